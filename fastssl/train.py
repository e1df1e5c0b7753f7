"""Pre-train a self-supervised method.

    torchrun --standalone --nproc_per_node=N fastssl/train.py --config configs/sc/builtin.yaml \
        train.epochs=1 data.pipeline=dali-cpu out_dir=runs/x [--resume]

Read top to bottom: ``main`` is the whole run (config -> ``setup``: processes, data, model,
(resume) -> one ``train_stage`` per stage -> ``finish``); a stage is its loader and optimiser,
then its epochs (``train_epoch``: the step loop; ``train_step``: one step on the device;
``after_step``: the host's bookkeeping), then ``end_epoch`` / ``end_stage``.
Every config value is checked before anything heavy is built; a SIGTERM/SIGUSR1 finishes the
step after it, writes a checkpoint and exits 0; ``--resume`` continues from it exactly.  A step
whose gradients are not finite (a non-finite loss gives such gradients) is skipped on the device
(no update) and counted; ``train.max_bad_steps`` of them in a row stop the run (exit 3) with the
last checkpoint intact, as does a checkpoint that cannot be written (e.g. a full disk: the
previous one stays loadable).  A steady-state step reads nothing from the device on the host
(engine/sync.py: the skip decided on the device, the host told a step late).  A function that
can end the run returns its exit status, None to go on.

That machinery lives in fastssl/engine/: the loop's position and its arithmetic in state.py
(``RunState``, ``Schedule``), checkpoints in checkpoint.py, the early exits in run.py, the
signal handlers and the tests' fault hooks in signals.py.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

if __package__ in (None, ""):  # run as a script (torchrun fastssl/train.py) from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from fastssl import dist
from fastssl.config import load_config, save_config
from fastssl.data.dali_check import PipelineBuildError
from fastssl.data.executors import steps_per_epoch as loader_steps
from fastssl.data.sources import build_source
from fastssl.engine import checkpoint as ckpt
from fastssl.engine import run, sync
from fastssl.engine.metrics import MetricsLogger, StepTimer
from fastssl.engine.monitors import KNNMonitor
from fastssl.engine.optim import autocast, build_optimizer, build_scheduler, grad_scaler, resolve_precision
from fastssl.engine.signals import FaultInjection, StopRequest
from fastssl.engine.state import RunState, Schedule, stage_fields
from fastssl.errors import ConfigError
from fastssl.methods import get_method
from fastssl.models import build_backbone, compile_stages


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config", help="YAML file, e.g. configs/sc/builtin.yaml (default with --resume: out_dir/config.yaml)"
    )
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoints/last.pt if it exists")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=1")
    return p.parse_args(argv)


def resolve_config(args):
    path = args.config
    if path is None and args.resume:
        out = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("out_dir=")), None)
        if out and os.path.isfile(os.path.join(out, "config.yaml")):
            path = os.path.join(out, "config.yaml")
    if path is None:
        raise ConfigError("--config: required (or --resume with out_dir=<a run folder holding config.yaml>)")
    return load_config(path, args.overrides)


def cudnn_benchmark(cfg, device) -> bool:
    """``train.cudnn_benchmark``: auto = on for CUDA, off in deterministic mode."""
    choice = str(cfg.train.cudnn_benchmark).lower()
    if choice == "auto":
        return device.type == "cuda" and not cfg.train.deterministic
    return choice == "true"


def checkpoint_path(cfg) -> str:
    return os.path.join(cfg.out_dir, "checkpoints", "last.pt")


@dataclass
class Run:
    """What a run holds from ``setup`` to ``finish``: its processes, data and method, where it
    is (``state``, against the ``plan``) and how it reports (``log``, ``timer``, ``votes``)."""

    cfg: Any
    d: dist.DistInfo
    stop: StopRequest
    fault: FaultInjection
    source: Any
    model: Any  # the method: backbone + its heads/state
    channels_last: bool
    precision: str
    knn: Optional[KNNMonitor]  # (None on the other ranks)
    resumed: Optional[dict]  # the checkpoint's dict, until its stage is done
    state: RunState
    steps_per_epoch: int
    plan: Schedule
    log: MetricsLogger
    timer: StepTimer
    votes: sync.Votes  # (every rank's skip and stop flags, read a step late)
    stopping: bool = False  # some rank asked to stop (the host learns it a step late)
    init_record: Optional[dict] = None  # the kNN monitor's step-0 record, until the first banner is out

    @property
    def ck_path(self) -> str:
        return checkpoint_path(self.cfg)

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.d.world


@dataclass
class Stage:
    """A method trains in one or more stages (e.g. one layer at a time); each stage has its own
    trainable parameters, data recipe, data loader and optimiser."""

    loader: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    ddp: Any  # the model the step calls: DDP-wrapped with more than one process
    save: Callable[..., bool]  # every rank calls save(reason, position) at the same steps; False: not written


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)  # every value validated here, before any model or data
    except ConfigError as e:
        print(f"fastssl: config error: {e}", file=sys.stderr)
        return 2
    try:
        r = setup(cfg, args.resume)
    except ckpt.CheckpointError as e:  # (--resume from a checkpoint that cannot be read)
        print(f"fastssl: {e}", file=sys.stderr)
        return 2

    # the random-init level, measured before step 0 (read-only), logged after the first banner
    r.init_record = KNNMonitor.init_record(r.knn, r.model, r.state.step)
    # (each stage's loader, optimiser and DDP wrapper live in train_stage: the previous stage's are
    # gone before the next one's are built; the tensor executor holds the dataset on the device)
    while r.state.stage < r.model.num_stages and not r.state.done(r.plan):
        code = train_stage(r)
        if code is not None:
            return code
    return finish(r)


# ---------------------------------------------------------------------------- setup


def setup(cfg, resume: bool) -> Run:
    """Processes, seeds and output folder; data and method; the resumed position; the logs."""
    # ---- processes, seeds, output folder
    d = dist.setup()
    stop = StopRequest()  # SIGTERM / SIGUSR1 / SIGINT only set a flag, read once a step
    fault = FaultInjection()  # the tests' FASTSSL_* fault hooks; inert without them
    torch.manual_seed(cfg.seed)
    if cfg.train.deterministic:
        dist.deterministic()
    if d.is_main:
        os.makedirs(os.path.join(cfg.out_dir, "checkpoints"), exist_ok=True)
        save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))

    # ---- data source and the method (backbone + its heads/state)
    source, model, channels_last = build_model(cfg, d)
    precision = resolve_precision(cfg, d.device)
    knn = KNNMonitor.build(cfg, source, type(model), d.device) if d.is_main else None  # (rank 0 probes)
    # ---- resume: the weights and the position (stage, epoch, step); the stage's optimiser state in train_stage
    resumed, state = resume_point(cfg, model, d, resume)

    steps_per_epoch = loader_steps(model.epoch_items(len(source.pretrain)), cfg.data.batch_size, d.world)
    plan = Schedule(model.num_stages, cfg.train.epochs, steps_per_epoch, cfg.train.max_steps)
    log = MetricsLogger(cfg.out_dir, d.is_main, plan.total_steps, state.step, cfg.train.tensorboard, cfg.train.progress)
    timer = StepTimer(d.device)
    votes = sync.Votes(d.device)
    return Run(
        cfg=cfg,
        d=d,
        stop=stop,
        fault=fault,
        source=source,
        model=model,
        channels_last=channels_last,
        precision=precision,
        knn=knn,
        resumed=resumed,
        state=state,
        steps_per_epoch=steps_per_epoch,
        plan=plan,
        log=log,
        timer=timer,
        votes=votes,
    )


def build_model(cfg, d):
    """The data source and the method (backbone + its heads/state) on the device: (source, model,
    channels_last)."""
    source = build_source(cfg)
    if source.bad_files and d.is_main:
        f, why = next(iter(source.bad_files.items()))
        print(
            f"fastssl: data: {len(source.bad_files)} unreadable image files left out (e.g. {f}: {why}); "
            f"list them with: python -m fastssl.data.check {cfg.data.path}",
            file=sys.stderr,
        )
    model = get_method(cfg.method.name)(
        cfg, build_backbone(cfg.model, source.image_size), source.image_size, len(source.pretrain)
    )
    model = model.to(d.device)
    channels_last = cfg.train.channels_last if cfg.train.channels_last is not None else d.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # every step's inputs have the same sizes, so cuDNN's timed choice of kernels pays off at once
    torch.backends.cudnn.benchmark = cudnn_benchmark(cfg, d.device)
    if cfg.train.compile:
        compile_stages(model.backbone)
    return source, model, channels_last


def resume_point(cfg, model, d, resume: bool):
    """``--resume``: the weights (into ``model``) and the position (stage, epoch, step) of the
    last checkpoint, and its dict (the stage's optimiser state is restored by ``train_stage``);
    a fresh run: (None, the start).  Raises ``ckpt.CheckpointError`` on a checkpoint that
    cannot be resumed from."""
    ck_path = checkpoint_path(cfg)
    if not (resume and os.path.isfile(ck_path)):
        if resume and d.is_main:
            print(f"fastssl: no checkpoint at {ck_path}; starting a new run", file=sys.stderr)
        return None, RunState()
    resumed = ckpt.resume(ck_path, model)
    state = RunState.from_dict(resumed)
    changed = ckpt.config_changes(resumed["config"], cfg)
    if changed and d.is_main:  # (e.g. a default that a newer fastssl changed, resumed from the YAML file)
        print(
            "fastssl: resuming with settings that differ from the checkpoint's (the run continues with "
            "the new values; pass the old ones as overrides to keep them): " + "; ".join(changed),
            file=sys.stderr,
        )
    return resumed, state


# ---------------------------------------------------------------------------- a stage


def train_stage(r: Run) -> Optional[int]:
    """One stage: its loader and optimiser, its epochs, its end."""
    at_start = r.resumed is not None and "optimizer" not in r.resumed  # a checkpoint written as its stage began
    if at_start:  # begin_stage draws from the RNG (e.g. Exemplar-CNN's re-initialised network): as it did then
        ckpt.restore_rng(r.resumed, r.d.rank)
    r.model.begin_stage(r.state.stage, r.source)
    try:  # (a DALI GPU graph that cannot be built is refused here, before any step)
        loader = r.model.loader(r.cfg, r.source, r.d.rank, r.d.world, r.d.device_id, r.d.device)
    except PipelineBuildError as e:
        print(f"fastssl: {e}", file=sys.stderr)
        dist.cleanup()
        return 2
    stage = build_stage(r, loader, restore=r.resumed is not None and not at_start)

    r.state.roll_over(r.plan)  # (a checkpoint may mark the end of an epoch)
    while not r.state.done(r.plan) and not r.state.stage_done(r.plan):
        code = train_epoch(r, stage)
        if code is None:
            code = end_epoch(r, stage)
        if code is not None:
            return code
    return end_stage(r, stage)


def build_stage(r: Run, loader, restore: bool) -> Stage:
    """The stage's optimiser, schedule, gradient scaler and DDP wrapper; ``restore``: this is the
    stage the checkpoint was written in (its optimisation state goes on).  Logs the banner."""
    cfg, d, model = r.cfg, r.d, r.model
    optimizer, opt_name = build_optimizer(cfg, model, r.global_batch, d.device)
    scheduler = build_scheduler(cfg, optimizer, r.steps_per_epoch)
    scaler = grad_scaler(r.precision, d.device)
    optim = (optimizer, scheduler, scaler)  # (what a checkpoint keeps of the stage's optimisation)
    ddp = dist.wrap_ddp(model, model.find_unused_parameters, model.ddp_keep_local) if d.world > 1 else model
    if restore:
        ckpt.restore_stage(r.resumed, optim, d.rank)
    r.log.write(banner(r, getattr(loader, "pipeline", cfg.data.pipeline), opt_name))
    if r.init_record is not None:  # (metrics.jsonl: still the first record)
        r.log.log_epoch(r.init_record)
        r.init_record = None
    save = functools.partial(ckpt.save, r.ck_path, model=model, optim=optim, config=cfg, d=d, log=r.log, fault=r.fault)
    return Stage(loader, optimizer, scheduler, scaler, ddp, save)


def banner(r: Run, pipeline: str, opt_name: str) -> str:
    """The line each stage starts with: what trains on what, how, and from where."""
    cfg, source, d, num_stages = r.cfg, r.source, r.d, r.model.num_stages
    return (
        f"fastssl: {cfg.method.name} on {source.name} ({len(source.pretrain)} images, {source.image_size}px) | "
        f"{cfg.model.arch} | {d.world} x {d.device.type} | pipeline {pipeline} | "
        f"{r.precision} | {opt_name} | batch {cfg.data.batch_size} x {d.world} | {r.steps_per_epoch} steps/epoch"
        + (" | compiled" if cfg.train.compile else "")
        + (f" | stage {r.state.stage + 1}/{num_stages}" if num_stages > 1 else "")
        + (f" | resumed at epoch {r.state.epoch} step {r.state.step}" if r.resumed is not None else "")
    )


# ---------------------------------------------------------------------------- the loop


def train_epoch(r: Run, stage: Stage) -> Optional[int]:
    """The epoch's steps (from mid-epoch on a resumed run), until the epoch or the plan ends."""
    state = r.state
    stage.loader.set_epoch(state.epoch, state.step_in_epoch)  # (mid-epoch: the data resume where they stopped)
    r.model.begin_epoch(state.epoch, fresh=state.step_in_epoch == 0)
    r.model.train()
    t_wait = time.perf_counter()
    for batch in stage.loader:
        views = [v.to(r.d.device, non_blocking=True) for v in batch["views"]]
        if r.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for v in views]
        r.timer.data_wait(time.perf_counter() - t_wait)

        skip, out = train_step(r, stage, views, batch["index"])
        state.advance()
        r.timer.step_done()
        r.log.advance()

        code = after_step(r, stage, skip, out)
        if code is not None:
            return code
        r.fault.after_step(state.step)  # (FASTSSL_KILL_AT_STEP: a crash, after this step's checkpoint)
        if state.done(r.plan):
            break
        t_wait = time.perf_counter()
    return None


def train_step(r: Run, stage: Stage, views, index):
    """Forward, backward and update, all on the device: (the skip flag, the method's outputs)."""
    d, model, optimizer, scaler = r.d, r.model, stage.optimizer, stage.scaler
    with autocast(r.precision, d.device):
        out = stage.ddp(views, index.to(d.device, non_blocking=True))
    out["loss"] = r.fault.loss(r.state.step + 1, out["loss"])
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out["loss"]).backward()  # (DDP averages the gradients here)
    norm = None
    if r.cfg.train.grad_clip:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), r.cfg.train.grad_clip)
    # a non-finite gradient skips the update on the device: no host read (engine/sync.py)
    skip = sync.skip_flag(model.parameters(), norm)
    sync.optimizer_step(optimizer, scaler, skip)
    model.after_step(skip)
    stage.scheduler.step()  # (a skipped step still moves the schedule: resume positions stay whole steps)
    return skip, out


def after_step(r: Run, stage: Stage, skip, out) -> Optional[int]:
    """The host's side of a step: skips and stop requests, the metrics record, the checkpoint."""
    cfg, state, plan = r.cfg, r.state, r.plan
    # the host learns of skips and stop requests a step late, except where it syncs anyway
    log_due = state.step % cfg.train.log_every_steps == 0 or state.step == plan.total_steps
    ckpt_due = state.step % cfg.train.ckpt_every_steps == 0
    r.votes.cast(state.step, skip, r.stop.requested)
    code = count_votes(r, now=log_due or ckpt_due or state.epoch_done(plan) or state.done(plan))
    if code is not None:
        return code
    if log_due:
        log_step(r, stage, out)
    if r.stopping or ckpt_due:
        if not stage.save(f"signal {r.stop.name}" if r.stopping else "periodic", state.restart_point(plan)):
            return run.abort_unsaved(r.log, state.step)
    if r.stopping:
        return run.stopped(r.log, r.stop.name, state.step)
    return None


def count_votes(r: Run, now: bool) -> Optional[int]:
    """The ready rows of every rank's (skipped, stop) flags: counted, logged, and the run aborted
    after ``train.max_bad_steps`` skipped steps in a row."""
    state = r.state
    for step_no, bad, stop_voted in r.votes.take(now=now):
        state.count_skipped(bad)
        r.stopping = r.stopping or stop_voted
        if bad:
            r.log.write(
                f"fastssl: step {step_no}: non-finite loss or gradients, step skipped ({state.bad_in_row} in a "
                f"row, {state.skipped} in all)"
            )
        if state.bad_in_row >= r.cfg.train.max_bad_steps:
            return run.abort_bad_steps(r.log, state, r.cfg.train.max_bad_steps, r.ck_path)
    return None


def log_step(r: Run, stage: Stage, out) -> None:
    """A logging step's metrics record (the method's outputs, averaged over the ranks)."""
    state = r.state
    rec = {"step": state.step, "epoch": state.progress(r.plan), **stage_fields(r.model.num_stages, state.stage)}
    with sync.intended_read("a logging step"):
        rec.update({k: dist.mean_over_ranks(v.detach().float()).item() for k, v in out.items()})
    rec["lr"] = stage.scheduler.get_last_lr()[0]
    rec["skipped_steps"] = state.skipped
    rec.update(r.timer.read(r.global_batch))
    r.log.log(rec)


# ---------------------------------------------------------------------------- ends


def end_epoch(r: Run, stage: Stage) -> Optional[int]:
    """After the epoch's last step: the method's and the kNN monitor's figures, a checkpoint; or
    the checkpoint of a run that ``train.max_steps`` ended mid-epoch."""
    state = r.state
    if state.epoch_done(r.plan):
        monitor = r.model.end_epoch(state.epoch, r.source)
        if r.knn is not None and r.knn.due(state.epoch):
            monitor.update(r.knn(r.model))
        if monitor:
            stage_key = stage_fields(r.model.num_stages, state.stage)  # (as the step records)
            r.log.log_epoch({"step": state.step, "epoch": state.epoch + 1, **stage_key, **monitor})
        if not stage.save("end of epoch", state.restart_point(r.plan)):
            return run.abort_unsaved(r.log, state.step)
        state.next_epoch()
    elif state.done(r.plan) and not stage.save("max_steps", state.restart_point(r.plan)):
        return run.abort_unsaved(r.log, state.step)
    return None


def end_stage(r: Run, stage: Stage) -> Optional[int]:
    """After the stage's last epoch: the method's end of stage and the next stage's checkpoint."""
    state = r.state
    if state.stage_done(r.plan):  # the stage ran to its end
        if r.d.is_main:
            r.model.end_stage(state.stage, r.cfg.out_dir)
        # a resumed run starts the next stage afresh: no optimiser state to keep
        if state.stage + 1 < r.model.num_stages and not stage.save(
            "end of stage", state.next_stage_start(), optim=None
        ):
            return run.abort_unsaved(r.log, state.step)
        state.next_stage()
        r.resumed = None
    # (otherwise the run is done: max_steps came first)
    return None


def finish(r: Run) -> int:
    """Every rank's parameters compared, the last line, the process group left: exit 0."""
    d, state = r.d, r.state
    agree = dist.same_on_all_ranks(r.model, d.device)
    if d.world > 1:
        rec = {"step": state.step, "epoch": state.epoch, "ranks_agree": float(agree)}
        r.log.log_epoch(rec, echo=False)  # (in metrics.jsonl only: the last line below says it)
    r.log.write(
        f"fastssl: done after {state.step} steps; checkpoint {r.ck_path}"
        + (f"; parameters identical on all {d.world} ranks: {agree}" if d.world > 1 else "")
    )
    r.log.close()
    dist.barrier()
    dist.cleanup()
    r.stop.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
