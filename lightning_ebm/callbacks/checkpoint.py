"""Checkpoint files that survive a crash: write a temporary file next to the target, then rename.

Lightning's own ``TorchCheckpointIO`` serialises the whole checkpoint into memory, writes it to a
temporary file in the *system* temporary directory and moves it into place. When that directory
is on another filesystem than the checkpoints (node-local ``/tmp`` and a shared ``/scratch`` on
most clusters), the move is a copy, and a process killed during the copy leaves a truncated
``last.ckpt`` behind. ``AtomicCheckpointIO`` writes to a hidden temporary file in the target's own
directory, flushes it to disk (``fsync``) and renames it over the target (``os.replace``, atomic on
POSIX within one filesystem): a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: temporary file, ``fsync``, rename.

    The ``lightning-ebm`` CLI installs it by default; with a plain ``Trainer`` pass
    ``Trainer(plugins=[AtomicCheckpointIO()])``. Remote paths (``s3://`` and the like) go through
    Lightning's own writer: object stores replace an object in one piece already. A temporary file
    left by a killed writer (``.<name>.tmp-<pid>``) is removed by the next save of the same file.
    It streams the checkpoint to disk instead of building it in memory first, so peak host memory
    is one checkpoint smaller than Lightning's default.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path``; a crash at any moment leaves the old file or the new one."""
        fs, local = fsspec.core.url_to_fs(str(path))
        if not isinstance(fs, LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(
                "AtomicCheckpointIO.save_checkpoint got storage_options="
                f"{storage_options!r}, but it takes none (like Lightning's TorchCheckpointIO)"
            )
        target = Path(local)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)  # make the rename itself durable


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
