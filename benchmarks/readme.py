"""Copy the benchmark reports (benchmarks/results/<device>/report.md) into the README, between
the markers ``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->``.

    python -m benchmarks.readme          # rewrite README.md
    python -m benchmarks.readme --check  # exit 1 if README.md is out of date
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def section(results=os.path.join(ROOT, "benchmarks", "results")) -> str:
    parts = []
    for dev in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        rep = os.path.join(results, dev, "report.md")
        if os.path.isfile(rep):
            body = open(rep).read().strip()
            body = body.replace("\n## ", "\n#### ").replace("# fastssl benchmarks on", "### Benchmarks on", 1)
            pngs = sorted(f for f in os.listdir(os.path.join(results, dev)) if f.endswith(".png"))
            plots = " ".join(f"![{f[:-4]} on {dev}](benchmarks/results/{dev}/{f})" for f in pngs)
            parts.append(body + (f"\n\n{plots}" if plots else "") + f"\n\n(`benchmarks/results/{dev}/`)")
    return "\n\n".join(parts) or "No benchmark reports yet: run `python -m benchmarks`."


def render(readme: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the markers {BEGIN} ... {END}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{section()}\n{END}{tail}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    a = p.parse_args(argv)
    path = os.path.join(ROOT, "README.md")
    old = open(path).read()
    new = render(old)
    if a.check:
        if new != old:
            print("README.md's benchmark section is out of date: run python -m benchmarks.readme", file=sys.stderr)
            return 1
        return 0
    with open(path, "w") as f:
        f.write(new)
    print("README.md updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
