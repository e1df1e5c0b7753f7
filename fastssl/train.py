"""Pre-train a self-supervised method.

    torchrun --standalone --nproc_per_node=N fastssl/train.py --config configs/sc/builtin.yaml \
        train.epochs=1 data.pipeline=dali-cpu out_dir=runs/x [--resume]

Read top to bottom: config -> processes -> data -> model -> optimiser -> (resume) -> loop.
Every config value is checked before anything heavy is built; a SIGTERM/SIGUSR1 finishes the
current step, writes a checkpoint and exits 0; ``--resume`` continues from it exactly.  A step
whose loss is not finite is skipped (no update) and counted; ``train.max_bad_steps`` of them in
a row stop the run (exit 3) with the last checkpoint intact, as does a checkpoint that cannot
be written (e.g. a full disk: the previous one stays loadable).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

if __package__ in (None, ""):  # run as a script (torchrun fastssl/train.py) from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from fastssl.config import ConfigError, load_config, save_config
from fastssl.data.dali_check import PipelineBuildError
from fastssl.data.executors import resolve_pipeline
from fastssl.data.executors import steps_per_epoch as loader_steps
from fastssl.data.sources import build_source
from fastssl.engine import checkpoint as ckpt
from fastssl.engine import dist
from fastssl.engine.metrics import MetricsLogger, StepTimer
from fastssl.engine.monitors import KNNMonitor
from fastssl.engine.optim import (autocast, build_optimizer, build_scheduler, grad_scaler,
                                  resolve_precision)
from fastssl.engine.signals import FaultInjection, StopRequest
from fastssl.methods import get_method
from fastssl.models import build_backbone


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file, e.g. configs/sc/builtin.yaml (default with --resume: out_dir/config.yaml)")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)  # every value validated here, before any model or data
    except ConfigError as e:
        print(f"fastssl: config error: {e}", file=sys.stderr)
        return 2

    # ---- processes, seeds, output folder
    d = dist.setup()
    stop = StopRequest()
    fault = FaultInjection()
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
        print(f"fastssl: data: {len(source.bad_files)} unreadable image files left out (e.g. {f}: {why}); "
              f"list them with: python -m fastssl.data.check {cfg.data.path}", file=sys.stderr)
    model = get_method(cfg.method.name)(cfg, build_backbone(cfg.model, source.image_size), source.image_size,
                                        len(source.pretrain))
    model = model.to(d.device)
    channels_last = cfg.train.channels_last if cfg.train.channels_last is not None else d.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    precision = resolve_precision(cfg, d.device)
    knn = KNNMonitor.build(cfg, source, type(model), d.device) if d.is_main else None  # (rank 0 probes)
    global_batch = cfg.data.batch_size * d.world

    # ---- resume: the position (stage, epoch, step) and, below, the stage's optimiser state
    state, stage0, epoch, step_in_epoch, step = None, 0, 0, 0, 0
    if args.resume and os.path.isfile(ck_path):
        try:
            state = ckpt.load(ck_path)
            model.load_state_dict(state["model"])
        except ckpt.CheckpointError as e:
            print(f"fastssl: cannot resume: {e}", file=sys.stderr)
            return 2
        except RuntimeError as e:
            print(f"fastssl: {ck_path} does not fit this config's model: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        stage0, epoch, step_in_epoch, step = state.get("stage", 0), state["epoch"], state["step_in_epoch"], state["step"]
    elif args.resume and d.is_main:
        print(f"fastssl: no checkpoint at {ck_path}; starting a new run", file=sys.stderr)

    # A method trains in one or more stages (e.g. one layer at a time); each stage has its own
    # trainable parameters, data recipe, data loader and optimiser.
    steps_per_epoch = loader_steps(model.epoch_items(len(source.pretrain)), cfg.data.batch_size, d.world)
    total_steps = model.num_stages * cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    log = MetricsLogger(cfg.out_dir, d.is_main, total_steps, step, cfg.train.tensorboard, cfg.train.progress)
    timer = StepTimer(d.device)
    finished = step >= total_steps
    skipped = state.get("skipped_steps", 0) if state is not None else 0  # non-finite-loss steps so far
    bad_in_row = 0

    for stage in range(stage0, model.num_stages):
        if finished:
            break
        loader = None  # the previous stage's loader goes first (the tensor executor holds the dataset on the device)
        model.begin_stage(stage, source)
        try:  # (a DALI GPU graph that cannot be built is refused here, before any step)
            loader = model.loader(cfg, source, d.rank, d.world, d.device_id, d.device)
        except PipelineBuildError as e:
            print(f"fastssl: {e}", file=sys.stderr)
            dist.cleanup()
            return 2
        optimizer, opt_name = build_optimizer(cfg, model, global_batch, d.device)
        scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
        scaler = grad_scaler(precision, d.device)
        ddp = dist.wrap_ddp(model, model.find_unused_parameters, model.ddp_keep_local) if d.world > 1 else model
        if state is not None and stage == stage0:
            if "optimizer" in state:  # (absent when the checkpoint marks the start of a stage)
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                scaler.load_state_dict(state["scaler"])
            ckpt.set_rng_state(state["rng"][d.rank] if d.rank < len(state["rng"]) else state["rng"][0])
        log.write(f"fastssl: {cfg.method.name} on {source.name} ({len(source.pretrain)} images, {source.image_size}px) | "
                  f"{cfg.model.arch} | {d.world} x {d.device.type} | pipeline {resolve_pipeline(cfg.data.pipeline)} | "
                  f"{precision} | {opt_name} | batch {cfg.data.batch_size} x {d.world} | {steps_per_epoch} steps/epoch"
                  + (f" | stage {stage + 1}/{model.num_stages}" if model.num_stages > 1 else "")
                  + (f" | resumed at epoch {epoch} step {step}" if state is not None and stage == stage0 else ""))

        def save(reason: str, fresh_stage: bool = False) -> bool:
            """All ranks' RNG states are gathered; rank 0 writes the file atomically.  Returns
            False on every rank when the write failed (the previous checkpoint is intact)."""
            rngs = [ckpt.rng_state()]
            if d.world > 1:
                rngs = [None] * d.world
                torch.distributed.all_gather_object(rngs, ckpt.rng_state())
            error = None
            if d.is_main:
                try:
                    write(reason, fresh_stage, rngs)
                except OSError as e:
                    error = e
                    log.write(f"fastssl: cannot write the checkpoint at step {step} ({e}); "
                              f"the previous checkpoint {ck_path} is intact")
            return not dist.any_rank(error is not None, d.device)

        def write(reason, fresh_stage, rngs):
            if fresh_stage:  # the stage is done: resume at the start of the next one
                pos = {"stage": stage + 1, "epoch": 0, "step_in_epoch": 0}
                opt = {}
            else:
                e, k = (epoch + 1, 0) if step_in_epoch >= steps_per_epoch else (epoch, step_in_epoch)
                pos = {"stage": stage, "epoch": e, "step_in_epoch": k}
                opt = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "scaler": scaler.state_dict()}
            ckpt.save_atomic({"model": model.state_dict(), **opt, "rng": rngs, **pos, "step": step,
                              "config": cfg, "reason": reason, "skipped_steps": skipped}, ck_path,
                             fail_after_bytes=4096 if fault.ckpt_fails(step) else None)

        def abort(msg: str) -> int:
            log.write(msg)
            log.close()
            dist.cleanup()
            return 3

        # ---- the loop
        if step_in_epoch >= steps_per_epoch:
            epoch, step_in_epoch = epoch + 1, 0
        while not finished and epoch < cfg.train.epochs:
            loader.set_epoch(epoch, step_in_epoch)
            model.begin_epoch(epoch, fresh=step_in_epoch == 0)
            model.train()
            t_wait = time.perf_counter()
            for batch in loader:
                views = [v.to(d.device, non_blocking=True) for v in batch["views"]]
                if channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for v in views]
                timer.data_wait(time.perf_counter() - t_wait)

                with autocast(precision, d.device):
                    out = ddp(views, batch["index"].to(d.device, non_blocking=True))
                out["loss"] = fault.loss(step + 1, out["loss"])
                # one all-reduce per step: every rank skips a non-finite step and stops on a signal together
                bad, stopping = dist.any_ranks([~torch.isfinite(out["loss"].detach()), stop.requested], d.device)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out["loss"]).backward()  # (also when bad: DDP's gradient buckets expect it)
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    skipped, bad_in_row = skipped + 1, bad_in_row + 1
                else:
                    if cfg.train.grad_clip:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    model.after_step()
                    bad_in_row = 0
                scheduler.step()
                step += 1
                step_in_epoch += 1
                timer.step_done()
                log.advance()

                if step % cfg.train.log_every_steps == 0 or step == total_steps:
                    rec = {"step": step, "epoch": epoch + step_in_epoch / steps_per_epoch}
                    if model.num_stages > 1:
                        rec["stage"] = stage
                    rec.update({k: dist.mean_over_ranks(v.detach().float()).item() for k, v in out.items()})
                    rec["lr"] = scheduler.get_last_lr()[0]
                    rec["skipped_steps"] = skipped
                    rec.update(timer.read(global_batch))
                    log.log(rec)
                if bad:
                    log.write(f"fastssl: step {step}: non-finite loss, step skipped ({bad_in_row} in a row, {skipped} in all)")
                    if bad_in_row >= cfg.train.max_bad_steps:
                        return abort(f"fastssl: {bad_in_row} non-finite losses in a row (train.max_bad_steps="
                                     f"{cfg.train.max_bad_steps}): stopping at step {step}; the last checkpoint "
                                     f"{ck_path} is intact (lower optim.lr or set train.grad_clip)")
                if stopping or step % cfg.train.ckpt_every_steps == 0:
                    if not save(f"signal {stop.name}" if stopping else "periodic"):
                        return abort(f"fastssl: stopping at step {step}: checkpoints cannot be written")
                if stopping:
                    log.write(f"fastssl: {stop.name or 'stop on another rank'}: checkpoint written at step {step}; "
                              f"continue with --resume")
                    log.close()
                    dist.barrier()
                    dist.cleanup()
                    return 0
                fault.after_step(step)
                if step >= total_steps:
                    finished = True
                    break
                t_wait = time.perf_counter()
            if step_in_epoch >= steps_per_epoch:
                monitor = model.end_epoch(epoch, source)
                if knn is not None and knn.due(epoch):
                    monitor.update(knn(model))
                if monitor:
                    stage_key = {"stage": stage} if model.num_stages > 1 else {}  # (as the step records)
                    log.log_epoch({"step": step, "epoch": epoch + 1, **stage_key, **monitor})
                if not save("end of epoch"):
                    return abort(f"fastssl: stopping at step {step}: checkpoints cannot be written")
                epoch, step_in_epoch = epoch + 1, 0
            elif finished and not save("max_steps"):
                return abort(f"fastssl: stopping at step {step}: checkpoints cannot be written")
        if epoch >= cfg.train.epochs:  # the stage ran to its end
            if d.is_main:
                model.end_stage(stage, cfg.out_dir)
            if stage + 1 < model.num_stages and not save("end of stage", fresh_stage=True):
                return abort(f"fastssl: stopping at step {step}: checkpoints cannot be written")
            epoch, step_in_epoch, state = 0, 0, None

    agree = dist.same_on_all_ranks(model, d.device)
    if d.world > 1:
        log.log_epoch({"step": step, "epoch": epoch, "ranks_agree": float(agree)})
    log.write(f"fastssl: done after {step} steps; checkpoint {ck_path}"
              + (f"; parameters identical on all {d.world} ranks: {agree}" if d.world > 1 else ""))
    log.close()
    dist.barrier()
    dist.cleanup()
    stop.restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
