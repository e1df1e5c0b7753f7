"""Pre-train a self-supervised method.

    torchrun --standalone --nproc_per_node=N fastssl/train.py --config configs/sc/builtin.yaml \
        train.epochs=1 data.pipeline=dali-cpu out_dir=runs/x [--resume]

Read top to bottom: config -> processes -> data -> model -> optimiser -> (resume) -> loop.
Every config value is checked before anything heavy is built; a SIGTERM/SIGUSR1 finishes the
step after it, writes a checkpoint and exits 0; ``--resume`` continues from it exactly.  A step
whose gradients are not finite (a non-finite loss gives such gradients) is skipped on the device
(no update) and counted; ``train.max_bad_steps`` of them in a row stop the run (exit 3) with the
last checkpoint intact, as does a checkpoint that cannot be written (e.g. a full disk: the
previous one stays loadable).  A steady-state step reads nothing from the device on the host
(engine/sync.py: the skip decided on the device, the host told a step late).

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

if __package__ in (None, ""):  # run as a script (torchrun fastssl/train.py) from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from fastssl.config import load_config, save_config
from fastssl.data.dali_check import PipelineBuildError
from fastssl.data.executors import steps_per_epoch as loader_steps
from fastssl.data.sources import build_source
from fastssl.engine import checkpoint as ckpt
from fastssl.engine import dist, run, sync
from fastssl.engine.metrics import MetricsLogger, StepTimer
from fastssl.engine.monitors import KNNMonitor
from fastssl.engine.optim import autocast, build_optimizer, build_scheduler, grad_scaler, resolve_precision
from fastssl.engine.signals import FaultInjection, StopRequest
from fastssl.engine.state import RunState, Schedule
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


def banner(cfg, source, d, pipeline, precision, opt_name, steps_per_epoch, num_stages, state, resumed) -> str:
    """The line each stage starts with: what trains on what, how, and from where."""
    return (
        f"fastssl: {cfg.method.name} on {source.name} ({len(source.pretrain)} images, {source.image_size}px) | "
        f"{cfg.model.arch} | {d.world} x {d.device.type} | pipeline {pipeline} | "
        f"{precision} | {opt_name} | batch {cfg.data.batch_size} x {d.world} | {steps_per_epoch} steps/epoch"
        + (" | compiled" if cfg.train.compile else "")
        + (f" | stage {state.stage + 1}/{num_stages}" if num_stages > 1 else "")
        + (f" | resumed at epoch {state.epoch} step {state.step}" if resumed else "")
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)  # every value validated here, before any model or data
    except ConfigError as e:
        print(f"fastssl: config error: {e}", file=sys.stderr)
        return 2

    # ---- processes, seeds, output folder
    d = dist.setup()
    stop = StopRequest()  # SIGTERM / SIGUSR1 / SIGINT only set a flag, read once a step
    fault = FaultInjection()  # the tests' FASTSSL_* fault hooks; inert without them
    torch.manual_seed(cfg.seed)
    if cfg.train.deterministic:
        dist.deterministic()
    ck_path = os.path.join(cfg.out_dir, "checkpoints", "last.pt")
    if d.is_main:
        os.makedirs(os.path.join(cfg.out_dir, "checkpoints"), exist_ok=True)
        save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))

    # ---- data source and the method (backbone + its heads/state)
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
    precision = resolve_precision(cfg, d.device)
    knn = KNNMonitor.build(cfg, source, type(model), d.device) if d.is_main else None  # (rank 0 probes)
    global_batch = cfg.data.batch_size * d.world

    # ---- resume: the weights and the position (stage, epoch, step); the stage's optimiser state below
    resumed, state = None, RunState()  # (resumed: the checkpoint's dict, until its stage is done)
    if args.resume and os.path.isfile(ck_path):
        try:
            resumed = ckpt.resume(ck_path, model)
        except ckpt.CheckpointError as e:
            print(f"fastssl: {e}", file=sys.stderr)
            return 2
        state = RunState.from_dict(resumed)
        changed = ckpt.config_changes(resumed["config"], cfg)
        if changed and d.is_main:  # (e.g. a default that a newer fastssl changed, resumed from the YAML file)
            print(
                "fastssl: resuming with settings that differ from the checkpoint's (the run continues with "
                "the new values; pass the old ones as overrides to keep them): " + "; ".join(changed),
                file=sys.stderr,
            )
    elif args.resume and d.is_main:
        print(f"fastssl: no checkpoint at {ck_path}; starting a new run", file=sys.stderr)

    # A method trains in one or more stages (e.g. one layer at a time); each stage has its own
    # trainable parameters, data recipe, data loader and optimiser.
    steps_per_epoch = loader_steps(model.epoch_items(len(source.pretrain)), cfg.data.batch_size, d.world)
    plan = Schedule(model.num_stages, cfg.train.epochs, steps_per_epoch, cfg.train.max_steps)
    log = MetricsLogger(cfg.out_dir, d.is_main, plan.total_steps, state.step, cfg.train.tensorboard, cfg.train.progress)
    timer = StepTimer(d.device)
    votes, stopping = sync.Votes(d.device), False  # (every rank's skip and stop flags, read a step late)

    KNNMonitor.log_init(knn, model, log, state.step)  # kNN monitor's random-init level, before step 0 (read-only)
    while state.stage < model.num_stages and not state.done(plan):
        loader = None  # the previous stage's loader goes first (the tensor executor holds the dataset on the device)
        at_start = resumed is not None and "optimizer" not in resumed  # a checkpoint written as its stage began
        if at_start:  # begin_stage draws from the RNG (e.g. Exemplar-CNN's re-initialised network): as it did then
            ckpt.restore_rng(resumed, d.rank)
        model.begin_stage(state.stage, source)
        try:  # (a DALI GPU graph that cannot be built is refused here, before any step)
            loader = model.loader(cfg, source, d.rank, d.world, d.device_id, d.device)
        except PipelineBuildError as e:
            print(f"fastssl: {e}", file=sys.stderr)
            dist.cleanup()
            return 2
        optimizer, opt_name = build_optimizer(cfg, model, global_batch, d.device)
        scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
        scaler = grad_scaler(precision, d.device)
        optim = (optimizer, scheduler, scaler)  # (what a checkpoint keeps of the stage's optimisation)
        ddp = dist.wrap_ddp(model, model.find_unused_parameters, model.ddp_keep_local) if d.world > 1 else model
        if resumed is not None and not at_start:  # this is the stage the checkpoint was written in
            ckpt.restore_stage(resumed, optim, d.rank)
        log.write(
            banner(
                cfg,
                source,
                d,
                getattr(loader, "pipeline", cfg.data.pipeline),
                precision,
                opt_name,
                steps_per_epoch,
                model.num_stages,
                state,
                resumed is not None,
            )
        )
        # every rank calls save(reason, position) at the same steps; False: the file could not be written
        save = functools.partial(ckpt.save, ck_path, model=model, optim=optim, config=cfg, d=d, log=log, fault=fault)

        # ---- the loop
        state.roll_over(plan)  # (a checkpoint may mark the end of an epoch)
        while not state.done(plan) and not state.stage_done(plan):
            loader.set_epoch(state.epoch, state.step_in_epoch)  # (mid-epoch: the data resume where they stopped)
            model.begin_epoch(state.epoch, fresh=state.step_in_epoch == 0)
            model.train()
            t_wait = time.perf_counter()
            for batch in loader:
                views = [v.to(d.device, non_blocking=True) for v in batch["views"]]
                if channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for v in views]
                timer.data_wait(time.perf_counter() - t_wait)

                with autocast(precision, d.device):
                    out = ddp(views, batch["index"].to(d.device, non_blocking=True))
                out["loss"] = fault.loss(state.step + 1, out["loss"])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out["loss"]).backward()  # (DDP averages the gradients here)
                norm = None
                if cfg.train.grad_clip:
                    scaler.unscale_(optimizer)
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                # a non-finite gradient skips the update on the device: no host read (engine/sync.py)
                skip = sync.skip_flag(model.parameters(), norm)
                sync.optimizer_step(optimizer, scaler, skip)
                model.after_step(skip)
                scheduler.step()  # (a skipped step still moves the schedule: resume positions stay whole steps)
                state.advance()
                timer.step_done()
                log.advance()

                # the host learns of skips and stop requests a step late, except where it syncs anyway
                log_due = state.step % cfg.train.log_every_steps == 0 or state.step == plan.total_steps
                ckpt_due = state.step % cfg.train.ckpt_every_steps == 0
                votes.cast(state.step, skip, stop.requested)
                for step_no, bad, stop_voted in votes.take(
                    now=log_due or ckpt_due or state.epoch_done(plan) or state.done(plan)
                ):
                    state.count_skipped(bad)
                    stopping = stopping or stop_voted
                    if bad:
                        log.write(
                            f"fastssl: step {step_no}: non-finite loss or gradients, step skipped ({state.bad_in_row} in a "
                            f"row, {state.skipped} in all)"
                        )
                    if state.bad_in_row >= cfg.train.max_bad_steps:
                        return run.abort_bad_steps(log, state, cfg.train.max_bad_steps, ck_path)
                if log_due:
                    rec = {"step": state.step, "epoch": state.progress(plan)}
                    if model.num_stages > 1:
                        rec["stage"] = state.stage
                    with sync.intended_read("a logging step"):
                        rec.update({k: dist.mean_over_ranks(v.detach().float()).item() for k, v in out.items()})
                    rec["lr"] = scheduler.get_last_lr()[0]
                    rec["skipped_steps"] = state.skipped
                    rec.update(timer.read(global_batch))
                    log.log(rec)
                if stopping or ckpt_due:
                    if not save(f"signal {stop.name}" if stopping else "periodic", state.restart_point(plan)):
                        return run.abort_unsaved(log, state.step)
                if stopping:
                    return run.stopped(log, stop.name, state.step)
                fault.after_step(state.step)  # (FASTSSL_KILL_AT_STEP: a crash, after this step's checkpoint)
                if state.done(plan):
                    break
                t_wait = time.perf_counter()
            if state.epoch_done(plan):
                monitor = model.end_epoch(state.epoch, source)
                if knn is not None and knn.due(state.epoch):
                    monitor.update(knn(model))
                if monitor:
                    stage_key = {"stage": state.stage} if model.num_stages > 1 else {}  # (as the step records)
                    log.log_epoch({"step": state.step, "epoch": state.epoch + 1, **stage_key, **monitor})
                if not save("end of epoch", state.restart_point(plan)):
                    return run.abort_unsaved(log, state.step)
                state.next_epoch()
            elif state.done(plan) and not save("max_steps", state.restart_point(plan)):
                return run.abort_unsaved(log, state.step)
        if state.stage_done(plan):  # the stage ran to its end
            if d.is_main:
                model.end_stage(state.stage, cfg.out_dir)
            # a resumed run starts the next stage afresh: no optimiser state to keep
            if state.stage + 1 < model.num_stages and not save("end of stage", state.next_stage_start(), optim=None):
                return run.abort_unsaved(log, state.step)
            state.next_stage()
            resumed = None
        # (otherwise the run is done: max_steps came first)

    agree = dist.same_on_all_ranks(model, d.device)
    if d.world > 1:
        rec = {"step": state.step, "epoch": state.epoch, "ranks_agree": float(agree)}
        log.log_epoch(rec, echo=False)  # (in metrics.jsonl only: the last line below says it)
    log.write(
        f"fastssl: done after {state.step} steps; checkpoint {ck_path}"
        + (f"; parameters identical on all {d.world} ranks: {agree}" if d.world > 1 else "")
    )
    log.close()
    dist.barrier()
    dist.cleanup()
    stop.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
