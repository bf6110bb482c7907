"""Using lightning_ebm's pieces inside another Lightning project.

Two patterns, and a third that reuses someone else's trained model:

1. your own LightningDataModule (here: points you already have in a tensor) with ``EBM`` and the
   library's callbacks, in your own Trainer;
2. your own LightningModule that uses a lightning_ebm sampler and replay buffer in its training
   step: a JEM-style classifier whose logits ``f(x)`` define the energy
   ``E(x) = -logsumexp_y f(x)[y]`` (Grathwohl et al., 2020);
3. a pretrained EBM (a directory written by ``save_pretrained`` / ``lightning-ebm export``, or a
   Hugging Face Hub repo id) loaded with its sampler and latent, ready to generate.

Run: ``python examples/drop_in.py --max_steps 200`` (add ``--pretrained DIR_OR_REPO`` for 3;
pattern 1's model is saved to ``<root>/pretrained`` for it).
"""

from __future__ import annotations

import argparse
import functools
import math

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ebm import EBM
from lightning_ebm.callbacks import Plot2D
from lightning_ebm.energies import MLPEnergy
from lightning_ebm.latents import ReplayBuffer, Uniform
from lightning_ebm.samplers import GradientDescent, Langevin


def ring_points(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    radius = 2.0 + 0.1 * torch.randn(n, generator=g)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], 1)


class MyPointsDataModule(L.LightningDataModule):
    """A user's own DataModule: batches are tuples whose first item is the data tensor."""

    sample_shape = (2,)  # optional: lets EBM check its latent's shape at setup

    def __init__(self, points: torch.Tensor, batch_size: int = 128) -> None:
        super().__init__()
        self.points, self.batch_size = points, batch_size
        self.val_data = points[-500:]  # Plot2D shows it when present

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.points[:-500]), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.val_data), batch_size=self.batch_size)


def train_ebm_on_my_data(max_steps: int, root: str) -> EBM:
    """Pattern 1: EBM and Plot2D with a DataModule the library has never seen."""
    model = EBM(
        energy=MLPEnergy(dim=2, hidden=64),
        sampler=GradientDescent(steps=30, step_size=0.1),
        latent=Uniform(shape=(2,), low=-3.0, high=3.0),
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999)),  # picklable: resumable
    )
    trainer = L.Trainer(
        max_steps=max_steps, inference_mode=False, accelerator="cpu", default_root_dir=root,
        callbacks=[Plot2D(every_n_steps=max_steps)], enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, MyPointsDataModule(ring_points(3000)))
    return model


class JEMClassifier(L.LightningModule):
    """Pattern 2: a classifier whose logits are also an energy, trained with lightning_ebm's sampler."""

    def __init__(self, num_classes: int = 2, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, num_classes))
        self.sampler = Langevin(steps=20, step_size=0.05, noise_std=0.01)
        self.buffer = ReplayBuffer(Uniform(shape=(2,), low=-3.0, high=3.0), capacity=1000, reinit_prob=0.05)
        self.lr = lr

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.logsumexp(self.net(x), dim=1)  # (B,): the lightning_ebm energy contract

    def training_step(self, batch, batch_idx):
        x, y = batch
        z, slots = self.buffer.draw(x.shape[0], device=x.device, dtype=x.dtype)
        x_gen = self.sampler(self.energy, z)  # any callable (B, *shape) -> (B,) is an energy
        self.buffer.push(x_gen, slots)
        classification = nn.functional.cross_entropy(self.net(x), y)
        generative = self.energy(x).mean() - self.energy(x_gen).mean()
        loss = classification + generative
        self.log_dict({"train/ce": classification, "train/gap": generative})
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=(0.5, 0.999))


def train_jem(max_steps: int, root: str) -> JEMClassifier:
    points = ring_points(2000)
    labels = (points[:, 0] > 0).long()  # two half-rings
    model = JEMClassifier()
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", default_root_dir=root, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(points, labels), batch_size=128, shuffle=True))
    return model


def load_pretrained(path_or_repo_id: str, n: int = 1000) -> tuple[EBM, torch.Tensor]:
    """Pattern 3: a shared model, its whole generator included: samples from a fixed seed."""
    model = EBM.from_pretrained(path_or_repo_id)  # config.json + safetensors: no pickle, no code run
    return model, model.generate(n, generator=torch.Generator().manual_seed(0))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=1000)
    parser.add_argument("--root", default="runs/examples")
    parser.add_argument("--pretrained", default=None, help="a pretrained directory or Hub repo id to sample from")
    args = parser.parse_args()
    if args.pretrained is not None:
        _, x = load_pretrained(args.pretrained)
        print(f"pretrained {args.pretrained}: {tuple(x.shape)} samples, mean {x.mean(0).tolist()}")
        raise SystemExit
    ebm = train_ebm_on_my_data(args.max_steps, args.root)
    radius = ebm.generate(2000).norm(dim=1)
    print(f"EBM on my data: generated radius {radius.mean():.2f} +- {radius.std():.2f} (data: 2.00 +- 0.10)")
    try:
        print(f"saved for pattern 3: {ebm.save_pretrained(f'{args.root}/pretrained')}")
    except ImportError as err:  # the optional hub extra (safetensors) is not installed
        print(f"not saved for pattern 3: {err}")
    jem = train_jem(args.max_steps, args.root)
    grid = ring_points(1000, seed=1)
    accuracy = (jem.net(grid).argmax(1) == (grid[:, 0] > 0).long()).float().mean()
    print(f"JEM classifier accuracy on fresh ring points: {accuracy:.3f}")
