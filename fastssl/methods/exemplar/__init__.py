"""Exemplar-CNN with surrogate-class clustering (Dosovitskiy et al. 2016; Bautista et al.).

Every surrogate class is one seed image (after clustering: a few similar images); its patches
are random transformations of the seed patch (methods/exemplar/surrogate.py: the surrogate plan and its
recipe of ops, made by the data.pipeline executor every epoch; or read from a set materialised
once by methods/exemplar/materialised.py).  The network classifies each patch into its class:
softmax cross-entropy over up to 16,000 classes.

Stages: 1 (Exemplar-CNN), or 2 with ``method.cluster.enabled``: after stage 1 the trained
network's features of a random half of the images are clustered (methods/exemplar/cluster.py), the classes
are re-formed from the clusters (filled up to the class budget with single images and their 3
nearest held-out images), and the network is trained again from scratch on the new set.

Optimiser groups as in the seed paper: lr x1 for weights, x2 for biases, x0.25 for the last fc
weights; L2 .004 on fc1 and .016 on fc2 weights, none elsewhere (``method.l2_conv3``: the authors'
.001 on conv3).

The authors' code (``EricArazo/ExemplarCNN``; docs/fidelity.md) as switches: ``method.surrogate``
(``fixed``: one set of patches drawn once from the run's seed and shown every epoch),
``method.dropout`` (``authors``: after fc1 only), ``method.l2_conv3``, ``method.cluster.features``
(``authors``: conv1-3 before ReLU, max-pooled 2x2) and the transformation switches of
``method.aug`` (methods/exemplar/surrogate.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.data.decode import split_images
from fastssl.errors import check
from fastssl.log import get_logger
from fastssl.methods import register
from fastssl.methods.base import Method, MethodConfig
from fastssl.methods.exemplar.surrogate import (
    SurrogateAug,
    SurrogateMode,
    SurrogateSet,
    check_aug,
    draw_params,
    generate_torch,
    make_surrogate_set,
    seed_surrogate_set,
    surrogate_recipe,
)
from fastssl.models import he_init

log = get_logger(__name__)


@dataclass
class ClusterConfig:
    enabled: bool = False  # second stage: cluster, re-form classes, retrain from scratch
    threshold: float = 1.25  # cut: largest distance inside a cluster (L2-normalised features)
    max_size: int = 7  # and most images in a cluster (the paper's largest; 0: no cap)
    fraction: float = 0.5  # share of the images clustered; the rest is held out to join single images
    neighbours: int = 3  # held-out images joined to each single image
    max_images: int = 20000  # complete linkage is O(n^2) memory: above this, k-means parts first
    features: Literal["pooled", "authors"] = (
        "pooled"  # pooled: every stage max-pooled 2x2 | authors: conv1-3 before ReLU, pooled 2x2
    )


@dataclass
class ExemplarConfig(MethodConfig):
    name: str = "exemplar"
    num_classes: int = 16000  # surrogate classes: seed images (and the class budget after clustering)
    patches_per_class: int = 100  # per epoch (spread over a clustered class's images)
    val_patches_per_class: int = 10  # fixed validation patches: surrogate accuracy each epoch
    val_classes: int = 2000  # validation patches come from at most this many classes
    patch_size: int = 32
    aug: SurrogateAug = field(default_factory=SurrogateAug)
    lr_bias_factor: float = 2.0  # bias lr = 2 x optim.lr (seed: .2)
    lr_fc2_factor: float = 0.25  # last fc weights lr = 0.25 x optim.lr (seed: .025)
    l2_fc1: float = 0.004
    l2_fc2: float = 0.016
    l2_conv3: float = 0.0  # L2 on the conv3 weights (authors: .001; the paper: none)
    dropout: Literal["paper", "authors"] = "paper"  # paper: after every conv and fc1 | authors: after fc1 only
    surrogate: SurrogateMode = (
        "fixed"  # fixed: one set drawn once (paper, authors) | per_epoch: new patches every epoch
    )
    surrogate_dir: Optional[str] = None  # a set materialised by `python -m fastssl.materialise`
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


@register
class ExemplarCNN(Method):
    name = "exemplar"
    Config = ExemplarConfig
    tool_order = 4
    tiny = ("method.num_classes=64", "method.patches_per_class=8", "method.val_patches_per_class=2")  # (1,024 classes)
    benchmarks = ()  # its surrogate patches have their own suite, benchmarks/exemplar.py

    def __init__(self, cfg, backbone, image_size, num_images=0):
        super().__init__(cfg, backbone, image_size, num_images)
        m = cfg.method
        self.num_stages = 2 if m.cluster.enabled else 1
        self.classifier = nn.Linear(backbone.dim("fc1"), m.num_classes)
        self.register_buffer("pca_mean", torch.zeros(3))
        self.register_buffer("pca_vecs", torch.eye(3))
        self.register_buffer("member_label", torch.zeros(0, dtype=torch.long), persistent=False)
        self.sset: Optional[SurrogateSet] = None
        self.clustered = False
        self._val = None
        self._init_classifier()
        if m.dropout == "authors":  # their network: no dropout after the convs (no parameters, no RNG use)
            for name in ("conv1", "conv2", "conv3"):
                stage = backbone.stages[name]
                for i, mod in enumerate(stage):
                    if isinstance(mod, nn.Dropout):
                        stage[i] = nn.Identity()

    def _init_classifier(self):
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    # ---- state that is not a tensor of fixed shape: the surrogate set (checkpointed)
    def get_extra_state(self):
        return {"sset": None if self.sset is None else self.sset.state(), "clustered": self.clustered}

    def set_extra_state(self, state):
        self.clustered = state["clustered"]
        if state["sset"] is not None:
            self._use(SurrogateSet.from_state(state["sset"]))

    def _use(self, sset: SurrogateSet):
        self.sset = sset
        self.member_label = torch.from_numpy(sset.labels).to(self.pca_mean.device)
        self._val = None

    @property
    def pca(self):
        return self.pca_mean.cpu().numpy(), self.pca_vecs.cpu().numpy()

    @classmethod
    def validate(cls, cfg, data_info):
        """The numbers (the choices are Literal fields, checked on merge), then each part in use."""
        m = cfg.method
        check(
            cfg.model.arch == "exemplar-cnn",
            "model.arch",
            f"exemplar needs exemplar-cnn (its fc layer is sized for the patch), got {cfg.model.arch}",
        )
        check(
            m.patch_size == 32,
            "method.patch_size",
            f"the Exemplar-CNN's fc layer takes 32 px patches, got {m.patch_size}",
        )
        n = data_info["num_pretrain"] if cfg.data.split == "pretrain" else data_info["num_train"]
        check(
            2 <= m.num_classes <= n,
            "method.num_classes",
            f"{m.num_classes} surrogate classes need as many images; {cfg.data.source} has {n}",
        )
        check(m.patches_per_class >= 1, "method.patches_per_class", f"must be >= 1, got {m.patches_per_class}")
        check(
            m.val_patches_per_class >= 0, "method.val_patches_per_class", f"must be >= 0, got {m.val_patches_per_class}"
        )
        if m.val_patches_per_class > 0:  # (0: no validation patches, val_classes is not read)
            check(m.val_classes >= 1, "method.val_classes", f"must be >= 1, got {m.val_classes}")
        for k in ("lr_bias_factor", "lr_fc2_factor", "l2_fc1", "l2_fc2", "l2_conv3"):
            check(getattr(m, k) >= 0, f"method.{k}", f"must be >= 0, got {getattr(m, k)}")
        cls._check_aug(cfg)
        if m.cluster.enabled:  # the clustering settings are read by the second stage only
            cls._check_cluster(m.cluster)
        if m.surrogate_dir is not None:
            cls._check_materialised(m)
        else:
            check(
                m.num_classes * m.patches_per_class >= cfg.data.batch_size,
                "method.patches_per_class",
                f"{m.num_classes} x {m.patches_per_class} patches are fewer than one batch of {cfg.data.batch_size}",
            )

    @staticmethod
    def _check_aug(cfg):
        check_aug(cfg.method.aug)
        check(
            not (cfg.method.aug.pca_basis == "patch" and cfg.data.pipeline in ("auto", "dali-cpu", "dali-gpu")),
            "method.aug.pca_basis",
            f"patch (each patch's own PCA) has no DALI face; data.pipeline={cfg.data.pipeline} builds a DALI graph: "
            "use data.pipeline=torch or data.pipeline=tensor",
        )

    @staticmethod
    def _check_cluster(c):
        check(c.threshold > 0, "method.cluster.threshold", f"must be > 0, got {c.threshold}")
        check(0 < c.fraction < 1, "method.cluster.fraction", f"must be in (0, 1), got {c.fraction}")
        check(
            not (c.max_size == 1 or c.max_size < 0),
            "method.cluster.max_size",
            f"must be >= 2 (or 0: no cap), got {c.max_size}",
        )
        check(
            c.neighbours >= 0 and c.max_images >= 2,
            "method.cluster",
            f"neighbours >= 0 and max_images >= 2, got {c.neighbours}, {c.max_images}",
        )

    @staticmethod
    def _check_materialised(m):
        from fastssl.methods.exemplar.materialised import open_materialised

        check(
            not m.cluster.enabled,
            "method.surrogate_dir",
            "a materialised set is fixed, clustering makes a new one; use one or the other (method.cluster.enabled=false)",
        )
        _, _, meta = open_materialised(m.surrogate_dir)
        check(
            meta["classes"] == m.num_classes,
            "method.surrogate_dir",
            f"{m.surrogate_dir} holds {meta['classes']} classes, method.num_classes is {m.num_classes}",
        )

    def epoch_items(self, num_images: int) -> int:
        m = self.cfg.method
        if m.surrogate_dir is not None:
            from fastssl.methods.exemplar.materialised import open_materialised

            return len(open_materialised(m.surrogate_dir)[1])
        return m.num_classes * m.patches_per_class

    @property
    def view_size(self):
        return self.cfg.method.patch_size

    # ---- stages: the seed set, then (optionally) the clustered set
    def begin_stage(self, stage: int, source=None) -> None:
        if self.sset is None:  # a fresh run (a resumed one has its set from the checkpoint)
            self._seed_set(source)
        if stage == 1 and not self.clustered:
            self._cluster(source)
            self.clustered = True

    def _seed_set(self, source):
        m = self.cfg.method
        if m.surrogate_dir is not None:
            import os

            from fastssl.methods.exemplar.materialised import open_materialised

            st = torch.load(os.path.join(m.surrogate_dir, "surrogate_set.pt"), weights_only=True)
            sset, patches = SurrogateSet.from_state(st), open_materialised(m.surrogate_dir)[0]
            pca = (st["pca_mean"].numpy(), st["pca_vecs"].numpy())
            sample = torch.from_numpy(np.asarray(patches[np.linspace(0, len(patches) - 1, 4096).astype(int)]))
        else:
            sset, pca = seed_surrogate_set(self.cfg, source)
            sample = None
        self.pca_mean.copy_(torch.from_numpy(pca[0]))
        self.pca_vecs.copy_(torch.from_numpy(pca[1]))
        self._use(sset)
        self._set_normalisation(source, sample)

    def _set_normalisation(self, source, sample=None):
        """Per-channel mean/std of the surrogate set (4,096 patches) into the network's input layer."""
        if sample is None:
            sample = self.patches(source, np.random.default_rng([self.cfg.seed, 13]), 4096)
        x = sample.double().div(255.0)
        stem = self.backbone.stem
        stem.mean.copy_(x.mean((0, 1, 2)).view(1, 3, 1, 1))
        stem.std.copy_(x.std((0, 1, 2)).clamp_min(1e-3).view(1, 3, 1, 1))

    def patches(self, source, rng, n: int, rows=None):
        """``n`` random patches (or those of member ``rows``) made by the torch executor: (n, P, P, 3) uint8."""
        m = self.cfg.method
        rows = rng.integers(0, len(self.sset.members), n) if rows is None else rows
        params = draw_params(rng, self.sset.anchors[rows], m.aug, m.patch_size, source.image_size, self.pca)
        out = []
        for s in range(0, len(rows), 1024):
            imgs = split_images(source.pretrain, self.sset.members[rows[s : s + 1024]], source.image_size)
            out.append(generate_torch(imgs, params[s : s + 1024], m.patch_size, m.aug))
        return torch.cat(out)

    @torch.no_grad()
    def _cluster(self, source):
        """Features of the trained network -> merged classes -> new set; weights re-initialised."""

        from fastssl import dist
        from fastssl.features.maps import extract_pooled, extract_prerelu_conv
        from fastssl.methods.exemplar.cluster import surrogate_classes

        m, c = self.cfg.method, self.cfg.method.cluster
        result = None
        if dist.rank() == 0:
            dev = self.pca_mean.device
            prep = self.eval_input(self.cfg, source)

            def features(rows):
                if c.features == "authors":  # their forward_all_conv_feat: conv1-3 before ReLU, pooled 2x2
                    return extract_prerelu_conv(
                        self.backbone, source.pretrain, source, prep, 256, dev, rows, ("conv1", "conv2", "conv3")
                    ).numpy()
                return extract_pooled(self.backbone, source.pretrain, source, prep, 256, dev, rows).numpy()

            result = surrogate_classes(features, len(source.pretrain), m.num_classes, c, self.cfg.seed)
            summary = result[2]
            cap = f", cap {c.max_size}" if c.max_size else ""
            log.info(
                f"fastssl: exemplar clustering: {summary['clusters']} clusters (largest {summary['largest']}{cap}) + "
                f"{summary['singles']} single images joined by {summary['joined']} held-out images -> "
                f"{summary['classes']} classes of {summary['mean_size']:.2f} images"
            )
            if summary["classes"] < m.num_classes:
                log.warning(
                    f"fastssl: exemplar clustering: only {summary['classes']} of {m.num_classes} classes could "
                    f"be formed; the other outputs stay unused"
                )
        members, labels, _ = dist.broadcast_object(result)
        self._use(
            make_surrogate_set(source.pretrain, source.image_size, members, labels, m.num_classes, self.cfg.seed + 1)
        )
        torch.manual_seed(self.cfg.seed + 1)  # train again from scratch
        he_init(self.backbone)  # as models.exemplar_cnn builds it
        self._init_classifier()
        self._set_normalisation(source)

    def recipe(self):
        """The current surrogate set's patches: its own plan (parameters drawn per step), three ops."""
        m = self.cfg.method
        return surrogate_recipe(
            self.sset,
            m.aug,
            m.patch_size,
            self.image_size,
            self.pca,
            m.patches_per_class,
            surrogate=m.surrogate,
            tag=int(self.clustered),
        )

    def make_loader(self, cfg, source, rank, world, device_id):
        """A materialised set (method.surrogate_dir) is read back from its file until clustering
        makes a new set; otherwise None: the recipe on the data.pipeline executor."""
        if cfg.method.surrogate_dir and not self.clustered:
            from fastssl.methods.exemplar.materialised import FileSurrogateLoader

            return FileSurrogateLoader(cfg.method.surrogate_dir, cfg.data.batch_size, cfg.seed, rank, world)
        return None

    # ---- optimiser groups of the seed paper
    def param_groups(self, lr: float, weight_decay: float = 0.0):
        """The authors' per-layer rates and L2 (optim.weight_decay is not used: method.l2_fc1 / l2_fc2;
        ``method.l2_conv3`` > 0 moves the conv3 weights to a fifth group with that L2)."""
        m = self.cfg.method
        fc1 = self.backbone.stages["fc1"][0].linear.weight
        conv3 = self.backbone.stages["conv3"][0].weight
        groups = {"weights": [], "biases": [], "fc1": [fc1], "fc2": [self.classifier.weight], "conv3": []}
        special = {id(fc1), id(self.classifier.weight)}
        for p in self.parameters():
            if p.requires_grad and id(p) not in special:
                if m.l2_conv3 > 0 and p is conv3:
                    groups["conv3"].append(p)
                else:
                    groups["biases" if p.ndim == 1 else "weights"].append(p)
        out = [
            {"name": "weights", "params": groups["weights"], "lr": lr, "weight_decay": 0.0},
            {"name": "biases", "params": groups["biases"], "lr": lr * m.lr_bias_factor, "weight_decay": 0.0},
            {"name": "fc1", "params": groups["fc1"], "lr": lr, "weight_decay": m.l2_fc1},
            {"name": "fc2", "params": groups["fc2"], "lr": lr * m.lr_fc2_factor, "weight_decay": m.l2_fc2},
        ]
        if groups["conv3"]:
            out.append({"name": "conv3", "params": groups["conv3"], "lr": lr, "weight_decay": m.l2_conv3})
        return out

    # ---- training
    def logits(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, P, P, 3) uint8 patches -> (B, classes) scores."""
        x = patches.permute(0, 3, 1, 2).float().div(255.0)
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.classifier(self.backbone(x, ["fc1"])["fc1"].flatten(1))

    def forward(self, views, index):
        target = self.member_label[index.view(-1)]
        logits = self.logits(views[0])
        loss = F.cross_entropy(logits.float(), target)
        return {"loss": loss, "acc": (logits.argmax(1) == target).float().mean().detach() * 100}

    def end_epoch(self, epoch: int, source):
        """Surrogate-class accuracy on fixed validation patches (``val_patches_per_class``)."""
        m = self.cfg.method
        if m.val_patches_per_class == 0:
            return {}
        if self._val is None:
            rng = np.random.default_rng([self.cfg.seed, 19, int(self.clustered)])
            classes = np.sort(rng.permutation(self.sset.num_classes)[: m.val_classes])
            first = {c: i for i, c in reversed(list(enumerate(self.sset.labels)))}  # a member of each class
            rows = np.repeat([first[c] for c in classes if c in first], m.val_patches_per_class)
            self._val = (self.patches(source, rng, len(rows), rows), torch.from_numpy(self.sset.labels[rows]))
        x, y = self._val
        was = self.training
        self.eval()
        with torch.no_grad():
            pred = torch.cat(
                [self.logits(x[s : s + 512].to(self.pca_mean.device)).argmax(1).cpu() for s in range(0, len(x), 512)]
            )
        self.train(was)
        return {"val_acc": float((pred == y).float().mean() * 100)}

    @classmethod
    def eval_input(cls, cfg, source):
        return lambda x: x.float() / 255.0  # the network standardises with its surrogate-set statistics

    @classmethod
    def input_spec(cls, cfg, stats=None):
        return {"pixels": "x / 255", "note": "the network standardises its input itself (stem buffers mean/std)"}
