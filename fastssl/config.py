"""Run configuration: a typed schema, YAML files, dotted CLI overrides, and validation.

Everything a run needs is described here.  ``load_config`` merges, in order, the schema's
defaults, the method's own defaults (its registered config dataclass), the YAML file and the
``key=value`` overrides, then ``validate`` checks every value *before* any data is read into
memory or any model or GPU memory is created.  Any problem raises ``ConfigError`` whose message
is one line naming the key (and the file or value) at fault.
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from fastssl import config_files
from fastssl.errors import ConfigError, check, choice
from fastssl.registry import PIPELINES, PRECISIONS, Pipeline, Precision  # noqa: F401  (PIPELINES, PRECISIONS: re-exported)


@dataclass
class BuiltinData:
    """Procedurally generated labeled set (see fastssl/data/sources.py: BuiltinSource)."""

    num_train: int = 4096
    num_test: int = 1024
    image_size: int = 32
    num_classes: int = 10
    seed: int = 1234


@dataclass
class DataConfig:
    source: str = "builtin"
    path: Optional[str] = None  # root of the dataset files; not used by `builtin`
    split: Literal["pretrain", "train"] = (
        "pretrain"  # which images pre-training sees: pretrain (all unlabeled + train) | train
    )
    image_size: Optional[int] = None  # folder: side the images are resized to; others: native
    pipeline: Pipeline = "auto"  # auto = dali-gpu when CUDA is present, dali-cpu otherwise
    batch_size: int = 128  # per process
    num_workers: int = 2  # DALI CPU threads / DataLoader workers per process
    prefetch: int = 2  # DALI prefetch queue depth / DataLoader prefetch factor
    reader_workers: int = 2  # folders on DALI: processes reading the files' bytes (0: the main thread reads them)
    hw_decoder_load: float = 0.65  # dali-gpu: share of JPEG decoding on the hardware decoder (DALI's default)
    builtin: BuiltinData = field(default_factory=BuiltinData)


@dataclass
class ModelConfig:
    arch: str = "convnet"  # convnet | shallow | resnet18 | resnet50
    width: int = 64  # convnet/shallow base width (channels of the first stage)
    kernel: int = 6  # shallow: conv kernel side
    stem: Literal["auto", "small", "imagenet"] = (
        "auto"  # auto | small (3x3 stride 1, no max-pool) | imagenet (7x7/2 + max-pool)
    )


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.05  # for a batch of 256 images in total; scaled linearly with the global batch
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    milestones: List[float] = field(default_factory=list)  # epochs, for `step`
    gamma: float = 0.1
    gammas: List[float] = field(default_factory=list)  # one factor per milestone (empty: gamma at each)
    scale_lr: bool = True
    impl: Literal["auto", "fused", "foreach"] = "auto"  # auto: fused on CUDA, foreach on the CPU


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: Optional[int] = None  # stop early after this many steps (tests, smoke runs)
    precision: Precision = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    channels_last: Optional[bool] = None  # None = on for CUDA
    grad_clip: Optional[float] = None
    max_bad_steps: int = 5  # non-finite losses in a row before the run stops (each one is skipped)
    ckpt_every_steps: int = 200
    log_every_steps: int = 10
    progress: bool = True
    tensorboard: bool = True
    deterministic: bool = False
    cudnn_benchmark: str = "auto"  # auto (on for CUDA unless deterministic: the inputs have fixed sizes) | true | false
    compile: bool = False  # torch.compile the backbone's stages (minutes of compiling, then faster steps)
    monitor_every: int = 1  # epochs between kNN-monitor probes (0 = off; off without labels)
    monitor_bank: int = 1024  # labeled training images in the monitor's bank (a fixed subset)
    monitor_test: int = 1024  # test images it classifies (the first ones)


@dataclass
class EvalConfig:
    """Defaults of `python -m fastssl.eval` (each is also a command-line flag there)."""

    layer: Optional[str] = None  # backbone stage whose pooled output is the feature; None = last
    linear_epochs: int = 100
    linear_lr: float = 0.1
    linear_seeds: int = 3
    knn_k: int = 200
    knn_temperature: float = 0.07
    finetune_labels: Optional[int] = None  # labeled images used for fine-tuning (None = all)
    finetune_epochs: int = 30
    finetune_lr: float = 0.05
    finetune_seeds: int = 1
    transfer_epochs: int = 15  # transfer protocol (layerwise): small classifier on the learned first layer
    transfer_runs: int = 3
    transfer_freeze: bool = False  # frozen (True) or fine-tuned (False) first layer
    # small (fastssl's) | authors (shallow-conv's: BatchNorm, conv2 512, fc 512, crop/flip)
    transfer_classifier: Literal["small", "authors"] = "small"
    svm_c: float = 1.0  # svm-folds: LinearSVC C on standardised features
    svm_folds: int = 10  # svm-folds without predefined folds: random folds of svm_fold_size train images
    svm_fold_size: int = 1000
    # svm-folds: pooled (fastssl's) | authors (conv1-3 + fc1 after ReLU, 2x2, L2 per block)
    svm_features: Literal["pooled", "authors"] = "pooled"
    svm_c_grid: List[float] = field(default_factory=list)  # svm-folds: C searched per fold (empty: svm_c)
    svm_c_select: Literal["cv", "test"] = (
        "cv"  # with svm_c_grid: cv (3-fold inside each fold) | test (best test accuracy: the authors')
    )
    svm_scale: bool = True  # StandardScaler before the LinearSVC (the authors: false)
    batch_size: int = 256


@dataclass
class LossConfig:
    impl: Literal["auto", "fused", "eager"] = (
        "auto"  # auto = fused Triton kernels on CUDA (after a one-time check), eager elsewhere
    )
    # fp32 loss inputs on the TF32 tensor cores in the fused kernels (faster, ~1e-3 relative);
    # None = auto: on CUDA in mixed-precision runs (where InvP's fp32 bank is the one fp32 input)
    tf32: Optional[bool] = None


@dataclass
class Config:
    method: Any = MISSING  # the method's registered dataclass (fastssl/methods)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0
    out_dir: str = "runs/default"


def _one_line(e: Exception) -> str:
    """OmegaConf errors span several lines (key, type, value); fold them into one."""
    if isinstance(e, OmegaConfBaseException):
        msg = str(e).splitlines()[0].strip()
        key = getattr(e, "full_key", None)
        if key:
            return f"{key}: {msg}"
        return msg
    return str(e).replace("\n", " ")


def load_config(path, overrides: List[str] = ()) -> DictConfig:
    """YAML file (or a stored config) + ``key=value`` overrides -> validated, read-only config."""
    from fastssl.methods import get_method  # the registry (imports each method module)

    file_cfg = OmegaConf.create()
    if isinstance(path, (DictConfig, dict)):  # e.g. the config stored in a checkpoint (older ones: a DictConfig)
        plain = OmegaConf.to_container(path, resolve=True) if isinstance(path, DictConfig) else path
        file_cfg, path = OmegaConf.create(plain), None
    elif path is not None:
        path = config_files.find(path)  # a file, or a shipped config by name (sc/stl10)
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:  # yaml syntax error
            raise ConfigError(f"--config {path}: not valid YAML: {_one_line(e)}") from None
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override {o!r}: expected key=value, e.g. train.epochs=1")
    try:
        cli_cfg = OmegaConf.from_dotlist(list(overrides))
    except Exception as e:
        raise ConfigError(f"overrides: {_one_line(e)}") from None

    name = OmegaConf.select(cli_cfg, "method.name") or OmegaConf.select(file_cfg, "method.name")
    if name is None:
        raise ConfigError("method.name: missing (set it in the config file or as method.name=sc)")
    method_cls = get_method(str(name)).Config  # raises ConfigError for an unknown name
    schema = OmegaConf.structured(Config(method=method_cls()))
    try:
        cfg = OmegaConf.merge(schema, file_cfg, cli_cfg)
    except OmegaConfBaseException as e:
        refusal = _literal_refusal(e)  # a Literal field's value that is not one of its choices
        if refusal is not None:
            raise refusal from None
        where = f" (in {path} or the overrides)" if path else ""
        raise ConfigError(_one_line(e) + where) from None
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        raise ConfigError(f"{sorted(missing)[0]}: missing value")
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _literal_refusal(e: Exception) -> Optional[ConfigError]:
    """OmegaConf's refusal of a value for a ``Literal`` field, in the words of ``choice``."""
    obj, key = getattr(e, "object_type", None), getattr(e, "key", None)
    if not (isinstance(e, ValidationError) and isinstance(obj, type) and isinstance(key, str)):
        return None
    try:
        hint = typing.get_type_hints(obj).get(key)
    except Exception:  # a type hint it cannot resolve: OmegaConf's own words
        return None
    if typing.get_origin(hint) is not Literal:
        return None
    try:
        choice(e.value, e.full_key or key, typing.get_args(hint))
    except ConfigError as refusal:
        return refusal
    return None


def _check_data(cfg: DictConfig) -> None:
    from fastssl.data.sources import SOURCES

    d = cfg.data
    choice(d.source, "data.source", SOURCES.names())
    check(d.batch_size >= 2, "data.batch_size", f"must be >= 2 (contrastive losses need negatives), got {d.batch_size}")
    check(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    check(d.prefetch >= 1, "data.prefetch", f"must be >= 1, got {d.prefetch}")
    check(d.reader_workers >= 0, "data.reader_workers", f"must be >= 0, got {d.reader_workers}")
    check(0 <= d.hw_decoder_load <= 1, "data.hw_decoder_load", f"must be in [0, 1], got {d.hw_decoder_load}")
    check(
        d.pipeline != "tensor" or d.source != "folder",
        "data.pipeline",
        "tensor keeps the whole dataset in memory as one tensor and needs an in-memory source "
        "(builtin, stl10, cifar10, cifar100); a folder's images are files: use dali-gpu, dali-cpu or torch",
    )
    if d.pipeline == "dali-gpu":
        import torch

        check(
            torch.cuda.is_available(),
            "data.pipeline",
            "dali-gpu needs a CUDA GPU and none is visible; use dali-cpu or torch",
        )


def _check_model(cfg: DictConfig) -> None:
    from fastssl.models import ARCHS

    m = cfg.model
    choice(m.arch, "model.arch", ARCHS)
    check(m.width >= 1, "model.width", f"must be >= 1, got {m.width}")
    check(m.kernel >= 1, "model.kernel", f"must be >= 1, got {m.kernel}")


def _check_optim(cfg: DictConfig) -> None:
    o, epochs = cfg.optim, cfg.train.epochs
    check(o.lr > 0 and math.isfinite(o.lr), "optim.lr", f"must be a positive number, got {o.lr}")
    check(0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}")
    check(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    check(o.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {o.warmup_epochs}")
    if o.schedule != "step":  # milestones, gamma and gammas are read by the step schedule only
        return
    check(0 < o.gamma <= 1, "optim.gamma", f"must be in (0, 1], got {o.gamma}")
    check(
        len(o.gammas) in (0, len(o.milestones)),
        "optim.gammas",
        f"{len(o.gammas)} factors for {len(o.milestones)} milestones (give one per milestone, or none)",
    )
    for i, g in enumerate(o.gammas):
        check(0 < g <= 1, f"optim.gammas[{i}]", f"must be in (0, 1], got {g}")
    for i, ms in enumerate(o.milestones):
        check(0 < ms <= epochs, f"optim.milestones[{i}]", f"{ms} is outside (0, train.epochs={epochs}]")


def _check_train(cfg: DictConfig) -> None:
    t = cfg.train
    check(t.epochs >= 1, "train.epochs", f"must be >= 1, got {t.epochs}")
    check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    check(t.ckpt_every_steps >= 1, "train.ckpt_every_steps", f"must be >= 1, got {t.ckpt_every_steps}")
    check(t.log_every_steps >= 1, "train.log_every_steps", f"must be >= 1, got {t.log_every_steps}")
    # a str, not a Literal: YAML reads true/false as booleans, which OmegaConf stores as "True"/"False"
    check(
        str(t.cudnn_benchmark).lower() in ("auto", "true", "false"),
        "train.cudnn_benchmark",
        f"{t.cudnn_benchmark!r} is not one of auto, true, false",
    )
    check(
        not (str(t.cudnn_benchmark).lower() == "true" and t.deterministic),
        "train.cudnn_benchmark",
        "true picks convolution kernels by timing them, which train.deterministic=true rules out; use auto",
    )
    check(t.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {t.max_bad_steps}")
    check(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", f"must be > 0, got {t.grad_clip}")
    check(t.monitor_every >= 0, "train.monitor_every", f"must be >= 0 (0 = off), got {t.monitor_every}")
    if t.monitor_every > 0:  # the monitor's sizes are read only when it is on
        check(t.monitor_bank >= 1, "train.monitor_bank", f"must be >= 1, got {t.monitor_bank}")
        check(t.monitor_test >= 1, "train.monitor_test", f"must be >= 1, got {t.monitor_test}")
    if t.precision in ("bf16", "fp16"):
        import torch

        check(
            torch.cuda.is_available() or t.precision == "bf16",
            "train.precision",
            "fp16 needs a CUDA GPU; use bf16 or fp32 on CPU",
        )


def _check_eval(cfg: DictConfig) -> None:
    from fastssl.models import stages_of

    e, arch = cfg.eval, cfg.model.arch
    check(e.linear_epochs >= 1, "eval.linear_epochs", f"must be >= 1, got {e.linear_epochs}")
    check(e.linear_seeds >= 1, "eval.linear_seeds", f"must be >= 1, got {e.linear_seeds}")
    check(e.knn_k >= 1, "eval.knn_k", f"must be >= 1, got {e.knn_k}")
    check(e.knn_temperature > 0, "eval.knn_temperature", f"must be > 0, got {e.knn_temperature}")
    check(e.transfer_epochs >= 1, "eval.transfer_epochs", f"must be >= 1, got {e.transfer_epochs}")
    check(e.transfer_runs >= 1, "eval.transfer_runs", f"must be >= 1, got {e.transfer_runs}")
    check(e.svm_c > 0, "eval.svm_c", f"must be > 0, got {e.svm_c}")
    check(e.svm_folds >= 1, "eval.svm_folds", f"must be >= 1, got {e.svm_folds}")
    check(e.svm_fold_size >= 2, "eval.svm_fold_size", f"must be >= 2, got {e.svm_fold_size}")
    check(all(c > 0 for c in e.svm_c_grid), "eval.svm_c_grid", f"every C must be > 0, got {list(e.svm_c_grid)}")
    check(
        e.finetune_labels is None or e.finetune_labels >= 1,
        "eval.finetune_labels",
        f"must be >= 1, got {e.finetune_labels}",
    )
    if e.layer is not None:
        check(
            e.layer in stages_of(arch),
            "eval.layer",
            f"{e.layer!r} is not a stage of {arch}: {', '.join(stages_of(arch))}",
        )


def _check_loss(cfg: DictConfig) -> None:
    if cfg.loss.impl == "fused":
        import torch

        from fastssl.kernels.runtime import interpreted

        check(
            torch.cuda.is_available() or interpreted(),
            "loss.impl",
            "fused kernels need a CUDA GPU (or TRITON_INTERPRET=1 for tests); use auto or eager",
        )


def _check_data_size(cfg: DictConfig) -> dict:
    """The source's files (headers and sizes) against the batch; returns the source's sizes."""
    from fastssl.data.sources import check_source

    d = cfg.data
    info = check_source(cfg)  # raises ConfigError naming the file/field; returns sizes
    n = info["num_pretrain"] if d.split == "pretrain" else info["num_train"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check(
        n >= d.batch_size * world,
        "data.batch_size",
        f"{d.batch_size} x {world} processes is more than the {n} training images of {d.source}",
    )
    return info


def validate(cfg: DictConfig) -> None:
    """Check every value that the run uses; cheap (headers and file sizes only, no image data is
    loaded).  The fixed choices are ``Literal`` fields, already checked by OmegaConf on merge."""
    from fastssl.methods import get_method

    for section in (_check_data, _check_model, _check_optim, _check_train, _check_eval, _check_loss):
        section(cfg)
    info = _check_data_size(cfg)
    get_method(cfg.method.name).validate(cfg, info)


def save_config(cfg: DictConfig, path: str) -> None:
    OmegaConf.save(cfg, path, resolve=True)
