"""Two-dimensional toy distributions and their LightningDataModule."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from .._checks import check_bool, check_choice, check_int, fail
from ..density.grid import histogram_2d, histogram_lookup

__all__ = ["TOY_DATASETS", "TOY_LABELLED", "TOY_LOG_DENSITIES", "sample_toy", "sample_toy_labelled", "toy_log_density",
           "Toy2DDataModule",
           "ToyBatchStream"]


def _rand(n, g, *shape):
    return torch.rand((n, *shape), generator=g, dtype=torch.float64)


def _randn(n, g, *shape):
    return torch.randn((n, *shape), generator=g, dtype=torch.float64)


def _eight_gaussians_labelled(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    k = torch.randint(0, 8, (n,), generator=g)
    angle = k.double() * (math.pi / 4)
    centres = 2.0 * math.sqrt(2.0) * torch.stack([angle.cos(), angle.sin()], 1)
    return centres + (0.5 / math.sqrt(2.0)) * _randn(n, g, 2), k


def _two_spirals_labelled(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    t = _rand(n, g).sqrt() * 3 * math.pi
    lower = torch.rand(n, generator=g) < 0.5
    sign = torch.where(lower, -1.0, 1.0).double()
    xy = torch.stack([-t.cos() * t, t.sin() * t], 1) + 0.5 * _rand(n, g, 2)
    return sign[:, None] * xy / 3 + 0.1 * _randn(n, g, 2), lower.long()


def _checkerboard(n: int, g: torch.Generator) -> Tensor:
    x1 = _rand(n, g) * 4 - 2
    x2 = _rand(n, g) - torch.randint(0, 2, (n,), generator=g).double() * 2
    x2 = x2 + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1) * 2


def _rings_labelled(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    ring = torch.randint(1, 5, (n,), generator=g)
    radius = 0.9 * ring.double()
    angle = _rand(n, g) * 2 * math.pi
    return radius[:, None] * torch.stack([angle.cos(), angle.sin()], 1) + 0.08 * _randn(n, g, 2), ring - 1


def _moons_labelled(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    t = _rand(n, g) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, t.cos(), 1 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    centred = torch.stack([x, y], 1) - torch.tensor([0.5, 0.25], dtype=torch.float64)
    return 1.5 * centred + 0.1 * _randn(n, g, 2), (~upper).long()


def _pinwheel_labelled(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    arms, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    k = torch.randint(0, arms, (n,), generator=g)
    feats = _randn(n, g, 2) * torch.tensor([radial_std, tangential_std], dtype=torch.float64)
    feats[:, 0] += 1.0
    angle = k.double() * (2 * math.pi / arms) + rate * feats[:, 0].exp()
    c, s = angle.cos(), angle.sin()
    rot = torch.stack([torch.stack([c, -s], 1), torch.stack([s, c], 1)], 1)  # (n, 2, 2)
    return 2 * torch.einsum("nij,nj->ni", rot, feats), k


def _points_only(labelled: Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
                 ) -> Callable[[int, torch.Generator], Tensor]:
    def points(n: int, g: torch.Generator) -> Tensor:
        return labelled(n, g)[0]

    points.__name__ = labelled.__name__.removesuffix("_labelled")
    return points


#: mixture sets: name -> (number of modes, sampler ``(n, generator) -> ((n, 2) float64, mode index (n,) int64)``);
#: the points are exactly those of ``TOY_DATASETS[name]`` for the same stream
TOY_LABELLED: dict[str, tuple[int, Callable[[int, torch.Generator], tuple[Tensor, Tensor]]]] = {
    "8gaussians": (8, _eight_gaussians_labelled),
    "2spirals": (2, _two_spirals_labelled),
    "rings": (4, _rings_labelled),
    "moons": (2, _moons_labelled),
    "pinwheel": (5, _pinwheel_labelled),
}
_eight_gaussians, _two_spirals, _rings, _moons, _pinwheel = (
    _points_only(TOY_LABELLED[k][1]) for k in ("8gaussians", "2spirals", "rings", "moons", "pinwheel"))


def _swissroll(n: int, g: torch.Generator) -> Tensor:
    t = 1.5 * math.pi * (1 + 2 * _rand(n, g))
    xy = torch.stack([t * t.cos(), t * t.sin()], 1)
    return (xy + _randn(n, g, 2)) / 5


#: name -> sampler ``(n, generator) -> (n, 2) float64``
TOY_DATASETS: dict[str, Callable[[int, torch.Generator], Tensor]] = {
    "8gaussians": _eight_gaussians,
    "2spirals": _two_spirals,
    "checkerboard": _checkerboard,
    "rings": _rings,
    "moons": _moons,
    "pinwheel": _pinwheel,
    "swissroll": _swissroll,
}


def _check_name(name: str, owner: str) -> None:
    check_choice(owner, "name (the toy dataset)", name, sorted(TOY_DATASETS))


def sample_toy(name: str, n: int, generator: torch.Generator | None = None, seed: int | None = None) -> Tensor:
    """``n`` samples ``(n, 2)`` (float32) of the toy distribution ``name``."""
    _check_name(name, "sample_toy")
    n = check_int("sample_toy", "n", n, minimum=1)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    return TOY_DATASETS[name](n, generator).float()


def _check_labelled(name: str, owner: str) -> int:
    """The number of modes of the mixture set ``name``; a clear error for sets without modes."""
    _check_name(name, owner)
    if name not in TOY_LABELLED:
        raise ValueError(f"{owner}: labels=True needs a toy set made of modes (the label is the mode index); "
                         f"{name!r} has none; choose one of {sorted(TOY_LABELLED)}")
    return TOY_LABELLED[name][0]


def sample_toy_labelled(name: str, n: int, generator: torch.Generator | None = None,
                        seed: int | None = None) -> tuple[Tensor, Tensor]:
    """``n`` samples ``(n, 2)`` (float32) of the mixture set ``name`` and their mode indices ``(n,)`` (int64).

    The points are exactly ``sample_toy(name, n, ...)``'s for the same stream or seed.
    """
    _check_labelled(name, "sample_toy_labelled")
    n = check_int("sample_toy_labelled", "n", n, minimum=1)
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    x, y = TOY_LABELLED[name][1](n, generator)
    return x.float(), y


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class ToyBatchStream:
    """An endless supply of fresh training batches, ``batches_per_epoch`` per epoch.

    Batch number ``k`` (counted over all epochs) of rank ``r`` is drawn from its own random
    stream seeded by ``(seed, r, k)``. The state is therefore just two counters, equal on every
    rank: Lightning saves rank 0's copy in checkpoints (the object is stateful) and every rank
    restores from it, so a resumed run sees exactly the batches the uninterrupted run would have
    seen, under DDP too. Every rank draws its own batches.
    """

    def __init__(self, name: str, batch_size: int, batches_per_epoch: int, seed: int, labels: bool = False) -> None:
        _check_name(name, "ToyBatchStream")
        if labels:
            _check_labelled(name, "ToyBatchStream")
        self.labels = labels
        self.name, self.batch_size, self.batches_per_epoch, self.seed = name, batch_size, batches_per_epoch, seed
        self._position = 0  # batches already yielded in the current epoch
        self._count = 0  # batches already yielded in all epochs

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _stream(self) -> torch.Generator:
        seed = (self.seed * 1_000_003 + 7919 * _rank() + 1) * 1_000_000_007 + self._count
        return torch.Generator().manual_seed(seed % (2**63 - 1))

    def __iter__(self) -> Iterator[Tensor | tuple[Tensor, Tensor]]:
        if self._position >= self.batches_per_epoch:
            self._position = 0
        while self._position < self.batches_per_epoch:
            if self.labels:  # (x, y): the same points as without labels, plus their mode index
                batch = sample_toy_labelled(self.name, self.batch_size, generator=self._stream())
            else:
                batch = sample_toy(self.name, self.batch_size, generator=self._stream())
            self._position += 1
            self._count += 1
            yield batch
        # the epoch is complete; the next __iter__ starts a new one

    def state_dict(self) -> dict[str, Any]:
        return {"position": self._position, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._position, self._count = int(state["position"]), int(state["count"])


class Toy2DDataModule(L.LightningDataModule):
    """Two-dimensional toy data: fresh training samples every batch, a fixed held-out set.

    Args:
        name: one of ``8gaussians``, ``2spirals``, ``checkerboard``, ``rings``, ``moons``,
            ``pinwheel``, ``swissroll``.
        batch_size: training (and validation) batch size, per device.
        batches_per_epoch: training batches per epoch (each freshly sampled).
        num_val: held-out samples drawn once (seeded) for validation metrics.
        seed: seed of the training stream (per rank) and of the held-out set.
        labels: batches are ``(x, y)`` with ``y`` the mode index (int64) of each point, for the
            mixture sets (``TOY_LABELLED``: 8gaussians, 2spirals, rings, moons, pinwheel); the
            points are the same as without labels. ``num_classes`` is then the number of modes.
    """

    sample_shape = (2,)

    def __init__(
        self,
        name: str = "8gaussians",
        batch_size: int = 256,
        batches_per_epoch: int = 100,
        num_val: int = 2000,
        seed: int = 0,
        labels: bool = False,
    ) -> None:
        super().__init__()
        _check_name(name, "Toy2DDataModule")
        labels = check_bool("Toy2DDataModule", "labels", labels)
        self.num_classes = _check_labelled(name, "Toy2DDataModule") if labels else None
        batch_size = check_int("Toy2DDataModule", "batch_size", batch_size, minimum=1)
        batches_per_epoch = check_int("Toy2DDataModule", "batches_per_epoch", batches_per_epoch, minimum=1)
        num_val = check_int("Toy2DDataModule", "num_val", num_val, minimum=1)
        seed = check_int("Toy2DDataModule", "seed", seed)
        self.save_hyperparameters()
        self.name, self.batch_size, self.seed = name, batch_size, seed
        self.batches_per_epoch, self.num_val = batches_per_epoch, num_val
        self.labels = labels
        self._train = ToyBatchStream(name, batch_size, batches_per_epoch, seed, labels=labels)
        self.val_data: Tensor | None = None
        self.val_labels: Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.val_data is None:
            generator = torch.Generator().manual_seed(10_000_019 + self.seed)
            if self.labels:
                self.val_data, self.val_labels = sample_toy_labelled(self.name, self.num_val, generator=generator)
            else:
                self.val_data = sample_toy(self.name, self.num_val, generator=generator)

    def sample(self, n: int, seed: int = 0) -> Tensor:
        """``n`` fresh samples ``(n, 2)`` from an independent seeded stream (for plots and floors)."""
        return sample_toy(self.name, n, seed=20_000_003 + seed)

    def train_dataloader(self) -> ToyBatchStream:
        return self._train

    def val_dataloader(self) -> DataLoader:
        self.setup()
        tensors = (self.val_data, self.val_labels) if self.labels else (self.val_data,)
        return DataLoader(TensorDataset(*tensors), batch_size=self.batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The test split (``lightning-ebm predict`` writes its energies and, for a classifier, logits)."""
        return self.test_dataloader()

    @property
    def exact_density(self) -> bool:
        """Whether ``log_density`` is exact (else a fine histogram of many samples)."""
        return self.name in TOY_LOG_DENSITIES

    def log_density(self, x: Tensor) -> Tensor:
        """The data's log-density at points ``x`` ``(N, 2)`` (see ``toy_log_density``)."""
        return toy_log_density(self.name, x)


def _eight_gaussians_log_density(x: Tensor) -> Tensor:
    angle = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    centres = 2.0 * math.sqrt(2.0) * torch.stack([angle.cos(), angle.sin()], 1)
    var = (0.5 / math.sqrt(2.0)) ** 2
    sq = (x[:, None, :] - centres).pow(2).sum(-1)
    return torch.logsumexp(-sq / (2 * var), 1) - math.log(8 * 2 * math.pi * var)


def _checkerboard_log_density(x: Tensor) -> Tensor:
    # four 1 x 2 columns of unit squares with floor(u) + floor(v) even, on [-2, 2)^2, scaled by 2
    cell = torch.floor(x / 2)
    inside = ((x >= -4) & (x < 4)).all(1) & ((cell[:, 0] + cell[:, 1]) % 2 == 0)
    return torch.full(inside.shape, -math.log(32.0), dtype=torch.float64).masked_fill(~inside, -math.inf)


#: toy sets with a closed-form density: name -> ``log p`` of float64 points ``(N, 2)``
TOY_LOG_DENSITIES: dict[str, Callable[[Tensor], Tensor]] = {
    "8gaussians": _eight_gaussians_log_density,
    "checkerboard": _checkerboard_log_density,
}


@functools.lru_cache(maxsize=8)
def _toy_histogram(name: str, num_samples: int, bins: int, seed: int) -> tuple[Tensor, tuple[float, ...]]:
    samples = sample_toy(name, num_samples, seed=seed).double()
    lo, hi = samples.min(0).values, samples.max(0).values
    pad = (hi - lo) * 0.01
    bounds = (float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1]))
    return histogram_2d(samples, bounds, bins), bounds


def toy_log_density(name: str, x: Tensor, num_samples: int = 2_000_000, bins: int = 200,
                    seed: int = 1) -> Tensor:
    """Log-density of the toy distribution ``name`` at points ``x`` ``(N, 2)``, float64.

    Exact for the sets in ``TOY_LOG_DENSITIES``; for the others a ``bins x bins`` histogram of
    ``num_samples`` seeded samples over their bounding box (cached), accurate up to the bin
    width and ``-inf`` on empty cells.
    """
    _check_name(name, "toy_log_density")
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != 2:
        raise fail("toy_log_density", "x", "a tensor of points (N, 2)", getattr(x, "shape", type(x).__name__))
    if name in TOY_LOG_DENSITIES:
        return TOY_LOG_DENSITIES[name](x.detach().double().cpu()).to(x.device)
    table, bounds = _toy_histogram(name, num_samples, bins, seed)
    return histogram_lookup(table, x, bounds)
