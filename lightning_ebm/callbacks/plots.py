"""Pictures of a two-dimensional EBM: data vs generated samples, energy landscape, trajectories."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from torch import Tensor

from .ema import averaged_weights
from .logging import EveryNSteps, held_out_data, log_image

__all__ = ["Plot2D", "energy_on_grid", "plot_2d"]


@torch.no_grad()
def energy_on_grid(
    energy: torch.nn.Module, bounds: tuple[float, float, float, float], size: int, chunk: int = 16384
) -> tuple[Tensor, Tensor, Tensor]:
    """``E`` on a ``size x size`` grid over ``(xmin, xmax, ymin, ymax)``: returns ``(xs, ys, E)``."""
    param = next(energy.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    xs = torch.linspace(bounds[0], bounds[1], size, device=device, dtype=dtype)
    ys = torch.linspace(bounds[2], bounds[3], size, device=device, dtype=dtype)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
    values = torch.cat([energy(p) for p in points.split(chunk)]).reshape(size, size)
    return xs.cpu(), ys.cpu(), values.float().cpu()


def _bounds(*point_sets: Tensor | None, margin: float = 0.15) -> tuple[float, float, float, float]:
    pts = torch.cat([p.detach().float().cpu() for p in point_sets if p is not None])
    lo = torch.quantile(pts, 0.001, dim=0)
    hi = torch.quantile(pts, 0.999, dim=0)
    pad = (hi - lo) * margin
    lo, hi = lo - pad, hi + pad
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


def plot_2d(
    energy: torch.nn.Module,
    generated: Tensor,
    data: Tensor | None = None,
    trajectories: Tensor | None = None,
    bounds: tuple[float, float, float, float] | None = None,
    grid_size: int = 150,
    title: str = "",
) -> Figure:
    """Two panels: data vs generated samples; the energy landscape with trajectories ``(T, B, 2)``."""
    bounds = bounds or _bounds(data, generated)
    xs, ys, e = energy_on_grid(energy, bounds, grid_size)
    fig = Figure(figsize=(10, 4.8), dpi=90)
    ax1, ax2 = fig.subplots(1, 2)
    if data is not None:
        d = data.detach().float().cpu()
        ax1.scatter(d[:, 0], d[:, 1], s=2, alpha=0.4, c="tab:blue", label="data")
    g = generated.detach().float().cpu()
    ax1.scatter(g[:, 0], g[:, 1], s=2, alpha=0.5, c="tab:orange", label="generated")
    ax1.set_title("data vs generated")
    ax1.legend(loc="upper right", markerscale=4, fontsize=8)
    im = ax2.imshow((-e).numpy(), origin="lower", extent=bounds, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax2, label="-E(x)")
    if trajectories is not None:
        tr = trajectories.detach().float().cpu()
        for k in range(tr.shape[1]):
            ax2.plot(tr[:, k, 0], tr[:, k, 1], c="white", lw=0.7, alpha=0.8)
        ax2.scatter(tr[0, :, 0], tr[0, :, 1], s=8, c="white", marker="o", label="z")
        ax2.scatter(tr[-1, :, 0], tr[-1, :, 1], s=12, c="red", marker="x", label="G(z)")
        ax2.legend(loc="upper right", fontsize=8)
    ax2.set_title("energy landscape and dynamics")
    for ax in (ax1, ax2):
        ax.set_xlim(bounds[0], bounds[1])
        ax.set_ylim(bounds[2], bounds[3])
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


class Plot2D(EveryNSteps):
    """Every ``every_n_steps`` training steps (and at the end of training) log a 2-D picture.

    The picture shows held-out data (the DataModule's ``val_data``, else its first validation
    batches, else those of the validation loader given to ``fit``) against
    ``num_samples`` generated samples, and the energy landscape with ``num_trajectories`` runs of
    the dynamics from ``z`` to ``G(z)``. The samples come from a fixed seed, so frames of one run
    are comparable. With an ``EMA`` callback the averaged weights generate. Logged through
    ``log_image`` (W&B, TensorBoard or PNG in the run directory).
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 1000,
        num_trajectories: int = 24,
        grid_size: int = 150,
        bounds: tuple[float, float, float, float] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps)
        for name, value in (("num_samples", num_samples), ("grid_size", grid_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Plot2D: {name} must be a positive integer, got {value!r}")
        if not isinstance(num_trajectories, int) or num_trajectories < 0:
            raise ValueError(f"Plot2D: num_trajectories must be an integer >= 0, got {num_trajectories!r}")
        self.num_samples, self.num_trajectories = num_samples, num_trajectories
        self.grid_size, self.bounds, self.seed = grid_size, bounds, seed
        self._warned_no_data = False

    def make_figure(self, trainer: L.Trainer, pl_module: Any) -> Figure:
        if tuple(pl_module.latent.shape) != (2,):
            raise ValueError(f"Plot2D needs 2-D samples, the latent has shape {tuple(pl_module.latent.shape)}")
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        x = pl_module.generate(self.num_samples, generator=gen)
        trajectories = None
        if self.num_trajectories:
            _, trajectories = pl_module.generate(self.num_trajectories, generator=gen, return_trajectory=True)
        data = held_out_data(trainer, self.num_samples)
        if data is None and not self._warned_no_data:
            self._warned_no_data = True
            rank_zero_warn("Plot2D: no held-out data to draw next to the samples: the DataModule has neither "
                           "`val_data` nor a `val_dataloader`, and fit was given no validation loader")
        return plot_2d(pl_module.energy, x, data, trajectories, self.bounds, self.grid_size,
                       title=f"step {trainer.global_step}")

    def log_now(self, trainer: L.Trainer, pl_module: Any) -> None:
        with averaged_weights(trainer, pl_module):  # the weights validation judges, as in SampleGrid
            fig = self.make_figure(trainer, pl_module)  # every rank samples (cheap); rank 0 logs
        log_image(trainer, "samples_2d", fig)
