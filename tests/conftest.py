"""Shared fixtures: analytic energies (defined at module level so they pickle) and tiny models."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
# One intra-op thread, here and in the subprocesses tests start (CLI runs, DDP workers): the test
# models are tiny and overhead-bound, where a second thread gains nothing on an idle machine and
# costs 5-50x when the cores are shared (OpenMP threads spin waiting for each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


class QuadraticEnergy(nn.Module):
    """``E(x) = 0.5 x^T A x`` with ``grad E = A x``, ``Hessian = A``: the closed-form reference."""

    def __init__(self, A: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.scale = nn.Parameter(torch.ones((), dtype=A.dtype))  # a parameter that must get no grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return 0.5 * self.scale * ((flat @ self.A) * flat).sum(1)


def random_spd(dim: int, seed: int = 0, low: float = 0.5, high: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    """A symmetric positive-definite matrix with eigenvalues spread in ``[low, high]``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=dtype))
    eig = torch.linspace(low, high, dim, dtype=dtype)
    return q @ torch.diag(eig) @ q.T


@pytest.fixture
def quadratic():
    def make(dim: int = 2, seed: int = 0, dtype=torch.float64) -> QuadraticEnergy:
        return QuadraticEnergy(random_spd(dim, seed, dtype=dtype))

    return make


@pytest.fixture(autouse=True)
def _teardown_process_group():
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """One uninterrupted run of the shrunk toy recipe (``cli_run_helpers``): what interrupted runs must equal."""
    from cli_run_helpers import MAX_STEPS, run, small_config

    cwd = tmp_path_factory.mktemp("reference")
    rc, log = run(cwd, "fit", "--config", str(small_config(cwd)))
    assert rc == 0, log[-3000:]
    run_dir = cwd / "runs" / "toy2d" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file(), log[-3000:]
    assert f"max_steps={MAX_STEPS}" in log
    return run_dir
