"""Per-run metrics: ``metrics.jsonl`` (one JSON object per logging step), TensorBoard scalars
and a progress bar, all on rank 0.  Also measures data-stall: the share of step time spent
waiting for the data pipeline."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict

import torch


class StepTimer:
    """Accumulates time waiting for data vs. total step time over a logging window."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.data = 0.0
        self.steps = 0

    def data_wait(self, seconds: float):
        self.data += seconds

    def step_done(self):
        self.steps += 1

    def read(self, images_per_step: int) -> Dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        total = time.perf_counter() - self.t0
        out = {
            "images_per_s": images_per_step * self.steps / max(total, 1e-9),
            "data_stall": self.data / max(total, 1e-9),
            "step_time_s": total / max(self.steps, 1),
        }
        if self.device.type == "cuda":  # (the allocator's own count: no device read)
            out["gpu_mem_peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.reset()
        return out


class MetricsLogger:
    def __init__(
        self,
        out_dir: str,
        enabled: bool,
        total_steps: int,
        initial_step: int,
        tensorboard: bool = True,
        progress: bool = True,
    ):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.f = None
        if not enabled:
            return
        self.f = open(os.path.join(out_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        self.last_print = 0.0
        if progress and sys.stderr.isatty():  # a bar on a terminal; plain lines in log files
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
        self.total = total_steps

    def log(self, record: Dict):
        if not self.enabled:
            return
        self._write(record, "train")
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.0f}", stall=f"{record['data_stall']:.0%}"
            )
        elif time.time() - self.last_print > 30 or record["step"] == self.total:
            self.last_print = time.time()
            print(
                f"step {record['step']}/{self.total} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
                f"lr {record['lr']:.4g} {record['images_per_s']:.0f} img/s data-stall {record['data_stall']:.0%}",
                flush=True,
            )

    def log_epoch(self, record: Dict):
        """Per-epoch monitors (e.g. kNN accuracy): to metrics.jsonl, TensorBoard and the console."""
        if not self.enabled:
            return
        self._write(record, "monitor")
        self.write(
            "epoch {epoch}: ".format(**record)
            + " ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("step", "epoch"))
        )

    def _write(self, record: Dict, group: str):
        self.f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{group}/{k}", v, record["step"])

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def write(self, msg: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.f is not None:
            self.f.close()
