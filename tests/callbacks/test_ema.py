"""EMA under a real Trainer: the averaged weights are what validation, sampling and checkpoints use."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from image_helpers import fit
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ebm import EBM
from lightning_ebm.callbacks import EMA, SampleGrid
from lightning_ebm.callbacks.ema import averaged_weights
from lightning_ebm.data import DigitsDataModule
from lightning_ebm.energies import ConvEnergy
from lightning_ebm.latents import ReplayBuffer, Uniform
from lightning_ebm.samplers import GradientDescent


class RecordWeights(L.Callback):
    """Raw weights after every optimizer step; weights seen inside ``averaged_weights``."""

    def __init__(self) -> None:
        self.raw, self.inside, self.after = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        flat = lambda: torch.cat([p.detach().flatten() for p in pl_module.energy.parameters()]).clone()  # noqa: E731
        self.raw.append(flat())
        with averaged_weights(trainer, pl_module):
            self.inside.append(flat())
        self.after.append(flat())


class RecordValidation(L.Callback):
    def __init__(self) -> None:
        self.seen = []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.seen.append(torch.cat([p.detach().flatten() for p in pl_module.energy.parameters()]).clone())


class ModuleRecordingValidation(EBM):
    def on_validation_epoch_end(self):
        self.val_weights = torch.cat([p.detach().flatten() for p in self.energy.parameters()]).clone()
        super().on_validation_epoch_end()


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


def ema_reference(raw: list[torch.Tensor], decay: float) -> list[torch.Tensor]:
    """float64 recursion: the first step copies, then ema = decay * ema + (1 - decay) * w."""
    out = [raw[0].double()]
    for w in raw[1:]:
        out.append(decay * out[-1] + (1 - decay) * w.double())
    return out


def test_ema_is_used_for_validation_sampling_and_checkpoints(tmp_path):
    decay = 0.6
    latent = ReplayBuffer(Uniform((1, 8, 8)), capacity=32, reinit_prob=0.1)
    model = ModuleRecordingValidation(
        ConvEnergy(1, 2, 8, activation="silu"), GradientDescent(steps=3, step_size=0.5), latent
    )
    record, val_after = RecordWeights(), RecordValidation()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    # the validation recorder sits after EMA: Lightning's own callback would have swapped back already
    trainer = fit(
        tmp_path,
        model,
        [EMA(decay=decay), record, val_after, ckpt],
        val_check_interval=4,
        enable_checkpointing=True,
    )
    reference = ema_reference(record.raw, decay)
    assert len(reference) == 4
    for inside, after, ref, raw in zip(record.inside, record.after, reference, record.raw, strict=True):
        close(inside, ref)  # averaged_weights swaps the average in ...
        torch.testing.assert_close(after, raw)  # ... and back out
    close(val_after.seen[0], reference[-1])
    close(model.val_weights, reference[-1])  # the module's own metrics too
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    flat = lambda sd: torch.cat([v.flatten() for k, v in sd.items() if k.startswith("energy.")])  # noqa: E731
    close(flat(state["state_dict"]), reference[-1])
    torch.testing.assert_close(flat(state["current_model_state"]), record.raw[-1])
    # chains are not averaged: the checkpoint's are the live ones
    torch.testing.assert_close(state["state_dict"]["latent._extra_state"]["buffer"], model.latent.buffer)
    # loading for sampling gives the averaged energy
    loaded = ModuleRecordingValidation.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    close(torch.cat([p.flatten() for p in loaded.energy.parameters()]), reference[-1])
    assert trainer.global_step == 4

    # resuming continues both the raw weights and the average
    record2 = RecordWeights()
    model2 = ModuleRecordingValidation(
        ConvEnergy(1, 2, 8, activation="silu"),
        GradientDescent(steps=3, step_size=0.5),
        ReplayBuffer(Uniform((1, 8, 8)), 32),
    )
    L.Trainer(
        max_steps=5,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        inference_mode=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[EMA(decay=decay), record2],
    ).fit(
        model2, DigitsDataModule(batch_size=16), ckpt_path=tmp_path / "ckpt" / "last.ckpt", weights_only=False
    )
    assert len(record2.raw) == 1
    close(record2.inside[0], decay * reference[-1] + (1 - decay) * record2.raw[0].double())


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match=r"EMA: decay must be a finite number in \[0, 1\), got 1.5"):
        EMA(decay=1.5)
    with pytest.raises(ValueError, match="num_frames must be an integer >= 2"):
        SampleGrid(num_frames=1)
