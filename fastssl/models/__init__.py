"""Backbones with named stages.

Every backbone is a ``Backbone``: a sequence of named stages (``stages_of(arch)``), a
``forward(x, stages)`` returning the requested stages' feature maps, and ``features(x)``
returning one stage globally average-pooled to a vector (what evaluation protocols use).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastssl.registry import Registry

# model.arch -> builder(model_cfg, image_size) -> Backbone, with its stage names (``stages=``):
# adding a backbone is one decorated builder in this file
BACKBONES = Registry("backbone", "model.arch")
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def stages_of(arch: str):
    return BACKBONES.meta(arch)["stages"]


class Backbone(nn.Module):
    def __init__(self, stem: nn.Module, stages: "OrderedDict[str, nn.Module]", widths: Dict[str, int]):
        super().__init__()
        self.stem = stem
        self.stages = nn.ModuleDict(stages)
        self.widths = widths  # output channels per stage

    @property
    def stage_names(self):
        return tuple(self.stages.keys())

    def forward(self, x: torch.Tensor, stages: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
        """Feature maps of ``stages`` (default: the last); stops after the deepest one asked for."""
        wanted = set(stages) if stages is not None else {self.stage_names[-1]}
        out = {}
        x = self.stem(x)
        for name, stage in self.stages.items():
            x = stage(x)
            if name in wanted:
                out[name] = x
                if len(out) == len(wanted):
                    break
        return out

    def features(self, x: torch.Tensor, stage: Optional[str] = None) -> torch.Tensor:
        stage = stage or self.stage_names[-1]
        return self.forward(x, [stage])[stage].float().mean(dim=(2, 3))

    def dim(self, stage: Optional[str] = None) -> int:
        return self.widths[stage or self.stage_names[-1]]


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class SplitBackbone(Backbone):
    """Two sub-networks side by side, each seeing only its own input channels (Split-Brain):
    ``halves[0]`` gets channels ``[:split]``, ``halves[1]`` the rest; every stage's output is
    the two halves' maps concatenated along channels."""

    def __init__(self, half_a: Backbone, half_b: Backbone, split: int):
        nn.Module.__init__(self)
        self.halves = nn.ModuleList([half_a, half_b])
        self.split = split
        self.widths = {k: half_a.widths[k] + half_b.widths[k] for k in half_a.widths}

    @property
    def stage_names(self):
        return self.halves[0].stage_names

    def forward(self, x, stages=None):
        a = self.halves[0](x[:, : self.split], stages)
        b = self.halves[1](x[:, self.split :], stages)
        return {k: torch.cat([a[k], b[k]], 1) for k in a}


def convnet(width: int = 64) -> Backbone:
    """A small VGG-style network in the spirit of the SC paper's STL-10/CIFAR nets."""
    w = width
    stages = OrderedDict(
        block1=nn.Sequential(_conv_bn(3, w), _conv_bn(w, w), nn.MaxPool2d(2)),
        block2=nn.Sequential(_conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2)),
        block3=nn.Sequential(_conv_bn(2 * w, 4 * w), _conv_bn(4 * w, 4 * w)),
    )
    return Backbone(nn.Identity(), stages, {"block1": w, "block2": 2 * w, "block3": 4 * w})


def simplenet(width: int = 64, in_channels: int = 3) -> Backbone:
    """The 5-layer "SimpleNet" of the Split-Brain study: 3x3 conv-BN-ReLU, widths w, 2w, 4w,
    4w, 4w, the first three with stride 2 (output stride 8: 12x12 maps for 96 px inputs)."""
    w = [width, 2 * width, 4 * width, 4 * width, 4 * width]
    cin = [in_channels] + w[:-1]
    stages = OrderedDict((f"conv{i + 1}", _conv_bn(cin[i], w[i], 2 if i < 3 else 1)) for i in range(5))
    return Backbone(nn.Identity(), stages, {f"conv{i + 1}": w[i] for i in range(5)})


def resnet18_narrow(width: int = 64, in_channels: int = 3) -> Backbone:
    """ResNet-18 (torchvision BasicBlocks) with stage widths w, 2w, 4w, 8w, a 3x3 stride-1 stem
    and no max-pool: output stride 8."""
    import torchvision  # imported here: it costs ~1.7 s per process, and only the ResNets need it
    from torchvision.models.resnet import BasicBlock

    net = torchvision.models.resnet18(weights=None)  # for its _make_layer
    net.inplanes, net.dilation = width, 1
    stem = nn.Sequential(
        nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
    )
    stages = OrderedDict(
        (n, net._make_layer(BasicBlock, width * m, 2, stride=1 if m == 1 else 2))
        for n, m in zip(RESNET_STAGES, (1, 2, 4, 8))
    )
    return Backbone(stem, stages, {n: width * m for n, m in zip(RESNET_STAGES, (1, 2, 4, 8))})


def shallow(width: int = 64, kernel: int = 6, pool: int = 2) -> Backbone:
    """Layer-wise contrastive net: stages of one valid conv (kernel x kernel) + ReLU + max-pool."""
    chans = [3, width, 2 * width, 4 * width]
    stages = OrderedDict(
        (
            f"layer{i}",
            nn.Sequential(nn.Conv2d(chans[i - 1], chans[i], kernel), nn.ReLU(inplace=True), nn.MaxPool2d(pool)),
        )
        for i in (1, 2, 3)
    )
    return Backbone(nn.Identity(), stages, {f"layer{i}": chans[i] for i in (1, 2, 3)})


def shallow_min_patch(depth: int, kernel: int = 6, pool: int = 2) -> int:
    """Smallest input side giving a 1x1 output after ``depth`` shallow stages (7 for 6x6 + 2x2)."""
    side = 1
    for _ in range(depth):
        side = side * pool + kernel - 1
    return side


def resnet(arch: str, small_stem: bool) -> Backbone:
    """torchvision ResNet; ``small_stem`` = 3x3 stride-1 conv and no max-pool (32-64 px inputs)."""
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    stages = OrderedDict((n, getattr(net, n)) for n in RESNET_STAGES)
    exp = 4 if arch == "resnet50" else 1
    widths = {n: c * exp for n, c in zip(RESNET_STAGES, (64, 128, 256, 512))}
    return Backbone(stem, stages, widths)


class Standardize(nn.Module):
    """Per-channel ``(x - mean) / std`` with the statistics as buffers (saved with the weights):
    the network takes [0, 1] pixels and carries its own normalisation to evaluation."""

    def __init__(self, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class DenseAsConv(nn.Module):
    """A fully connected layer over a ``channels x k x k`` map that also runs convolutionally on
    larger maps (a k x k convolution): on the k x k training input it is exactly the Linear layer."""

    def __init__(self, channels: int, k: int, out: int):
        super().__init__()
        self.k = k
        self.linear = nn.Linear(channels * k * k, out)

    def forward(self, x):
        if x.shape[-2:] == (self.k, self.k):
            return self.linear(x.flatten(1))[:, :, None, None]
        w = self.linear.weight.view(self.linear.out_features, -1, self.k, self.k)
        return F.conv2d(x, w, self.linear.bias)


def he_init(module: nn.Module) -> nn.Module:
    """He (Kaiming) normal weights, fan-in, for ReLU, and zero biases on every conv and linear
    layer: a deep net without normalisation layers keeps its activations' scale from layer to
    layer (PyTorch's default init shrinks it, and training then sits on a plateau first)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def exemplar_cnn(width: int = 64, patch: int = 32) -> Backbone:
    """The Exemplar-CNN of Dosovitskiy et al. (seed Table 1): at width 64, conv 92/256/512 5x5
    (pad 2, ReLU; 3x3/2 max-pool after the first two; dropout .25) and fc 1024 (ReLU, dropout .5)
    over the 512 x 7 x 7 map of a 32 px patch.  Larger images run the fc convolutionally.
    He-initialised (``he_init``): it has no normalisation layers."""
    c = [max(1, round(92 * width / 64)), 4 * width, 8 * width, 16 * width]
    side = ((patch - 3) // 2 + 1 - 3) // 2 + 1  # after the two 3x3/2 poolings (32 -> 15 -> 7)
    stages = OrderedDict(
        conv1=nn.Sequential(
            nn.Conv2d(3, c[0], 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2), nn.Dropout(0.25)
        ),
        conv2=nn.Sequential(
            nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2), nn.Dropout(0.25)
        ),
        conv3=nn.Sequential(nn.Conv2d(c[1], c[2], 5, padding=2), nn.ReLU(inplace=True), nn.Dropout(0.25)),
        fc1=nn.Sequential(DenseAsConv(c[2], side, c[3]), nn.ReLU(inplace=True), nn.Dropout(0.5)),
    )
    return he_init(Backbone(Standardize(), stages, dict(zip(stages, c))))


# ----------------------------------------------------------------------------- the registered archs
# (registration order is the order ARCHS lists them in)


@BACKBONES.register("convnet", stages=("block1", "block2", "block3"))
def _convnet(m, image_size: int) -> Backbone:
    return convnet(m.width)


@BACKBONES.register("shallow", stages=("layer1", "layer2", "layer3"))
def _shallow(m, image_size: int) -> Backbone:
    return shallow(m.width, m.kernel)


def _small_stem(m, image_size: int) -> bool:
    return m.stem == "small" or (m.stem == "auto" and image_size <= 64)


@BACKBONES.register("resnet18", stages=RESNET_STAGES)
def _resnet18(m, image_size: int) -> Backbone:
    return resnet("resnet18", _small_stem(m, image_size))


@BACKBONES.register("resnet50", stages=RESNET_STAGES)
def _resnet50(m, image_size: int) -> Backbone:
    return resnet("resnet50", _small_stem(m, image_size))


@BACKBONES.register("simplenet", stages=tuple(f"conv{i}" for i in range(1, 6)))
def _simplenet(m, image_size: int) -> Backbone:
    return simplenet(m.width)


def _split(half):
    """Split-Brain's two half-width nets over input channels [:1] and [1:]."""

    def build(m, image_size: int) -> Backbone:
        w = max(1, m.width // 2)
        return SplitBackbone(half(w, 1), half(w, 2), 1)

    return build


BACKBONES.register("split-simplenet", stages=stages_of("simplenet"))(_split(simplenet))
BACKBONES.register("split-resnet18", stages=RESNET_STAGES)(_split(resnet18_narrow))


@BACKBONES.register("exemplar-cnn", stages=("conv1", "conv2", "conv3", "fc1"))
def _exemplar_cnn(m, image_size: int) -> Backbone:
    return exemplar_cnn(m.width)


ARCHS = BACKBONES.names()


def compile_stages(backbone: nn.Module) -> int:
    """``torch.compile`` every stem and stage of ``backbone`` (and of the backbones inside it, e.g.
    Split-Brain's halves) in place (``nn.Module.compile``: the state-dict keys stay as they are,
    so checkpoints and exports do not change).  Stages, not ``forward``: methods call stages
    and ``features`` directly, which would bypass a compiled ``forward``.  Returns how many
    modules were compiled."""
    n = 0
    for net in [m for m in backbone.modules() if type(m) is not SplitBackbone and isinstance(m, Backbone)]:
        for module in [net.stem, *net.stages.values()]:
            # (not an Identity stem: a frame with nothing to compile makes dynamo skip its code
            # object, Module._call_impl, which every module shares: no stage would be compiled)
            if not isinstance(module, nn.Identity):
                module.compile()
                n += 1
    return n


def build_backbone(model_cfg, image_size: int) -> Backbone:
    """The backbone ``model_cfg.arch`` (a registered name) for images of side ``image_size``."""
    return BACKBONES.get(model_cfg.arch)(model_cfg, image_size)


def build(name: str, width: int = 64, kernel: int = 6, stem: str = "auto", image_size: int = 32) -> Backbone:
    """Public builder: the backbone ``name`` (one of ``ARCHS``) exactly as training builds it from
    ``model.arch/width/kernel/stem`` and the image side, e.g. to load an exported state dict::

        ck = torch.load("backbone.pt")              # written by `fastssl export --format state_dict`
        net = fastssl.models.build(**ck["meta"]["build"])
        net.load_state_dict(ck["state_dict"], strict=True)

    ``stem`` (ResNets only): ``small`` = 3x3 stride-1 conv and no max-pool, ``imagenet`` = 7x7/2
    + max-pool, ``auto`` = small for images of at most 64 px.  Raises ``ValueError`` for an
    unknown name."""
    if name not in ARCHS:
        raise ValueError(f"unknown backbone {name!r} (one of: {', '.join(ARCHS)})")
    if stem not in ("auto", "small", "imagenet"):
        raise ValueError(f"stem: auto, small or imagenet, not {stem!r}")
    from types import SimpleNamespace

    return build_backbone(SimpleNamespace(arch=name, width=int(width), kernel=int(kernel), stem=stem), int(image_size))
