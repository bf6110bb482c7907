"""The EBM's own density ``exp(-E)/Z`` in any dimension: ``log Z`` by annealed importance sampling.

AIS (Neal 2001) moves chains from a tractable ``p0`` (a latent with ``log_prob``) to ``exp(-E)``
through the geometric path ``log f_b(x) = (1 - b) log p0(x) - b E(x)``, ``0 = b_0 < ... < b_K = 1``:

    x_0 ~ p0;   log w += (b_k - b_{k-1}) (-E(x_{k-1}) - log p0(x_{k-1}));   x_k ~ T_k(x_{k-1}, .)

with ``T_k`` a MALA or HMC transition that leaves ``f_{b_k}`` invariant (the very updates of
``samplers.mcmc``, run on the annealed energy ``b E - (1 - b) log p0``). ``mean exp(log w)`` is an
unbiased estimate of ``Z / Z_0 = Z`` (``p0`` is normalised), so ``log`` of it is a stochastic
lower bound of ``log Z`` (Jensen), tight when the weights are even (a large effective sample size).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import ArgumentError, check_bool, check_choice, check_float, check_int, fail
from ..energies import check_energy_output
from ..latents import Latent, PersistentLatent
from ..samplers.mcmc import _normal_and_uniform, hmc_update, mala_update, metropolis_state

__all__ = ["AISResult", "BitsPerDim", "estimate_log_partition", "ais_schedule", "log_mean_exp_stats",
           "TRANSITIONS", "SCHEDULES"]

TRANSITIONS = ("mala", "hmc")
SCHEDULES = ("sigmoid", "linear", "geometric")


@dataclass(frozen=True)
class AISResult:
    """What ``estimate_log_partition`` found.

    ``log_z``: ``log mean exp(log_weights)``; ``stderr``: its delta-method standard error over
    chains, ``std(w) / (sqrt(n) mean(w))`` (an underestimate when a few weights dominate: watch
    ``ess``); ``ess``: the effective sample size ``(sum w)^2 / sum w^2`` of the normalised
    weights (``num_chains`` when all are equal); ``log_weights`` ``(num_chains,)`` float64 on the
    CPU; ``acceptance``: the transitions' mean acceptance rate, and ``acceptance_per_temp``
    ``(num_temps - 1,)`` per intermediate distribution (to tune ``step_size``); ``betas`` the
    schedule ``(num_temps + 1,)``; ``seconds``: wall time.
    """

    log_z: float
    stderr: float
    ess: float
    log_weights: Tensor = field(repr=False)
    acceptance: float
    acceptance_per_temp: Tensor = field(repr=False)
    betas: Tensor = field(repr=False)
    seconds: float


@dataclass(frozen=True)
class BitsPerDim:
    """Held-out bits/dim under a density (``EBM.bits_per_dim``).

    ``value``: the mean over the points; ``stderr_data``: the standard error of that mean over
    the points (the test set's own sampling noise); ``stderr_log_z``: the part from ``log Z``'s
    AIS standard error, ``stderr / (D ln 2)``, common to every point (0 for the generator's
    ``q``, which is normalised by construction); ``per_example``: ``(N,)``.
    """

    value: float
    stderr_data: float
    stderr_log_z: float
    per_example: Tensor = field(repr=False)

    @property
    def stderr(self) -> float:
        """Both uncertainties together, ``sqrt(stderr_data^2 + stderr_log_z^2)``."""
        return math.hypot(self.stderr_data, self.stderr_log_z)


def log_mean_exp_stats(log_w: Tensor) -> tuple[float, float, float]:
    """``(log mean exp(log_w), its delta-method standard error, effective sample size)``, in float64."""
    log_w = log_w.detach().double().cpu()
    n = log_w.numel()
    if not bool(torch.isfinite(log_w).all()):
        bad = int((~torch.isfinite(log_w)).sum())
        raise ValueError(f"estimate_log_partition: {bad} of {n} log-weights are not finite (the energy "
                         "diverged, or a chain left the latent's support); check the energy and step_size")
    top = log_w.max()
    r = (log_w - top).exp()
    mean = r.mean()
    log_z = float(top + mean.log())
    stderr = float(r.std(correction=1) / (math.sqrt(n) * mean)) if n > 1 else math.nan
    ess = float(r.sum() ** 2 / (r**2).sum())
    return log_z, stderr, ess


def ais_schedule(num_temps: int, schedule: str | Sequence[float] | Tensor = "sigmoid") -> Tensor:
    """The inverse temperatures ``b_0 = 0 < b_1 < ... < b_K = 1``, ``K = num_temps``, float64.

    ``"sigmoid"`` (Grosse et al. 2015, the default): ``sigmoid(4 (2k/K - 1))`` rescaled to
    ``[0, 1]``, dense at both ends; ``"linear"``: evenly spaced; ``"geometric"``: ``b_k =
    10^(-4 (1 - k/K))`` for ``k >= 1`` (dense near 0, where ``f_b`` changes fastest in ``log b``).
    A sequence gives the ``K + 1`` values itself (increasing, 0 first, 1 last).
    """
    num_temps = check_int("estimate_log_partition", "num_temps", num_temps, minimum=1)
    if isinstance(schedule, str):
        check_choice("estimate_log_partition", "schedule", schedule, SCHEDULES)
        t = torch.linspace(0, 1, num_temps + 1, dtype=torch.float64)
        if schedule == "linear":
            return t
        if schedule == "geometric":
            b = 10.0 ** (-4.0 * (1 - t))
            b[0] = 0.0
            return b
        s = torch.sigmoid(4.0 * (2 * t - 1))
        return (s - s[0]) / (s[-1] - s[0])
    try:
        b = torch.as_tensor(schedule, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise fail("estimate_log_partition", "schedule", f"one of {SCHEDULES} or a sequence of numbers",
                   schedule) from None
    if (b.numel() != num_temps + 1 or not bool(torch.isfinite(b).all()) or float(b[0]) != 0.0
            or float(b[-1]) != 1.0 or not bool((b.diff() > 0).all())):
        raise ArgumentError(f"estimate_log_partition: a schedule sequence must hold num_temps + 1 = "
                            f"{num_temps + 1} strictly increasing values from 0 to 1, got {b.numel()} values "
                            f"{b[:3].tolist()}...{b[-2:].tolist()}")
    return b


class _Annealed:
    """The gradient function the MCMC updates take, for the annealed energy ``b E(x) - (1 - b) log p0(x)``.

    Outside ``p0``'s support (``log p0 = -inf``, a ``Uniform`` latent's box) the annealed energy
    is ``+inf``, so a proposal there is always rejected; its gradient there is that of ``b E``
    alone (which only steers an HMC trajectory that may come back; any smooth extension keeps the
    transition exact). ``first`` keeps ``(E, log p0)`` of the first point evaluated since
    ``reset``: the updates evaluate the current state first, and AIS needs exactly those values
    for its weight, so the weight costs no extra evaluation.
    """

    def __init__(self, energy: nn.Module, latent: Latent) -> None:
        self.energy, self.latent = energy, latent
        self.beta = 0.0
        self.first: tuple[Tensor, Tensor] | None = None

    def reset(self, beta: float) -> None:
        self.beta, self.first = beta, None

    def __call__(self, x: Tensor, with_energy: bool = False) -> Any:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            e = self.energy(x)
            check_energy_output(e, x)
            lp = self.latent.log_prob(x)
            inside = torch.isfinite(lp)
            total = self.beta * e - (1 - self.beta) * torch.where(inside, lp, torch.zeros_like(lp))
            (g,) = torch.autograd.grad(total.sum(), x)
        e, lp = e.detach(), lp.detach()
        if self.first is None:
            self.first = (e, lp)
        if not with_energy:
            return g
        return g, torch.where(inside, total.detach(), torch.full_like(e, math.inf))


def _check_latent(latent: Any) -> Latent:
    if isinstance(latent, PersistentLatent):
        raise ArgumentError(
            f"estimate_log_partition: latent {type(latent).__name__} has no log_prob (its chains' law depends on "
            "the training history); start AIS from its fresh-noise latent instead: latent=buffer.base "
            f"({type(latent.base).__name__})")
    if not isinstance(latent, Latent) or not getattr(latent, "has_density", False):
        raise fail("estimate_log_partition", "latent", "a Latent with a log_prob (Uniform, Gaussian)", latent)
    return latent


def _step_sizes(step_size: float | Sequence[float] | Tensor, num_temps: int) -> Tensor:
    if isinstance(step_size, (int, float)) and not isinstance(step_size, bool):
        s = check_float("estimate_log_partition", "step_size", step_size, minimum=0, strict=True)
        return torch.full((num_temps,), s, dtype=torch.float64)
    try:
        s = torch.as_tensor(step_size, dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise fail("estimate_log_partition", "step_size", "a positive number or num_temps positive numbers",
                   step_size) from None
    if s.numel() != num_temps or not bool((torch.isfinite(s) & (s > 0)).all()):
        raise fail("estimate_log_partition", "step_size",
                   f"a positive number or a sequence of num_temps={num_temps} positive numbers (one per b_1..b_K)",
                   step_size)
    return s


@torch.no_grad()
def estimate_log_partition(
    energy: nn.Module,
    latent: Latent,
    *,
    num_chains: int = 256,
    num_temps: int = 1000,
    transition: str = "mala",
    step_size: float | Sequence[float] | Tensor = 0.05,
    num_leapfrog: int = 5,
    steps_per_temp: int = 1,
    schedule: str | Sequence[float] | Tensor = "sigmoid",
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool | None = None,
) -> AISResult:
    """``log Z = log int exp(-E(x)) dx`` by annealed importance sampling from ``latent``, with an error bar.

    Args:
        energy: ``(B, *shape) -> (B,)`` (put it in ``eval()`` mode first if it has dropout or
            spectral norm).
        latent: ``p0`` with a ``log_prob`` (``Uniform``, ``Gaussian``; for a ``ReplayBuffer`` pass
            its ``base``). With a ``Uniform`` latent every intermediate target lives on its box
            (proposals outside are rejected), so the estimate is ``log`` of ``int exp(-E)`` **over
            the box**: choose a box that holds ``exp(-E)``'s mass (as with grid quadrature). With
            a ``Gaussian`` the integral is over the whole space; it must be finite.
        num_chains: independent AIS chains (>= 2, for the standard error); the error bar shrinks
            as ``1 / sqrt(num_chains)``.
        num_temps: ``K``, the number of annealing steps (intermediate distributions + 1); the
            bias of ``log Z`` (downwards) and the weights' spread fall as ``K`` grows.
        transition: ``"mala"`` (2 gradient evaluations per step) or ``"hmc"``
            (``num_leapfrog + 1``).
        step_size: MALA's step ``s`` (proposal noise variance ``2 s``) or HMC's leapfrog step;
            one number, or one per annealing step ``b_1 .. b_K`` (see ``acceptance_per_temp``).
        num_leapfrog: leapfrog steps per HMC move.
        steps_per_temp: transitions per intermediate distribution.
        schedule: ``"sigmoid"``, ``"linear"``, ``"geometric"`` or the ``K + 1`` values of ``b``
            (see ``ais_schedule``).
        batch_size: chains run at once (default: all); memory is that of one batch's update.
        generator: the random stream of every draw (``p0``, proposals, accept tests).
        device: of the chains (default: the energy's parameters').
        dtype: of the chains (default: the energy's parameters'); the weights are accumulated in
            float64 whatever the dtype.
        progress: a tqdm bar over the annealing steps; ``None`` shows one on an interactive
            terminal for runs of more than 2000 steps in all.

    Returns:
        ``AISResult`` (``log_z``, ``stderr``, ``ess``, ``log_weights``, ``acceptance``, ...).
    """
    owner = "estimate_log_partition"
    if not isinstance(energy, nn.Module) and not callable(energy):
        raise fail(owner, "energy", "an nn.Module mapping (B, *shape) -> (B,)", energy)
    latent = _check_latent(latent)
    num_chains = check_int(owner, "num_chains", num_chains, minimum=2)
    num_temps = check_int(owner, "num_temps", num_temps, minimum=1)
    transition = check_choice(owner, "transition", transition, TRANSITIONS)
    num_leapfrog = check_int(owner, "num_leapfrog", num_leapfrog, minimum=1)
    steps_per_temp = check_int(owner, "steps_per_temp", steps_per_temp, minimum=1)
    batch_size = check_int(owner, "batch_size", batch_size, minimum=1, allow_none=True) or num_chains
    if progress is not None:
        progress = check_bool(owner, "progress", progress)
    betas = ais_schedule(num_temps, schedule)
    steps = _step_sizes(step_size, num_temps)
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{owner} needs autograd for grad E(x), which torch.inference_mode forbids; "
                           "call it under torch.no_grad() instead")
    param = next((p for p in energy.parameters() if p.is_floating_point()), None) \
        if isinstance(energy, nn.Module) else None
    device = torch.device(device) if device is not None else (param.device if param is not None else None)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise fail(owner, "dtype", "None or a floating torch.dtype (e.g. torch.float64)", dtype)
    dtype = dtype or (param.dtype if param is not None else torch.get_default_dtype())

    annealed = _Annealed(energy, latent)
    if transition == "mala":
        def move(state, k):
            return mala_update(annealed, state, _normal_and_uniform(state[0], generator), k, 1.0, None, 0, 0.5, 0.0)
    else:
        def move(state, k):
            return hmc_update(annealed, state, _normal_and_uniform(state[0], generator), k, 1.0, num_leapfrog,
                              None, 0, 0.5, 0.0)

    batches = [min(batch_size, num_chains - i) for i in range(0, num_chains, batch_size)]
    total = len(batches) * num_temps
    if progress is None:
        progress = total * steps_per_temp > 2000 and sys.stderr.isatty()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"AIS ({transition}, {num_chains} chains)", unit="temp", leave=False)
    start = time.perf_counter()
    step_sizes = steps.tolist()
    delta = betas.diff().tolist()
    k0 = torch.zeros((), dtype=torch.int64, device=device)
    weights, accepted_per_temp = [], torch.zeros(max(num_temps - 1, 1), dtype=torch.float64, device=device)
    try:
        for n in batches:
            x = latent.sample(n, generator=generator, device=device, dtype=dtype)
            log_w = torch.zeros(n, dtype=torch.float64, device=device)
            for k in range(1, num_temps):  # transitions T_1 .. T_{K-1}; T_K is not needed for the weights
                annealed.reset(float(betas[k]))
                state = metropolis_state(x, step_sizes[k - 1])
                for _ in range(steps_per_temp):
                    state, _extras = move(state, k0)
                e, lp = annealed.first  # at x_{k-1}: the first point the first move evaluated
                log_w += delta[k - 1] * (-e.double() - lp.double())
                x = state[0]
                accepted_per_temp[k - 1] += state[2].double().sum()
                if bar is not None:
                    bar.update(1)
            e = energy(x)
            check_energy_output(e, x)
            log_w += delta[-1] * (-e.double() - latent.log_prob(x).double())
            weights.append(log_w)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    log_weights = torch.cat(weights).cpu()
    log_z, stderr, ess = log_mean_exp_stats(log_weights)
    per_temp = (accepted_per_temp / (num_chains * steps_per_temp)).cpu()
    acceptance = float(per_temp.mean()) if num_temps > 1 else math.nan
    return AISResult(log_z=log_z, stderr=stderr, ess=ess, log_weights=log_weights, acceptance=acceptance,
                     acceptance_per_temp=per_temp if num_temps > 1 else per_temp[:0], betas=betas,
                     seconds=time.perf_counter() - start)
