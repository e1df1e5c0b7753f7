"""Copy the benchmark reports (benchmarks/results/<device>/report.md) into docs/benchmarks.md
(``TARGET``; the README links to it and quotes a few figures), between the markers
``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->``, and, when the folder
benchmarks/results/gpu-acceptance/ exists (``bash benchmarks/gpu_acceptance.sh``), its files as
the "GPU acceptance" section between ``<!-- gpu-acceptance:begin -->`` and
``<!-- gpu-acceptance:end -->`` (inserted after the benchmark section the first time).

    python -m benchmarks.readme          # rewrite docs/benchmarks.md
    python -m benchmarks.readme --check  # exit 1 if docs/benchmarks.md is out of date
    python -m benchmarks.readme --acceptance DIR --print-acceptance   # print DIR's section only
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.path.join(ROOT, "docs", "benchmarks.md")  # the page holding the tables (images linked from docs/)
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
ACC_BEGIN, ACC_END = "<!-- gpu-acceptance:begin -->", "<!-- gpu-acceptance:end -->"
ACCEPTANCE = os.path.join(ROOT, "benchmarks", "results", "gpu-acceptance")
# The acceptance script's files: (section, file, heading).
ACC_SECTIONS = (
    ("doctor", "doctor.json", "Doctor: every component against its reference (`python -m fastssl.doctor`)"),
    (
        "kernels",
        "kernels.json",
        "Fused loss kernels: fused vs eager vs torch.compile (`benchmarks.kernels --sizes headline`)",
    ),
    ("compiled", "compiled.md", "Compiled kernel configurations (`python -m fastssl.kernels.compiled`)"),
    (
        "pipelines",
        "pipelines.json",
        "Data pipelines per method: DALI GPU / DALI CPU / DataLoader (`benchmarks.pipelines`)",
    ),
    (
        "train_losses",
        "train_losses.json",
        "Training losses, `loss.impl=fused` vs `eager` (`benchmarks.train_step --compare-impls`)",
    ),
    ("train_step", "train_step.json", "Training images/s and data-stall per method (`benchmarks.train_step`)"),
    ("knn", "knn.json", "kNN graph (`benchmarks.knn`)"),
)


def section(results=os.path.join(ROOT, "benchmarks", "results")) -> str:
    parts = []
    for dev in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        rep = os.path.join(results, dev, "report.md")
        if os.path.isfile(rep):
            body = open(rep).read().strip()
            body = body.replace("\n## ", "\n#### ").replace("# fastssl benchmarks on", "### Benchmarks on", 1)
            pngs = sorted(f for f in os.listdir(os.path.join(results, dev)) if f.endswith(".png"))
            plots = " ".join(f"![{f[:-4]} on {dev}](../benchmarks/results/{dev}/{f})" for f in pngs)
            parts.append(body + (f"\n\n{plots}" if plots else "") + f"\n\n(`benchmarks/results/{dev}/`)")
    return "\n\n".join(parts) or "No benchmark reports yet: run `python -m benchmarks`."


def _status(env: dict) -> str:
    s = env.get("status", "?") + (f": {env['why']}" if env.get("why") else "")
    if "cpu_status" in env:
        s += (
            f"; ran instead: {env.get('ran_instead') or 'the CPU version'} ({env['cpu_status']}"
            + (f": {env['cpu_why']}" if env.get("cpu_why") else "")
            + ")"
        )
    return s


def _cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _doctor_md(doc: dict) -> str:
    v = doc.get("versions", {})
    keys = (
        "python",
        "torch",
        "cuda_runtime",
        "driver",
        "gpus",
        "triton",
        "nvidia.dali",
        "faiss",
        "faiss_gpus",
        "apex",
        "omegaconf",
    )
    ver = ", ".join(
        f"{k} {'; '.join(v[k]) if isinstance(v.get(k), list) else v.get(k)}"
        for k in keys
        if k in v and v[k] not in (None, [])
    )
    lines = [f"Versions: {ver}" if ver else "", "", "| component | status | detail | s |", "|---|---|---|---|"]
    for r in doc.get("components", []):
        st = r.get("status", "?") + (f": {r['why']}" if r.get("why") else "")
        lines.append(
            f"| {_cell(r.get('component', r.get('id', '?')))} | {_cell(st)} | {_cell(r.get('detail', ''))} | "
            f"{'' if r.get('seconds') is None else r['seconds']} |"
        )
    if doc.get("verdict"):
        lines += ["", f"{doc['verdict']}."]
    return "\n".join(lines).strip()


def acceptance_section(folder: str = ACCEPTANCE):
    """The "GPU acceptance" section of docs/benchmarks.md from ``folder`` (the acceptance script's files), or
    None when the folder does not exist."""
    if not os.path.isdir(folder):
        return None
    envs, bodies = [], []
    for name, fname, heading in ACC_SECTIONS:
        path = os.path.join(folder, fname)
        if not os.path.isfile(path):
            envs.append({"section": name, "status": "missing", "why": f"no {fname}"})
            continue
        if fname.endswith(".md"):
            text = open(path).read()
            first, _, rest = text.partition("\n")
            env = {"section": name, "status": "?"}
            if first.startswith("<!-- acceptance ") and first.rstrip().endswith("-->"):
                try:
                    env.update(json.loads(first.strip()[len("<!-- acceptance ") : -len("-->")]))
                    text = rest
                except ValueError:
                    pass
            body = text.strip()
        else:
            try:
                env = json.load(open(path))
            except ValueError as e:
                envs.append({"section": name, "status": "unreadable", "why": f"{fname}: {e}"})
                continue
            body = _doctor_md(env) if name == "doctor" else env.get("markdown", "").strip()
            if env.get("status") not in ("ok", None) and env.get("stderr_tail"):
                tail = "\n".join(env["stderr_tail"].splitlines()[-12:])
                body += f"\n\nLast lines of its stderr:\n\n```\n{tail}\n```"
        envs.append(env)
        status = "" if env.get("status") == "ok" else f"Status: {_status(env)}.\n\n"
        bodies.append(f"#### {heading}\n\n{status}{body or '(no output)'}")
    first = next((e for e in envs if e.get("device")), {})
    device = first.get("device") or "unknown device"
    total = sum(float(e.get("seconds") or 0) for e in envs)
    tiny = " (`--tiny`: CPU-sized)" if first.get("tiny") else ""
    where = (
        os.path.relpath(folder, ROOT) if os.path.abspath(folder).startswith(ROOT + os.sep) else os.path.basename(folder)
    )
    head = [
        f"### GPU acceptance on {device}{tiny}",
        "",
        f"`bash benchmarks/gpu_acceptance.sh{' --tiny' if first.get('tiny') else ''}` wrote `{where}/`; "
        f"{total:.0f} s in all, one command, each section under its own time limit.",
        "",
        "| section | status | seconds | limit |",
        "|---|---|---|---|",
    ]
    head += [
        f"| {e['section']} | {_cell(_status(e))} | {e.get('seconds', '-')} | {e.get('limit_s', '-')} |" for e in envs
    ]
    return "\n".join(head) + "\n\n" + "\n\n".join(bodies)


def render(readme: str, acceptance: str = ACCEPTANCE) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{os.path.relpath(TARGET, ROOT)} lacks the markers {BEGIN} ... {END}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    out = f"{head}{BEGIN}\n{section()}\n{END}{tail}"
    acc = acceptance_section(acceptance)
    if ACC_BEGIN in out and ACC_END in out:
        h, r = out.split(ACC_BEGIN, 1)
        _, t = r.split(ACC_END, 1)
        acc = acc or (
            "No GPU acceptance run yet: `bash benchmarks/gpu_acceptance.sh` on a GPU machine writes "
            "`benchmarks/results/gpu-acceptance/`."
        )
        out = f"{h}{ACC_BEGIN}\n{acc}\n{ACC_END}{t}"
    elif acc is not None:  # the first time: the markers go right after the benchmark section
        out = out.replace(END, f"{END}\n\n{ACC_BEGIN}\n{acc}\n{ACC_END}", 1)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    p.add_argument("--acceptance", default=ACCEPTANCE, help="the GPU acceptance folder (default %(default)s)")
    p.add_argument("--print-acceptance", action="store_true", help="print the GPU acceptance section only")
    a = p.parse_args(argv)
    if a.print_acceptance:
        acc = acceptance_section(a.acceptance)
        if acc is None:
            print(f"no GPU acceptance folder at {a.acceptance}", file=sys.stderr)
            return 1
        print(acc)
        return 0
    path = TARGET
    old = open(path).read()
    new = render(old, a.acceptance)
    if a.check:
        if new != old:
            print("docs/benchmarks.md is out of date: run python -m benchmarks.readme", file=sys.stderr)
            return 1
        return 0
    with open(path, "w") as f:
        f.write(new)
    print("docs/benchmarks.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
