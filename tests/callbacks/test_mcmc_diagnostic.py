"""MCMCDiagnostic: long exact chains from the generator's samples, after validation.

Closed form: for ``E(x) = 0.5 x^T A x`` the exact target ``exp(-E)`` is ``N(0, A^-1)``, under
which ``E`` is ``chi^2_d / 2``: mean ``d / 2``, standard deviation ``sqrt(d / 2)``, whatever the
generator the chains start from.
"""

from __future__ import annotations

import csv
import math
import warnings

import lightning as L
import pytest
import torch
from conftest import QuadraticEnergy, random_spd
from image_helpers import fit, tiny_model
from lightning.pytorch.loggers import CSVLogger

from lightning_ebm import EBM
from lightning_ebm.callbacks import MCMCDiagnostic
from lightning_ebm.data import Toy2DDataModule
from lightning_ebm.energies import MLPEnergy
from lightning_ebm.latents import Uniform
from lightning_ebm.samplers import HMC, MALA, GradientDescent


def read_metrics(path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v:
                    out.setdefault(k, []).append(float(v))
    return out


@pytest.mark.parametrize("sampler", [MALA(steps=300, step_size=0.05, adapt_steps=50),
                                     HMC(steps=150, step_size=0.2, num_leapfrog=4)])
def test_chains_reach_the_exact_target_from_a_bad_start(sampler):
    """A generator that stops far from the target (3 tiny steps from Uniform[3, 4]^6): the chains
    still end at E ~ chi^2_6 / 2 (mean 3, std sqrt 3; 400 chains: the mean within 4 standard errors)."""
    d = 6
    model = EBM(QuadraticEnergy(random_spd(d, 0, dtype=torch.float32)), GradientDescent(3, 0.01),
                Uniform((d,), 3.0, 4.0))
    diag = MCMCDiagnostic(sampler, num_chains=400, seed=1)
    fig, metrics = diag.compute(None, model)
    assert metrics["mcmc/energy_start"] > 15
    assert abs(metrics["mcmc/energy_end"] - d / 2) < 4 * math.sqrt(d / 2) / math.sqrt(400)
    assert metrics["mcmc/energy_end_std"] == pytest.approx(math.sqrt(d / 2), rel=0.2)
    assert metrics["mcmc/energy_drift"] == pytest.approx(metrics["mcmc/energy_end"] - metrics["mcmc/energy_start"])
    assert 0.4 < metrics["mcmc/acceptance"] <= 1 and metrics["mcmc/nonfinite"] == 0
    assert fig is not None and "mcmc/mmd_end" not in metrics  # no trainer, no held-out data
    # the trace is the energy along the chain: step 0 is the generator's samples
    out = diag.run(model)
    assert out["energies"].shape == (sampler.steps + 1, 400)
    assert torch.allclose(out["energies"][0], model.energy(out["start"]).double())
    assert torch.allclose(out["energies"][-1], model.energy(out["end"]).double(), atol=1e-5)


def test_the_hook_fires_after_validation_and_logs_its_metrics_2d(tmp_path):
    L.seed_everything(0, verbose=False)
    model = EBM(MLPEnergy(2, hidden=16, num_layers=2), GradientDescent(5, 0.05), Uniform((2,), -4.0, 4.0))
    diag = MCMCDiagnostic(MALA(steps=20, step_size=0.01), num_chains=64, every_n_validations=2, record_every=5)
    trainer = L.Trainer(max_steps=6, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
                        logger=CSVLogger(tmp_path, name="run"), callbacks=[diag], accelerator="cpu",
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        inference_mode=False, num_sanity_val_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, Toy2DDataModule("8gaussians", batch_size=32, batches_per_epoch=6, num_val=128))
    assert diag.validations == 3  # at steps 2, 4, 6; not the sanity check
    assert diag.logged_steps == [4]  # every second validation
    run = tmp_path / "run" / "version_0"
    assert [p.name for p in (run / "images").iterdir()] == ["mcmc_diagnostic_step0000004.png"]
    logged = read_metrics(run / "metrics.csv")
    for key in ("mcmc/energy_start", "mcmc/energy_end", "mcmc/energy_drift", "mcmc/acceptance",
                "mcmc/mmd_start", "mcmc/mmd_end", "mcmc/energy_data", "mcmc/nonfinite"):
        assert logged[key] == [pytest.approx(diag.last_metrics[key])], key
    assert model.training  # eval mode was only borrowed
    assert diag.state_dict() == {"validations": 3}


def test_the_hook_fires_for_images(tmp_path):
    diag = MCMCDiagnostic(HMC(steps=5, step_size=0.01, num_leapfrog=2), num_chains=16)
    trainer = fit(tmp_path, tiny_model(), [diag], max_steps=2, val_check_interval=2, check_val_every_n_epoch=None)
    assert diag.logged_steps == [2]
    images = list((tmp_path / "lightning_logs" / "version_0" / "images").iterdir())
    assert [p.name for p in images] == ["mcmc_diagnostic_step0000002.png"]
    assert set(diag.last_metrics) >= {"mcmc/energy_end", "mcmc/acceptance", "mcmc/mmd_end"}
    assert trainer.global_step == 2


def test_bad_arguments():
    with pytest.raises(ValueError, match="MCMCDiagnostic: num_chains must be an integer >= 2, got 1"):
        MCMCDiagnostic(num_chains=1)
    with pytest.raises(ValueError, match="every_n_validations must be a positive integer, got 0"):
        MCMCDiagnostic(every_n_validations=0)
    with pytest.raises(TypeError, match="sampler must be a lightning_ebm.samplers.Sampler"):
        MCMCDiagnostic(sampler="mala")
