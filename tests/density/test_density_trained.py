"""The generator's density on a 2-D model trained here for a few hundred steps, and the callbacks.

Checks that need no closed form: ``exp(log q)`` integrates to one over a grid that holds the
samples (minus the Monte-Carlo fraction of samples outside it); ``generate`` and
``generator_log_prob`` agree on the same points; grid KLs agree with Monte-Carlo estimates.
"""

from __future__ import annotations

import copy
import csv
import math
import types
import warnings

import lightning as L
import pytest
import torch

from lightning_ebm import EBM
from lightning_ebm import density as dn
from lightning_ebm.callbacks import EMA, DensityPanel2D, LongRunDiagnostic
from lightning_ebm.callbacks.density import density_metrics
from lightning_ebm.callbacks.ema import averaged_weights
from lightning_ebm.data import Toy2DDataModule
from lightning_ebm.energies import MLPEnergy
from lightning_ebm.latents import Gaussian
from lightning_ebm.samplers import ODE, GradientDescent, Langevin

BOX = (-5.0, 5.0, -5.0, 5.0)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, accelerator="cpu", devices=1)
    return L.Trainer(**{**defaults, **kwargs})


@pytest.fixture(scope="module")
def trained() -> tuple[EBM, Toy2DDataModule]:
    """An MLP energy trained 300 steps on 8gaussians against a 20-step gradient-descent generator."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = EBM(MLPEnergy(2, hidden=32, num_layers=2), GradientDescent(20, 0.05), Gaussian((2,), std=2.0),
                rng_seed=0, optimizer=lambda p: torch.optim.Adam(p, lr=2e-3, betas=(0.5, 0.999)))
    datamodule = Toy2DDataModule("8gaussians", batch_size=128, batches_per_epoch=300, num_val=500)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_steps=300).fit(model, datamodule)
    torch.set_num_threads(threads)
    return model.eval(), datamodule


def fraction_outside(model: EBM, n: int = 20000) -> float:
    x = model.generate(n, generator=torch.Generator().manual_seed(11))
    lo = torch.tensor([BOX[0], BOX[2]], dtype=x.dtype)
    hi = torch.tensor([BOX[1], BOX[3]], dtype=x.dtype)
    return float(((x < lo) | (x > hi)).any(1).double().mean())


@pytest.mark.parametrize("kind", ["descent", "ode"])
def test_generator_density_integrates_to_one(trained, kind):
    model, _ = trained
    if kind == "ode":  # the gradient flow of the same trained energy
        model = copy.deepcopy(model).double()
        model.sampler = ODE(t_end=1.0, method="rk4", step_size=0.05)
    points, area = dn.grid_2d(BOX, 80 if kind == "ode" else 120, dtype=model.dtype)
    mass = float(model.generator_log_prob(points, batch_size=4096).double().exp().sum() * area)
    assert abs(mass - 1.0) < 0.02
    # the mass the grid misses is the mass the generator puts outside it (Monte Carlo, se ~ 6e-4)
    assert abs(mass - (1.0 - fraction_outside(model))) < 0.005


def test_generate_and_generator_log_prob_agree(trained):
    model, _ = trained
    x, log_q = model.generate(400, return_log_prob=True, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(log_q).all() and log_q.std() > 0.1  # a non-trivial density
    torch.testing.assert_close(model.generator_log_prob(x), log_q, rtol=0, atol=1e-3)  # float32
    model64 = copy.deepcopy(model).double()
    x, log_q = model64.generate(400, return_log_prob=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model64.generator_log_prob(x), log_q, rtol=0, atol=1e-8)
    model64.sampler = ODE(t_end=1.0, method="rk4", step_size=0.05)
    x, log_q = model64.generate(400, return_log_prob=True, generator=torch.Generator().manual_seed(1))
    # rk4's discretisation error, forwards and backwards
    torch.testing.assert_close(model64.generator_log_prob(x), log_q, rtol=0, atol=1e-5)


def test_grid_kls_match_monte_carlo(trained):
    model, datamodule = trained
    points, area = dn.grid_2d(BOX, 120)
    log_data = datamodule.log_density(points)
    log_gen = model.generator_log_prob(points)
    log_ebm = dn.ebm_log_density(model.energy, points, area)
    metrics = density_metrics(log_data, log_gen, log_ebm, area)
    # KL(data || q) = E_data[log p - log q]: Monte Carlo on fresh data, corrected for q's mass on the grid
    x = datamodule.sample(20000, seed=3)
    terms = datamodule.log_density(x) - model.generator_log_prob(x).double()
    mc, se = float(terms.mean()), float(terms.std()) / math.sqrt(x.shape[0])
    expected = mc + math.log(metrics["mass_gen"])  # the grid renormalises q to mass one
    assert abs(metrics["kl_data_gen"] - expected) < 3 * se + 0.01
    # KL(data || EBM) = E_data[log p + E] + log Z, Z by the same quadrature
    with torch.no_grad():
        log_z = float(torch.logsumexp(-model.energy(points).double(), 0)) + math.log(area)
        terms = datamodule.log_density(x) + model.energy(x).double()
    assert abs(metrics["kl_data_ebm"] - (float(terms.mean()) + log_z)) < 3 * float(terms.std()) / 141.4 + 0.01
    assert metrics["kl_data_gen"] > 0 and metrics["kl_data_ebm"] > 0 and 0 < metrics["tv_gen_ebm"] < 1


def test_density_panel_compute_without_datamodule_density(trained):
    """A DataModule without ``log_density`` falls back to a KDE of its held-out data."""
    model, datamodule = trained
    panel = DensityPanel2D(bounds=BOX, grid_size=40)
    plain = types.SimpleNamespace(val_data=datamodule.sample(4000))
    fig, metrics = panel.compute(types.SimpleNamespace(datamodule=plain, global_step=0), model)
    _, exact = panel.compute(types.SimpleNamespace(datamodule=datamodule, global_step=0), model)
    assert fig is not None
    assert metrics["mass_data"] == pytest.approx(1.0, abs=0.01)
    assert abs(metrics["tv_data_gen"] - exact["tv_data_gen"]) < 0.1  # a KDE of 4000 points
    assert metrics["kl_gen_ebm"] == exact["kl_gen_ebm"]


def test_density_panel_with_a_noisy_sampler_compares_data_and_the_ebm_only(trained):
    """Langevin has no generator density: the panel shows data | exp(-E)/Z with the same KL as with GD."""
    model, datamodule = trained
    panel = DensityPanel2D(bounds=BOX, grid_size=40)
    trainer = types.SimpleNamespace(datamodule=datamodule, global_step=0)
    _, deterministic = panel.compute(trainer, model)
    noisy = copy.deepcopy(model)
    noisy.sampler = Langevin(steps=5, step_size=0.05, noise_std=0.1)
    fig, metrics = panel.compute(trainer, noisy)
    assert set(metrics) == {"mass_data", "kl_data_ebm", "tv_data_ebm"}
    assert metrics["kl_data_ebm"] == deterministic["kl_data_ebm"]  # the same energy, the same grid
    assert len(fig.axes) == 3  # two panels and the colour bar


def read_metrics(path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v:
                    out.setdefault(k, []).append(float(v))
    return out


def test_callbacks_fire_under_a_trainer(trained, tmp_path):
    model, datamodule = trained
    model = copy.deepcopy(model).train()
    panel = DensityPanel2D(every_n_steps=2, bounds=BOX, grid_size=30)
    longrun = LongRunDiagnostic(every_n_steps=100, multiples=[3, 10], num_samples=200)
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path, callbacks=[panel, longrun],
                            logger=L.pytorch.loggers.CSVLogger(tmp_path, name="run"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule)
    assert panel.logged_steps == [2, 3]  # on_train_batch_end at step 2, on_train_end at step 3
    assert longrun.logged_steps == [3]  # on_train_end only
    run = tmp_path / "run" / "version_0"
    assert sorted(p.name for p in (run / "images").iterdir()) == [
        "density_2d_step0000002.png", "density_2d_step0000003.png", "longrun_step0000003.png"]
    logged = read_metrics(run / "metrics.csv")
    for key in ("density/kl_data_gen", "density/kl_data_ebm", "density/kl_gen_ebm", "density/mass_gen"):
        assert len(logged[key]) == 2
        assert logged[key][-1] == pytest.approx(panel.last_metrics[key.split("/")[1]])
    assert logged["longrun/energy_x10"] == [pytest.approx(longrun.last_metrics["longrun/energy_x10"])]
    assert model.training  # eval mode was only borrowed


def test_the_panels_judge_the_ema_weights_as_validation_does(trained, tmp_path):
    """At step 2 (mid-training: at the end Lightning copies the average into the module anyway)."""
    def weights(module):
        return torch.cat([p.detach().flatten() for p in module.energy.parameters()]).clone()

    def recording(cls):
        class Recording(cls):
            def compute(self, trainer, pl_module):
                if not hasattr(self, "seen"):  # the first call's (step 2)
                    self.seen = weights(pl_module)
                return super().compute(trainer, pl_module)
        return Recording

    class AtStep2(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                self.raw = weights(pl_module)
                with averaged_weights(trainer, pl_module):
                    self.average = weights(pl_module)

    model = copy.deepcopy(trained[0]).train()
    panel = recording(DensityPanel2D)(every_n_steps=2, bounds=BOX, grid_size=10)
    longrun = recording(LongRunDiagnostic)(every_n_steps=2, multiples=[2], num_samples=20)
    at_step_2 = AtStep2()
    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path, logger=False,
                            callbacks=[EMA(decay=0.5), panel, longrun, at_step_2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, trained[1])
    assert not torch.equal(at_step_2.raw, at_step_2.average)
    torch.testing.assert_close(panel.seen, at_step_2.average)
    torch.testing.assert_close(longrun.seen, at_step_2.average)


def test_long_run_continues_the_same_dynamics(trained):
    """Applying the sampler m times is the dynamics run m times as long, from the same latents."""
    model, _ = trained
    diag = LongRunDiagnostic(multiples=[4], num_samples=50, seed=2)
    runs = diag.run(model)
    z = model.latent.sample(50, generator=torch.Generator().manual_seed(2))
    longer = EBM(model.energy, GradientDescent(80, 0.05), model.latent)
    torch.testing.assert_close(runs[4], longer.generate(0, z=z), rtol=0, atol=1e-5)
    torch.testing.assert_close(runs[1], model.generate(0, z=z))
    with pytest.raises(ValueError, match="multiples"):
        LongRunDiagnostic(multiples=[1])
