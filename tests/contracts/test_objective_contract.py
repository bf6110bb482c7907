"""The objective contract, run over every name in ``lightning_ebm.objectives.__all__``.

Every exported objective has factories in ``OBJECTIVES`` (the other exports are listed in
``NOT_OBJECTIVES``); a new export without one fails ``test_every_exported_objective_is_in_the_contract``.
Each objective must give a finite loss with finite scalar parts, send gradients to the energy's
parameters, run the sampler if and only if it says it needs negatives (and then leave no
parameter gradient from it), draw all its randomness from the step's stream, and resume exactly
from a checkpoint under the Trainer. ``NoNegatives`` (defined here, not exported) checks the
contract's other branch: an objective that never runs the sampler.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from reliability_helpers import differences, tiny_data, tiny_ebm, tiny_trainer
from torch import Tensor, nn

from lightning_ebm import objectives
from lightning_ebm.energies import ClassifierEnergy, MLPEnergy
from lightning_ebm.latents import Gaussian, ReplayBuffer, Uniform
from lightning_ebm.objectives import MaximumLikelihood, Objective, TrainingStep
from lightning_ebm.samplers import Langevin


class NoNegatives(Objective):
    """Test-only: a denoising score-matching loss, which needs no generator samples."""

    needs_negatives = False

    def __call__(self, step: TrainingStep) -> tuple[Tensor, dict[str, Tensor]]:
        x = step.jittered_data()
        eps = torch.randn(x.shape, generator=step.rng, device=x.device, dtype=x.dtype)
        noisy = (x + 0.3 * eps).requires_grad_(True)
        (grad,) = torch.autograd.grad(step.energy_of(noisy).sum(), noisy, create_graph=True)
        loss = (grad - eps / 0.3).pow(2).sum(1).mean()
        return loss, {"dsm": loss.detach()}


OBJECTIVES = {
    "MaximumLikelihood": [lambda: MaximumLikelihood(),
                          lambda: MaximumLikelihood(alpha=0.3, generator_loss_weight=0.5, generator_loss_steps=2)],
    "DenoisingScoreMatching": [lambda: objectives.DenoisingScoreMatching(0.3)],
    "MultiLevelDenoisingScoreMatching": [lambda: objectives.MultiLevelDenoisingScoreMatching(sigmas=[0.1, 0.5])],
    "SlicedScoreMatching": [lambda: objectives.SlicedScoreMatching(num_projections=2),
                            lambda: objectives.SlicedScoreMatching(projection="gaussian", variance_reduced=False)],
    "ExactScoreMatching": [lambda: objectives.ExactScoreMatching()],
    "NoiseContrastiveEstimation": [lambda: objectives.NoiseContrastiveEstimation(),
                                   lambda: objectives.NoiseContrastiveEstimation(Gaussian((2,), std=2.0), 3),
                                   lambda: objectives.NoiseContrastiveEstimation(fit_noise=True)],
    "DiffusionRecoveryLikelihood": [lambda: objectives.DiffusionRecoveryLikelihood(steps=3, num_levels=4),
                                    lambda: objectives.DiffusionRecoveryLikelihood(steps=2, sigmas=[0.2, 0.5],
                                                                                   alpha=0.0, grad_clip=1.0)],
    # the generative terms one at a time (the contract counts one sampler call), and the classifier alone
    "JointEnergyModel": [lambda: objectives.JointEnergyModel(ml_weight=1.0, alpha=0.1),
                         lambda: objectives.JointEnergyModel(ce_weight=0.5, ml_weight=0.0, conditional_weight=1.0),
                         lambda: objectives.JointEnergyModel(ml_weight=0.0)],
}
#: objectives that need a noise-conditioned energy: the number of levels of the energy they get
NUM_LEVELS = {("DiffusionRecoveryLikelihood", 0): 4, ("DiffusionRecoveryLikelihood", 1): 2}
#: objectives that need a classifier energy and labelled data: the number of classes (8gaussians' modes)
NUM_CLASSES = {("JointEnergyModel", i): 8 for i in range(3)}
NOT_OBJECTIVES = {"Objective": "the interface", "TrainingStep": "what an objective is given"}
EXTRA = {"NoNegatives": [NoNegatives]}

CASES = [(name, i) for table in (OBJECTIVES, EXTRA) for name, builds in table.items() for i in range(len(builds))]


def _build(name: str, i: int) -> Objective:
    return {**OBJECTIVES, **EXTRA}[name][i]()


@pytest.fixture(params=CASES, ids=[f"{n}-{i}" for n, i in CASES])
def case(request) -> tuple[str, int]:
    return request.param


class CountingLangevin(Langevin):
    """Langevin that counts its calls and records whether parameter gradients existed after each."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = 0
        self.param_grads_after: list[bool] = []

    def __call__(self, energy, x0, **kwargs):
        out = super().__call__(energy, x0, **kwargs)
        self.calls += 1
        self.param_grads_after.append(any(p.grad is not None for p in energy.parameters()))
        return out


def _energy(case: tuple[str, int] | None = None) -> nn.Module:
    classes = NUM_CLASSES.get(case)
    if classes is not None:
        return ClassifierEnergy(MLPEnergy(dim=2, hidden=16, num_layers=2, num_outputs=classes), classes)
    return MLPEnergy(dim=2, hidden=16, num_layers=2, num_levels=NUM_LEVELS.get(case))


def make_step(objective_seed: int = 0, latent=None, case=None) -> tuple[TrainingStep, CountingLangevin]:
    torch.manual_seed(0)
    energy = _energy(case)
    sampler = CountingLangevin(steps=3, step_size=0.05, noise_std=0.05)
    data = torch.randn(12, 2, generator=torch.Generator().manual_seed(1))
    rng = torch.Generator().manual_seed(objective_seed)
    latent = latent or ReplayBuffer(Uniform((2,), low=-3.0, high=3.0), capacity=32, reinit_prob=0.2)
    classes = NUM_CLASSES.get(case)
    labels = None if classes is None else torch.randint(classes, (12,), generator=torch.Generator().manual_seed(2))
    return TrainingStep(energy, sampler, latent, rng, data, num_negatives=10, data_noise=0.05,
                        labels=labels), sampler


def test_every_exported_objective_is_in_the_contract():
    exported = set(objectives.__all__)
    assert exported == set(OBJECTIVES) | set(NOT_OBJECTIVES), (
        f"objectives without a contract fixture: {sorted(exported - set(OBJECTIVES) - set(NOT_OBJECTIVES))}")
    for name in OBJECTIVES:
        cls = getattr(objectives, name)
        assert isinstance(cls, type) and issubclass(cls, Objective), name


def test_the_interface_is_abstract():
    step, _ = make_step()
    with pytest.raises(NotImplementedError):
        Objective()(step)


def test_loss_and_parts_are_finite_scalars_and_gradients_reach_the_energy(case):
    step, _ = make_step(case=case)
    loss, parts = _build(*case)(step)
    assert loss.shape == () and torch.isfinite(loss)
    assert parts and all(v.shape == () and torch.isfinite(v) for v in parts.values()), parts
    loss.backward()
    # (a score-based loss cannot move the output bias, so not every parameter need get a gradient)
    grads = [p.grad for p in step.energy.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_the_sampler_runs_if_and_only_if_negatives_are_needed(case):
    step, sampler = make_step(case=case)
    objective = _build(*case)
    objective(step)
    if objective.needs_negatives:
        assert sampler.calls == 1 and step.generated is not None
        assert step.generated.shape == (step.num_negatives, 2) and not step.generated.requires_grad
        assert sampler.param_grads_after == [False]  # the sampler accumulated no parameter gradient
        assert step.latent.rank_state() is not None  # the chains were taken back
    else:
        assert sampler.calls == 0 and step.generated is None
        assert step.latent.rank_state() is None  # nothing drawn from the chains either


def test_all_randomness_comes_from_the_steps_stream(case):
    losses = []
    for _ in range(2):
        step, _ = make_step(objective_seed=3, case=case)  # seeds torch's global stream and builds the energy
        state = torch.get_rng_state()
        losses.append(_build(*case)(step)[0])
        assert torch.equal(torch.get_rng_state(), state)  # the objective never touches the global stream...
    assert torch.equal(losses[0], losses[1])  # ... and the step's stream decides everything
    other, _ = make_step(objective_seed=4, case=case)
    assert not torch.equal(_build(*case)(other)[0], losses[0])


def _fit(root, objective_case, max_steps, ckpt_path=None):
    L.seed_everything(0 if ckpt_path is None else 123)  # a resumed run starts elsewhere: the checkpoint must win
    model = tiny_ebm(objective=_build(*objective_case), energy=_energy(objective_case))
    trainer = tiny_trainer(root, max_steps=max_steps, limit_val_batches=0, val_check_interval=None,
                           callbacks=[ModelCheckpoint(dirpath=root, save_last=True)])
    data = tiny_data(labels=True) if objective_case in NUM_CLASSES else tiny_data()
    trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=False)
    return {"model": model.state_dict(), "optimizer": trainer.optimizers[0].state_dict(),
            "rng": model.rng.get_state(), "global_step": trainer.global_step}


def test_resume_is_exact(case, tmp_path):
    straight = _fit(tmp_path / "straight", case, 6)
    _fit(tmp_path / "first", case, 3)
    resumed = _fit(tmp_path / "second", case, 6, ckpt_path=tmp_path / "first" / "last.ckpt")
    assert differences(straight, resumed) == []
    assert straight["global_step"] == 6
