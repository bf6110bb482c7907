"""Does a sample stay a sample? Long exact MCMC chains (MALA, HMC) started from the generator's samples."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from matplotlib.figure import Figure
from torch import Tensor

from .._checks import check_int, check_type
from ..metrics import mmd_rbf
from ..samplers import MALA, Sampler
from .density import _eval_mode, _log_metrics
from .logging import held_out_data, log_image

__all__ = ["MCMCDiagnostic"]


class MCMCDiagnostic(L.Callback):
    """After every ``every_n_validations``-th validation: long MALA/HMC chains from the generator's samples.

    If ``exp(-E)`` were the model's density and the generator drew from it, an exact sampler at
    ``T = 1`` started from generated samples would leave their law unchanged: the energy along
    the chain would stay flat and the samples would stay on the data. A short-run EBM's energy
    is a critic for its own generator instead, and the chains typically drift (to lower energy,
    or spread out where ``exp(-E)`` is flat). The callback logs through every logger, at the
    current global step:

    ``mcmc/energy_start``, ``mcmc/energy_end`` (mean energy of the chains before and after),
    ``mcmc/energy_drift`` (their difference), ``mcmc/energy_end_std``, ``mcmc/acceptance`` (after
    any warm-up), ``mcmc/step_size`` (when the sampler adapts it), ``mcmc/nonfinite`` (fraction of
    chains with non-finite states or energies), and with held-out data ``mcmc/mmd_start``,
    ``mcmc/mmd_end`` (MMD to it) and ``mcmc/energy_data``; plus a picture ``mcmc_diagnostic``:
    the energy along the chain (mean and 10-90% band) and the samples before and after (2-D
    scatter over the data, or image grids).

    Args:
        sampler: an exact MCMC sampler (default ``MALA(steps=1000, step_size=0.01,
            adapt_steps=100)``: the step size adapted per chain towards 0.574 acceptance during
            the first 100 steps). Any sampler works; its ``steps`` are the chain length.
        num_chains: chains followed (generated from a fixed seed, so runs are comparable).
        every_n_validations: run after every n-th validation (every n epochs with Lightning's
            default ``check_val_every_n_epoch=1``); never during the sanity check.
        seed: seed of the generator's latents and of the chains' noise.
        record_every: keep the chains' energies every this many steps for the trace.
    """

    def __init__(self, sampler: Sampler | None = None, num_chains: int = 256, every_n_validations: int = 1,
                 seed: int = 0, record_every: int = 1) -> None:
        sampler = MALA(steps=1000, step_size=0.01, adapt_steps=100) if sampler is None else sampler
        self.sampler = check_type("MCMCDiagnostic", "sampler", sampler, Sampler,
                                  "a lightning_ebm.samplers.Sampler (MALA, HMC)")
        self.num_chains = check_int("MCMCDiagnostic", "num_chains", num_chains, minimum=2)
        self.every_n_validations = check_int("MCMCDiagnostic", "every_n_validations", every_n_validations,
                                             minimum=1)
        self.seed = check_int("MCMCDiagnostic", "seed", seed)
        self.record_every = check_int("MCMCDiagnostic", "record_every", record_every, minimum=1)
        self.validations = 0
        #: global steps at which the diagnostic ran
        self.logged_steps: list[int] = []
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ the chains
    @torch.no_grad()
    def run(self, pl_module: Any) -> dict[str, Tensor]:
        """``{"start", "end", "energies"}``: generated samples, the chains' end points, and the energies
        ``(num_recorded, num_chains)`` along the chains (step 0 first, then every ``record_every``)."""
        device = pl_module.device
        gen = torch.Generator(device=device).manual_seed(self.seed)
        start = pl_module.generate(self.num_chains, generator=gen)
        energy = pl_module.energy
        recorded = [energy(start).detach()]

        def record(info: dict[str, Any]) -> None:
            if info["step"] % self.record_every == 0:
                e = info.get("energy")
                recorded.append(e.detach() if e is not None else energy(info["x"]).detach())

        end = self.sampler(energy, start, generator=gen, callback=record)
        return {"start": start, "end": end, "energies": torch.stack(recorded).double().cpu()}

    def compute(self, trainer: L.Trainer | None, pl_module: Any) -> tuple[Figure, dict[str, float]]:
        """Run the chains (energy in ``eval()`` mode) and summarise them: ``(figure, metrics)``."""
        with _eval_mode(pl_module):
            out = self.run(pl_module)
            data = held_out_data(trainer, self.num_chains) if trainer is not None else None
            e_data = pl_module.energy(data.to(pl_module.device)).double().mean() if data is not None else None
        energies, start, end = out["energies"], out["start"], out["end"]
        finite = torch.isfinite(end.flatten(1)).all(1).cpu() & torch.isfinite(energies[-1])
        metrics = {
            "mcmc/energy_start": float(energies[0].mean()),
            "mcmc/energy_end": float(energies[-1][finite].mean()) if finite.any() else math.nan,
            "mcmc/energy_end_std": float(energies[-1][finite].std()) if finite.sum() > 1 else math.nan,
            "mcmc/nonfinite": float(1 - finite.double().mean()),
        }
        metrics["mcmc/energy_drift"] = metrics["mcmc/energy_end"] - metrics["mcmc/energy_start"]
        for key, value in (self.sampler.last_info or {}).items():
            if key in ("acceptance", "step_size"):
                metrics[f"mcmc/{key}"] = float(value)
        if data is not None:
            data = data.to(start)
            metrics["mcmc/energy_data"] = float(e_data)
            metrics["mcmc/mmd_start"] = float(mmd_rbf(start, data))
            ok = end[finite.to(end.device)]
            metrics["mcmc/mmd_end"] = float(mmd_rbf(ok, data)) if ok.shape[0] >= 2 else math.nan
        step = trainer.global_step if trainer is not None else 0
        return self._figure(out, data, metrics, step), metrics

    def _figure(self, out: dict[str, Tensor], data: Tensor | None, metrics: dict[str, float], step: int) -> Figure:
        energies, start, end = out["energies"], out["start"], out["end"]
        pictures = start.ndim == 4 or (start.ndim == 2 and start.shape[1] == 2)
        fig = Figure(figsize=(11.0 if pictures else 4.5, 3.9), dpi=90, layout="constrained")
        axes = fig.subplots(1, 3 if pictures else 1, squeeze=False)[0]
        steps = torch.arange(energies.shape[0]) * self.record_every
        finite = torch.where(torch.isfinite(energies), energies, torch.nan)
        lo, mid, hi = (torch.nanquantile(finite, q, dim=1) for q in (0.1, 0.5, 0.9))
        ax = axes[0]
        ax.fill_between(steps.numpy(), lo.numpy(), hi.numpy(), alpha=0.3, color="tab:orange", label="10-90%")
        ax.plot(steps.numpy(), torch.nanmean(finite, 1).numpy(), color="tab:orange", label="mean")
        ax.plot(steps.numpy(), mid.numpy(), color="tab:orange", ls=":", label="median")
        if "mcmc/energy_data" in metrics:
            ax.axhline(metrics["mcmc/energy_data"], color="tab:blue", ls="--", label="held-out data")
        ax.set_xlabel(f"{type(self.sampler).__name__} step")
        ax.set_ylabel("energy")
        acc = metrics.get("mcmc/acceptance")
        ax.set_title("energy along the chains" + (f" (acceptance {acc:.2f})" if acc is not None else ""),
                     fontsize=9)
        ax.legend(fontsize=7)
        if pictures:
            for a, x, name in ((axes[1], start, "generated (start)"), (axes[2], end, "after the chain")):
                x = x.detach().float().cpu()
                if x.ndim == 2:
                    if data is not None:
                        d = data.detach().float().cpu()
                        a.scatter(d[:, 0], d[:, 1], s=2, alpha=0.3, c="tab:blue")
                    a.scatter(x[:, 0], x[:, 1], s=3, alpha=0.6, c="tab:orange")
                    a.set_aspect("equal")
                else:
                    from .images import image_grid

                    a.imshow(image_grid(x[:64].clamp(-1, 1), nrow=8).permute(1, 2, 0).numpy())
                    a.axis("off")
                key = "mcmc/mmd_start" if x is start else "mcmc/mmd_end"
                title = name + (f"\nMMD to data {metrics[key]:.3g}" if key in metrics else "")
                a.set_title(title, fontsize=9)
        fig.suptitle(f"{self.sampler.steps if hasattr(self.sampler, 'steps') else ''} exact-MCMC steps from "
                     f"the generator's samples, step {step}", fontsize=10)
        return fig

    # ------------------------------------------------------------------ the hook
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_validations or not trainer.is_global_zero:
            return
        fig, metrics = self.compute(trainer, pl_module)
        self.last_metrics = metrics
        self.logged_steps.append(trainer.global_step)
        _log_metrics(trainer, metrics)
        log_image(trainer, "mcmc_diagnostic", fig)

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = int(state_dict.get("validations", 0))
