"""Diffusion recovery (Gao et al. 2021): the noise schedule and the conditional Langevin that undoes it.

``NoiseSchedule`` is the one definition of the variance-preserving noising that
``objectives.DiffusionRecoveryLikelihood`` trains on and ``DiffusionRecovery`` generates with:
``x_{t+1} = sqrt(1 - s_{t+1}^2) x_t + s_{t+1} eps``, ``t = 0 .. T-1``, ``x_0`` the data.

Recovering ``x_t`` from ``x_{t+1}`` samples ``p(x_t | x_{t+1}) ∝ exp(-E(x_t, t) - ||x~ - x_t||^2 / (2 r^2))``
with ``x~ = x_{t+1} / a``, ``a = sqrt(1 - s_{t+1}^2)`` and ``r = s_{t+1} / a``: given ``x_t``, ``x~`` is
``x_t`` plus Gaussian noise of standard deviation ``r`` (the paper writes the same conditional for the
scaled ``a x_t``; ``r -> s`` as ``s -> 0``). The chain is ``steps`` Langevin steps started at ``x~``, step
size ``b^2 r^2 / 2`` and noise ``b r`` (temperature 1), each sample at its own level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._checks import ArgumentError, check_float, check_int
from ..energies import energy_levels
from . import _backends
from .base import GradFn, Sampler, State, Steps, clip_grad
from .descent import gaussian_noise

__all__ = ["NoiseSchedule", "DiffusionRecovery", "recovery_update"]


class NoiseSchedule:
    """The ``T`` noise steps ``s_1 .. s_T`` of a variance-preserving diffusion, each in ``(0, 1)``.

    Given as a list ``sigmas`` (``sigmas[t]`` takes level ``t`` to ``t + 1``), or as ``num_levels``
    steps geometrically spaced from ``sigma_min`` (level 0 -> 1) up to ``sigma_max`` (the top step).
    ``owner`` names the class whose arguments these are, in error messages.

    Attributes:
        sigmas: the steps ``s_{t+1}``, ``t = 0 .. T-1``.
        alphas: ``a_{t+1} = sqrt(1 - s_{t+1}^2)``.
        alpha_bars: ``prod_{i <= t} a_i`` for ``t = 0 .. T`` (``alpha_bars[0] = 1``): the marginal is
            ``x_t = alpha_bars[t] x_0 + sqrt(1 - alpha_bars[t]^2) eps``.
    """

    def __init__(self, owner: str, sigmas: Sequence[float] | None = None, num_levels: int = 6,
                 sigma_min: float = 0.05, sigma_max: float = 0.9) -> None:
        if sigmas is not None:
            if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, Sequence) or len(sigmas) == 0:
                raise ArgumentError(f"{owner}: sigmas must be a non-empty list of numbers in (0, 1) or None, "
                                    f"got {sigmas!r}")
            steps = [check_float(owner, f"sigmas[{i}]", s, minimum=0, maximum=1, strict=True)
                     for i, s in enumerate(sigmas)]
        else:
            k = check_int(owner, "num_levels", num_levels, minimum=1)
            lo = check_float(owner, "sigma_min", sigma_min, minimum=0, maximum=1, strict=True)
            hi = check_float(owner, "sigma_max", sigma_max, minimum=0, maximum=1, strict=True)
            if not lo <= hi:
                raise ArgumentError(f"{owner}: sigma_min must be <= sigma_max, got sigma_min={lo!r}, "
                                    f"sigma_max={hi!r}")
            steps = [lo * (hi / lo) ** (i / (k - 1)) for i in range(k)] if k > 1 else [hi]
        self.sigmas = steps
        self.alphas = [math.sqrt(1 - s * s) for s in steps]
        self.alpha_bars = [1.0]
        for a in self.alphas:
            self.alpha_bars.append(self.alpha_bars[-1] * a)

    @property
    def num_levels(self) -> int:
        """``T``: the energy's levels ``0 .. T-1`` (the clean sample of each noise step)."""
        return len(self.sigmas)

    def _at(self, values: list[float], t: Tensor, like: Tensor) -> Tensor:
        v = torch.tensor(values, dtype=like.dtype, device=like.device)[t]
        return v.view(-1, *([1] * (like.ndim - 1)))

    def marginal(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x_t = alpha_bar_t x_0 + sqrt(1 - alpha_bar_t^2) eps`` per sample (``t``: LongTensor ``(B,)``)."""
        ab = self._at(self.alpha_bars, t, x0)
        return ab * x0 + (1 - ab * ab).sqrt() * eps

    def noise_step(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x_{t+1} = a_{t+1} x_t + s_{t+1} eps`` per sample."""
        return self._at(self.alphas, t, x_t) * x_t + self._at(self.sigmas, t, x_t) * eps

    def anchor_and_scale(self, x_next: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x~, r)`` of the recovery of level ``t`` from ``x_{t+1}``: ``x~ = x_{t+1} / a``, ``r = s / a``."""
        a = self._at(self.alphas, t, x_next)
        return x_next / a, self._at(self.sigmas, t, x_next) / a

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NoiseSchedule) and self.sigmas == other.sigmas

    def __repr__(self) -> str:
        return f"NoiseSchedule(sigmas={[round(s, 6) for s in self.sigmas]})"


def recovery_update(grad: GradFn, state: State, noise: tuple[Tensor, ...], k: Tensor, half_b2: float,
                    grad_clip: float | None, clamp: tuple[float, float] | None) -> tuple[State, dict[str, Tensor]]:
    """One conditional Langevin step on ``E(x, t) + ||x~ - x||^2 / (2 r^2)``.

    ``state = (x, x~, h, n)`` with per-sample step ``h = b^2 r^2 / 2`` and noise ``n = b r``; the
    quadratic's gradient times ``h`` is ``(b^2 / 2)(x - x~)``, so ``half_b2`` is a constant.
    """
    x, anchor, h, n = state
    g = clip_grad(grad(x), grad_clip)
    x = x - h * g - half_b2 * (x - anchor) + n * noise[0]
    if clamp is not None:
        x = x.clamp(*clamp)
    return (x, anchor, h, n), {"grad": g}


class _AtLevel(nn.Module):
    """``x -> energy(x, t=self.t)``: a noise-conditioned energy seen by the backends at fixed levels."""

    def __init__(self, energy: nn.Module, t: Tensor) -> None:
        super().__init__()
        self.energy = energy
        self.t = t

    def forward(self, x: Tensor) -> Tensor:
        return self.energy(x, t=self.t)


def check_conditioned(owner: str, energy: nn.Module, schedule: NoiseSchedule) -> None:
    """Raise unless ``energy`` is noise-conditioned (``num_levels``, ``t=``) with the schedule's ``T`` levels."""
    levels = energy_levels(energy)
    name, want = type(energy).__name__, schedule.num_levels
    if levels is None:
        raise ArgumentError(
            f"{owner} needs a noise-conditioned energy, but {name} takes no noise level (num_levels is None); "
            f"build it with num_levels={want} (MLPEnergy, ConvEnergy, ResNetEnergy), or give your energy a "
            f"num_levels attribute and a forward(x, t=None) that takes the level index t")
    if levels != want:
        raise ArgumentError(f"{owner}: the energy {name} has num_levels={levels} but the noise schedule has "
                            f"{want} levels; they must match")


class DiffusionRecovery(Sampler):
    """Generation by diffusion recovery: from ``x_T`` (the latent, e.g. ``N(0, I)``) down to level 0.

    For ``t = T-1 .. 0``: ``x_t`` = ``steps`` conditional Langevin steps at level ``t`` started at
    ``x~ = x_{t+1} / a_{t+1}`` (see the module docstring), so the energy must be noise-conditioned
    with ``num_levels = T`` (``energies``' protocol). The schedule arguments are those of
    ``objectives.DiffusionRecoveryLikelihood`` (one ``NoiseSchedule``): give both the same. Returns
    ``x_0``; a trajectory holds every step of every level (``T * steps`` states after ``x0``).

    Args:
        steps: Langevin steps per level ``K``.
        b: step-size factor: step ``b^2 r^2 / 2``, noise ``b r``, ``r`` the level's recovery scale.
        sigmas: the noise steps ``s_1 .. s_T``, each in (0, 1) (``NoiseSchedule``); ``None``: the
            next three give them, geometrically spaced.
        num_levels: ``T``, the number of noise steps (and of the energy's levels).
        sigma_min: the first step (level 0 -> 1).
        sigma_max: the top step (level T-1 -> T).
        grad_clip: clamp every coordinate of ``grad E`` to ``[-grad_clip, grad_clip]``.
        clamp: clamp the state to ``(low, high)`` after every step.
        compile: run each step through ``torch.compile`` (one compilation serves every level).
    """

    deterministic = False

    def __init__(self, steps: int = 20, b: float = 0.35, sigmas: Sequence[float] | None = None, num_levels: int = 6,
                 sigma_min: float = 0.05, sigma_max: float = 0.9, grad_clip: float | None = None,
                 clamp: tuple[float, float] | None = None, compile: bool = False) -> None:
        super().__init__(grad_clip=grad_clip, clamp=clamp, compile=compile)
        name = type(self).__name__
        self.steps = check_int(name, "steps", steps, minimum=1)
        self.b = check_float(name, "b", b, minimum=0, strict=True)
        self.schedule = NoiseSchedule(name, sigmas, num_levels, sigma_min, sigma_max)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_view", None)  # the cached view of the energy at fixed levels is not part of the sampler
        return state

    def check_energy(self, energy: nn.Module) -> None:
        """Raise unless the energy is noise-conditioned with this schedule's number of levels."""
        check_conditioned(type(self).__name__, energy, self.schedule)

    def dynamics(self) -> Steps:
        """``recovery_update``, ``steps`` times, a standard normal per step (one level's chain)."""
        return Steps(recovery_update, self.steps, (0.5 * self.b**2, self.grad_clip, self.clamp), draw=gaussian_noise)

    def recover(self, energy: nn.Module, x_next: Tensor, t: Tensor, generator: torch.Generator | None = None,
                callback=None, return_trajectory: bool = False) -> _backends.Run:
        """One level's chain for each sample at its own level ``t`` (LongTensor ``(B,)``), from ``x_{t+1}``.

        Runs through the library's backends (eager or compiled); no graph, no parameter gradient.
        Returns the backend's ``Run``; ``run.state[0]`` is ``x_t``.
        """
        anchor, r = self.schedule.anchor_and_scale(x_next.detach(), t)
        h, n = 0.5 * (self.b * r) ** 2, self.b * r
        state = (anchor, anchor, h.expand_as(anchor).contiguous(), n.expand_as(anchor).contiguous())
        view = self.__dict__.get("_view")
        if view is None or view.energy is not energy:  # one view per energy: compiled steps are reused
            view = self.__dict__["_view"] = _AtLevel(energy, t)
        view.t = t
        return _backends.run_steps(self.dynamics(), view, state, generator=generator,
                                   return_trajectory=return_trajectory, callback=callback, compile=self.compile,
                                   owner=type(self).__name__)

    def _run(self, energy, x0, generator, return_trajectory, callback, differentiable_steps=0):
        name = type(self).__name__
        if differentiable_steps:
            raise ArgumentError(f"{name}: differentiable_steps is not supported (got {differentiable_steps})")
        self.check_energy(energy)
        x, pieces, nfe, compile_time = x0, [x0[None]] if return_trajectory else None, 0, 0.0
        for level in reversed(range(self.schedule.num_levels)):
            inner = None
            if callback is not None:
                inner = lambda info, done=nfe, lvl=level: callback(  # noqa: E731
                    {**info, "step": done + info["step"], "level": lvl})
            t = torch.full((x.shape[0],), level, dtype=torch.long, device=x.device)
            run = self.recover(energy, x, t, generator, callback=inner, return_trajectory=return_trajectory)
            x, nfe, compile_time = run.state[0], nfe + run.nfe, compile_time + run.compile_time
            if pieces is not None:
                pieces.append(run.trajectory[1:])
        self._record(_backends.Run((x,), None, nfe, compile_time))
        return x, (torch.cat(pieces) if pieces is not None else None)
