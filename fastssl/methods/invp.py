"""Invariance Propagation (Wang et al., NeurIPS 2020).

Instance discrimination against a memory bank of L2-normalised features of every training
image (EMA-updated, momentum m, renormalised), plus positives discovered by propagating over
a kNN graph of the bank:

* graph: each image's ``graph_k`` nearest bank entries (self excluded), on FAISS
  (``fastssl.knn``), built from the whole bank at the first epoch's start.  It is a buffer of
  the module, so checkpoints carry it.  How it is kept fresh is ``graph_refresh``:
* ``graph_refresh=step`` (the default: the authors' code; the paper does not say): after every
  step each batch row's graph row is replaced by its ``graph_k`` nearest bank entries found
  from the step's features (``fastssl.knn.graph.refresh_neighbours``, before the bank's EMA
  update); the other rows keep the neighbours of their last visit.  ``graph_refresh=epoch``
  rebuilds the whole graph from the bank at every epoch's start instead: each bank entry moves
  only when its image is visited, i.e. once per epoch, so that graph is as fresh as the bank it
  is built from, at the cost of one N x N search per epoch.
* positives: every image within ``graph_steps`` hops of the anchor (deduplicated, self
  excluded); ``positives=knn`` keeps the direct neighbours only (the paper's ablation);
  ``positives=authors``: the authors' released code (WangFeng18/InvariancePropagation,
  ``objective.py``): the concatenated 1- .. ``graph_steps``-step neighbour lists, k + k^2 + k^3
  entries, duplicates and the anchor itself kept, each copy counted.
* hard positives: the ``hard_positives`` positives least similar to the anchor (0 = all);
  ``hard_mode=most_similar``: the most similar ones (the authors' ``--not_hardpos``).
* ``weight_decay_scope``: ``all`` parameters (the default: the authors' ``main.py``, SGD over
  ``network.parameters()``; the paper does not say) or ``weights`` (none on biases and norms).
* background / hard negatives: the ``background`` nearest bank entries (0 = the whole bank).

With s = exp(cos / temperature) and the anchor's own bank entry s_self:

    L_ins = -log( s_self / sum_{j in top-K} s_j )
    L_inv = -log( sum_{p in hard pos} s_p / (sum_{j in top-K} s_j - s_self) )
    L = L_ins + lambda * w(epoch) * L_inv,   w = 0 before ``rampup_epoch``, 1 after

computed in log space (top-K taken to contain self; self is added when it is not among them),
by ``fastssl.losses.bank_loss`` (eager: the whole B x N logit matrix) or ``fastssl.kernels.bank_loss``
(fused: one streaming pass over the bank, exact top-K), chosen by ``loss.impl``; both take the
loss's settings by name (``BankLossSettings``: temperature, background, hard_positives, most_similar).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastssl.data.ops import HSV, Blur, Crop, Flip, Grey, Normalise, Resize
from fastssl.data.plan import ColorJitter, check_jitter, draw_blur, draw_hsv, jitter_active
from fastssl.data.recipe import Recipe
from fastssl.errors import check
from fastssl.knn import GraphIndex, choose_index, gpu_count, say_once
from fastssl.knn.graph import knn_graph, propagate, refresh_neighbours
from fastssl.losses.bank_loss import BankLossSettings, bank_loss_eager
from fastssl.methods import register
from fastssl.methods.base import Method, MethodConfig
from fastssl.models.bank import MemoryBank, all_gather_batch
from fastssl.models.heads import Head, projection_head

__all__ = ["InvPConfig", "InvariancePropagation", "knn_graph", "propagate"]  # (the graph helpers: re-exported)


def _instdisc_color():
    return ColorJitter(hue=36.0, saturation=[0.6, 1.4], value=[0.6, 1.4])


@dataclass
class InvPConfig(MethodConfig):
    name: str = "invp"
    feat_dim: int = 128
    head: Head = "linear"  # linear | mlp
    temperature: float = 0.07
    bank_momentum: float = 0.5
    graph_k: int = 4
    graph_steps: int = 3
    # FAISS index of the graph: auto (by size: fastssl.knn.choose_index) | flat (exact) | ivf | hnsw
    graph_index: GraphIndex = "auto"
    # propagation | knn (ablation: direct neighbours only) | authors (multiset with the anchor)
    positives: Literal["propagation", "knn", "authors"] = "propagation"
    graph_refresh: Literal["epoch", "step"] = (
        "step"  # step (batch rows' neighbours, every step: authors) | epoch (whole graph per epoch)
    )
    hard_positives: int = 50  # P; 0 = use every positive (ablation: no hard positives)
    # least_similar (the paper's hard positives) | most_similar (authors' --not_hardpos)
    hard_mode: Literal["least_similar", "most_similar"] = "least_similar"
    weight_decay_scope: Literal["weights", "all"] = (
        "all"  # all (authors' main.py; paper silent) | weights (not biases/norms)
    )
    background: int = 4096  # K; 0 = the whole bank (ablation: no hard negatives)
    lam: float = 0.6
    rampup_epoch: int = 30
    # instance-discrimination augmentations, drawn in the view plan
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])
    crop_ratio: List[float] = field(default_factory=lambda: [0.75, 4.0 / 3.0])
    flip: bool = True
    color: ColorJitter = field(default_factory=_instdisc_color)
    grayscale: float = 0.2  # probability of a grey view (luma in all three channels)
    blur: float = 0.0  # probability of a Gaussian-blurred view (the authors' ImageNet recipe: 0.5)
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])  # sigma range, pixels
    blur_kernel: Optional[int] = None  # odd window side; None = about 10% of the view side


# ----------------------------------------------------------------------------- the method


@register
class InvariancePropagation(Method):
    name = "invp"
    Config = InvPConfig
    tool_order = 2
    benchmarks = ("pipelines", "train_step", "train_step-tiny", "compare-impls")
    ddp_keep_local = ("bank", "graph")  # updated with every rank's all-gathered batch (after_step)

    def __init__(self, cfg, backbone, image_size, num_images=0):
        super().__init__(cfg, backbone, image_size, num_images)
        m = cfg.method
        self.head = projection_head(m.head, backbone.dim(), m.feat_dim)
        n = max(1, num_images)
        # the buffer ``bank`` is registered on this module (state-dict key "bank", ddp_keep_local):
        # ``self.memory`` holds no state of its own (fastssl.models.bank)
        self.memory = MemoryBank(n, m.feat_dim, m.bank_momentum, seed=cfg.seed + 1, host=self, name="bank")
        self.register_buffer("graph", torch.full((n, m.graph_k), -1, dtype=torch.long))
        self.epoch = 0
        self.graph_ready = False  # set by begin_epoch

    @property
    def _pending(self):
        """The (features, index) ``forward`` stashed for ``after_step`` (``self.memory.pending``)."""
        return self.memory.pending

    @classmethod
    def validate(cls, cfg, data_info):
        """The numbers (the choices are Literal fields, checked on merge)."""
        m, n = cfg.method, data_info["num_pretrain"]
        check(m.feat_dim >= 1, "method.feat_dim", f"must be >= 1, got {m.feat_dim}")
        check(m.temperature > 0, "method.temperature", f"must be > 0, got {m.temperature}")
        check(0 <= m.bank_momentum < 1, "method.bank_momentum", f"must be in [0, 1), got {m.bank_momentum}")
        check(1 <= m.graph_k < n, "method.graph_k", f"must be in [1, {n - 1}], got {m.graph_k}")
        check(m.graph_steps >= 1, "method.graph_steps", f"must be >= 1, got {m.graph_steps}")
        check(m.hard_positives >= 0, "method.hard_positives", f"must be >= 0, got {m.hard_positives}")
        check(m.background >= 0, "method.background", f"must be >= 0, got {m.background}")
        check(m.lam >= 0, "method.lam", f"must be >= 0, got {m.lam}")
        cls._check_views(m)

    @staticmethod
    def _check_views(m):
        s, r = m.crop_scale, m.crop_ratio
        check(0 < s[0] <= s[1] <= 1, "method.crop_scale", f"must be 0 < lo <= hi <= 1, got {list(s)}")
        check(0 < r[0] <= r[1], "method.crop_ratio", f"must be 0 < lo <= hi, got {list(r)}")
        check(0 <= m.grayscale <= 1, "method.grayscale", f"must be in [0, 1], got {m.grayscale}")
        check(0 <= m.blur <= 1, "method.blur", f"must be in [0, 1], got {m.blur}")
        if m.blur > 0:  # the blur's sigma range and window are read only when views are blurred
            check(
                len(m.blur_sigma) == 2 and 0 < m.blur_sigma[0] <= m.blur_sigma[1],
                "method.blur_sigma",
                f"must be [lo, hi] with 0 < lo <= hi, got {list(m.blur_sigma)}",
            )
            check(
                m.blur_kernel is None or (m.blur_kernel >= 1 and m.blur_kernel % 2 == 1),
                "method.blur_kernel",
                f"must be an odd number of pixels, got {m.blur_kernel}",
            )
        check_jitter(m.color)

    # ---- recipe: random resized crop, flip, colour change, grey, blur
    @property
    def view_size(self):
        return self.image_size

    def blur_kernel(self) -> int:
        """The blur window: method.blur_kernel, or the odd side nearest 10% of the view (SimCLR's), at least 3."""
        k = self.cfg.method.blur_kernel
        return int(k) if k is not None else max(3, 2 * int(round((self.view_size / 10 - 1) / 2)) + 1)

    def recipe(self):
        m = self.cfg.method
        ops = (
            [Crop(), Resize()]
            + [Flip()] * bool(m.flip)
            + [HSV()] * jitter_active(m.color)
            + [Grey()] * (m.grayscale > 0)
            + [Blur(self.blur_kernel())] * (m.blur > 0)
            + [Normalise()]
        )
        return Recipe(self.draw, ops, views=1, size=self.view_size, name="invp crop")

    def draw(self, rng, n, shapes=None):
        """torchvision's RandomResizedCrop boxes, flips, HSV change, greyscale and blur choices;
        ``shapes`` (n, 2): boxes over frames of these sizes (folders) instead of the square."""
        m = self.cfg.method
        sh, sw = (self.image_size, self.image_size) if shapes is None else (shapes[:, :1], shapes[:, 1:])
        tries = 10  # torchvision's RandomResizedCrop: 10 attempts, then the whole image
        area = sh * sw * rng.uniform(*m.crop_scale, (n, tries))
        logr = rng.uniform(np.log(m.crop_ratio[0]), np.log(m.crop_ratio[1]), (n, tries))
        w = np.round(np.sqrt(area * np.exp(logr))).astype(np.int64)
        h = np.round(np.sqrt(area / np.exp(logr))).astype(np.int64)
        ok = (w >= 1) & (h >= 1) & (w <= sw) & (h <= sh)
        first = np.where(ok.any(1), ok.argmax(1), -1)
        rows = np.arange(n)
        sh, sw = np.broadcast_to(sh, (n, 1))[:, 0], np.broadcast_to(sw, (n, 1))[:, 0]
        h = np.where(first >= 0, h[rows, first.clip(0)], sh)
        w = np.where(first >= 0, w[rows, first.clip(0)], sw)
        y = (rng.random(n) * (sh - h + 1)).astype(np.int64)
        x = (rng.random(n) * (sw - w + 1)).astype(np.int64)
        boxes = np.stack([y, x, h, w], 1).astype(np.int32)[:, None, :]
        flips = (rng.random((n, 1)) < 0.5).astype(np.uint8) if m.flip else np.zeros((n, 1), np.uint8)
        fields = {
            "box": boxes,
            "flip": flips,
            "hsv": draw_hsv(rng, n, 1, m.color),
            "grey": (rng.random(n) < m.grayscale).astype(np.uint8)[:, None],
        }
        if m.blur > 0:  # drawn last, and only when on: the streams of the fields above are unchanged
            fields["blur"] = draw_blur(rng, n, 1, m.blur, m.blur_sigma)
        return fields

    # ---- per-epoch graph, per-step bank
    def begin_epoch(self, epoch: int, fresh: bool) -> None:
        self.epoch = epoch
        # graph_refresh=step: built once (the first epoch), then kept up to date row by row in after_step
        if fresh and (self.cfg.method.graph_refresh == "epoch" or not bool((self.graph >= 0).all())):
            self.graph.copy_(knn_graph(self.bank, self.cfg.method.graph_k, self.graph_index()))
        # read once per epoch (the graph changes only here or on load), not on the host every step
        self.graph_ready = bool((self.graph >= 0).all())

    def graph_index(self) -> str:
        """method.graph_index, with ``auto`` resolved by the bank's size and where FAISS runs
        (``fastssl.knn.choose_index``: exact on a GPU and up to 320,000 rows, ivf beyond; said once)."""
        kind = self.cfg.method.graph_index
        if kind != "auto":
            return kind
        n, on_gpu = len(self.bank), self.bank.is_cuda and gpu_count() > 0
        kind = choose_index(n, on_gpu)
        say_once(
            f"graph_index {kind} {n}",
            f"method.graph_index=auto: {kind} for {n:,} bank rows on the "
            f"{'GPU' if on_gpu else 'CPU'}"
            + (
                ""
                if kind == "flat"
                else " (approximate: recall@4 measured 0.998 on a clustered bank of 320,000 rows, 0.22 on "
                "the random bank of epoch 0; docs/knn.md)"
            ),
        )
        return kind

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone.features(x)).float(), dim=1)

    def forward(self, views, index):
        m = self.cfg.method
        f = self.embed(views[0])
        steps = 1 if m.positives == "knn" else m.graph_steps
        pos = (
            propagate(self.graph, index, steps, multiset=m.positives == "authors")
            if self.graph_ready
            else torch.full_like(index[:, None], -1)
        )
        settings = BankLossSettings.from_method(m)
        sizes = dict(B=f.shape[0], D=f.shape[1], N=len(self.bank), K=settings.background)
        if self.loss_impl(self.bank, "bank_loss", **sizes) == "fused":  # (the kernel reads f in the bank's dtype)
            from fastssl.kernels.bank_loss import bank_loss_fused  # (Triton: imported only when chosen)

            l_ins, l_inv = bank_loss_fused(f, self.bank, index, pos, settings, tf32=self.loss_tf32(self.bank))
        else:
            l_ins, l_inv = bank_loss_eager(f, self.bank, index, pos, settings)
        w = 1.0 if self.epoch >= m.rampup_epoch else 0.0
        has_pos = ~torch.isnan(l_inv)  # mean over the rows with positives (0 when none), without a host sync
        l_inv_mean = torch.where(has_pos, l_inv, 0.0).sum() / has_pos.sum().clamp(min=1)
        self.memory.stash(f, index)
        return {
            "loss": l_ins.mean() + m.lam * w * l_inv_mean,
            "loss_ins": l_ins.mean().detach(),
            "loss_inv": l_inv_mean.detach(),
        }

    def after_step(self, skipped: Optional[torch.Tensor] = None) -> None:
        """EMA update of the visited bank entries, with every rank's batch (all-gather);
        ``graph_refresh=step``: first their graph rows, from the step's features against the
        bank before the update (the authors' ``update_nn``, also with every rank's batch).  A
        skipped step (``skipped``, a device flag) writes the rows back unchanged."""
        if self.cfg.method.graph_refresh == "step" and self._pending is not None:
            f, idx = all_gather_batch(*self._pending)
            rows = refresh_neighbours(f, self.bank, idx, self.graph.shape[1])
            self.graph[idx] = rows if skipped is None else torch.where(skipped, self.graph[idx], rows)
        self.memory.step(skipped)

    def param_groups(self, lr: float, weight_decay: float):
        """``weight_decay_scope=weights``: the base class's groups (no decay on biases and norm
        parameters); ``all``: one group, every parameter decayed (the authors' ``main.py``)."""
        if self.cfg.method.weight_decay_scope == "weights":
            return super().param_groups(lr, weight_decay)
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": weight_decay}]

    def end_epoch(self, epoch, source):
        out = {}
        if dist.is_initialized() and dist.get_world_size() > 1:  # every rank must hold the same bank
            out["bank_consistent"] = float(self.memory.check_agreement(self.graph))
            if not out["bank_consistent"]:
                raise RuntimeError("invp: the memory bank or kNN graph differs between ranks")
        return out
