"""Copy the benchmark reports (benchmarks/results/<device>/report.md) into docs/benchmarks.md
(``TARGET``; the README links to it and quotes a few figures), between the markers
``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->``, and, when
benchmarks/results/gpu-acceptance/acceptance.jsonl exists (``bash benchmarks/gpu_acceptance.sh``), its rows as
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
# The acceptance run's sections (benchmarks/acceptance.py), in its order, with their headings.
ACC_SECTIONS = (
    ("imagenet", "Headline: pre-training from an ImageNet-shaped JPEG folder (`benchmarks.imagenet`)"),
    ("kernels", "Fused loss kernels vs GEMM form vs eager vs torch.compile (`benchmarks.kernels --sizes headline`)"),
    ("compiled", "Compiled kernel variants (`python -m fastssl.kernels.compiled`)"),
    ("pipelines", "Data pipelines per method: DALI GPU / DALI CPU / DataLoader (`benchmarks.pipelines`)"),
    ("train_losses", "Training losses, `loss.impl=fused` vs `eager` (`benchmarks.train_step --compare-impls`)"),
    ("knn", "kNN graph (`benchmarks.knn`)"),
    ("doctor", "Doctor: every component against its reference (`python -m fastssl.doctor --quick`)"),
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


def _doctor_md(versions: dict, components: list, verdict: str = "") -> str:
    v = versions
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
        "omegaconf",
    )
    ver = ", ".join(
        f"{k} {'; '.join(v[k]) if isinstance(v.get(k), list) else v.get(k)}"
        for k in keys
        if k in v and v[k] not in (None, [])
    )
    lines = [f"Versions: {ver}" if ver else "", "", "| component | status | detail | s |", "|---|---|---|---|"]
    for r in components:
        st = r.get("status", "?") + (f": {r['why']}" if r.get("why") else "")
        lines.append(
            f"| {_cell(r.get('component', r.get('id', '?')))} | {_cell(st)} | {_cell(r.get('detail', ''))} | "
            f"{'' if r.get('seconds') is None else r['seconds']} |"
        )
    if verdict:
        lines += ["", f"{verdict}."]
    return "\n".join(lines).strip()


def _rows_md(rows: list) -> str:
    """A plain table of the rows a section emitted (a section stopped before its own table)."""
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "section"]
    keys = [k for k in keys if all(not isinstance(r.get(k), (dict, list)) for r in rows)][:10]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else _cell(r.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def read_acceptance(folder: str):
    """(rows by section, the last section record by section) from ``folder``/acceptance.jsonl."""
    rows, records = {}, {}
    with open(os.path.join(folder, "acceptance.jsonl")) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:  # (a line cut by a kill)
                continue
            kind = obj.get("record")
            if kind == "section":
                records[obj["section"]] = obj
            elif kind is None:
                rows.setdefault(obj.get("section", "?"), []).append(obj)
            else:
                records.setdefault((obj.get("section"), kind), obj)
    return rows, records


def acceptance_section(folder: str = ACCEPTANCE):
    """The "GPU acceptance" section of docs/benchmarks.md from ``folder``/acceptance.jsonl (the
    acceptance run's rows and section records), or None when there is none."""
    if not os.path.isfile(os.path.join(folder, "acceptance.jsonl")):
        return None
    rows, records = read_acceptance(folder)
    envs, bodies = [], []
    for name, heading in ACC_SECTIONS:
        env = records.get(name)
        mine = rows.get(name, [])
        if env is None:
            if not mine:
                continue  # (not run this time: --only)
            env = {"section": name, "status": "stopped", "why": "the run ended inside this section"}
        envs.append(env)
        if name == "doctor":
            ver = records.get((name, "versions"), {})
            body = _doctor_md(ver.get("versions", {}), mine, ver.get("verdict", ""))
        else:
            body = (env.get("markdown") or "").strip() or (_rows_md(mine) if mine else "")
        if env.get("status") not in ("ok",) and env.get("stderr_tail"):
            tail = "\n".join(env["stderr_tail"].splitlines()[-12:])
            body += f"\n\nLast lines of its stderr:\n\n```\n{tail}\n```"
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
        f"{total:.0f} s in all, one command, each section under its own time limit, every row kept as measured.",
        "",
        "| section | status | rows | seconds | limit |",
        "|---|---|---|---|---|",
    ]
    head += [
        f"| {e['section']} | {_cell(_status(e))} | {len(rows.get(e['section'], []))} | {e.get('seconds', '-')} | "
        f"{e.get('limit_s', '-')} |"
        for e in envs
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
            "`benchmarks/results/gpu-acceptance/acceptance.jsonl`."
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
