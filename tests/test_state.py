"""The training loop's position (fastssl.engine.state) and the checkpoint functions around it
(fastssl.engine.checkpoint.save / contents / resume / restore_stage, fastssl.engine.run): in
process, no training subprocess."""

import itertools
import os
import random

import pytest
import torch

import fastssl
from fastssl.dist import DistInfo
from fastssl.engine import checkpoint as ckpt
from fastssl.engine import run
from fastssl.engine.signals import FaultInjection
from fastssl.engine.state import RunState, Schedule

POSITION_KEYS = ["stage", "epoch", "step_in_epoch", "step", "skipped_steps"]


def pos(s: RunState):
    return s.stage, s.epoch, s.step_in_epoch, s.step


class Log:
    """A MetricsLogger stand-in that keeps what is written."""

    def __init__(self):
        self.lines, self.closed = [], False

    def write(self, msg):
        self.lines.append(msg)

    def close(self):
        self.closed = True


CPU = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))

# --------------------------------------------------------------------------- round trip


def test_round_trip_through_a_dict():
    s = RunState(stage=1, epoch=2, step_in_epoch=3, step=43, skipped=4, bad_in_row=2)
    d = s.to_dict()
    assert list(d) == POSITION_KEYS
    assert d == {"stage": 1, "epoch": 2, "step_in_epoch": 3, "step": 43, "skipped_steps": 4}
    back = RunState.from_dict(d)
    assert back == RunState(1, 2, 3, 43, 4)  # bad_in_row is not saved: a resumed run counts afresh
    assert back.bad_in_row == 0


def test_round_trip_through_torch_save(tmp_path):
    s = RunState(stage=2, epoch=0, step_in_epoch=7, step=97, skipped=1)
    f = tmp_path / "s.pt"
    torch.save({"model": {}, **s.to_dict()}, f)
    assert RunState.from_dict(torch.load(f, weights_only=True)) == s


def test_reads_todays_checkpoint_dict():
    """A checkpoint dict as train.py has written it (every key), and one from before stages and
    the non-finite-step count."""
    today = {
        "model": {"w": torch.zeros(2)},
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "rng": [{}],
        "stage": 1,
        "epoch": 3,
        "step_in_epoch": 5,
        "step": 77,
        "config": None,
        "reason": "periodic",
        "skipped_steps": 2,
    }
    assert RunState.from_dict(today) == RunState(stage=1, epoch=3, step_in_epoch=5, step=77, skipped=2)
    older = {"model": {}, "rng": [{}], "epoch": 1, "step_in_epoch": 0, "step": 20, "config": None}
    assert RunState.from_dict(older) == RunState(stage=0, epoch=1, step_in_epoch=0, step=20, skipped=0)


# --------------------------------------------------------------------------- arithmetic


def test_total_steps():
    assert Schedule(1, 4, 10).total_steps == 40
    assert Schedule(2, 3, 5).total_steps == 30
    assert Schedule(2, 3, 5, max_steps=7).total_steps == 7
    assert Schedule(2, 3, 5, max_steps=1000).total_steps == 30


def test_advance_counts_skipped_steps_and_the_run_of_them():
    s = RunState()
    for bad in (False, True, True, False, True):
        s.advance(bad)
    assert (s.step, s.step_in_epoch, s.skipped, s.bad_in_row) == (5, 5, 3, 1)


def test_mid_epoch_restart_point_is_the_position_itself():
    plan = Schedule(1, 2, 10)
    s = RunState(epoch=1, step_in_epoch=3, step=13)
    assert pos(s.restart_point(plan)) == (0, 1, 3, 13)
    assert s.progress(plan) == 1.3 and not s.epoch_done(plan)


def test_end_of_epoch_restarts_at_the_next_epoch():
    plan = Schedule(1, 3, 10)
    s = RunState(epoch=0, step_in_epoch=10, step=10)
    assert s.epoch_done(plan)
    r = s.restart_point(plan)
    assert pos(r) == (0, 1, 0, 10)
    assert pos(s) == (0, 0, 10, 10)  # the restart point is a copy: the loop still ends the epoch
    s.next_epoch()
    assert pos(s) == pos(r) and not s.stage_done(plan)


def test_end_of_stage_restarts_at_the_next_stage():
    plan = Schedule(3, 2, 4)
    s = RunState(stage=0, epoch=1, step_in_epoch=4, step=8, skipped=1)
    assert pos(s.restart_point(plan)) == (0, 2, 0, 8)  # the end-of-epoch checkpoint
    s.next_epoch()
    assert s.stage_done(plan) and not s.done(plan)
    nxt = s.next_stage_start()
    assert pos(nxt) == (1, 0, 0, 8) and nxt.skipped == 1
    s.next_stage()
    assert pos(s) == (1, 0, 0, 8)


def test_a_checkpoint_at_an_epochs_end_rolls_over_on_resume():
    plan = Schedule(1, 3, 10)
    s = RunState.from_dict({"epoch": 1, "step_in_epoch": 10, "step": 20})
    s.roll_over(plan)
    assert pos(s) == (0, 2, 0, 20)
    s.roll_over(plan)  # mid- (here: start of) epoch: unchanged
    assert pos(s) == (0, 2, 0, 20)


def loop(plan, state, kill_at=None):
    """The position arithmetic of train.py's loop (stages, epochs, steps; no model): the
    checkpoints written as (reason, position) and the final state.  ``kill_at``: stop after
    that step, like a SIGKILL (after the step's checkpoint)."""
    saved = []
    while state.stage < plan.stages and not state.done(plan):
        state.roll_over(plan)
        while not state.done(plan) and not state.stage_done(plan):
            for _ in range(state.step_in_epoch, plan.steps_per_epoch):
                state.advance(False)
                if state.step % 3 == 0:  # ckpt_every_steps=3
                    saved.append(("periodic", state.restart_point(plan)))
                if state.step == kill_at:
                    return saved, state
                if state.done(plan):
                    break
            if state.epoch_done(plan):
                saved.append(("end of epoch", state.restart_point(plan)))
                state.next_epoch()
            elif state.done(plan):
                saved.append(("max_steps", state.restart_point(plan)))
        if state.stage_done(plan):
            if state.stage + 1 < plan.stages:
                saved.append(("end of stage", state.next_stage_start()))
            state.next_stage()
    return saved, state


def test_multi_stage_positions_by_hand():
    plan = Schedule(stages=2, epochs=2, steps_per_epoch=4)  # 16 steps
    saved, end = loop(plan, RunState())
    got = [(why, pos(p)) for why, p in saved]
    assert got == [
        ("periodic", (0, 0, 3, 3)),
        ("end of epoch", (0, 1, 0, 4)),
        ("periodic", (0, 1, 2, 6)),
        ("end of epoch", (0, 2, 0, 8)),
        ("end of stage", (1, 0, 0, 8)),
        ("periodic", (1, 0, 1, 9)),
        ("periodic", (1, 1, 0, 12)),
        ("end of epoch", (1, 1, 0, 12)),
        ("periodic", (1, 1, 3, 15)),
        ("end of epoch", (1, 2, 0, 16)),
    ]
    assert end.step == 16 and end.stage == 2 and end.epoch == 0  # (train.py's final ranks_agree record)


def test_max_steps_mid_stage():
    plan = Schedule(stages=2, epochs=2, steps_per_epoch=4, max_steps=10)
    saved, end = loop(plan, RunState())
    assert [(why, pos(p)) for why, p in saved][-2:] == [("periodic", (1, 0, 1, 9)), ("max_steps", (1, 0, 2, 10))]
    assert pos(end) == (1, 0, 2, 10) and end.done(plan)


def dedup(saved):
    """The positions checkpoints were written at, the same one written twice in a row once (a
    periodic checkpoint at an epoch's last step holds what the end-of-epoch one does)."""
    out = []
    for _, p in saved:
        if not out or out[-1] != pos(p):
            out.append(pos(p))
    return out


@pytest.mark.parametrize("stages,epochs,spe", [(1, 3, 5), (2, 2, 4), (3, 1, 3), (2, 3, 1)])
def test_resume_from_every_checkpoint_continues_the_same_run(stages, epochs, spe):
    """Killed after any step, resumed from the last checkpoint: the same positions follow."""
    plan = Schedule(stages, epochs, spe)
    ref, ref_end = loop(plan, RunState())
    for kill_at in range(3, plan.total_steps + 1):  # (the first checkpoint is at step 3 at the latest)
        before, _ = loop(plan, RunState(), kill_at=kill_at)
        resumed = RunState.from_dict(before[-1][1].to_dict())  # (through the checkpoint's fields)
        after, end = loop(plan, resumed)
        assert dedup(before + after) == dedup(ref), kill_at
        assert end.step == ref_end.step and end.done(plan)  # (a finished run, resumed, stays where it is)


def old_position(stage, epoch, step_in_epoch, step, steps_per_epoch, fresh_stage):
    """The position fields train.py wrote before RunState (its inline arithmetic, verbatim)."""
    if fresh_stage:
        return {"stage": stage + 1, "epoch": 0, "step_in_epoch": 0, "step": step}
    e, k = (epoch + 1, 0) if step_in_epoch >= steps_per_epoch else (epoch, step_in_epoch)
    return {"stage": stage, "epoch": e, "step_in_epoch": k, "step": step}


def test_restart_points_equal_the_old_inline_arithmetic():
    for spe, stage, epoch, k in itertools.product((1, 3, 8), (0, 2), (0, 1, 5), range(0, 9)):
        if k > spe:
            continue
        s = RunState(stage, epoch, k, step=17, skipped=3)
        for fresh in (False, True):
            want = {**old_position(stage, epoch, k, 17, spe, fresh), "skipped_steps": 3}
            got = s.next_stage_start() if fresh else s.restart_point(Schedule(3, 6, spe))
            assert got.to_dict() == want


# --------------------------------------------------------------------------- checkpoint files


def tiny_stage():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    sched.step()
    return model, (opt, sched, scaler)


def test_contents_keep_todays_keys_in_their_order():
    model, optim = tiny_stage()
    s = RunState(stage=0, epoch=1, step_in_epoch=2, step=7, skipped=1)
    ck = ckpt.contents(model, optim, [ckpt.rng_state()], s, {"cfg": 1}, "periodic")
    assert list(ck) == [
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "rng",
        "stage",
        "epoch",
        "step_in_epoch",
        "step",
        "config",
        "reason",
        "skipped_steps",
        "fastssl_version",  # (issue 33: the fastssl that wrote it)
    ]
    assert ck["fastssl_version"] == fastssl.__version__
    assert (ck["stage"], ck["epoch"], ck["step_in_epoch"], ck["step"], ck["skipped_steps"]) == (0, 1, 2, 7, 1)
    fresh = ckpt.contents(model, None, [ckpt.rng_state()], s.next_stage_start(), None, "end of stage")
    assert "optimizer" not in fresh and (fresh["stage"], fresh["epoch"], fresh["step_in_epoch"]) == (1, 0, 0)


def pickled_globals(path) -> set:
    """The ``module name`` pairs a torch.save file's pickle names (its GLOBAL opcodes)."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return {str(arg) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


def test_checkpoints_keep_the_config_as_plain_data_naming_no_fastssl_class(tmp_path):
    """A pickled structured DictConfig names the dataclass of every config section, so moving one
    (as Exemplar-CNN's ``SurrogateAug`` moved into its method folder) made every older checkpoint
    unreadable; the config is kept as plain dicts and lists, and loads back to the same config."""
    from fastssl.config import load_config

    cfg = load_config("configs/exemplar/builtin.yaml")
    path = str(tmp_path / "last.pt")
    model, optim = tiny_stage()
    assert ckpt.save(path, "periodic", RunState(), model=model, optim=optim, config=cfg, d=CPU, log=Log())
    assert not [g for g in pickled_globals(path) if g.startswith(("fastssl", "omegaconf"))], pickled_globals(path)
    ck = ckpt.load(path)
    assert type(ck["config"]) is dict and ck["config"]["method"]["aug"]["pca_basis"] == "set"
    assert load_config(ck["config"]) == cfg and ckpt.config_changes(ck["config"], cfg) == []


def test_a_checkpoint_naming_a_moved_module_still_reads(tmp_path, monkeypatch):
    """A checkpoint written before the move pickled its config as a DictConfig whose ``method.aug``
    names ``fastssl.data.surrogate.SurrogateAug``; it is read from where the class is now."""
    import sys

    from fastssl.config import load_config
    from fastssl.methods.exemplar.surrogate import SurrogateAug

    cfg = load_config("configs/exemplar/builtin.yaml", ["method.aug.flip=0.25"])
    path = str(tmp_path / "old.pt")
    model, _ = tiny_stage()
    monkeypatch.setattr(SurrogateAug, "__module__", "fastssl.data.surrogate")  # where it was
    monkeypatch.setitem(sys.modules, "fastssl.data.surrogate", sys.modules["fastssl.methods.exemplar.surrogate"])
    torch.save({"model": model.state_dict(), "config": cfg, "epoch": 0, "step": 0, "step_in_epoch": 0}, path)
    monkeypatch.undo()  # the old module name is gone again
    assert "fastssl.data.surrogate" not in sys.modules
    assert "fastssl.data.surrogate SurrogateAug" in pickled_globals(path)
    with pytest.raises(ModuleNotFoundError):
        torch.load(path, weights_only=False)  # (what a plain torch.load does with it)
    ck = ckpt.load(path)
    assert load_config(ck["config"]) == cfg and ck["config"].method.aug.flip == 0.25


def test_save_then_resume_restores_weights_optimiser_and_rng(tmp_path):
    path = str(tmp_path / "checkpoints" / "last.pt")
    model, optim = tiny_stage()
    random.seed(5)
    torch.manual_seed(5)
    s = RunState(stage=0, epoch=0, step_in_epoch=4, step=4)
    assert ckpt.save(path, "periodic", s, model=model, optim=optim, config={"x": 1}, d=CPU, log=Log())
    want = torch.rand(3), random.random()

    other = torch.nn.Linear(3, 2)
    with torch.no_grad():
        other.weight.zero_()
    ck = ckpt.resume(path, other)
    assert torch.equal(other.weight, model.weight) and ck["reason"] == "periodic"
    assert RunState.from_dict(ck) == s
    opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    other_optim = (
        opt,
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        torch.amp.GradScaler("cpu", enabled=False),
    )
    ckpt.restore_stage(ck, other_optim, rank=3)  # (a rank the checkpoint lacks: rank 0's RNG state)
    assert other_optim[1].last_epoch == 1
    assert torch.equal(
        opt.state_dict()["state"][0]["momentum_buffer"], optim[0].state_dict()["state"][0]["momentum_buffer"]
    )
    assert torch.equal(torch.rand(3), want[0]) and random.random() == want[1]
    fresh = (torch.optim.SGD(other.parameters(), lr=0.1), None, None)
    ckpt.restore_stage({"rng": ck["rng"]}, fresh, rank=0)  # a stage's start: the RNG state alone
    assert fresh[0].state_dict()["state"] == {}


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    model, optim = tiny_stage()
    assert ckpt.save(
        path, "periodic", RunState(step=3, step_in_epoch=3), model=model, optim=optim, config=None, d=CPU, log=Log()
    )
    monkeypatch.setenv("FASTSSL_FAIL_CKPT_AT_STEP", "6")
    log = Log()
    with torch.no_grad():
        model.weight.add_(1.0)
    ok = ckpt.save(
        path,
        "periodic",
        RunState(step=6, step_in_epoch=6),
        model=model,
        optim=optim,
        config=None,
        d=CPU,
        log=log,
        fault=FaultInjection(),
    )
    assert not ok
    assert len(log.lines) == 1 and "No space left on device" in log.lines[0] and "is intact" in log.lines[0]
    assert "at step 6" in log.lines[0]
    kept = ckpt.load(path)
    assert kept["step"] == 3 and not torch.equal(kept["model"]["weight"], model.weight)
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_resume_says_why_it_cannot(tmp_path):
    path = str(tmp_path / "last.pt")
    model, optim = tiny_stage()
    assert ckpt.save(path, "periodic", RunState(step=1), model=model, optim=optim, config=None, d=CPU, log=Log())
    with pytest.raises(ckpt.CheckpointError, match=r"does not fit this config's model: Error"):
        ckpt.resume(path, torch.nn.Linear(4, 2))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ckpt.CheckpointError, match=r"^cannot resume: checkpoint .* is unreadable or corrupt"):
        ckpt.resume(path, model)


# --------------------------------------------------------------------------- early exits


def test_abort_and_stop_close_the_log_and_say_why():
    log = Log()
    assert run.abort_unsaved(log, 12) == 3 and log.closed
    assert log.lines == ["fastssl: stopping at step 12: checkpoints cannot be written"]
    log = Log()
    s = RunState(step=7, bad_in_row=3)
    assert run.abort_bad_steps(log, s, 3, "r/checkpoints/last.pt") == 3
    assert log.lines == [
        "fastssl: 3 non-finite losses in a row (train.max_bad_steps=3): stopping at step 7; the "
        "last checkpoint r/checkpoints/last.pt is intact (lower optim.lr or set train.grad_clip)"
    ]
    log = Log()
    assert run.stopped(log, "SIGTERM", 9) == 0 and log.closed
    assert log.lines == ["fastssl: SIGTERM: checkpoint written at step 9; continue with --resume"]
    log = Log()
    run.stopped(log, "", 9)
    assert log.lines[0].startswith("fastssl: stop on another rank: ")
