"""Bad input at run time fails loudly: NaN/Inf in a data batch names the batch; a latent shape that
does not match the data fails in setup, before any training, with both shapes; integer data and
points of the wrong shape are named, float data of another dtype is cast; a diverged loss is
reported."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from reliability_helpers import single_thread, tiny_ebm, tiny_trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_ebm.cli import main
from lightning_ebm.data import Toy2DDataModule
from lightning_ebm.samplers import GradientDescent

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

ROOT = Path(__file__).resolve().parents[2]


class _Poisoned:
    """The wrapped training stream with one value of batch number ``at`` (over all epochs) replaced."""

    def __init__(self, stream, at: int, value: float) -> None:
        self.stream, self.at, self.value, self.count = stream, at, value, 0

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.stream:
            if self.count == self.at:
                x = (batch[0] if isinstance(batch, list) else batch).clone()  # validation batches are [x]
                x[1, 0] = self.value
                batch = [x] if isinstance(batch, list) else x
            self.count += 1
            yield batch


class PoisonedToyData(Toy2DDataModule):
    """Toy data with a NaN or Inf in one training batch, or in the first validation batch."""

    def __init__(self, poison_batch: int = 7, value: str = "nan", in_validation: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.poison_batch, self.value, self.in_validation = poison_batch, float(value), in_validation

    def train_dataloader(self):
        stream = super().train_dataloader()
        return stream if self.in_validation else _Poisoned(stream, self.poison_batch, self.value)

    def val_dataloader(self):
        loader = super().val_dataloader()
        return _Poisoned(loader, 0, self.value) if self.in_validation else loader


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_training_batch_is_named(tmp_path, value):
    L.seed_everything(0)
    data = PoisonedToyData(poison_batch=7, value=value, batch_size=32, batches_per_epoch=5, num_val=64)
    trainer = tiny_trainer(tmp_path, max_steps=10, limit_val_batches=0)
    match = r"non-finite values \(NaN or Inf\) in 1 sample\(s\) of training batch 2 \(epoch 1, global step 7"
    with pytest.raises(ValueError, match=match):
        trainer.fit(tiny_ebm(), data)
    assert trainer.global_step == 7  # stopped at the bad batch, no step taken on it
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_non_finite_validation_batch_is_named(tmp_path):
    data = PoisonedToyData(in_validation=True, batch_size=32, batches_per_epoch=5, num_val=64)
    trainer = tiny_trainer(tmp_path, max_steps=4, num_sanity_val_steps=0)
    with pytest.raises(ValueError, match=r"in 1 sample\(s\) of validation batch 0 \(epoch 0, global step 3"):
        trainer.fit(tiny_ebm(), data)


def cli(tmp_path: Path, *extra: str) -> None:
    main(["fit", "--config", str(ROOT / "configs" / "toy2d.yaml"),
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.max_steps=4",
          "--trainer.enable_progress_bar=false", "--data.init_args.num_val=64",
          "--model.init_args.sampler.init_args.steps=3", *extra])


def test_cli_names_the_non_finite_batch(tmp_path):
    with pytest.raises(ValueError, match=r"in 1 sample\(s\) of training batch 2 \(epoch 0, global step 2\)"):
        cli(tmp_path, f"--data={__name__}.PoisonedToyData", "--data.poison_batch=2", "--data.batch_size=32")


def test_cli_latent_shape_that_does_not_match_the_data_fails_in_setup_with_both_shapes(tmp_path):
    match = r"latent shape \(3,\) does not match the data's sample shape \(2,\) \(from Toy2DDataModule\)"
    with pytest.raises(ValueError, match=match) as info:
        cli(tmp_path, "--model.init_args.latent.init_args.shape=[3]",
            "--model.init_args.energy.init_args.dim=3")
    assert any(entry.name == "setup" for entry in info.traceback)  # raised by setup, before any step
    assert not list(tmp_path.rglob("*.ckpt"))


def _fit_on(tmp_path: Path, data: torch.Tensor, **kwargs) -> L.Trainer:
    trainer = tiny_trainer(tmp_path, max_steps=4, limit_val_batches=0, **kwargs)
    L.seed_everything(0)
    trainer.fit(tiny_ebm(), DataLoader(TensorDataset(data), batch_size=32))
    return trainer


def test_float64_batches_train_a_float32_model_exactly_as_their_float32_cast(tmp_path):
    """NumPy's float64 arrays are what users have: cast to the energy's dtype, not a dtype error deep in torch."""
    data = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    weights = [_fit_on(tmp_path / name, x).lightning_module.energy.state_dict()
               for name, x in (("float64", data), ("float32", data.float()))]
    assert all(p.dtype == torch.float32 for p in weights[0].values())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


def test_integer_batches_are_named_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"training batch 0 holds torch.int64 data, but the energy takes "
                                         r"floating-point samples.*x.float\(\) / 127.5 - 1"):
        _fit_on(tmp_path, torch.randint(0, 255, (128, 2)))


def test_points_given_to_the_model_are_checked_and_cast():
    model = tiny_ebm()
    z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    torch.testing.assert_close(model.generate(4, z=z, generator=gen),
                               model.generate(4, z=z.float(), generator=torch.Generator().manual_seed(1)))
    for bad, match in ((torch.randn(4, 3), r"z must be a tensor of shape \(B, 2\).*got shape \(4, 3\)"),
                       (torch.randn(4), r"got shape \(4,\)"), ([[0.0, 1.0]], "got a list"),
                       (torch.zeros(4, 2, dtype=torch.long), "z must hold floating-point values, got torch.int64")):
        with pytest.raises(ValueError, match=match):
            model.generate(4, z=bad)
    with pytest.raises(ValueError, match=r"EBM.generator_log_prob: x must be a tensor of shape \(B, 2\)"):
        model.generator_log_prob(torch.randn(4, 5))


def test_a_diverged_loss_is_reported_once_without_a_guard(tmp_path):
    class Unbounded(torch.nn.Module):  # -a |x|^4: gradient descent runs off to infinity
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.ones(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -self.a * x.pow(4).sum(1)

    model = tiny_ebm(energy=Unbounded(), sampler=GradientDescent(steps=20, step_size=0.5))
    trainer = tiny_trainer(tmp_path, max_steps=6, limit_val_batches=0, log_every_n_steps=2)
    with pytest.warns(UserWarning, match=r"train/loss is (nan|inf) at global step 0: the run has diverged.*"
                                         r"DivergenceGuard") as record:
        trainer.fit(model, DataLoader(TensorDataset(torch.randn(128, 2)), batch_size=32))
    assert sum("the run has diverged" in str(w.message) for w in record) == 1
