"""A checkpoint of the step reached when a run is stopped: SIGTERM, Ctrl-C, SIGUSR1 or an exception.

Clusters and preemptible machines stop a job with SIGTERM (SLURM also sends SIGUSR1 before the
time limit with ``--signal``) and kill it a few seconds later; a user stops it with Ctrl-C.
Without this callback everything since the last periodic checkpoint is lost. With it, the signal
only sets a flag; at the end of the training step in progress (a step boundary, where a
checkpoint resumes bit for bit) the callback writes a complete checkpoint through the trainer's
checkpoint writer (``AtomicCheckpointIO`` under the CLI: a kill during the write leaves the
previous file whole), prints the command that resumes it and exits with status 128 + signal
number. An exception raised between two training steps (in validation, in a callback) gets the
same checkpoint; one raised inside a step does not (that step is half done: the weights, the
random streams and the data stream would not agree), and neither does ``DivergenceError`` (the
divergence guard has saved its last good state).

Lightning by itself: on SIGTERM it finishes the current batch and raises ``SIGTERMException``
(saving nothing); Ctrl-C raises ``KeyboardInterrupt`` wherever the program is, mid-step
included, and Lightning shuts down without saving; under SLURM with auto-requeue it saves
``hpc_ckpt_<n>.ckpt`` from inside the SIGUSR1 handler (wherever the step is) and requeues the job.
This callback chains to whatever handler was installed before it (Lightning's SLURM requeue
handler, and its SIGTERM handler when Lightning launched several processes), so requeueing keeps
working.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from .._checks import check_bool, check_type, fail
from .logging import run_dir

__all__ = ["PreemptionCheckpoint", "Preempted"]

_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class Preempted(SystemExit):
    """Raised (as ``SystemExit(128 + signal number)``) after the emergency checkpoint is written."""

    def __init__(self, code: int, path: Path, step: int) -> None:
        super().__init__(code)
        self.path, self.step = path, step


class PreemptionCheckpoint(L.Callback):
    """Write ``<dirpath>/<filename>.ckpt`` at the end of the step in progress when the run is stopped.

    Args:
        dirpath: where the checkpoint goes; default: the ModelCheckpoint's directory, else
            ``<run directory>/checkpoints``.
        filename: file name without ``.ckpt``. The default, ``last-preempted``, is one that
            Lightning's own ``trainer.fit(ckpt_path="last")`` finds next to ModelCheckpoint's
            ``last.ckpt`` (it takes the newest ``last*.ckpt`` of that directory).
        signals: names of the signals that stop the run with a checkpoint (a subset of
            ``SIGTERM``, ``SIGINT``, ``SIGUSR1``).
        on_exception: also write it when the run dies of an exception between two training steps.

    A second Ctrl-C before the write starts stops at once, without the checkpoint (the earlier
    checkpoints are untouched); any signal that arrives during the write is ignored until the
    write is done. ``resume_command`` (set by the ``lightning-ebm`` CLI) is the command printed.
    Under DDP every rank takes part in the write and all ranks stop at the same step (one small
    all-reduce per step tells them whether any rank was signalled).
    """

    def __init__(self, dirpath: str | Path | None = None, filename: str = "last-preempted",
                 signals: list[str] | tuple[str, ...] = _SIGNALS, on_exception: bool = True) -> None:
        owner = "PreemptionCheckpoint"
        check_type(owner, "dirpath", dirpath, (str, Path, type(None)), "a path or None")
        check_type(owner, "filename", filename, str, "a file name")
        check_bool(owner, "on_exception", on_exception)
        if not filename or "/" in filename or filename.endswith(".ckpt"):
            raise fail(owner, "filename", "a non-empty file name without a directory or '.ckpt'", filename)
        check_type(owner, "signals", signals, (list, tuple), f"a list of names among {list(_SIGNALS)}")
        for name in signals:
            if name not in _SIGNALS:
                raise fail(owner, "signals", f"a list of names among {list(_SIGNALS)}", list(signals))
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.filename = filename
        self.signals = tuple(dict.fromkeys(signals))
        self.on_exception_enabled = bool(on_exception)
        self.resume_command: str | None = None
        self.last_write_seconds: float | None = None
        self._received: int | None = None
        self._writing = False
        self._in_step = False
        self._pending: tuple[int, Path] | None = None
        self._start_step = 0
        self._previous: dict[int, Any] = {}

    # -- where ----------------------------------------------------------------------------------
    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        """The file this callback writes for ``trainer``."""
        if self.dirpath is not None:
            directory = self.dirpath
        else:
            callback = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
            directory = Path(callback.dirpath) if callback is not None else run_dir(trainer) / "checkpoints"
        return directory / f"{self.filename}.ckpt"

    # -- signal handlers ------------------------------------------------------------------------
    def _install(self, trainer: L.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python allows signal handlers only in the main thread
        chain_sigterm = trainer.strategy.launcher is not None  # Lightning forwards SIGTERM to its workers
        for name in self.signals:
            signum = getattr(signal, name, None)
            if signum is None:  # not on this platform (SIGUSR1 on Windows)
                continue
            previous = signal.getsignal(signum)
            self._previous[signum] = previous
            chain = previous if callable(previous) and previous is not signal.default_int_handler else None
            if signum == signal.SIGTERM and not chain_sigterm:
                chain = None  # one process: Lightning's handler would only raise SIGTERMException elsewhere
            signal.signal(signum, self._make_handler(trainer, chain))

    def _make_handler(self, trainer: L.Trainer, chain: Any):
        def handler(signum: int, frame: Any) -> None:
            if chain is not None:
                chain(signum, frame)
            name = signal.Signals(signum).name
            if self._writing:
                _say_now(f"{name} received while the emergency checkpoint is being written: ignored until it is done.")
                return
            if self._received is not None:
                if signum == signal.SIGINT and self._pending is None:
                    _say_now("second Ctrl-C: stopping now, without an emergency checkpoint.")
                    raise KeyboardInterrupt
                return
            self._received = signum
            again = " (Ctrl-C again to stop at once, without it)" if signum == signal.SIGINT else ""
            _say_now(f"{name} received at global step {trainer.global_step}: writing a checkpoint at the end "
                     f"of the current step, then stopping{again}.")

        return handler

    def _restore(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous.items():
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # -- hooks ------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._received, self._writing, self._in_step, self._pending = None, False, False, None
        self._start_step = trainer.global_step
        # run after every other callback's on_train_batch_end (the divergence guard's verdict, ModelCheckpoint)
        # (a new list: Lightning is iterating over the current one to call this very hook)
        if trainer.callbacks and trainer.callbacks[-1] is not self:
            trainer.callbacks = [c for c in trainer.callbacks if c is not self] + [self]
        self._install(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._in_step = False
        stop = self._received is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and self._pending is None:
            signum = self._received if self._received is not None else signal.SIGTERM
            self._pending = (int(signum), self._write(trainer))

    # Exit at the next hook after Lightning has logged this step's metrics (it does so after
    # on_train_batch_end): before the next batch, the validation, the end of the epoch or of training.
    def _exit_if_pending(self, trainer: L.Trainer) -> None:
        if self._pending is None:
            return
        signum, path = self._pending
        _say(self._message(trainer, f"stopped by {signal.Signals(signum).name}", path), trainer)
        raise Preempted(128 + signum, path, trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._exit_if_pending(trainer)
        self._in_step = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._exit_if_pending(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._exit_if_pending(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()
        self._exit_if_pending(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, (Preempted, KeyboardInterrupt)) or not self.on_exception_enabled:
            return
        if type(exception).__name__ == "DivergenceError" or type(exception).__name__ == "SIGTERMException":
            return  # the guard saved its last good state / Lightning stopped at a point that is not a step end
        if trainer.state.fn != "fit" or trainer.global_step == self._start_step:
            return  # nothing trained since the run started (or resumed): the existing checkpoints hold it
        if self._in_step:
            _say(f"{type(exception).__name__} inside training step {trainer.global_step + 1}: no emergency "
                 "checkpoint (a half-done step does not resume exactly); the newest periodic checkpoint "
                 "is the one to resume from.", trainer)
            return
        path = self._write(trainer)
        _say(self._message(trainer, f"died of {type(exception).__name__}", path), trainer)

    # -- the write --------------------------------------------------------------------------------
    def _write(self, trainer: L.Trainer) -> Path:
        path = self.checkpoint_path(trainer)
        self._writing = True
        start = time.perf_counter()
        try:
            trainer.save_checkpoint(path, weights_only=False)  # the full state: resumable
        finally:
            self._writing = False
        self.last_write_seconds = time.perf_counter() - start
        return path

    def _message(self, trainer: L.Trainer, why: str, path: Path) -> str:
        command = (f"    {self.resume_command.replace('{ckpt_path}', shlex.quote(str(path)))}"
                   if self.resume_command else
                   f"    trainer.fit(model, datamodule, ckpt_path={str(path)!r})")
        return (f"Training {why} after global step {trainer.global_step}; checkpoint of that step written "
                f"in {self.last_write_seconds:.2f} s to\n    {path}\nResume exactly where it stopped with:\n"
                f"{command}")


def _say(message: str, trainer: L.Trainer | None = None) -> None:
    if trainer is None or trainer.is_global_zero:
        print(f"[PreemptionCheckpoint] {message}", file=sys.stderr, flush=True)


def _say_now(message: str) -> None:
    """From a signal handler: one unbuffered write (``print`` there can hit a reentrant stderr)."""
    os.write(2, f"\n[PreemptionCheckpoint] {message}\n".encode())
