"""kill -9 in the middle of writing a checkpoint: the previous checkpoint must stay loadable.

A child process trains a tiny model with ``ModelCheckpoint(save_last=True)`` saving every step.
Before the second ``last.ckpt`` is written, it arms a trap in ``open``: the file being written
gets half of the previous checkpoint's bytes, flushed to disk, and then the process sends itself
SIGKILL. With ``AtomicCheckpointIO`` the old ``last.ckpt`` is untouched; the control, a writer
that writes in place, leaves a truncated file behind (so the trap does hit the write).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from reliability_helpers import single_thread, tiny_data, tiny_ebm, tiny_trainer

from lightning_ebm import EBM
from lightning_ebm.callbacks import AtomicCheckpointIO
from lightning_ebm.cli import EBMCLI

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

ROOT = Path(__file__).resolve().parents[2]

CHILD = r'''
import builtins, os, signal, sys
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from reliability_helpers import tiny_data, tiny_ebm, tiny_trainer

from lightning_ebm.callbacks import AtomicCheckpointIO

writer, root = sys.argv[1], Path(sys.argv[2])
ckpt_dir = root / "ckpt"
real_open = builtins.open
trap = {"limit": None}


class KillMidWrite:
    """Writes through until ``limit`` bytes are on disk, then SIGKILLs its own process."""

    def __init__(self, f, limit):
        self._f, self._limit, self._written = f, limit, 0

    def write(self, data):
        data = memoryview(data).cast("B")
        if self._written + len(data) >= self._limit:
            self._f.write(data[: self._limit - self._written])
            self._f.flush()
            os.fsync(self._f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
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
    path = Path(os.fsdecode(file)) if isinstance(file, (str, bytes, os.PathLike)) else None
    if trap["limit"] and "w" in mode and path is not None and path.parent == ckpt_dir and "last" in path.name:
        return KillMidWrite(f, trap["limit"])
    return f


builtins.open = trapped_open


class InPlaceCheckpointIO(TorchCheckpointIO):
    """The control: torch.save straight into the target file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            torch.save(checkpoint, f)


class Arm(L.Callback):  # runs before ModelCheckpoint, which Lightning always puts last
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            trap["limit"] = (ckpt_dir / "last.ckpt").stat().st_size // 2
            (root / "armed").write_text(str(trap["limit"]))


io = AtomicCheckpointIO() if writer == "atomic" else InPlaceCheckpointIO()
L.seed_everything(0)
checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)
trainer = tiny_trainer(root, max_steps=3, limit_val_batches=0, plugins=[io], callbacks=[Arm(), checkpoint])
trainer.fit(tiny_ebm(), tiny_data())
'''


def run_child(tmp_path: Path, writer: str) -> subprocess.CompletedProcess:
    (tmp_path / "child.py").write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(tmp_path / "child.py"), writer, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)


def test_kill_9_while_writing_leaves_the_previous_checkpoint_loadable_and_resumable(tmp_path):
    result = run_child(tmp_path, "atomic")
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    limit = int((tmp_path / "armed").read_text())
    ckpt_dir = tmp_path / "ckpt"
    (partial,) = ckpt_dir.glob(".last.ckpt.tmp-*")  # the write that was killed: half a file, never renamed
    assert partial.stat().st_size == limit
    with pytest.raises(Exception):  # noqa: B017  (whatever torch raises for a truncated zip)
        torch.load(partial, weights_only=False)

    last = ckpt_dir / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 1  # the previous checkpoint, whole
    assert all(torch.isfinite(p).all() for p in EBM.load_from_checkpoint(last).parameters())
    # and a run resumes from it; its first save sweeps the dead writer's temporary file away
    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1)
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[checkpoint])
    trainer.fit(tiny_ebm(), tiny_data(), ckpt_path=last, weights_only=False)
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert not list(ckpt_dir.glob(".*.tmp-*"))


def test_control_a_writer_that_writes_in_place_is_broken_by_the_same_kill(tmp_path):
    result = run_child(tmp_path, "inplace")
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.stat().st_size == int((tmp_path / "armed").read_text())
    with pytest.raises(Exception):  # noqa: B017
        torch.load(last, weights_only=False)


def test_atomic_checkpoint_io_round_trips_and_refuses_storage_options(tmp_path):
    io = AtomicCheckpointIO()
    state = {"w": torch.arange(5.0), "step": 3}
    io.save_checkpoint(state, tmp_path / "sub" / "x.ckpt")  # creates the directory
    loaded = io.load_checkpoint(tmp_path / "sub" / "x.ckpt")
    assert torch.equal(loaded["w"], state["w"]) and loaded["step"] == 3
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.ckpt"]
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(state, tmp_path / "y.ckpt", storage_options={"a": 1})


def test_the_cli_writes_checkpoints_atomically_unless_told_otherwise(tmp_path):
    base = ["--config", str(ROOT / "configs" / "toy2d.yaml"), f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}"]
    cli = EBMCLI(args=base, run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    chosen = EBMCLI(args=[*base, "--trainer.plugins=lightning.fabric.plugins.TorchCheckpointIO"], run=False)
    assert type(chosen.trainer.strategy.checkpoint_io) is TorchCheckpointIO  # the user's choice stands
