"""What a tensor-core path does to InvP's bank loss, measured against the fp32 eager twin: the
products of a bf16 bank (inputs rounded to bf16) and of TF32 (inputs rounded to 10 mantissa bits,
as the TF32 tensor cores take them), on the CPU with the eager loss (the fused kernel computes the
same maths from the same rounded inputs; tests/test_bank.py holds it to the twin).

    python -m benchmarks.bank_precision [--n 65536] [--d 128] [--b 256] [--k 4096] [--out DIR]

Two banks: random unit rows (InvP's bank at initialisation) and a clustered one (N/100 centres,
noise norm 0.6: a trained bank's shape).  Per bank and precision: L_ins and L_inv against fp32
(mean, largest absolute difference per row) and the overlap of each row's top-K background with
fp32's.  fastssl's choice, from these numbers: TF32 products over the fp32 bank (``loss.tf32``
auto), not a bf16 bank.  Results: bank-precision.{json,md} in benchmarks/results/<device>/.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import write_results  # noqa: E402
from fastssl.losses.bank_loss import BankLossSettings, bank_loss_eager  # noqa: E402


def tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32's 10 mantissa bits (round to nearest), kept in fp32."""
    i = x.float().contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


ROUND = {"bf16": lambda x: x.bfloat16().float(), "tf32": tf32}


def bank_of(kind: str, n: int, d: int, g: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return F.normalize(torch.randn(n, d, generator=g), dim=1)
    centres = F.normalize(torch.randn(max(1, n // 100), d, generator=g), dim=1)
    pick = torch.randint(0, len(centres), (n,), generator=g)
    return F.normalize(centres[pick] + 0.6 * torch.randn(n, d, generator=g) / d**0.5, dim=1)


def measure(kind: str, n: int, d: int, b: int, k: int, temperature: float = 0.07):
    g = torch.Generator().manual_seed(0)
    bank = bank_of(kind, n, d, g)
    idx = torch.randint(0, n, (b,), generator=g)
    f = F.normalize(bank[idx] + 0.3 * torch.randn(b, d, generator=g) / d**0.5, dim=1)
    pos = torch.randint(0, n, (b, 20), generator=g)
    settings = BankLossSettings(temperature=temperature, background=k, hard_positives=10)
    ref_ins, ref_inv = bank_loss_eager(f, bank, idx, pos, settings)
    ref_top = (f @ bank.t()).topk(k, dim=1).indices
    rows = []
    for name, q in ROUND.items():
        fq, bq = q(f), q(bank)
        ins, inv = bank_loss_eager(fq, bq, idx, pos, settings)
        top = (fq @ bq.t()).topk(k, dim=1).indices
        overlap = torch.tensor([len(set(a.tolist()) & set(c.tolist())) / k for a, c in zip(top, ref_top)])
        rows.append(
            {
                "bank": kind,
                "precision": name,
                "N": n,
                "D": d,
                "B": b,
                "K": k,
                "l_ins_mean": ins.mean().item(),
                "l_ins_mean_fp32": ref_ins.mean().item(),
                "l_ins_max_abs_diff": (ins - ref_ins).abs().max().item(),
                "l_inv_max_abs_diff": (inv - ref_inv).nan_to_num().abs().max().item(),
                "topk_overlap_mean": overlap.mean().item(),
                "topk_overlap_min": overlap.min().item(),
            }
        )
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=65536)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--b", type=int, default=256)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    k = min(a.k, a.n // 4)
    rows = [r for kind in ("random", "clustered") for r in measure(kind, a.n, a.d, a.b, k)]
    lines = [
        "| bank | precision | L_ins mean (fp32) | max abs diff L_ins | max abs diff L_inv | top-K overlap mean (min) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['bank']} | {r['precision']} | {r['l_ins_mean']:.5f} ({r['l_ins_mean_fp32']:.5f}) | "
            f"{r['l_ins_max_abs_diff']:.1e} | {r['l_inv_max_abs_diff']:.1e} | "
            f"{r['topk_overlap_mean']:.4f} ({r['topk_overlap_min']:.4f}) |"
        )
    table = "\n".join(lines) + (
        f"\n\nN = {a.n:,}, D = {a.d}, B = {a.b}, K = {k:,}, temperature 0.07; against the fp32 eager loss and fp32 top-K."
    )
    print(table)
    write_results("bank-precision", rows, table, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
