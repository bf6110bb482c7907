"""A real ``lightning-ebm fit`` stopped by SIGTERM / Ctrl-C / a kill mid-write, then ``--ckpt_path last``.

Each interrupted run must leave a checkpoint of the step it reached (within one step of the last
step its metrics.csv showed when the signal was sent), and resuming it must end with the same
weights, optimizer state and random streams, bit for bit, as the uninterrupted reference run, in
the same run directory, with the same metrics.csv rows.
"""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from cli_run_helpers import (
    MAX_STEPS,
    VAL_EVERY,
    comparable_rows,
    last_train_step,
    run,
    small_config,
    start,
    training_state,
    wait_until,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from reliability_helpers import InjectFault, differences, single_thread, tiny_data, tiny_ebm, tiny_trainer
from reliability_helpers import training_state as state_of

from lightning_ebm.callbacks import AtomicCheckpointIO, DivergenceError, DivergenceGuard, PreemptionCheckpoint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

RUN = Path("runs") / "toy2d" / "version_0"


def interrupt(cwd: Path, signum: int, seed: int, *args: str, command: list[str] | None = None):
    """Start a fit, wait until it has trained a few steps plus a random delay, send ``signum``.

    Returns the process (still running) and the last training step metrics.csv showed just before.
    """
    config = cwd / "toy2d.yaml"
    if not config.exists():
        small_config(cwd)
    process = start(cwd, "fit", "--config", str(config), *args, command=command)
    metrics = cwd / RUN / "metrics.csv"
    first = last_train_step(metrics)
    wait_until(lambda: last_train_step(metrics) >= first + 3, what="training to start", process=process)
    # a random moment, reproducible from the seed, well before the end (120 steps take >= 5 s)
    time.sleep(random.Random(seed).uniform(0.0, 0.5))
    seen = last_train_step(metrics)
    process.send_signal(signum)
    return process, seen


def check_same_as_reference(cwd: Path, reference_run: Path, skipped_validation: set[int]) -> None:
    run_dirs = sorted(p.name for p in (cwd / "runs" / "toy2d").iterdir())
    assert run_dirs == ["version_0"], run_dirs  # the resumed run continued the same directory
    final = training_state(cwd / RUN / "checkpoints" / "last.ckpt")
    expected = training_state(reference_run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == MAX_STEPS
    assert differences(expected, final) == []
    # one metrics.csv; every row of the reference once, except the validation of a step where the
    # run stopped (Lightning skips it on resume: the checkpoint was written before it)
    got, want = comparable_rows(cwd / RUN / "metrics.csv"), comparable_rows(reference_run / "metrics.csv")
    skipped = [r for r in want if dict(r).get("val/mmd") and int(dict(r)["step"]) + 1 in skipped_validation]
    assert sorted(got) == sorted(r for r in want if r not in skipped)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_leaves_the_step_reached_and_resume_equals_the_uninterrupted_run(tmp_path, reference_run,
                                                                                   signum):
    process, seen = interrupt(tmp_path, signum, seed=int(signum))
    rc = process.wait(timeout=120)
    log = (tmp_path / "fit.log").read_text()
    assert rc == 128 + signum, log[-3000:]
    emergency = tmp_path / RUN / "checkpoints" / "last-preempted.ckpt"
    step = torch.load(emergency, weights_only=True, mmap=True)["global_step"]
    # the handler reports the global step at which the signal arrived; the checkpoint holds that
    # step, or the next one when a step was in progress (it is finished first): within one step
    received = int(re.search(rf"{signum.name} received at global step (\d+)", log).group(1))
    assert received <= step <= received + 1, (received, step)
    assert seen + 1 <= step < MAX_STEPS  # and after what metrics.csv showed when the signal was sent
    assert f"after global step {step}" in log
    assert f"--ckpt_path {emergency.relative_to(tmp_path)}" in log  # the command to resume, spelled out

    rc, log = run(tmp_path, "fit", "--config", str(tmp_path / "toy2d.yaml"), "--ckpt_path", "last",
                  log="resume.log")
    assert rc == 0, log[-3000:]
    assert "last-preempted.ckpt" in log.split("Restored all states from the checkpoint at")[1].splitlines()[0]
    check_same_as_reference(tmp_path, reference_run, {step} if step % VAL_EVERY == 0 else set())


TRAP = r'''
import builtins, os, sys, time
from pathlib import Path

real_open = builtins.open


class PauseMidWrite:
    """Writes the first 4 KiB, flushes them to disk, says so in a file, then waits to be killed."""

    def __init__(self, f):
        self._f, self._written = f, 0

    def write(self, data):
        data = memoryview(data).cast("B")
        if self._written + len(data) >= 4096:
            self._f.write(data[: 4096 - self._written])
            self._f.flush()
            os.fsync(self._f.fileno())
            Path("writing").write_text(self._f.name)
            while True:
                time.sleep(0.05)
        self._written += len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def trapped_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if "w" in mode and isinstance(file, (str, os.PathLike)) and Path(file).name.startswith(".last-preempted.ckpt.tmp"):
        return PauseMidWrite(f)
    return f


builtins.open = trapped_open
from lightning_ebm.cli import main
main(sys.argv[1:])
'''


def test_a_kill_during_the_emergency_write_leaves_the_previous_checkpoint_and_resume_still_exact(
        tmp_path, reference_run):
    # a first interruption leaves last-preempted.ckpt at `first`
    process, _ = interrupt(tmp_path, signal.SIGTERM, seed=7)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "fit.log").read_text()[-3000:]
    emergency = tmp_path / RUN / "checkpoints" / "last-preempted.ckpt"
    first = torch.load(emergency, weights_only=True)["global_step"]
    before = emergency.read_bytes()

    # resumed, stopped again; its emergency write of the same file pauses half-way (the trap)
    (tmp_path / "trap.py").write_text(TRAP)
    process, _ = interrupt(tmp_path, signal.SIGTERM, 8, "--ckpt_path", "last",
                           command=[sys.executable, str(tmp_path / "trap.py")])
    wait_until(lambda: (tmp_path / "writing").exists(), what="the emergency write", process=process)
    process.send_signal(signal.SIGTERM)  # a second signal during the write: ignored, nothing corrupted
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None  # still writing: the second signals did not abort it
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    log = (tmp_path / "fit.log").read_text()
    assert "ignored until it is done" in log

    (partial,) = emergency.parent.glob(".last-preempted.ckpt.tmp-*")
    assert partial.stat().st_size == 4096
    assert emergency.read_bytes() == before  # the previous emergency checkpoint, untouched
    assert torch.load(emergency, weights_only=True)["global_step"] == first

    rc, log = run(tmp_path, "fit", "--config", str(tmp_path / "toy2d.yaml"), "--ckpt_path", "last",
                  log="resume.log")
    assert rc == 0, log[-3000:]
    # the killed run's metrics rows after its newest checkpoint were dropped and logged again
    skipped = {first} if first % VAL_EVERY == 0 else set()
    check_same_as_reference(tmp_path, reference_run, skipped)


# -- the callback in a plain Trainer (a drop-in user), in this process ----------------------------
class SignalAt(L.Callback):
    """Send this process ``signum`` at the end of the given global step (before PreemptionCheckpoint runs)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class RaiseAt(L.Callback):
    """Raise at global step ``step``: inside the step (before the optimizer step) or in validation after it."""

    def __init__(self, step: int, where: str) -> None:
        self.step, self.where = step, where

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.where == "step" and trainer.global_step == self.step:
            raise RuntimeError("boom inside the step")

    def on_validation_end(self, trainer, pl_module):
        if self.where == "validation" and trainer.global_step == self.step:
            raise RuntimeError("boom in validation")


def drop_in_fit(root: Path, max_steps: int, *extra: L.Callback, ckpt_path: str | None = None):
    L.seed_everything(0)
    model, data = tiny_ebm(), tiny_data()
    callbacks = [ModelCheckpoint(dirpath=root, save_last=True), PreemptionCheckpoint(), *extra]
    trainer = tiny_trainer(root, max_steps=max_steps, callbacks=callbacks)
    trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=False)
    return state_of(trainer, model)


@pytest.fixture(scope="module")
def drop_in_reference(tmp_path_factory):
    return drop_in_fit(tmp_path_factory.mktemp("drop_in"), 8)


@pytest.mark.usefixtures(single_thread.__name__)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_drop_in_a_signal_saves_the_step_and_lightning_s_own_last_resumes_it(tmp_path, drop_in_reference,
                                                                              capfd, signum):
    handler_before = signal.getsignal(signum)
    with pytest.raises(SystemExit) as stopped:
        drop_in_fit(tmp_path, 8, SignalAt(5, signum))
    assert stopped.value.code == 128 + signum
    assert signal.getsignal(signum) == handler_before  # handlers put back
    path = tmp_path / "last-preempted.ckpt"
    assert torch.load(path, weights_only=False)["global_step"] == 5
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 3  # what was there before
    err = capfd.readouterr().err
    assert f"trainer.fit(model, datamodule, ckpt_path={str(path)!r})" in err
    resumed = drop_in_fit(tmp_path, 8, ckpt_path="last")  # Lightning's own "last": the newest last*.ckpt
    assert differences(drop_in_reference, resumed) == []


@pytest.mark.usefixtures(single_thread.__name__)
def test_drop_in_an_exception_between_steps_saves_a_resumable_checkpoint(tmp_path, drop_in_reference):
    with pytest.raises(RuntimeError, match="boom in validation"):
        drop_in_fit(tmp_path, 8, RaiseAt(6, "validation"))
    assert torch.load(tmp_path / "last-preempted.ckpt", weights_only=False)["global_step"] == 6
    resumed = drop_in_fit(tmp_path, 8, ckpt_path=str(tmp_path / "last-preempted.ckpt"))
    assert differences(drop_in_reference, resumed) == []


@pytest.mark.usefixtures(single_thread.__name__)
def test_drop_in_an_exception_inside_a_step_or_a_divergence_writes_nothing(tmp_path, capfd):
    with pytest.raises(RuntimeError, match="boom inside the step"):
        drop_in_fit(tmp_path / "a", 8, RaiseAt(4, "step"))
    assert not (tmp_path / "a" / "last-preempted.ckpt").exists()
    assert "RuntimeError inside training step 5: no emergency checkpoint" in capfd.readouterr().err
    with pytest.raises(DivergenceError):
        drop_in_fit(tmp_path / "b", 8, DivergenceGuard(mode="stop"), InjectFault("nan_weight", [4]))
    assert (tmp_path / "b" / "last-good.ckpt").exists() and not (tmp_path / "b" / "last-preempted.ckpt").exists()


@pytest.mark.parametrize("kwargs, match", [
    ({"filename": "x.ckpt"}, "filename must be a non-empty file name"),
    ({"filename": ""}, "filename must be"),
    ({"signals": ["SIGHUP"]}, r"signals must be a list of names among \['SIGTERM', 'SIGINT', 'SIGUSR1'\]"),
    ({"signals": "SIGTERM"}, "signals must be a list"),
    ({"on_exception": 1}, "on_exception must be True or False"),
    ({"dirpath": 3}, "dirpath must be a path or None"),
])
def test_bad_arguments_fail_early_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=f"PreemptionCheckpoint: {match}"):
        PreemptionCheckpoint(**kwargs)


class Record(L.Callback):
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def on_train_start(self, trainer, pl_module):
        self.calls.append(("start", self.name))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.calls.append(("batch_end", self.name))


@pytest.mark.usefixtures(single_thread.__name__)
def test_moving_itself_last_skips_no_other_callback_s_hook(tmp_path):
    calls: list = []
    preemption = PreemptionCheckpoint()
    preemption.on_train_batch_end = lambda *a, **k: (calls.append(("batch_end", "preemption")),
                                                      PreemptionCheckpoint.on_train_batch_end(preemption, *a, **k))
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0,
                           callbacks=[Record("a", calls), preemption, Record("b", calls)])
    trainer.fit(tiny_ebm(), tiny_data())
    assert calls == [("start", "a"), ("start", "b"), ("batch_end", "a"), ("batch_end", "b"),
                     ("batch_end", "preemption")]


@pytest.mark.usefixtures(single_thread.__name__)
def test_under_slurm_lightning_still_requeues_and_the_step_boundary_checkpoint_is_the_newest(tmp_path,
                                                                                             monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.trainer.connectors import signal_connector

    for key, value in {"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "ebm", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    requeued: list = []
    monkeypatch.setattr(signal_connector, "call", lambda cmd, **kw: requeued.append(cmd) or 0)
    L.seed_everything(0)
    callbacks = [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), PreemptionCheckpoint(),
                 SignalAt(5, signal.SIGUSR1)]
    trainer = tiny_trainer(tmp_path, max_steps=8, callbacks=callbacks,
                           plugins=[AtomicCheckpointIO(), SLURMEnvironment(auto_requeue=True)])
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(tiny_ebm(), tiny_data())
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert requeued == [["scontrol", "requeue", "4242"]]  # Lightning's own handler ran: the job is requeued
    (hpc,) = tmp_path.glob("hpc_ckpt_*.ckpt")  # and saved its checkpoint, from inside the signal handler
    emergency = tmp_path / "ckpt" / "last-preempted.ckpt"
    assert torch.load(emergency, weights_only=False)["global_step"] == 5
    assert emergency.stat().st_mtime_ns >= hpc.stat().st_mtime_ns  # written after it: `--ckpt_path last` takes it


class DoubleCtrlC(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 5:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # two separate deliveries (identical pending signals would merge into one)
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.usefixtures(single_thread.__name__)
def test_a_second_ctrl_c_before_the_write_stops_at_once_without_it(tmp_path, capfd):
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        drop_in_fit(tmp_path, 8, DoubleCtrlC())
    assert stopped.value.code == 1  # Lightning's own shutdown on KeyboardInterrupt
    assert "second Ctrl-C: stopping now, without an emergency checkpoint" in capfd.readouterr().err
    assert not (tmp_path / "last-preempted.ckpt").exists()
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 3  # untouched
    assert signal.getsignal(signal.SIGINT) == before
