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


STATUS_EVERY_S = 30.0  # without a progress bar (a log file), a status line at least this often


def rate(x: float) -> str:
    """Images per second for people: 1234, 12.3, 0.42 (never "0" for a slow step)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


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
        if progress and sys.stderr.isatty():  # a bar on a terminal; plain lines in log files
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
        self.total = total_steps
        # the status lines: from the first step on, then every STATUS_EVERY_S (whatever log_every_steps is)
        self.step, self.last = initial_step, None  # (the last record: its loss goes into the status line)
        self.last_print, self.window = None, (time.time(), initial_step)

    def log(self, record: Dict):
        if not self.enabled:
            return
        self._write(record, "train")
        self.last = record
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", img_s=rate(record["images_per_s"]), stall=f"{record['data_stall']:.0%}"
            )
        elif self._due() or record["step"] == self.total:
            self._printed()
            print(
                f"step {record['step']}/{self.total} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
                f"lr {record['lr']:.4g} {rate(record['images_per_s'])} img/s data-stall {record['data_stall']:.0%}",
                flush=True,
            )

    def _due(self) -> bool:
        return self.last_print is None or time.time() - self.last_print >= STATUS_EVERY_S

    def _printed(self):
        self.last_print, self.window = time.time(), (time.time(), self.step)

    def status(self) -> str:
        """The time-based status line: the pace since the last line, the time left, the last loss."""
        t0, s0 = self.window
        per_step = (time.time() - t0) / max(self.step - s0, 1)
        pace = f"{per_step:.1f} s/step" if per_step >= 1 else f"{1000 * per_step:.0f} ms/step"
        line = f"step {self.step}/{self.total}: {pace}, {duration(per_step * (self.total - self.step))} to go"
        r = self.last
        if r is not None:
            line += (
                f"; at step {r['step']}: loss {r['loss']:.4f}, {rate(r['images_per_s'])} img/s, "
                f"data-stall {r['data_stall']:.0%}"
            )
        return line

    def log_epoch(self, record: Dict, echo: bool = True):
        """Per-epoch monitors (e.g. kNN accuracy): to metrics.jsonl, TensorBoard and (``echo``) the console."""
        if not self.enabled:
            return
        self._write(record, "monitor")
        if echo:
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
        """A step is done: the bar moves, or (no bar) a status line when one is due: after the
        first step, then every STATUS_EVERY_S, so slow steps show a sign of life long before
        ``train.log_every_steps`` steps are done."""
        if not self.enabled:
            return
        self.step += n
        if self.bar is not None:
            self.bar.update(n)
        elif self._due():
            line = self.status()
            self._printed()
            print(line, flush=True)

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
