"""DivergenceGuard: faults injected on purpose are caught, named, and end in a loadable good checkpoint.

Faults: an absurd learning rate, a NaN weight (NaN loss), a +1e6 energy offset (finite but
exploding energies), gradients times 1e12 (exploding gradient norm), a NaN weight after the
optimizer step (seen only by the parameter check). With a check and a snapshot every step, a
divergence found after step D restores the state of step D - 2: step D ran from the weights of
step D - 1, so those are the ones that diverged.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from reliability_helpers import (
    InjectFault,
    RecordStates,
    differences,
    single_thread,
    tiny_data,
    tiny_ebm,
    tiny_trainer,
)

from lightning_ebm import EBM
from lightning_ebm.callbacks import EMA, AtomicCheckpointIO, DivergenceError, DivergenceGuard

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

LR = 1e-2


class Run:
    """A tiny fit with a recorder before the guard and a ModelCheckpoint after it."""

    def __init__(self, root: Path, guard: DivergenceGuard, *faults: L.Callback, lr: float = LR,
                 max_steps: int = 10, **trainer_kwargs) -> None:
        L.seed_everything(0)
        self.model = tiny_ebm(lr=lr, lr_scheduler=None)
        self.recorder = RecordStates()
        self.guard = guard
        callbacks = [*faults, self.recorder, guard, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)]
        self.trainer = tiny_trainer(root, max_steps=max_steps, limit_val_batches=0, callbacks=callbacks,
                                    **trainer_kwargs)

    def fit(self, ckpt_path: Path | None = None) -> None:
        self.trainer.fit(self.model, tiny_data(), ckpt_path=ckpt_path, weights_only=False)


def model_state(model: EBM) -> dict:
    return {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_finite(model: EBM) -> None:
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.latent.buffer is None or torch.isfinite(model.latent.buffer).all()


def check_good_checkpoint(path: Path, recorder: RecordStates, good_step: int, lr: float) -> dict:
    """The file holds the recorded state of ``good_step`` with the learning rate lowered, and loads."""
    raw = torch.load(path, weights_only=False)
    loaded = EBM.load_from_checkpoint(path)
    assert_finite(loaded)
    assert differences(recorder.states[good_step]["model"], model_state(loaded)) == []
    assert differences(loaded.latent.buffer, recorder.states[good_step]["replay_buffer"]) == []
    assert raw["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(lr)
    return raw


FAULTS = {  # fault -> what the guard must name
    "nan_weight": "training loss = nan is not finite",
    "huge_energy": "exceeds max_abs_energy=10000",
    "huge_grad": "gradient norm = ",
    "nan_after_step": "parameter norm = nan is not finite",
}


@pytest.mark.parametrize("kind", list(FAULTS))
def test_stop_mode_names_the_fault_and_saves_the_last_good_state(tmp_path, kind):
    fault = InjectFault(kind, steps=[3])
    run = Run(tmp_path, DivergenceGuard(mode="stop", snapshot_every_n_steps=1), fault)
    with pytest.raises(DivergenceError) as info:
        run.fit()
    message = str(info.value)
    detected = 4  # the fault is injected during the 4th step (global step 3 before it, 4 after)
    assert fault.fired == [3]
    assert FAULTS[kind] in message and f"at global step {detected} (epoch 0, training batch 3)" in message
    good = detected - 2
    path = tmp_path / "ckpt" / "last-good.ckpt"
    assert f"global step {good})" in message and f"--ckpt_path {path}" in message
    check_good_checkpoint(path, run.recorder, good, LR * 0.5)


def test_stop_mode_catches_an_absurd_learning_rate_and_the_saved_state_resumes(tmp_path):
    run = Run(tmp_path, DivergenceGuard(mode="stop", snapshot_every_n_steps=1), lr=1e3)
    match = r"train/energy_data = \S+ exceeds max_abs_energy=10000 at global step 2"
    with pytest.raises(DivergenceError, match=match):
        run.fit()
    path = tmp_path / "ckpt" / "last-good.ckpt"
    check_good_checkpoint(path, run.recorder, 0, 1e3 * 0.5)
    # what the message says to do: resume from it (here the learning rate is still absurd, so lower it again)
    guard = DivergenceGuard(mode="rollback", lr_factor=1e-3, snapshot_every_n_steps=1)
    resumed = Run(tmp_path / "resumed", guard, lr=1e3, max_steps=12)
    resumed.fit(ckpt_path=path)
    assert resumed.trainer.global_step == 12 and resumed.guard.rollbacks >= 1
    assert_finite(resumed.model)
    assert resumed.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        1e3 * 0.5 * 1e-3 ** resumed.guard.rollbacks)


def test_rollback_restores_the_last_good_state_lowers_the_learning_rate_and_reseeds(tmp_path):
    fault = InjectFault("nan_weight", steps=[4])
    run = Run(tmp_path, DivergenceGuard(mode="rollback", snapshot_every_n_steps=1), fault, max_steps=5)
    seed_before = run.model.rng.initial_seed()
    with pytest.warns(UserWarning, match=r"training loss = nan .* global step 5 .* state of global step 3"):
        run.fit()  # the run ends right after the rollback: what it holds is what the rollback restored
    assert run.guard.rollbacks == 1 and fault.fired == [4]
    assert differences(run.recorder.states[3]["model"], model_state(run.model)) == []
    assert torch.equal(run.model.latent.buffer, run.recorder.states[3]["replay_buffer"])
    assert run.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.5)
    assert run.model.rng.initial_seed() != seed_before
    raw = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert raw["global_step"] == 5 and any(s == {"rollbacks": 1} for s in raw["callbacks"].values())
    assert differences(model_state(EBM.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")),
                       model_state(run.model)) == []


def test_rollback_also_restores_an_ema_that_already_averaged_the_diverged_weights(tmp_path):
    """EMA sits before the guard, so in the faulty step it averages NaN weights before the check."""
    fault = InjectFault("nan_weight", steps=[4])
    ema = EMA(decay=0.5)
    guard = DivergenceGuard(mode="rollback", snapshot_every_n_steps=1)
    L.seed_everything(0)
    model = tiny_ebm(lr=LR, lr_scheduler=None)
    trainer = tiny_trainer(tmp_path, max_steps=8, limit_val_batches=0, callbacks=[fault, ema, guard])
    trainer.fit(model, tiny_data())
    assert guard.rollbacks == 1 and fault.fired == [4]
    average = ema._average_model.module
    assert all(torch.isfinite(p).all() for p in average.parameters())
    assert ema._latest_update_step == 8
    with ema.averaged(model):  # the average is not a stale copy: it has followed the restored weights
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_rollback_mode_rides_through_every_kind_of_fault(tmp_path):
    faults = [InjectFault("nan_weight", [2]), InjectFault("huge_energy", [5]), InjectFault("huge_grad", [8])]
    run = Run(tmp_path, DivergenceGuard(mode="rollback", max_rollbacks=3, snapshot_every_n_steps=2), *faults,
              max_steps=14)
    with pytest.warns(UserWarning, match="rollback 3 of 3"):
        run.fit()
    assert [f.fired for f in faults] == [[2], [5], [8]]
    assert run.guard.rollbacks == 3 and run.trainer.global_step == 14
    assert_finite(run.model)
    # each rollback after a promoted snapshot lowers the rate once more than the snapshot's own
    assert run.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(LR * 0.5**3)
    assert_finite(EBM.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt"))


def test_rollback_mode_recovers_from_an_absurd_learning_rate(tmp_path):
    guard = DivergenceGuard(mode="rollback", lr_factor=1e-3, max_rollbacks=3, snapshot_every_n_steps=2)
    run = Run(tmp_path, guard, lr=1e3, max_steps=12)
    run.fit()
    assert 1 <= run.guard.rollbacks <= 3 and run.trainer.global_step == 12
    assert run.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e3 * 1e-3**run.guard.rollbacks)
    assert_finite(run.model)
    energies = run.trainer.callback_metrics
    assert all(abs(float(energies[k])) < 1e4 for k in ("train/energy_data", "train/energy_gen"))


def test_when_rollbacks_are_spent_it_stops_with_a_loadable_checkpoint(tmp_path):
    fault = InjectFault("nan_weight", steps=list(range(3, 100)))  # a fault that never goes away
    run = Run(tmp_path, DivergenceGuard(mode="rollback", max_rollbacks=2, snapshot_every_n_steps=1), fault)
    with pytest.raises(DivergenceError, match="all 2 rollbacks are spent"), pytest.warns(UserWarning):
        run.fit()
    assert run.guard.rollbacks == 2
    raw = check_good_checkpoint(tmp_path / "ckpt" / "last-good.ckpt", run.recorder, 2, LR * 0.5**3)
    assert any(s == {"rollbacks": 2} for s in raw["callbacks"].values())


@pytest.mark.parametrize("fault_step, caught_at", [(3, 4), (4, 7)])
def test_checking_every_third_step_catches_a_lasting_fault_later(tmp_path, fault_step, caught_at):
    guard = DivergenceGuard(mode="stop", check_every_n_steps=3)  # checks the steps that start at 0, 3, 6, ...
    run = Run(tmp_path, guard, InjectFault("nan_weight", [fault_step]))
    with pytest.raises(DivergenceError, match=f"loss = nan is not finite at global step {caught_at} "):
        run.fit()


def test_fp16_overflow_that_the_gradient_scaler_skips_is_not_divergence(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # low enough for this model never to overflow
    precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    fault = InjectFault("inf_grad", [2])
    run = Run(tmp_path, DivergenceGuard(mode="stop"), fault, max_steps=4,
              plugins=[AtomicCheckpointIO(), precision])
    run.fit()  # an inf gradient, as an fp16 overflow gives: the scaler skips the step and halves its scale
    assert fault.fired == [2] and run.trainer.global_step == 4 and scaler.get_scale() == 2.0**7


def test_an_inf_gradient_without_a_scaler_is_divergence(tmp_path):
    run = Run(tmp_path, DivergenceGuard(mode="stop"), InjectFault("inf_grad", [2]), max_steps=4)
    with pytest.raises(DivergenceError, match="gradient norm = inf is not finite at global step 3"):
        run.fit()


def test_non_finite_weights_at_the_start_are_refused(tmp_path):
    run = Run(tmp_path, DivergenceGuard())
    with torch.no_grad():
        next(run.model.parameters()).view(-1)[0] = math.inf
    with pytest.raises(DivergenceError, match="parameters are not finite at the start of training"):
        run.fit()


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "restart"}, "mode must be 'stop' or 'rollback', got 'restart'"),
    ({"max_abs_energy": -1.0}, "max_abs_energy must be a positive finite number or None, got -1.0"),
    ({"max_grad_norm": math.inf}, "max_grad_norm must be a positive finite number or None, got inf"),
    ({"lr_factor": 0.0}, r"lr_factor must be in \(0, 1\], got 0.0"),
    ({"max_rollbacks": -1}, "max_rollbacks must be an integer >= 0, got -1"),
    ({"check_every_n_steps": 0}, "check_every_n_steps must be an integer >= 1, got 0"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DivergenceGuard(**kwargs)
