"""Every exported objective trains under two-process DDP (gloo, CPU), launched as torchrun launches it.

Each rank draws its own data, so the ranks agree on the energy's parameters after training only if every
gradient an objective produces (score matching's double backward, NCE's noise, DRL's per-level chains,
JEM's classifier on labelled batches) is averaged by DDP; what an objective fits to the data (NCE's
``fit_noise``) must be the same on every rank. A new objective without a case here fails
``test_every_exported_objective_has_a_ddp_case``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_ebm import objectives
from lightning_ebm.objectives import Objective

pytestmark = pytest.mark.ddp

ROOT = Path(__file__).resolve().parents[2]
LEVELS = {"num_levels": 3, "sigma_min": 0.1, "sigma_max": 0.6}
CASES = {
    "MaximumLikelihood": {"objective": "MaximumLikelihood", "kwargs": {"generator_loss_weight": 0.5}},
    "DenoisingScoreMatching": {"objective": "DenoisingScoreMatching", "kwargs": {"sigma": 0.3}},
    "MultiLevelDenoisingScoreMatching": {"objective": "MultiLevelDenoisingScoreMatching",
                                         "kwargs": {"sigmas": [0.1, 0.5]}},
    "SlicedScoreMatching": {"objective": "SlicedScoreMatching", "kwargs": {"num_projections": 2}},
    "ExactScoreMatching": {"objective": "ExactScoreMatching"},
    "NoiseContrastiveEstimation": {"objective": "NoiseContrastiveEstimation", "kwargs": {"fit_noise": True}},
    "JointEnergyModel": {"objective": "JointEnergyModel", "kwargs": {"conditional_weight": 0.5, "alpha": 0.1},
                         "num_classes": 8},
    "DiffusionRecoveryLikelihood": {
        "objective": "DiffusionRecoveryLikelihood", "kwargs": {"steps": 2, **LEVELS},
        "energy": ["MLPEnergy", {"dim": 2, "hidden": 16, "num_layers": 2, "num_levels": 3}],
        "sampler": ["DiffusionRecovery", {"steps": 2, **LEVELS}],
        "latent": ["Gaussian", {"shape": [2]}],
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_exported_objective_has_a_ddp_case():
    exported = {n for n in objectives.__all__ if isinstance(getattr(objectives, n), type)
                and issubclass(getattr(objectives, n), Objective) and getattr(objectives, n) is not Objective}
    assert exported == set(CASES)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("ddp_objectives")
    spec = out / "cases.json"
    spec.write_text(json.dumps(CASES))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               f"--master_port={_free_port()}", str(Path(__file__).with_name("ddp_objectives_worker.py")),
               str(spec), str(out)]
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    return {name: [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in (0, 1)] for name in CASES}


@pytest.mark.parametrize("name", sorted(CASES))
def test_objective_trains_in_lockstep_on_two_ranks(ranks, name):
    first, second = ranks[name]
    assert first["parameters"] == second["parameters"], f"{name}: the ranks' energies differ after training"
    assert first["objective_state"] == second["objective_state"]
    for key in ("train/loss", "val/mmd", "val/mmd_floor"):
        assert math.isfinite(first["metrics"][key]), (name, key, first["metrics"])
    if name == "NoiseContrastiveEstimation":  # fitted to both ranks' first batches: a real, non-trivial state
        assert len(first["objective_state"]["mean"]) == 2 and len(first["objective_state"]["scale_tril"]) == 4
