"""One uninterrupted run of the shrunk toy recipe, the reference the interrupted runs must equal."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_run_helpers import MAX_STEPS, run, small_config


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """The run directory of ``MAX_STEPS`` steps in one go."""
    cwd = tmp_path_factory.mktemp("reference")
    rc, log = run(cwd, "fit", "--config", str(small_config(cwd)))
    assert rc == 0, log[-3000:]
    run_dir = cwd / "runs" / "toy2d" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file(), log[-3000:]
    assert f"max_steps={MAX_STEPS}" in log
    return run_dir
