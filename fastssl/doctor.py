"""Check a machine for fastssl: versions, then every component on tiny inputs against its reference.

    python -m fastssl.doctor [--quick] [--json PATH] [--only NAME[,NAME]] [--jobs N] [--list]

Components (``--only`` takes an id or a group: kernel, pipeline, faiss, collectives, train):

* ``kernel:<name>``   each fused Triton kernel against its eager twin, values and gradients
                      (``fastssl.kernels.selfcheck``): compiled on a CUDA GPU, under the Triton
                      interpreter on a CPU (the row says "(interpreted)").
* ``pipeline:<method>`` the first batch of each registered method's recipe (or its own loader,
                      e.g. Exemplar-CNN's surrogate patches) from DALI GPU against DALI CPU; on a CPU, DALI
                      CPU against the torch DataLoader executor (and ``pipeline:dali-gpu`` says
                      "not available: no GPU"); and the tensor executor (on the GPU where there
                      is one) against the same reference.
* ``faiss``, ``faiss-gpu`` FAISS CPU neighbours against torch brute force; FAISS GPU against FAISS CPU.
* ``collectives``     all_reduce / all_gather / broadcast: NCCL across min(2, GPUs) processes on
                      CUDA (1 GPU: a world of 1 still initialises NCCL), gloo with 2 on a CPU.
* ``train:<method>``  2 steps of ``fastssl/train.py`` on the method's built-in config, tiny
                      (skipped by ``--quick``): exit code 0 and finite losses in metrics.jsonl.

The methods are the registry's (``fastssl.methods``, listed in a subprocess, in their
``tool_order``); each method's ``tiny`` overrides shrink its built-in config further.

Every component runs in its own subprocess with its own time limit, so one that fails, hangs
or crashes never stops the others; its reason is one line (the failing ones' stderr tails are
printed after the table).  Exit status 0 when everything present works ("not available" rows,
e.g. no GPU, are not failures), 1 otherwise.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHOD_GROUPS = ("pipeline", "train")  # the groups with one row per method
# Tiny sizes for the pipeline rows (plus each method's own ``tiny`` overrides).
PIPE_SIZES = ["data.builtin.num_train=256", "data.builtin.num_test=64", "data.batch_size=32", "data.num_workers=1"]
# The test suite's tiny run (tests/conftest.py TINY), for the training rows (plus the method's ``tiny``).
TRAIN_TINY = [
    "data.builtin.num_train=512",
    "data.builtin.num_test=256",
    "data.batch_size=32",
    "model.width=16",
    "train.progress=false",
    "train.log_every_steps=1",
    "data.num_workers=1",
    "train.tensorboard=false",
]
# Tolerances of the pipeline comparison (stated in the rows' detail):
GREY_MAX, GREY_MEAN = 4, 0.5  # float views: max / mean |a - b| in grey levels (1/255 / std in their units)
UINT8_MAX = 2  # uint8 patches: max |a - b| in grey levels
INT_SHARE = 0.01  # integer targets (bins): share of entries that may differ
# Per-component time limits in seconds (CPU, CUDA); --timeout overrides them all.
LIMITS = {
    "kernel": (240, 180),
    "pipeline": (180, 120),
    "faiss": (60, 60),
    "faiss-gpu": (60, 60),
    "collectives": (120, 120),
    "train": (240, 180),
    "list": (90, 90),
}
FAULT_ENV = "FASTSSL_FAULT_DOCTOR"  # a component id whose worker crashes on purpose (tests)


def _line(s: str, n: int = 240) -> str:
    """The first non-empty line of ``s``, at most ``n`` characters."""
    s = next((ln.strip() for ln in str(s).splitlines() if ln.strip()), "")
    return s if len(s) <= n else s[: n - 3] + "..."


def _err(e: BaseException) -> str:
    return _line(f"{type(e).__name__}: {e}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return _line(lines[-1]) if lines else ""


# --------------------------------------------------------------------------- versions


def _cuda():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _dist_version(*names):
    for n in names:
        try:
            return importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


DALI_DISTS = ("nvidia-dali-cuda130", "nvidia-dali-cuda120")  # (NGC images install DALI under these names too)
FAISS_DISTS = ("faiss-cuda", "faiss-gpu", "faiss-gpu-cu12", "faiss-cpu")


def extra_line(v: dict) -> str:
    """Which install extra fits this machine (pyproject.toml: cpu, cu12, cu13) and the DALI and
    FAISS builds installed now."""
    cuda = v.get("cuda_runtime")
    major = str(cuda).split(".")[0] if cuda and v.get("gpus") else None
    want = f"cu{major}" if major in ("12", "13") else "cpu"
    why = f"torch's CUDA {cuda} and a GPU" if want != "cpu" else "no CUDA GPU visible"
    have = [f"{n} {_dist_version(n)}" for n in DALI_DISTS + FAISS_DISTS if _dist_version(n)]
    return f"{want} ({why}: install fastssl with its [{want}] extra); installed: {', '.join(have) or 'neither DALI nor FAISS'}"


def versions() -> dict:
    """Versions of everything fastssl uses (None: not installed; a string saying why otherwise)."""
    v = {"fastssl": None, "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import fastssl

        v["fastssl"] = fastssl.__version__
    except Exception as e:
        v["fastssl"] = f"import failed: {_err(e)}"
    try:
        import torch

        v["torch"] = torch.__version__
        v["cuda_runtime"] = torch.version.cuda
        v["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        v["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            v["gpus"] = [
                f"{torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))}, "
                f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)"
                for i in range(torch.cuda.device_count())
            ]
        else:
            v["gpus"] = []
    except Exception as e:
        v["torch"] = f"import failed: {_err(e)}"
    v["driver"] = _driver()
    v["triton"] = _dist_version("triton", "pytorch-triton")  # not imported here: TRITON_INTERPRET is read on import
    try:
        import nvidia.dali as dali

        v["nvidia.dali"] = dali.__version__
    except Exception as e:
        v["nvidia.dali"] = None if isinstance(e, ImportError) else f"import failed: {_err(e)}"
    try:
        import faiss

        v["faiss"] = faiss.__version__
        v["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except Exception as e:
        v["faiss"] = None if isinstance(e, ImportError) else f"import failed: {_err(e)}"
    try:
        import apex  # noqa: F401

        v["apex"] = _dist_version("apex") or "installed"
    except Exception as e:
        v["apex"] = None if isinstance(e, ImportError) else f"import failed: {_err(e)}"
    v["omegaconf"] = _dist_version("omegaconf")
    v["extra"] = extra_line(v)
    return v


def _driver():
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            p = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
            )
            if p.returncode == 0 and p.stdout.strip():
                return p.stdout.strip().splitlines()[0].strip()
        except Exception:
            pass
    try:  # no nvidia-smi: the driver's CUDA API version from libcuda
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        ver = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(ver)) == 0:
            return f"CUDA driver API {ver.value // 1000}.{ver.value % 1000 // 10} (no nvidia-smi)"
    except Exception:
        pass
    return None


# --------------------------------------------------------------------------- workers (run in subprocesses)


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def work_list_kernels():
    from fastssl.kernels import selfcheck

    return "ok", "", json.dumps(list(selfcheck.KERNELS))


def work_list_methods():
    """The registered methods in their tool order, each with its ``tiny`` overrides."""
    from fastssl.methods import for_tools, get_method

    return "ok", "", json.dumps({m: list(get_method(m).tiny) for m in for_tools()})


def work_kernel(name):
    import torch

    from fastssl.kernels import selfcheck

    dev = _device()
    how = "compiled, cuda" if dev == "cuda" else "Triton interpreter, cpu"
    done = []
    for dtype in (torch.float32, torch.bfloat16):
        ok, why = selfcheck.check(name, dev, dtype)
        dt = str(dtype).split(".")[-1]
        if not ok:
            return "failed", f"{dt}: {_line(why) or 'check returned False'}", f"fused vs eager ({how})"
        done.append(dt)
    return "ok", "", f"fused vs eager, values and gradients, {' and '.join(done)} ({how})"


def _first_batch(method, pipeline):
    """The first batch of ``method``'s pretraining loader on ``pipeline``, as train.py builds it."""
    from fastssl.config import load_config
    from fastssl.data.sources import build_source
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    over = PIPE_SIZES + list(get_method(method).tiny) + [f"data.pipeline={pipeline}"]
    cfg = load_config(f"{method}/builtin", over)  # (the shipped config, by name)
    source = build_source(cfg)
    model = get_method(cfg.method.name)(
        cfg, build_backbone(cfg.model, source.image_size), source.image_size, len(source.pretrain)
    )
    model.begin_stage(0, source)
    loader = model.loader(
        cfg, source, 0, 1, 0 if pipeline == "dali-gpu" else None, _device() if pipeline == "tensor" else "cpu"
    )
    loader.set_epoch(0)
    batch = next(iter(loader))
    out = {
        "index": batch["index"].cpu().clone(),
        "views": [v.cpu().clone() for v in batch["views"]],
        "std": min(source.std),
    }
    del loader, batch
    return out


def compare_batches(a, b, std):
    """(problems, summary) of two batches of the same plan, within the module's tolerances:
    float tensors max / mean |a - b| <= GREY_MAX / GREY_MEAN grey levels (a grey level is
    1/255/std in normalised units), uint8 <= UINT8_MAX levels, integer bins <= INT_SHARE differing."""
    import torch

    problems = []
    if not torch.equal(a["index"], b["index"]):
        problems.append("the batches hold different images (index differs)")
    if len(a["views"]) != len(b["views"]):
        problems.append(f"{len(a['views'])} vs {len(b['views'])} tensors per batch")
    tmax, tmean = GREY_MAX / 255 / std, GREY_MEAN / 255 / std
    fl, u8, ints = [], [], []
    for k, (x, y) in enumerate(zip(a["views"], b["views"])):
        what = f"tensor {k} ({str(x.dtype).split('.')[-1]} {tuple(x.shape)})"
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{what} vs {str(y.dtype).split('.')[-1]} {tuple(y.shape)}")
        elif x.dtype.is_floating_point:
            d = (x.double() - y.double()).abs()
            mx, mn = d.max().item(), d.mean().item()
            fl.append((mx, mn))
            if not (math.isfinite(mx) and mx <= tmax and mn <= tmean):
                problems.append(f"{what}: max |d| {mx:.3g} (tol {tmax:.3g}), mean {mn:.3g} (tol {tmean:.3g})")
        elif x.dtype == torch.uint8:
            mx = (x.int() - y.int()).abs().max().item()
            u8.append(mx)
            if mx > UINT8_MAX:
                problems.append(f"{what}: max |d| {mx} grey levels (tol {UINT8_MAX})")
        else:
            share = (x != y).double().mean().item()
            ints.append(share)
            if share > INT_SHARE:
                problems.append(f"{what}: {share:.2%} of entries differ (tol {INT_SHARE:.0%})")
    parts = []
    if fl:
        parts.append(
            f"floats max|d| {max(m for m, _ in fl):.2g} (tol {tmax:.2g} = {GREY_MAX} grey levels), "
            f"mean {max(m for _, m in fl):.2g} (tol {tmean:.2g})"
        )
    if u8:
        parts.append(f"uint8 max|d| {max(u8)} (tol {UINT8_MAX})")
    if ints:
        parts.append(f"bins {max(ints):.2%} differ (tol {INT_SHARE:.0%})")
    return problems, "; ".join(parts)


def work_pipeline(method):
    import gc

    pair = ("dali-gpu", "dali-cpu") if _device() == "cuda" else ("dali-cpu", "torch")
    a = _first_batch(method, pair[0])
    gc.collect()
    b = _first_batch(method, pair[1])
    problems, summary = compare_batches(a, b, a["std"])
    detail = f"{pair[0]} vs {pair[1]}, first batch ({len(a['index'])} images, {len(a['views'])} tensors): {summary}"
    gc.collect()
    t = _first_batch(method, "tensor")  # the tensor executor (on the GPU where there is one) vs the same reference
    more, tsummary = compare_batches(t, b, t["std"])
    problems += [f"tensor: {p}" for p in more]
    detail += f"; tensor ({_device()}) vs {pair[1]}: {tsummary}"
    return ("failed" if problems else "ok"), "; ".join(problems), detail


def _unit(n, d, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _knn_check(x, idx, k, ref_name):
    """idx (n, k) must be a valid top-k of x @ x.T (up to ties within 1e-5): (problem or '', rows equal)."""
    sims = x.double() @ x.double().t()
    kth = sims.topk(k, dim=1).values[:, -1:]
    got = sims.gather(1, idx.long().cpu())
    exact = sims.topk(k, dim=1).indices
    same = sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(idx.cpu(), exact))
    bad = int(((got < kth - 1e-5) | (idx.cpu() < 0)).any(dim=1).sum())
    if bad:
        return f"{bad} of {len(x)} rows have a neighbour that is not among the {k} nearest ({ref_name})", same
    return "", same


def work_faiss():
    from fastssl.knn import KNNIndex, have_faiss

    if not have_faiss():
        return "not available", "FAISS is not installed (kNN search runs exact on torch)", ""

    n, d, k = 2000, 64, 10
    x = _unit(n, d, 0)
    _, idx = KNNIndex(x, "ip", use_gpu=False).search(x, k)
    problem, same = _knn_check(x, idx, k, "torch brute force, float64")
    return (
        ("failed" if problem else "ok"),
        problem,
        f"FAISS CPU flat vs torch brute force: {n} x {d} unit vectors, k={k}: {same}/{n} rows with the same set",
    )


def work_faiss_gpu():
    import torch

    from fastssl.knn import KNNIndex, have_faiss

    if not have_faiss():
        return "not available", "FAISS is not installed (kNN search runs exact on torch)", ""
    import faiss

    if not (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0):
        return "not available", "faiss has no GPU support (a CPU-only build: get_num_gpus() = 0)", ""
    n, d, k = 4000, 64, 10
    x = _unit(n, d, 1)
    index = KNNIndex(x.cuda(), "ip", use_gpu=True)
    if not index.on_gpu:
        return "failed", "KNNIndex(use_gpu=True) built a CPU index although faiss sees a GPU", ""
    _, gi = index.search(x.cuda(), k)
    _, ci = KNNIndex(x, "ip", use_gpu=False).search(x, k)
    same = sum(set(a.tolist()) == set(b.tolist()) for a, b in zip(gi.cpu(), ci))
    problem, _ = _knn_check(x, gi.cpu(), k, "exact, float64")
    torch.cuda.synchronize()
    return (
        ("failed" if problem else "ok"),
        problem,
        f"FAISS GPU vs CPU flat: {n} x {d}, k={k}: {same}/{n} rows with the same set (ties within 1e-5 allowed)",
    )


def _collective_rank(rank, world, backend, init_file):
    import datetime

    import torch
    import torch.distributed as dist

    kw = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        kw["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
        **kw,
    )
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    try:
        t = torch.full((1000,), float(rank + 1), device=dev)
        dist.all_reduce(t)
        want = world * (world + 1) / 2
        if not torch.all(t == want):
            raise AssertionError(f"all_reduce: got {t[0].item()}, want {want}")
        parts = [torch.empty(7, device=dev) for _ in range(world)]
        dist.all_gather(parts, torch.arange(7, device=dev, dtype=torch.float32) + 100 * rank)
        for r, p in enumerate(parts):
            if not torch.equal(p.cpu(), torch.arange(7, dtype=torch.float32) + 100 * r):
                raise AssertionError(f"all_gather: rank {r}'s part is wrong on rank {rank}")
        b = torch.arange(5, device=dev, dtype=torch.float32) * (7.0 if rank == 0 else 0.0)
        dist.broadcast(b, src=0)
        if not torch.equal(b.cpu(), torch.arange(5, dtype=torch.float32) * 7.0):
            raise AssertionError(f"broadcast: wrong values on rank {rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def work_collectives():
    import torch
    import torch.multiprocessing as mp

    if torch.cuda.is_available():
        backend, world = "nccl", min(2, torch.cuda.device_count())
    else:
        backend, world = "gloo", 2
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_collective_rank, args=(world, backend, os.path.join(tmp, "store")), nprocs=world, join=True)
        except mp.ProcessRaisedException as e:
            return "failed", _last_line(str(e)), f"{backend}, world {world}"
        except mp.ProcessExitedException as e:
            return "failed", _err(e), f"{backend}, world {world}"
    return "ok", "", f"{backend}, world {world} (file store): all_reduce, all_gather, broadcast, barrier"


WORKERS = {
    "list": work_list_kernels,
    "methods": work_list_methods,
    "kernel": work_kernel,
    "pipeline": work_pipeline,
    "faiss": work_faiss,
    "faiss-gpu": work_faiss_gpu,
    "collectives": work_collectives,
}


def worker_main(cid: str, result: str) -> int:
    """Run one component in this process; its result goes to the JSON file ``result``."""
    if os.environ.get(FAULT_ENV) == cid:
        print(f"fault injected ({FAULT_ENV}={cid})", file=sys.stderr, flush=True)
        os._exit(3)
    group, _, arg = cid.partition(":")
    fn = WORKERS[group]
    try:
        out = fn(arg) if arg else fn()
    except Exception as e:
        import traceback

        traceback.print_exc()
        out = ("failed", _err(e), "")
    with open(result, "w") as f:
        json.dump(out if isinstance(out, dict) else dict(zip(("status", "why", "detail"), out)), f)
    return 0


# --------------------------------------------------------------------------- the driver


def _env(extra=None, drop=()):
    e = dict(os.environ)
    e["PYTHONPATH"] = ROOT + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.setdefault("OMP_NUM_THREADS", "2")
    for k in drop:
        e.pop(k, None)
    e.update(extra or {})
    return e


_LIVE: set = set()  # the component subprocesses running now (each leads its own process group)


def _kill_group(p) -> None:
    import signal

    try:
        os.killpg(p.pid, signal.SIGKILL)
    except OSError:
        pass


def run_cmd(cmd, limit, env=None, cwd=ROOT):
    """(returncode or None on timeout, stdout, stderr) of ``cmd`` within ``limit`` seconds; the
    whole process group is killed on timeout (also the command's own children)."""
    p = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _LIVE.add(p)
    try:
        out, err = p.communicate(timeout=limit)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        _kill_group(p)
        out, err = p.communicate()
        return None, out, err
    finally:
        _LIVE.discard(p)


def run_worker(cid, limit, env):
    """A component's worker subprocess -> (status, why, detail, log)."""
    with tempfile.TemporaryDirectory(prefix="fastssl-doctor-") as tmp:
        res = os.path.join(tmp, "result.json")
        rc, out, err = run_cmd([sys.executable, "-m", "fastssl.doctor", "--worker", cid, "--result", res], limit, env)
        log = (out + err)[-4000:]
        if rc is None:
            return "failed", f"timed out after {limit:g} s", "", log
        if not os.path.isfile(res):
            return "failed", f"worker exited {rc}" + (f": {_last_line(err)}" if _last_line(err) else ""), "", log
        with open(res) as f:
            r = json.load(f)
        return r["status"], r.get("why", ""), r.get("detail", ""), log if r["status"] == "failed" else ""


def run_train(method, tiny, limit, cuda):
    precision = "bf16" if cuda else "fp32"
    with tempfile.TemporaryDirectory(prefix="fastssl-doctor-train-") as out:
        cmd = [
            sys.executable,
            os.path.join(ROOT, "fastssl", "train.py"),
            "--config",
            f"{method}/builtin",
            f"out_dir={out}",
            *TRAIN_TINY,
            *tiny,
            "train.max_steps=2",
            f"train.precision={precision}",
            "train.ckpt_every_steps=100000",
        ]
        rc, so, se = run_cmd(cmd, limit, _env())
        log = (so + se)[-4000:]
        if rc is None:
            return "failed", f"timed out after {limit:g} s", "", log
        if rc != 0:
            return "failed", f"exit code {rc}: {_last_line(se) or _last_line(so)}", "", log
        path = os.path.join(out, "metrics.jsonl")
        recs = [json.loads(ln) for ln in open(path)] if os.path.isfile(path) else []
        losses = [r["loss"] for r in recs if "loss" in r]
        if len(losses) < 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in losses):
            return "failed", f"metrics.jsonl losses {losses} (want 2 finite values)", "", log
        head = next((ln for ln in (so + "\n" + se).splitlines() if ln.startswith("fastssl: ") and " | " in ln), "")
        pipe = next((p.split("pipeline ", 1)[1] for p in head.split(" | ") if p.startswith("pipeline ")), "?")
        return "ok", "", f"2 steps, {precision}, pipeline {pipe}: loss {losses[0]:.4g} -> {losses[-1]:.4g}", ""


# --------------------------------------------------------------------------- the registry


def check_in_worker(runner, cid):
    """A component checked by its worker (``WORKERS``) in a subprocess: kernels under the kernels' env."""
    group = cid.split(":")[0]
    return run_worker(cid, runner.limit(group), runner.kernel_env if group == "kernel" else _env())


def check_training(runner, cid):
    method = cid.split(":")[1]
    return run_train(method, runner.methods[method], runner.limit("train"), runner.cuda)


def _kernel_rows(cuda, kernels, methods):
    if isinstance(kernels, str):
        return [("kernel", "kernels", ("failed", kernels))]
    label = "" if cuda else " (interpreted)"
    return [(f"kernel:{k}", f"kernel {k}{label}", check_in_worker) for k in kernels]


def _pipeline_rows(cuda, kernels, methods):
    rows = []
    if isinstance(methods, str):
        rows.append(("methods", "methods", ("failed", methods)))
        methods = ()
    pipe = "dali-gpu vs dali-cpu" if cuda else "dali-cpu vs torch"
    rows += [(f"pipeline:{m}", f"pipeline {m} ({pipe})", check_in_worker) for m in methods]
    if not cuda:
        rows.append(("pipeline:dali-gpu", "pipeline dali-gpu", ("not available", "no GPU")))
    return rows


def _faiss_rows(cuda, kernels, methods):
    return [
        ("faiss", "faiss cpu vs torch", check_in_worker),
        ("faiss-gpu", "faiss gpu vs cpu", check_in_worker if cuda else ("not available", "no GPU")),
    ]


def _collective_rows(cuda, kernels, methods):
    return [("collectives", f"collectives ({'nccl' if cuda else 'gloo'})", check_in_worker)]


def _train_rows(cuda, kernels, methods):
    return [] if isinstance(methods, str) else [(f"train:{m}", f"train {m} (2 steps)", check_training) for m in methods]


# group -> its rows (cuda, kernels, methods) -> [(id, display name, check)], in the table's order; a
# check is ``fn(runner, id) -> (status, why, detail, log)`` or a given (status, why)
COMPONENTS = {
    "kernel": _kernel_rows,
    "pipeline": _pipeline_rows,
    "faiss": _faiss_rows,
    "collectives": _collective_rows,
    "train": _train_rows,
}
GROUPS = tuple(COMPONENTS)


def plan(quick, only, cuda, kernels, methods=()):
    """The rows to run: (id, display name, check), the registry's groups in order (``quick``: no
    training rows); ``kernels`` and ``methods``: the names, or why they could not be listed."""
    rows = []
    for group, rows_of in COMPONENTS.items():
        if not (quick and group == "train"):
            rows += rows_of(cuda, kernels, methods)
    if only:
        rows = [r for r in rows if _selected(r[0], only)]
    return rows


def _group(name: str) -> str:
    """The group of a component id or of an --only name: kernel:sc_loss -> kernel, pipelines -> pipeline,
    faiss-gpu -> faiss."""
    head = name.split(":")[0]
    if head == "faiss-gpu":
        return "faiss"
    return head[:-1] if head.endswith("s") and head[:-1] in GROUPS else head


def _selected(cid, only):
    if cid == "kernel":  # the row saying the kernels could not be listed: any kernel selection shows it
        return any(_group(o) == "kernel" for o in only)
    if cid == "methods":  # the same for the methods: any pipeline or train selection
        return any(_group(o) in METHOD_GROUPS for o in only)
    return any(o == cid or (":" not in o and o != "faiss-gpu" and _group(o) == _group(cid)) for o in only)


def list_names(only, limit, kernel_env):
    """(kernels, methods) the selection needs, each listed by a worker: the names (methods: with
    their ``tiny`` overrides), or why they could not be listed."""
    kernels, methods = [], {}
    if only is None or any(_group(o) == "kernel" for o in only):
        status, why, detail, _ = run_worker("list", limit("list"), kernel_env)
        kernels = (
            json.loads(detail) if status == "ok" else f"cannot list the kernels (fastssl.kernels.selfcheck): {why}"
        )
    if only is None or any(_group(o) in METHOD_GROUPS for o in only):
        status, why, detail, _ = run_worker("methods", limit("list"), _env())
        methods = json.loads(detail) if status == "ok" else f"cannot list the methods (fastssl.methods): {why}"
    return kernels, methods


# --------------------------------------------------------------------------- the runner


class Runner:
    """Runs the rows' checks (``jobs`` at once), prints a progress line as each ends and keeps
    the ``--json`` file up to date (a SIGTERM writes what is done and stops)."""

    def __init__(self, a, only, cuda, v, t0):
        self.a, self.only, self.cuda, self.versions, self.t0 = a, only, cuda, v, t0
        self.kernel_env = _env(drop=("TRITON_INTERPRET",)) if cuda else _env({"TRITON_INTERPRET": "1"})
        self.rows, self.methods, self.results, self.done = [], {}, {}, 0
        self.lock = threading.Lock()

    def limit(self, group):
        return self.a.timeout or LIMITS[group][1 if self.cuda else 0]

    def table_now(self, unfinished="not run"):
        return [
            self.results.get(cid)
            or {"id": cid, "component": name, "status": "not run", "why": unfinished, "detail": "", "seconds": None}
            for cid, name, _ in self.rows
        ]

    def write_json(self, table, complete, verdict="", total=None):
        if not self.a.json:
            return
        path = self.a.json
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        doc = {
            "versions": self.versions,
            "device": "cuda" if self.cuda else "cpu",
            "quick": self.a.quick,
            "only": self.only,
            "complete": complete,
            "components": table,
            "ok": complete and not any(r["status"] == "failed" for r in table),
            "verdict": verdict,
            "seconds": round(total if total is not None else time.perf_counter() - self.t0, 1),
        }
        with open(path + ".tmp", "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(path + ".tmp", path)

    def stop(self, signum, frame):  # e.g. the acceptance script's timeout: stop the components, keep what is done
        import signal

        for proc in list(_LIVE):
            _kill_group(proc)
        name = signal.Signals(signum).name
        with self.lock:
            self.write_json(self.table_now(f"doctor stopped by {name}"), False, f"stopped by {name}")
        print(f"\nfastssl doctor: stopped by {name}", flush=True)
        os._exit(128 + signum)

    def one(self, row):
        cid, name, check = row
        t = time.perf_counter()
        status, why, detail, log = (check[0], check[1], "", "") if isinstance(check, tuple) else check(self, cid)
        r = {
            "id": cid,
            "component": name,
            "status": status,
            "why": why,
            "detail": detail,
            "seconds": round(time.perf_counter() - t, 1),
        }
        if log and status == "failed":
            r["log"] = log
        with self.lock:
            self.results[cid] = r
            self.done += 1
            print(
                f"[{self.done:2d}/{len(self.rows)}] {name}: {status}{': ' + why if why else ''} ({r['seconds']:.1f} s)",
                flush=True,
            )
            self.write_json(self.table_now("running or waiting"), False)
        return r

    def run(self, rows, methods):
        """The rows' results, in the rows' order."""
        self.rows, self.methods = rows, methods
        if threading.current_thread() is threading.main_thread():
            import signal

            signal.signal(signal.SIGTERM, self.stop)
        jobs = self.a.jobs or max(1, min(4, (os.cpu_count() or 1) // 4))
        if jobs > 1:
            with concurrent.futures.ThreadPoolExecutor(jobs) as ex:
                list(ex.map(self.one, rows))
        else:
            for r in rows:
                self.one(r)
        return [self.results[cid] for cid, _, _ in rows]


# --------------------------------------------------------------------------- the renderer


VERSION_KEYS = (
    "fastssl",
    "python",
    "torch",
    "cuda_runtime",
    "cudnn",
    "driver",
    "gpus",
    "triton",
    "nvidia.dali",
    "faiss",
    "faiss_gpus",
    "apex",
    "omegaconf",
    "cpus",
    "extra",
)


def print_versions(v) -> None:
    print("fastssl doctor")
    for k in VERSION_KEYS:
        val = v.get(k)
        if k == "gpus":
            val = "; ".join(val) if val else "none (no CUDA GPU visible)"
        if val is None:
            val = "n/a" if k in ("cuda_runtime", "cudnn", "driver") else "not installed"
        print(f"  {k:13s} {val}")
    print(flush=True)


def verdict_text(table) -> str:
    failed = sum(r["status"] == "failed" for r in table)
    if failed:
        return f"{failed} of {len(table)} components failed"
    na = sum(r["status"] == "not available" for r in table)
    return f"all {sum(r['status'] == 'ok' for r in table)} available components work" + (
        f" ({na} not available)" if na else ""
    )


def print_results(table, verdict, total) -> None:
    """The table, the last lines of each failed component's output, the verdict."""
    print()
    print(render_table(table))
    for r in table:
        if r["status"] == "failed" and r.get("log"):
            tail = "\n".join(r["log"].rstrip().splitlines()[-15:])
            print(f"\n--- {r['component']}: last lines of its output\n{tail}")
    print(f"\n{verdict} ({total:.0f} s)")


def status_text(r) -> str:
    return r["status"] + (f": {r['why']}" if r.get("why") else "")


def render_table(rows) -> str:
    """The component | status | detail table as aligned text."""
    head = ("component", "status", "detail")
    cells = [head] + [(r["component"], status_text(r), r.get("detail", "")) for r in rows]
    w0 = max(len(c[0]) for c in cells)
    w1 = min(60, max(len(c[1]) for c in cells))
    lines = [f"{c[0]:{w0}s} | {c[1]:{w1}s} | {c[2]}".rstrip() for c in cells]
    lines.insert(1, "-" * w0 + "-+-" + "-" * w1 + "-+-" + "-" * 6)
    return "\n".join(lines)


def render_markdown(rows) -> str:
    """The same table in markdown (the GPU acceptance section of docs/benchmarks.md)."""
    esc = lambda s: str(s).replace("|", "\\|")
    lines = ["| component | status | detail | s |", "|---|---|---|---|"]
    lines += [
        f"| {esc(r['component'])} | {esc(status_text(r))} | {esc(r.get('detail', ''))} | {r.get('seconds', '')} |"
        for r in rows
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fastssl.doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="skip the training steps")
    p.add_argument("--json", metavar="PATH", help="also write the versions and the table as JSON")
    p.add_argument("--only", metavar="NAME[,NAME]", help="components or groups, e.g. kernel,faiss or pipeline:sc")
    p.add_argument("--jobs", type=int, default=None, help="components run at once (default: 1 per 4 CPUs, 1 to 4)")
    p.add_argument("--timeout", type=float, default=None, help="time limit of every component, seconds")
    p.add_argument("--list", action="store_true", help="list the components and exit")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.only_names = [o.strip() for o in a.only.split(",") if o.strip()] if a.only else None
    if a.only_names and not a.worker:
        unknown = [o for o in a.only_names if _group(o) not in GROUPS]
        if unknown:
            p.error(f"--only: unknown component {unknown[0]!r} (groups: {', '.join(GROUPS)}, or e.g. pipeline:sc)")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        return worker_main(a.worker, a.result)
    t0 = time.perf_counter()
    only, cuda = a.only_names, _cuda()
    v = versions()
    print_versions(v)
    runner = Runner(a, only, cuda, v, t0)
    kernels, methods = list_names(only, runner.limit, runner.kernel_env)
    rows = plan(a.quick, only, cuda, kernels, methods)
    if not rows:
        print("no component selected")
        return 1
    if a.list:
        for cid, name, _ in rows:
            print(f"{cid:22s} {name}")
        return 0
    table = runner.run(rows, methods)
    total = time.perf_counter() - t0
    verdict = verdict_text(table)
    print_results(table, verdict, total)
    runner.write_json(table, True, verdict, total)
    return 1 if any(r["status"] == "failed" for r in table) else 0


if __name__ == "__main__":
    sys.exit(main())
