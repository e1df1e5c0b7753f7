"""Stage-map features of whole images: every stage's output map max-pooled to 2x2 (the
Exemplar-CNN's SVM features, ``eval.svm_features=pooled``, and its clustering features), the
authors' pre-ReLU conv features (their clustering) and their SVM features
(``eval.svm_features=authors``): fastssl/eval/svm.py's fold protocol and the Exemplar-CNN's
surrogate clustering (fastssl/methods/exemplar/) both read them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.features.images import extract_with


def pooled_features(backbone, x: torch.Tensor) -> torch.Tensor:
    """(B, sum_s 4 C_s): each stage's map max-pooled to 2x2 (1x1 maps are repeated)."""
    maps = backbone(x, backbone.stage_names)
    return torch.cat([F.adaptive_max_pool2d(m.float(), 2).flatten(1) for m in maps.values()], 1)


def extract_pooled(backbone, split, source, prepare, batch_size: int, device, index=None) -> torch.Tensor:
    return extract_with(pooled_features, backbone, split, source, prepare, batch_size, device, index)


def _conv_stages(backbone, x: torch.Tensor, names, relu: bool):
    """Each stage of ``names`` (an ``nn.Sequential`` whose first module is its conv / fc) -> its
    map max-pooled to 2x2: the conv's output before the rest of the stage (``relu=False``) or
    after it and its ReLU (``relu=True``; before pooling and dropout)."""
    out = {}
    x = backbone.stem(x)
    for name, stage in backbone.stages.items():
        if len(out) == len(names):
            break
        if not isinstance(stage, torch.nn.Sequential):
            raise ValueError(f"stage {name}: the authors' features need a Sequential stage (conv first)")
        y = stage[0](x)
        if name in names:
            out[name] = F.adaptive_max_pool2d((F.relu(y) if relu else y).float(), 2).flatten(1)
        x = stage[1:](y)
    return [out[n] for n in names]


def prerelu_conv_features(backbone, x: torch.Tensor, names=("conv1", "conv2", "conv3")) -> torch.Tensor:
    """The authors' clustering features (``forward_all_conv_feat``): each conv's output before
    its ReLU, max-pooled to 2x2, concatenated."""
    return torch.cat(_conv_stages(backbone, x, names, relu=False), 1)


def authors_features(backbone, x: torch.Tensor, head=None, names=("conv1", "conv2", "conv3", "fc1")) -> torch.Tensor:
    """The authors' SVM features (``evaluation/extract_32x32_largeNet.py``, ``process_layers_fc_l2``):
    conv1-3 and fc1 (run convolutionally) after their ReLU, and with ``head`` (the classifier,
    ``nn.Linear``) fc2 as a 1x1 convolution on the fc1 map after its ReLU; each max-pooled to 2x2
    and L2-normalised (per image; the authors divide each block by its norm over a batch of 100)."""
    blocks = []
    h = backbone.stem(x)
    fc1 = None
    for name, stage in backbone.stages.items():
        y = stage[0](h)
        if name in names:
            blocks.append(F.adaptive_max_pool2d(F.relu(y).float(), 2).flatten(1))
        if name == "fc1":
            fc1 = F.relu(y).float()
        h = stage[1:](y)
        if name == names[-1]:
            break
    if head is not None:
        w = head.weight.float().view(head.out_features, head.in_features, 1, 1)
        fc2 = F.relu(F.conv2d(fc1, w, head.bias.float()))
        blocks.append(F.adaptive_max_pool2d(fc2, 2).flatten(1))
    return torch.cat([b / b.norm(dim=1, keepdim=True).clamp_min(1e-12) for b in blocks], 1)


def extract_prerelu_conv(backbone, split, source, prepare, batch_size: int, device, index=None, names=None):
    names = tuple(names or ("conv1", "conv2", "conv3"))
    fn = lambda b, x: prerelu_conv_features(b, x, names)  # noqa: E731
    return extract_with(fn, backbone, split, source, prepare, batch_size, device, index)


def extract_authors(backbone, split, source, prepare, batch_size: int, device, index=None, head=None):
    """``authors_features`` of ``split`` (``eval.svm_features=authors``)."""
    fn = lambda b, x: authors_features(b, x, head)  # noqa: E731
    return extract_with(fn, backbone, split, source, prepare, batch_size, device, index)
