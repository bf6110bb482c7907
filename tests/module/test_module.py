"""The EBM LightningModule: the critic loss, generation, checkpoints, and early errors."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import QuadraticEnergy, random_spd
from module_helpers import make_model, make_trainer, tiny_data

from lightning_ebm import EBM
from lightning_ebm._checks import ArgumentError
from lightning_ebm.energies import MLPEnergy
from lightning_ebm.latents import Gaussian, ReplayBuffer, Uniform
from lightning_ebm.samplers import GradientDescent, Langevin


def test_training_step_minimises_the_critic_loss_with_detached_samples():
    torch.manual_seed(0)
    A = random_spd(2, seed=3)
    model = EBM(QuadraticEnergy(A), GradientDescent(steps=3, step_size=0.1), Gaussian((2,)), alpha=0.5, rng_seed=7)
    x = torch.randn(16, 2, dtype=torch.float64)
    loss = model.training_step(x, 0)
    # recompute by hand with the same random stream: z ~ N(0, I), G(z) = (I - sA)^3 z
    rng = torch.Generator().manual_seed(7 * 1_000_003)
    z = torch.randn((16, 2), generator=rng, dtype=torch.float64)
    x_gen = z @ torch.linalg.matrix_power(torch.eye(2, dtype=torch.float64) - 0.1 * A, 3).T
    e = lambda v: 0.5 * ((v @ A) * v).sum(1)  # noqa: E731
    expected = e(x).mean() - e(x_gen).mean() + 0.5 * (e(x).pow(2).mean() + e(x_gen).pow(2).mean())
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # d loss / d scale: E is linear in scale, and the generated samples are constants
    grad = e(x).mean() - e(x_gen).mean() + 0.5 * 2 * (e(x).pow(2).mean() + e(x_gen).pow(2).mean())
    torch.testing.assert_close(model.energy.scale.grad, grad)


def test_fit_logs_losses_energies_and_validation_floors(tmp_path):
    model = make_model()
    trainer = make_trainer(tmp_path)
    trainer.fit(model, tiny_data())
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/energy_data", "train/energy_gen", "train/energy_gap",
                "train/grad_norm_gen", "train/samples_per_sec", "val/mmd", "val/mmd_floor", "val/sw",
                "val/sw_floor", "val/energy_data", "val/energy_gen"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert metrics["val/mmd_floor"] > 0


def test_generate_is_detached_chunkable_and_follows_z():
    model = make_model()
    z = model.latent.sample(10, generator=torch.Generator().manual_seed(0))
    x = model.generate(10, z=z)
    torch.testing.assert_close(x, model.generate(10, z=z, batch_size=3))
    torch.testing.assert_close(x, model.sampler(model.energy, z))
    assert x.shape == (10, 2) and not x.requires_grad
    x, traj = model.generate(4, return_trajectory=True)
    assert traj.shape == (6, 4, 2)


def test_checkpoint_round_trip_restores_replay_buffer_and_random_stream(tmp_path):
    model = make_model(latent=ReplayBuffer(Uniform((2,), low=-4.0, high=4.0), capacity=64, reinit_prob=0.05))
    trainer = make_trainer(tmp_path, max_steps=4, val_check_interval=None, limit_val_batches=0)
    trainer.fit(model, tiny_data())
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = EBM.load_from_checkpoint(ckpt)
    assert isinstance(loaded.latent, ReplayBuffer)
    torch.testing.assert_close(loaded.latent.buffer, model.latent.buffer)
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        if isinstance(p, torch.Tensor):
            torch.testing.assert_close(p, q, msg=name)
    # the next draws of the module's stream continue where the run stopped
    torch.testing.assert_close(torch.rand(5, generator=loaded.rng), torch.rand(5, generator=model.rng))
    # the buffer is not stored twice: the hyper-parameters hold the latent's config, no tensors
    raw = torch.load(ckpt, weights_only=True)
    assert raw["hyper_parameters"]["latent"] == {
        "class_path": "lightning_ebm.latents.ReplayBuffer",
        "init_args": {"latent": {"class_path": "lightning_ebm.latents.Uniform",
                                 "init_args": {"shape": (2,), "low": -4.0, "high": 4.0}},
                      "capacity": 64, "reinit_prob": 0.05, "num_classes": None}}


def test_a_different_rank_draws_a_different_stream():
    a, b = make_model(rng_seed=3), make_model(rng_seed=3)
    torch.testing.assert_close(torch.rand(3, generator=a.rng), torch.rand(3, generator=b.rng))
    assert not torch.equal(torch.rand(3, generator=make_model(rng_seed=4).rng), torch.rand(3, generator=a.rng))


def test_validate_needs_inference_mode_off(tmp_path):
    model = make_model()
    with pytest.raises(RuntimeError, match="inference_mode=False"):
        make_trainer(tmp_path, inference_mode=True).validate(model, tiny_data(), verbose=False)
    out = make_trainer(tmp_path).validate(model, tiny_data(), verbose=False)[0]
    # an untrained generator is far from the data: well above the data-vs-data floor
    assert out["val/mmd"] > 2 * out["val/mmd_floor"] > 0 and out["val/sw"] > out["val/sw_floor"] > 0


def test_test_and_predict_follow_lightnings_conventions(tmp_path):
    model, data = make_model(), tiny_data()
    trainer = make_trainer(tmp_path)
    val = trainer.validate(model, data, verbose=False)[0]
    test = trainer.test(model, data, verbose=False)[0]
    # the toy test split is the validation split: the same metrics under test/, the same values
    assert test == pytest.approx({k.replace("val/", "test/"): v for k, v in val.items()}, rel=1e-6)
    batches = trainer.predict(model, data)
    x = torch.cat([b[0] for b in data.predict_dataloader()]).to(model.device)
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([b["energy"] for b in batches]), model.energy(x))
    assert set(batches[0]) == {"energy"}  # no logits: not a classifier energy
    # plain loaders of tensors work too (no DataModule), and bad shapes name the stage
    loader = torch.utils.data.DataLoader(torch.randn(10, 2), batch_size=4)
    assert torch.cat([b["energy"] for b in trainer.predict(model, loader)]).shape == (10,)
    with pytest.raises(ValueError, match="predict batch 0 has samples of shape"):
        trainer.predict(model, torch.utils.data.DataLoader(torch.randn(4, 3), batch_size=4))
    with pytest.raises(ValueError, match="test batch 0 has samples of shape"):
        trainer.test(model, torch.utils.data.DataLoader(torch.randn(4, 3), batch_size=4), verbose=False)


def test_generate_and_generator_log_prob_name_a_bad_batch_size():
    model = make_model()
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match=r"EBM.generate: batch_size must be a positive integer or None"):
            model.generate(4, batch_size=bad)
        with pytest.raises(ValueError, match=r"EBM.generator_log_prob: batch_size must be a positive integer"):
            model.generator_log_prob(torch.zeros(4, 2), batch_size=bad)


# ---------------------------------------------------------------- bad input
class BadShapeEnergy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.lin(x)  # (B, 1)


def test_energy_with_wrong_output_shape_fails_in_setup(tmp_path):
    model = EBM(BadShapeEnergy(), GradientDescent(steps=2, step_size=0.1), Uniform((2,)))
    with pytest.raises(ValueError, match=r"energies of shape \(B,\); got input \(2, 2\) -> output \(2, 1\)"):
        make_trainer(tmp_path).fit(model, tiny_data())


def test_latent_shape_must_match_the_data(tmp_path):
    model = EBM(MLPEnergy(dim=3), GradientDescent(steps=2, step_size=0.1), Uniform((3,)))
    with pytest.raises(ValueError, match=r"latent shape \(3,\) does not match the data's sample shape \(2,\)"):
        make_trainer(tmp_path).fit(model, tiny_data())


def test_replay_capacity_below_batch_size_fails_in_setup(tmp_path):
    model = make_model(latent=ReplayBuffer(Uniform((2,)), capacity=16))
    with pytest.raises(ValueError, match=r"capacity=16 is smaller than the number of chains drawn per step \(32\)"):
        make_trainer(tmp_path).fit(model, tiny_data())


def test_non_finite_data_is_reported_with_the_batch():
    model = make_model()
    x = torch.randn(8, 2)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values \(NaN or Inf\) in 1 sample\(s\) of training batch 5"):
        model.training_step(x, 5)
    with pytest.raises(ValueError, match=r"training batch 0 has samples of shape \(3,\)"):
        model.training_step(torch.randn(8, 3), 0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(alpha=-1.0), ValueError, "alpha must be a finite number >= 0, got -1.0"),
        (dict(data_noise=float("inf")), ValueError, "data_noise"),
        (dict(num_negatives=0), ValueError, "num_negatives must be a positive integer or None, got 0"),
        (dict(sampler="langevin"), TypeError, "sampler must be a lightning_ebm.samplers.Sampler"),
        (dict(latent=torch.distributions.Normal(0, 1)), TypeError, "latent must be"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, error, match):
    args = dict(energy=MLPEnergy(dim=2), sampler=Langevin(steps=2, step_size=0.1, noise_std=0.1), latent=Uniform((2,)))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        EBM(**args)


def test_arguments_the_optimizer_or_scheduler_rejects_are_named():
    """torch checks them only when the optimizer is built: in fit, after the model (from the CLI: no traceback)."""
    args = dict(energy=MLPEnergy(dim=2), sampler=GradientDescent(steps=2, step_size=0.1), latent=Uniform((2,)))
    with pytest.raises(ArgumentError, match=r"^EBM: optimizer: Invalid learning rate: -1.0$"):
        EBM(**args, optimizer=functools.partial(torch.optim.Adam, lr=-1.0)).configure_optimizers()
    scheduler = functools.partial(torch.optim.lr_scheduler.LinearLR, start_factor=2.0)
    with pytest.raises(ArgumentError, match=r"^EBM: lr_scheduler: Starting multiplicative factor"):
        EBM(**args, lr_scheduler=scheduler).configure_optimizers()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_negatives=True), r"EBM: num_negatives must be a positive integer or None, got True"),
        (dict(check_finite="yes"), r"EBM: check_finite must be True or False, got 'yes'"),
        (dict(alpha="0.1"), r"EBM: alpha must be a finite number >= 0, got '0.1'"),
        (dict(rng_seed=1.5), r"EBM: rng_seed must be an integer or None, got 1.5"),
        (dict(energy=lambda x: x), r"EBM: energy must be an nn.Module mapping \(B, \*shape\) -> \(B,\), got function"),
    ],
)
def test_wrong_types_get_the_librarys_message(kwargs, match):
    args = dict(energy=MLPEnergy(dim=2), sampler=GradientDescent(steps=2, step_size=0.1), latent=Uniform((2,)))
    with pytest.raises(ArgumentError, match=match):
        EBM(**{**args, **kwargs})
