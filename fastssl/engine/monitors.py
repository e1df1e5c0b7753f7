"""Online monitors: a bounded weighted-kNN probe of the backbone, for every method.

Every ``train.monitor_every`` epochs (rank 0, in eval mode, no gradients), the method's
``monitor_features`` (the backbone's pooled last stage; layer-wise: the stage in training) of a
fixed subset of labeled training images (at most ``train.monitor_bank``,
drawn once from ``seed``, kept on the training device) and of the first ``train.monitor_test``
test images feed a weighted kNN (K = ``eval.knn_k``, temperature ``eval.knn_temperature``, on
the project's kNN layer, FAISS), whose accuracy is logged as ``knn_monitor`` (and the seconds it
took as ``monitor_s``).  Memory is bounded by the two sizes, not by the dataset: a ResNet-50's
2,048-d fp32 features of the default 1,024 bank + 1,024 test images are 17 MB, at any dataset size (the
peers' epoch-sized feature stores are what makes their kNN monitors costly on ImageNet).
The monitor only reads: no RNG stream and no training state changes, so a run with it equals
a run without it.

The random-init level: a fresh run probes the untrained network once, before its first step
(``KNNMonitor.init_record``), and logs it as ``knn_monitor_init`` in an epoch record at step 0,
epoch 0 (metrics.jsonl, TensorBoard ``monitor/knn_monitor_init``); the report draws it as a
line under the curve.  On real images an untrained network's kNN is far above chance (a random
convnet's features are a rich, if unlearned, basis), so the curve means something only against
that level.  A resumed run (step > 0) does not probe again: its metrics.jsonl holds the first
run's level, and since the probe only reads, the training streams are the same either way.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import numpy as np
import torch

from fastssl.engine.state import stage_fields
from fastssl.features.images import image_batches
from fastssl.knn.classify import knn_classify


class KNNMonitor:
    def __init__(self, cfg, source, prepare, device: torch.device):
        t = cfg.train
        self.cfg, self.source, self.prepare, self.device = cfg, source, prepare, device
        self.every = t.monitor_every
        rng = np.random.default_rng([cfg.seed, 7919])  # its own stream: training's RNG is untouched
        n = len(source.train)
        self.bank_index = np.sort(rng.choice(n, min(n, t.monitor_bank), replace=False))
        self.test_index = np.arange(min(len(source.test), t.monitor_test))
        self.bank_labels = torch.from_numpy(np.asarray(source.train.labels)[self.bank_index])
        self.test_labels = torch.from_numpy(np.asarray(source.test.labels)[self.test_index])
        self.bank: Optional[torch.Tensor] = None  # the last bank features (on the device)

    @classmethod
    def build(cls, cfg, source, method_cls, device) -> Optional["KNNMonitor"]:
        """The monitor, or None when it is off or the source has no labeled train and test images."""
        if cfg.train.monitor_every < 1 or source.train.labels is None or source.test.labels is None:
            return None
        if not len(source.train) or not len(source.test):
            return None
        return cls(cfg, source, method_cls.eval_input(cfg, source), device)

    @staticmethod
    def init_record(knn: Optional["KNNMonitor"], model, step: int) -> Optional[dict]:
        """The monitor's random-init level as an epoch record at step 0, measured once before step 0
        of a fresh run (None when the monitor is off, on ranks other than 0, or when the run
        resumes after step 0).  The caller logs it after the run's first banner."""
        if knn is None or step > 0:
            return None
        rec = knn(model)
        return {
            "step": 0,
            "epoch": 0,
            **stage_fields(model.num_stages, 0),
            "knn_monitor_init": rec["knn_monitor"],
            "monitor_s": rec["monitor_s"],
        }

    def due(self, epoch: int) -> bool:
        """After epoch ``epoch`` (0-based)?"""
        return (epoch + 1) % self.every == 0

    @torch.no_grad()
    def _features(self, model, split, index) -> torch.Tensor:
        bs = self.cfg.eval.batch_size
        return torch.cat(
            [
                model.monitor_features(x).float()
                for x in image_batches(split, self.source.image_size, self.prepare, bs, self.device, index)
            ]
        )

    def __call__(self, model) -> Dict[str, float]:
        t0 = time.perf_counter()
        was = model.training
        model.eval()
        try:
            self.bank = self._features(model, self.source.train, self.bank_index)
            test = self._features(model, self.source.test, self.test_index)
        finally:
            model.train(was)
        e = self.cfg.eval
        pred = knn_classify(self.bank, self.bank_labels, test, self.source.num_classes, e.knn_k, e.knn_temperature)
        acc = (pred.cpu() == self.test_labels).float().mean().item() * 100
        return {"knn_monitor": acc, "monitor_s": time.perf_counter() - t0}
