"""Density diagnostics: the data | generator q | exp(-E)/Z panel (2-D), and long runs of the dynamics."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure
from torch import Tensor

from .. import density
from .._checks import check_int, fail
from ..metrics import mmd_rbf
from .ema import averaged_weights
from .logging import EveryNSteps, held_out_data, log_image

__all__ = ["DensityPanel2D", "LongRunDiagnostic", "density_metrics", "density_figure"]


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Evaluate a fixed function: no dropout, no spectral-norm power iteration while we look."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@rank_zero_only
def _log_metrics(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def _padded_bounds(data: Tensor, margin: float = 0.15) -> tuple[float, float, float, float]:
    lo, hi = data.min(0).values.double(), data.max(0).values.double()
    pad = (hi - lo) * margin
    return float(lo[0] - pad[0]), float(hi[0] + pad[0]), float(lo[1] - pad[1]), float(hi[1] + pad[1])


def density_metrics(log_data: Tensor | None, log_gen: Tensor | None, log_ebm: Tensor,
                    cell_area: float) -> dict[str, float]:
    """Masses, KLs and total variations between the three densities on one grid.

    ``mass_gen`` is ``int q`` over the grid before renormalising (1 when the grid holds the
    generator's mass); the divergences compare the densities renormalised on the grid:
    ``kl_data_gen = KL(data || q)``, ``kl_data_ebm = KL(data || exp(-E)/Z)``,
    ``kl_gen_ebm = KL(q || exp(-E)/Z)``, and ``tv_*`` the matching total variations. Without a
    generator density (``log_gen=None``: a noisy sampler) only the data-vs-EBM ones.
    """
    out: dict[str, float] = {}
    pairs = []
    if log_gen is not None:
        out["mass_gen"] = float(log_gen.double().exp().sum() * cell_area)
        pairs.append(("gen_ebm", log_gen, log_ebm))
    if log_data is not None:
        out["mass_data"] = float(log_data.double().exp().sum() * cell_area)
        pairs = [("data_ebm", log_data, log_ebm)] + pairs
        if log_gen is not None:
            pairs.insert(0, ("data_gen", log_data, log_gen))
    for name, p, q in pairs:
        out[f"kl_{name}"] = float(density.kl_on_grid(p, q, cell_area))
        out[f"tv_{name}"] = float(density.tv_on_grid(p, q, cell_area))
    return out


def density_figure(bounds: Sequence[float], size: int, log_data: Tensor | None, log_gen: Tensor | None,
                   log_ebm: Tensor, metrics: dict[str, float], title: str = "",
                   log_range: float = 10.0) -> Figure:
    """Panels data | generator q | exp(-E)/Z as log-densities on one colour scale, KLs in the titles."""
    panels = [("data", log_data), ("generator q", log_gen), ("EBM exp(-E)/Z", log_ebm)]
    panels = [(name, v.double().cpu().reshape(size, size)) for name, v in panels if v is not None]
    finite_max = [float(v[torch.isfinite(v)].max()) for _, v in panels if torch.isfinite(v).any()]
    vmax = max(finite_max) if finite_max else 0.0
    fig = Figure(figsize=(3.6 * len(panels) + 1.0, 3.9), dpi=90, layout="constrained")
    axes = fig.subplots(1, len(panels))
    subtitles = {"data": "", "generator q": f"KL(data||q) = {metrics.get('kl_data_gen', math.nan):.3f}",
                 "EBM exp(-E)/Z": f"KL(data||EBM) = {metrics.get('kl_data_ebm', math.nan):.3f}"
                                  + (f"\nKL(q||EBM) = {metrics['kl_gen_ebm']:.3f}" if "kl_gen_ebm" in metrics else "")}
    if log_data is None:
        subtitles["generator q"] = ""
    im = None
    for ax, (name, values) in zip(axes, panels, strict=True):
        shown = values.clamp(min=vmax - log_range).nan_to_num(neginf=vmax - log_range).numpy()
        im = ax.imshow(shown, origin="lower", extent=tuple(bounds), vmin=vmax - log_range, vmax=vmax,
                       cmap="magma", aspect="equal")
        ax.set_title(f"{name}\n{subtitles[name]}".rstrip(), fontsize=9)
    fig.colorbar(im, ax=list(axes), label="log density", shrink=0.9)
    if title and "mass_gen" in metrics:
        fig.suptitle(f"{title}   (q integrates to {metrics['mass_gen']:.3f} on the grid)", fontsize=10)
    elif title:
        fig.suptitle(f"{title}   (the generator injects noise: no density q)", fontsize=10)
    return fig


class DensityPanel2D(EveryNSteps):
    """Every ``every_n_steps`` training steps (and at the end of training): data | generator q | exp(-E)/Z.

    On a ``grid_size x grid_size`` grid over ``bounds`` (default: the held-out data's box plus
    15%) it evaluates the data's log-density (the DataModule's ``log_density`` when it has one,
    else a Gaussian KDE of its held-out data), the generator's ``generator_log_prob`` (by inverting
    the dynamics) and the EBM's ``exp(-E)/Z`` (``Z`` by quadrature on the grid). It logs the
    panel through ``log_image`` and the numbers of ``density_metrics`` as ``density/<name>``
    through every logger; the last ones stay in ``last_metrics``. Runs on global rank 0 with
    the energy in eval mode (and with an ``EMA`` callback, its averaged weights). A generator
    without a density (a noisy sampler such as Langevin, MALA or DRL's recovery chain) leaves out
    the ``q`` panel and its numbers; one that cannot be inverted (a gradient-descent step that is
    not a contraction) is reported with a warning and that panel is skipped.

    Args:
        every_n_steps: period in training steps.
        bounds: ``(xmin, xmax, ymin, ymax)`` of the grid; choose it to hold all three densities.
        grid_size: cells per axis (the generator's density is inverted at ``grid_size**2`` points).
        trace: as in ``EBM.generator_log_prob`` (2-D: exact by default).
        num_probes: as in ``EBM.generator_log_prob``.
        batch_size: grid points inverted at once.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        bounds: tuple[float, float, float, float] | None = None,
        grid_size: int = 100,
        trace: str | None = None,
        num_probes: int = 1,
        batch_size: int = 4096,
    ) -> None:
        super().__init__(every_n_steps)
        grid_size = check_int("DensityPanel2D", "grid_size", grid_size, minimum=1)
        batch_size = check_int("DensityPanel2D", "batch_size", batch_size, minimum=1)
        num_probes = check_int("DensityPanel2D", "num_probes", num_probes, minimum=1)
        if bounds is not None:
            ok = isinstance(bounds, Sequence) and not isinstance(bounds, str) and len(bounds) == 4
            ok = ok and all(isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b)
                            for b in bounds)
            if not ok or not (bounds[0] < bounds[1] and bounds[2] < bounds[3]):
                raise fail("DensityPanel2D", "bounds", "(xmin, xmax, ymin, ymax) with xmin < xmax and ymin < ymax",
                           bounds)
        density.resolve_trace(trace, 2)
        self.bounds, self.grid_size = bounds, grid_size
        self.trace, self.num_probes, self.batch_size = trace, num_probes, batch_size
        self.last_metrics: dict[str, float] = {}

    def compute(self, trainer: L.Trainer, pl_module: Any) -> tuple[Figure, dict[str, float]]:
        """The panel and its metrics for the current model."""
        if tuple(pl_module.latent.shape) != (2,):
            raise ValueError(f"DensityPanel2D needs 2-D samples, the latent has shape "
                             f"{tuple(pl_module.latent.shape)}")
        datamodule = getattr(trainer, "datamodule", None)
        held_out = held_out_data(trainer, 100_000)
        bounds = self.bounds
        if bounds is None:
            if held_out is None:
                raise ValueError("DensityPanel2D: give bounds, or a DataModule with held-out data to derive "
                                 "them from")
            bounds = _padded_bounds(held_out)
        points, area = density.grid_2d(bounds, self.grid_size, device=pl_module.device, dtype=pl_module.dtype)
        if hasattr(datamodule, "log_density"):
            log_data = datamodule.log_density(points)
        elif held_out is not None:
            log_data = density.kde_log_density(held_out, points)
        else:
            log_data = None
        with _eval_mode(pl_module):
            try:
                density.check_density(pl_module.sampler, pl_module.latent)
            except ValueError:  # a noisy sampler (Langevin, MALA, DRL) or a latent without a density
                log_gen = None
            else:
                log_gen = pl_module.generator_log_prob(points, trace=self.trace, num_probes=self.num_probes,
                                                       batch_size=self.batch_size,
                                                       generator=torch.Generator(pl_module.device).manual_seed(0))
            log_ebm = density.ebm_log_density(pl_module.energy, points, area)
        metrics = density_metrics(log_data, log_gen, log_ebm, area)
        fig = density_figure(bounds, self.grid_size, log_data, log_gen, log_ebm, metrics,
                             title=f"step {trainer.global_step}")
        return fig, metrics

    def log_now(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        try:
            with averaged_weights(trainer, pl_module):  # the weights validation judges
                fig, metrics = self.compute(trainer, pl_module)
        except ValueError as err:
            if "not invertible" not in str(err):
                raise
            warnings.warn(f"DensityPanel2D skipped step {trainer.global_step}: {err}", stacklevel=2)
            return
        self.last_metrics = metrics
        _log_metrics(trainer, {f"density/{k}": v for k, v in metrics.items()})
        log_image(trainer, "density_2d", fig)


class LongRunDiagnostic(EveryNSteps):
    """Run the generator's dynamics far longer than training does and log where the samples go.

    From the same fixed latents every time, the dynamics are continued to ``multiples`` times
    their training length (the sampler applied again and again to its own output: exactly
    ``m * K`` gradient-descent or Langevin steps, or ``m * t_end`` of the ODE). At each multiple
    (and at 1) it logs ``longrun/energy_x<m>`` (mean energy), ``longrun/mmd_x<m>`` (MMD to
    held-out data) and ``longrun/nonfinite_x<m>`` (fraction of diverged samples), plus a picture
    (2-D scatter against the data, or image grids). If the energy were a density with minima at
    the data, long runs would stay on the data; if it is only a critic for its short-run
    generator, they drift (often to lower energy, away from the data). With an ``EMA`` callback
    the averaged weights run, as in validation.

    Args:
        every_n_steps: period in training steps (also runs at the end of training).
        multiples: how many times the training length to run (integers > 1).
        num_samples: chains followed.
        seed: seed of the latents (fixed, so frames of one run are comparable).
    """

    def __init__(self, every_n_steps: int = 1000, multiples: Sequence[int] = (10, 100),
                 num_samples: int = 1000, seed: int = 0) -> None:
        super().__init__(every_n_steps)
        num_samples = check_int("LongRunDiagnostic", "num_samples", num_samples, minimum=1)
        seed = check_int("LongRunDiagnostic", "seed", seed)
        if not isinstance(multiples, Sequence) or isinstance(multiples, str):
            raise fail("LongRunDiagnostic", "multiples", "a non-empty sequence of integers >= 2", multiples)
        multiples = tuple(multiples)
        if not multiples or any(not isinstance(m, int) or isinstance(m, bool) or m < 2 for m in multiples):
            raise fail("LongRunDiagnostic", "multiples", "a non-empty sequence of integers >= 2", multiples)
        self.num_samples, self.seed = num_samples, seed
        self.multiples = tuple(sorted(set(multiples)))
        self.last_metrics: dict[str, float] = {}

    @torch.no_grad()
    def run(self, pl_module: Any) -> dict[int, Tensor]:
        """Samples after 1 and each of ``multiples`` times the training length: ``{m: x}``."""
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        x = pl_module.generate(self.num_samples, generator=gen)
        out, done = {1: x}, 1
        for m in self.multiples:
            for _ in range(m - done):
                x = pl_module.generate(self.num_samples, z=x, generator=gen)
            out[m], done = x, m
        return out

    def compute(self, trainer: L.Trainer, pl_module: Any) -> tuple[Figure | None, dict[str, float]]:
        with _eval_mode(pl_module), torch.no_grad():
            runs = self.run(pl_module)
            energies = {m: pl_module.energy(x) for m, x in runs.items()}
        data = held_out_data(trainer, self.num_samples)
        metrics: dict[str, float] = {}
        for m, x in runs.items():
            finite = torch.isfinite(x.flatten(1)).all(1) & torch.isfinite(energies[m])
            metrics[f"longrun/nonfinite_x{m}"] = float(1 - finite.double().mean())
            metrics[f"longrun/energy_x{m}"] = float(energies[m].double().mean())
            if data is not None:
                ok = x[finite]
                mmd = mmd_rbf(ok, data.to(ok)) if ok.shape[0] >= 2 else torch.tensor(math.nan)
                metrics[f"longrun/mmd_x{m}"] = float(mmd)
        return self._figure(runs, data, metrics, trainer.global_step), metrics

    @staticmethod
    def _figure(runs: dict[int, Tensor], data: Tensor | None, metrics: dict[str, float],
                step: int) -> Figure | None:
        sample = next(iter(runs.values()))
        if sample.ndim not in (2, 4) or (sample.ndim == 2 and sample.shape[1] != 2):
            return None
        fig = Figure(figsize=(3.6 * len(runs), 3.9), dpi=90, layout="constrained")
        axes = fig.subplots(1, len(runs))
        for ax, (m, x) in zip(axes, runs.items(), strict=True):
            x = x.detach().float().cpu()
            if x.ndim == 2:
                if data is not None:
                    d = data.detach().float().cpu()
                    ax.scatter(d[:, 0], d[:, 1], s=2, alpha=0.3, c="tab:blue")
                ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, c="tab:orange")
                ax.set_aspect("equal")
            else:
                from torchvision.utils import make_grid

                grid = make_grid(x[:64].clamp(-1, 1), nrow=8, normalize=True, value_range=(-1, 1))
                ax.imshow(grid.permute(1, 2, 0).numpy())
                ax.axis("off")
            title = f"{m} x training length\nE = {metrics[f'longrun/energy_x{m}']:.3g}"
            if f"longrun/mmd_x{m}" in metrics:
                title += f", MMD = {metrics[f'longrun/mmd_x{m}']:.3g}"
            ax.set_title(title, fontsize=9)
        fig.suptitle(f"long runs of the dynamics, step {step}", fontsize=10)
        return fig

    def log_now(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        with averaged_weights(trainer, pl_module):  # the weights validation judges
            fig, metrics = self.compute(trainer, pl_module)
        self.last_metrics = metrics
        _log_metrics(trainer, metrics)
        if fig is not None:
            log_image(trainer, "longrun", fig)
