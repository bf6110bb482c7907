"""Training objectives: what one training step of an ``EBM`` minimises.

An objective is a small swappable piece, not a branch inside the training loop. ``EBM`` hands it
a ``TrainingStep`` (the module's energy, sampler, latent and random stream, and one checked data
batch) and logs what it returns: the loss and its named parts. A new objective is one class
here or in user code; ``module.py`` needs no edit. From YAML::

    model:
      init_args:
        objective:
          class_path: lightning_ebm.objectives.MaximumLikelihood
          init_args: {alpha: 0.1}

Negatives (generator samples) are drawn only through ``TrainingStep.negatives``, which draws the
starting points from the latent (a persistent latent's chains are taken back afterwards), runs
the sampler on the module's stream and records what it did, so the module logs the sampler's
telemetry only for objectives that ran it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._checks import ArgumentError, check_bool, check_choice, check_float, check_int, check_type
from ._config import RecordInit
from .energies import ConditionedEnergy, check_energy_output, check_labels, energy_classes
from .latents import Gaussian, Latent, PersistentLatent
from .samplers import DiffusionRecovery, Sampler
from .samplers.recovery import check_conditioned

__all__ = [
    "Objective",
    "MaximumLikelihood",
    "TrainingStep",
    "DenoisingScoreMatching",
    "MultiLevelDenoisingScoreMatching",
    "SlicedScoreMatching",
    "ExactScoreMatching",
    "NoiseContrastiveEstimation",
    "DiffusionRecoveryLikelihood",
    "JointEnergyModel",
]


@dataclass
class TrainingStep:
    """What an objective sees of one training step.

    Attributes:
        energy: the critic ``(B, *shape) -> (B,)`` (the module's ``energy``).
        sampler: the generator's dynamics.
        latent: where the dynamics start.
        rng: the module's training random stream (per rank, saved in checkpoints); draw every
            random number of the step from it, so that a resumed run is the same run.
        data: the data batch ``(B, *shape)``, checked, in the module's memory format.
        num_negatives: how many generator samples the step should use.
        data_noise: standard deviation of the Gaussian jitter ``jittered_data`` adds (0 = none).
        memory_format: puts a tensor in the module's memory format (channels-last or not).
        generated: the detached negatives of the last ``negatives`` call, ``None`` if the sampler
            did not run (the module logs the sampler's telemetry only then).
        labels: the batch's class labels ``(B,)`` (int64) when the data are labelled ``(x, y)``,
            else ``None``.
    """

    energy: nn.Module
    sampler: Sampler
    latent: Latent
    rng: torch.Generator
    data: Tensor
    num_negatives: int
    data_noise: float = 0.0
    memory_format: Callable[[Tensor], Tensor] = field(default=lambda x: x)
    generated: Tensor | None = None
    labels: Tensor | None = None

    def energy_of(self, x: Tensor) -> Tensor:
        """``E(x)``, shape ``(B,)`` (checked)."""
        e = self.energy(x)
        check_energy_output(e, x)
        return e

    def negatives(self, differentiable_steps: int = 0, y: Tensor | None = None) -> Tensor:
        """``num_negatives`` generator samples ``G(z)``, ``z ~ latent``, drawn on ``rng``.

        Detached unless ``differentiable_steps > 0``: then the graph of the last that many steps
        is kept (see ``Sampler.__call__``). A persistent latent gets the end points back. With
        classes ``y`` ``(n,)`` (a class-conditional energy) the dynamics follow ``-grad_x E(x, y)``
        and ``n = len(y)``; a latent with chains per class (``num_classes``) starts each chain from
        its own class's chains.
        """
        like, n = self.data, self.num_negatives if y is None else y.shape[0]
        energy = self.energy if y is None else ConditionedEnergy(self.energy, y)
        slots = None
        if isinstance(self.latent, PersistentLatent):
            by_class = {"y": y} if y is not None and getattr(self.latent, "num_classes", None) else {}
            z, slots = self.latent.draw(n, generator=self.rng, device=like.device, dtype=like.dtype, **by_class)
        else:
            z = self.latent.sample(n, generator=self.rng, device=like.device, dtype=like.dtype)
        z = self.memory_format(z)
        if differentiable_steps > 0:
            x = self.sampler(energy, z, generator=self.rng, differentiable_steps=differentiable_steps)
        else:
            x = self.sampler(energy, z, generator=self.rng)
        self.generated = x.detach()
        if slots is not None:
            self.latent.push(self.generated, slots)
        return x

    def jittered_data(self) -> Tensor:
        """The data plus ``data_noise`` Gaussian jitter drawn on ``rng`` (the data itself when 0)."""
        x = self.data
        if self.data_noise > 0:
            noise = torch.randn(x.shape, generator=self.rng, device=x.device, dtype=x.dtype)
            x = x + self.data_noise * noise
        return x


class Objective(RecordInit):
    """Base class of training objectives: ``objective(step) -> (loss, parts)``.

    ``loss`` is the scalar to minimise; ``parts`` are named scalars the module logs as
    ``train/<name>``. Subclasses set ``needs_negatives`` to say whether training runs the
    sampler (``step.negatives``); an objective without negatives (score matching, say) must not
    touch it.
    """

    #: whether the objective draws generator samples (runs the sampler) in training
    needs_negatives: bool = True

    def __call__(self, step: TrainingStep) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def check(self, energy: nn.Module, sampler: Sampler) -> None:
        """Raise early if this objective cannot train ``energy`` with ``sampler`` (``EBM.setup`` calls it)."""

    def state_dict(self) -> dict[str, Tensor]:
        """What the objective learnt outside the energy (tensors), saved in the module's checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Take back what ``state_dict`` gave (``EBM.on_load_checkpoint`` calls it)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def generator_loss(energy: nn.Module, x_gen: Tensor) -> Tensor:
    """``mean E(x_gen)`` with the critic's parameters held fixed (detached).

    ``x_gen`` must come from the sampler with ``differentiable_steps > 0``: the gradient then
    reaches the parameters only through the dynamics, moving the generator towards lower energy
    under the current critic, as a GAN's generator step does.
    """
    frozen = {name: p.detach() for name, p in energy.named_parameters()}
    return torch.func.functional_call(energy, frozen, (x_gen,)).mean()


class MaximumLikelihood(Objective):
    """The "maximum-likelihood" EBM loss, seen as the critic of a self-adversarial game.

    ``mean E(x_data) - mean E(sg(G(z))) + alpha * (mean E(x_data)^2 + mean E(G(z))^2)``, with the
    generated samples detached (``sg``), plus, when ``generator_loss_weight > 0``,
    ``generator_loss_weight * mean E_sg(G(z))``: the energy of the generated samples under the
    critic held fixed, differentiated through the last ``generator_loss_steps`` steps of the
    dynamics (the GAN generator objective).

    Args:
        alpha: weight of the energy-magnitude regulariser (keeps energies near 0).
        generator_loss_weight: weight of the generator loss; ``0`` trains the critic alone.
        generator_loss_steps: how many final steps of the dynamics the generator loss unrolls.
    """

    def __init__(self, alpha: float = 0.1, generator_loss_weight: float = 0.0, generator_loss_steps: int = 1) -> None:
        self.alpha = check_float("MaximumLikelihood", "alpha", alpha, minimum=0)
        self.generator_loss_weight = check_float("MaximumLikelihood", "generator_loss_weight",
                                                 generator_loss_weight, minimum=0)
        self.generator_loss_steps = check_int("MaximumLikelihood", "generator_loss_steps",
                                              generator_loss_steps, minimum=1)

    def critic_loss(self, e_data: Tensor, e_gen: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The critic loss and its parts; ``e_gen`` are energies of detached generator samples."""
        gap = e_data.mean() - e_gen.mean()
        reg = e_data.pow(2).mean() + e_gen.pow(2).mean()
        return gap + self.alpha * reg, {"energy_data": e_data.mean(), "energy_gen": e_gen.mean(),
                                        "energy_gap": gap, "energy_reg": reg}

    def __call__(self, step: TrainingStep) -> tuple[Tensor, dict[str, Tensor]]:
        if self.generator_loss_weight > 0:  # keep the graph of the last steps for the generator loss
            x_unrolled = step.negatives(differentiable_steps=self.generator_loss_steps)
            x_gen = x_unrolled.detach()
        else:
            x_gen = step.negatives()
        x_data = step.jittered_data()
        loss, parts = self.critic_loss(step.energy_of(x_data), step.energy_of(x_gen))
        if self.generator_loss_weight > 0:
            parts["generator_loss"] = generator_loss(step.energy, x_unrolled)
            loss = loss + self.generator_loss_weight * parts["generator_loss"]
        return loss, parts


# ---------------------------------------------------------------------------------------- score matching
def _energy_and_grad(step: TrainingStep, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, E(x), grad_x E(x))`` with the graph kept, so a loss of the gradient trains the energy."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        e = step.energy_of(x)
        (g,) = torch.autograd.grad(e.sum(), x, create_graph=True)
    return x, e, g


def _sum_over_sample(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


def _reaching_every_parameter(loss: Tensor, e: Tensor) -> Tensor:
    """``loss + 0 * sum E``: the same value, but a parameter that only shifts ``E`` (an output bias,
    which a loss of ``grad E`` never sees) gets a zero gradient rather than none, as DDP requires."""
    return loss + 0.0 * e.sum()


class DenoisingScoreMatching(Objective):
    """Denoising score matching (Vincent 2011) at one noise level ``sigma``.

    ``0.5 * mean || sigma * grad E(x + sigma * eps) - eps ||^2``, ``eps ~ N(0, I)``: the energy's
    score ``-grad E`` is fitted to the score of the data convolved with ``N(0, sigma^2 I)``, so the
    optimum is ``exp(-E) / Z = p_data * N(0, sigma^2 I)``: for Gaussian data ``N(mu, Sigma)`` and a
    quadratic energy, ``E = 0.5 (x - mu)^T (Sigma + sigma^2 I)^-1 (x - mu) + c``. It fits
    ``exp(-E)/Z`` directly and never runs the sampler in training (``generate`` still does). The
    loss is scaled by ``sigma^2`` (Song & Ermon's weighting), so its size does not depend on sigma.
    Score matching cannot see an additive constant in the energy: ``c`` stays where it starts.
    """

    needs_negatives = False

    def __init__(self, sigma: float = 0.1) -> None:
        self.sigma = check_float(type(self).__name__, "sigma", sigma, minimum=0, strict=True)

    def _sigmas(self, step: TrainingStep, x: Tensor) -> Tensor:
        return torch.full((x.shape[0],), self.sigma, device=x.device, dtype=x.dtype)

    def __call__(self, step: TrainingStep) -> tuple[Tensor, dict[str, Tensor]]:
        x = step.jittered_data()
        sigma = self._sigmas(step, x).view(-1, *([1] * (x.ndim - 1)))
        eps = torch.randn(x.shape, generator=step.rng, device=x.device, dtype=x.dtype)
        _, e, g = _energy_and_grad(step, x + sigma * eps)
        loss = _reaching_every_parameter(0.5 * _sum_over_sample((sigma * g - eps).pow(2)).mean(), e)
        return loss, {"dsm": loss.detach(), "energy_data": e.detach().mean(),
                      "score_norm": g.detach().flatten(1).norm(dim=1).mean()}


class MultiLevelDenoisingScoreMatching(DenoisingScoreMatching):
    """Denoising score matching over several noise levels, one drawn per sample (Li et al. 2019).

    The levels are ``sigmas`` (a list), or ``num_levels`` geometrically spaced from ``sigma_max``
    down to ``sigma_min``. Each sample's level is drawn uniformly from them on the step's stream
    and its loss weighted by ``sigma^2``, so every level counts alike. One energy without a noise
    input serves all levels: the small ones shape the modes, the large ones the space between them.
    """

    def __init__(self, sigmas: Sequence[float] | None = None, sigma_min: float = 0.05, sigma_max: float = 1.0,
                 num_levels: int = 10) -> None:
        owner = type(self).__name__
        if sigmas is not None:
            if isinstance(sigmas, (str, bytes)) or not isinstance(sigmas, Sequence) or len(sigmas) == 0:
                raise ArgumentError(f"{owner}: sigmas must be a non-empty list of positive numbers or None, "
                                    f"got {sigmas!r}")
            levels = [check_float(owner, f"sigmas[{i}]", s, minimum=0, strict=True) for i, s in enumerate(sigmas)]
        else:
            lo = check_float(owner, "sigma_min", sigma_min, minimum=0, strict=True)
            hi = check_float(owner, "sigma_max", sigma_max, minimum=0, strict=True)
            k = check_int(owner, "num_levels", num_levels, minimum=1)
            if not lo <= hi:
                raise ArgumentError(f"{owner}: sigma_min must be <= sigma_max, got sigma_min={lo!r}, "
                                    f"sigma_max={hi!r}")
            levels = [hi * (lo / hi) ** (i / (k - 1)) for i in range(k)] if k > 1 else [hi]
        self.sigmas = levels
        self.sigma = max(levels)

    def _sigmas(self, step: TrainingStep, x: Tensor) -> Tensor:
        levels = torch.tensor(self.sigmas, device=x.device, dtype=x.dtype)
        idx = torch.randint(len(self.sigmas), (x.shape[0],), generator=step.rng, device=x.device)
        return levels[idx]


class SlicedScoreMatching(Objective):
    """Sliced score matching (Song et al. 2019): score matching with random projections.

    Score matching minimises ``E_data[ -tr(hess E) + 0.5 ||grad E||^2 ]`` (Hyvarinen 2005), whose
    optimum is ``exp(-E)/Z = p_data``; slicing replaces the trace by ``v^T (hess E) v`` for random
    ``v`` (``num_projections`` per sample, Rademacher or Gaussian), one Hessian-vector product each,
    so the cost does not grow with the dimension. ``variance_reduced=True`` (the default, for
    Gaussian projections only) uses ``0.5 ||grad E||^2`` in closed form instead of its sliced
    estimate. For Gaussian data and a quadratic energy the optimum is ``P = Sigma^-1``, ``m = mu``.
    """

    needs_negatives = False

    def __init__(self, num_projections: int = 1, projection: str = "rademacher",
                 variance_reduced: bool = True) -> None:
        owner = type(self).__name__
        self.num_projections = check_int(owner, "num_projections", num_projections, minimum=1)
        self.projection = check_choice(owner, "projection", projection, ("rademacher", "gaussian"))
        self.variance_reduced = check_bool(owner, "variance_reduced", variance_reduced)

    def _directions(self, step: TrainingStep, x: Tensor) -> Tensor:
        shape = (self.num_projections, *x.shape)
        if self.projection == "gaussian":
            return torch.randn(shape, generator=step.rng, device=x.device, dtype=x.dtype)
        return torch.randint(0, 2, shape, generator=step.rng, device=x.device).to(x.dtype) * 2 - 1

    def __call__(self, step: TrainingStep) -> tuple[Tensor, dict[str, Tensor]]:
        x, e, g = _energy_and_grad(step, step.jittered_data())
        curvature = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        sliced_sq = torch.zeros_like(curvature)
        for v in self._directions(step, x):
            (hv,) = torch.autograd.grad(_sum_over_sample(g * v).sum(), x, create_graph=True)
            curvature = curvature + _sum_over_sample(hv * v)
            sliced_sq = sliced_sq + _sum_over_sample(g * v).pow(2)
        curvature = curvature / self.num_projections
        grad_sq = _sum_over_sample(g.pow(2)) if self.variance_reduced else sliced_sq / self.num_projections
        loss = _reaching_every_parameter((0.5 * grad_sq - curvature).mean(), e)
        return loss, {"ssm": loss.detach(), "energy_data": e.detach().mean(),
                      "curvature": curvature.detach().mean(), "score_norm": grad_sq.detach().sqrt().mean()}


class ExactScoreMatching(Objective):
    """Score matching with the exact Hessian trace (Hyvarinen 2005), for small dimensions.

    ``mean[ -tr(hess E(x)) + 0.5 ||grad E(x)||^2 ]`` over the data, the trace by one backward pass
    per dimension (``dim`` passes: use ``SlicedScoreMatching`` beyond a few dozen dimensions,
    ``max_dim`` guards against a slip). The optimum is ``exp(-E)/Z = p_data``.
    """

    needs_negatives = False

    def __init__(self, max_dim: int = 64) -> None:
        self.max_dim = check_int(type(self).__name__, "max_dim", max_dim, minimum=1)

    def __call__(self, step: TrainingStep) -> tuple[Tensor, dict[str, Tensor]]:
        dim = step.data[0].numel()
        if dim > self.max_dim:
            raise ValueError(f"ExactScoreMatching: the data have {dim} dimensions, more than "
                             f"max_dim={self.max_dim} (one backward pass per dimension); use SlicedScoreMatching")
        x, e, g = _energy_and_grad(step, step.jittered_data())
        flat = g.flatten(1)
        trace = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for i in range(flat.shape[1]):
            (row,) = torch.autograd.grad(flat[:, i].sum(), x, create_graph=True)
            trace = trace + row.flatten(1)[:, i]
        grad_sq = flat.pow(2).sum(1)
        loss = _reaching_every_parameter((0.5 * grad_sq - trace).mean(), e)
        return loss, {"sm": loss.detach(), "energy_data": e.detach().mean(), "curvature": trace.detach().mean()}


# ---------------------------------------------------------------------------------------- NCE
class _FittedGaussian(Latent):
    """``N(mean, L L^T)`` over the flattened sample: NCE's noise fitted to the data (not exported)."""

    has_density = True

    def __init__(self, shape: Sequence[int], mean: Tensor, scale_tril: Tensor) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.mean_vector, self.scale_tril = mean, scale_tril

    def _on(self, like: Tensor) -> tuple[Tensor, Tensor]:
        return (self.mean_vector.to(like.device, like.dtype), self.scale_tril.to(like.device, like.dtype))

    def sample(self, n, *, generator=None, device=None, dtype=None) -> Tensor:
        self._check_n(n)
        eps = torch.randn((n, self.mean_vector.numel()), generator=generator, device=device, dtype=dtype)
        mean, tril = self._on(eps)
        return (mean + eps @ tril.T).reshape(n, *self.shape)

    def log_prob(self, z: Tensor) -> Tensor:
        self._check_z(z)
        mean, tril = self._on(z)
        white = torch.linalg.solve_triangular(tril, (z.flatten(1) - mean).T, upper=False).T
        d = mean.numel()
        return (-0.5 * white.pow(2).sum(1) - tril.diagonal().log().sum() - 0.5 * d * math.log(2 * math.pi))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, fitted to the data"


def _mean_and_covariance(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and covariance (float64) of the flattened samples ``x``, over every rank's ``x`` under DDP."""
    flat = x.detach().flatten(1).double()
    stats = [flat.new_tensor(float(flat.shape[0])), flat.sum(0), flat.T @ flat]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in stats:
            torch.distributed.all_reduce(t)
    n, total, outer = stats
    mean = total / n
    return mean, (outer - n * torch.outer(mean, mean)) / (n - 1)


class NoiseContrastiveEstimation(Objective):
    """Noise-contrastive estimation (Gutmann & Hyvarinen 2010): tell data from noise with ``-E``.

    A logistic classifier with logit ``-E(x) - log q(x) - log nu`` separates the data from
    ``nu = noise_ratio`` times as many noise samples ``y ~ q`` (``noise``: any latent with a
    ``log_prob``; by default a standard Gaussian of the data's shape). Its optimum is
    ``exp(-E) = p_data`` *normalised*: NCE learns the log-normaliser too, through the energy's own
    additive constant (the output bias of ``MLPEnergy`` and the other library energies), so
    ``exp(-E)`` needs no ``Z`` afterwards. The noise should cover the data (same scale or wider):
    NCE's variance grows fast as the two separate. The sampler does not run in training.

    ``fit_noise=True`` makes the noise a full-covariance Gaussian with the mean and covariance of
    the first training batch (of every rank's first batch under DDP), plus ``shrinkage`` times the
    mean variance on the diagonal so that it stays positive definite when the batch is smaller
    than the dimension. It is fitted once and then held fixed (NCE needs a fixed noise law); it is
    saved in the module's checkpoints, so a resumed run keeps it.
    """

    needs_negatives = False

    def __init__(self, noise: Latent | None = None, noise_ratio: int = 1, fit_noise: bool = False,
                 shrinkage: float = 1e-3) -> None:
        owner = type(self).__name__
        if noise is not None:
            check_type(owner, "noise", noise, Latent, "a lightning_ebm latent with a log_prob (e.g. Gaussian) or None")
            if not getattr(noise, "has_density", False):
                raise ArgumentError(f"{owner}: noise must be a latent with a log_prob (a density), got "
                                    f"{type(noise).__name__}, which has none; use Gaussian or Uniform")
        self.fit_noise = check_bool(owner, "fit_noise", fit_noise)
        if self.fit_noise and noise is not None:
            raise ArgumentError(f"{owner}: give either noise={type(noise).__name__}(...) or fit_noise=True "
                                "(a Gaussian fitted to the data), not both")
        self.noise = noise
        self.noise_ratio = check_int(owner, "noise_ratio", noise_ratio, minimum=1)
        self.shrinkage = check_float(owner, "shrinkage", shrinkage, minimum=0)
        self._fitted: dict[str, Tensor] = {}

    def _noise(self, step: TrainingStep) -> Latent:
        shape = tuple(step.data.shape[1:])
        if self.fit_noise and not self._fitted:
            mean, cov = _mean_and_covariance(step.data)
            ridge = self.shrinkage * cov.diagonal().mean().clamp_min(torch.finfo(cov.dtype).tiny)
            eye = torch.eye(len(mean), dtype=cov.dtype, device=cov.device)
            tril, info = torch.linalg.cholesky_ex(cov + ridge * eye)
            if int(info) != 0:
                raise ValueError(f"NoiseContrastiveEstimation: the first batch's covariance is singular; raise "
                                 f"shrinkage (now {self.shrinkage}) or the batch size ({step.data.shape[0]})")
            self._fitted = {"mean": mean, "scale_tril": tril}
            self.noise = None
        if self._fitted and self.noise is None:
            self.noise = _FittedGaussian(shape, self._fitted["mean"], self._fitted["scale_tril"])
        if self.noise is None:
            self.noise = Gaussian(shape)
        if tuple(self.noise.shape) != shape:
            raise ValueError(f"NoiseContrastiveEstimation: the noise has shape {tuple(self.noise.shape)} but the "
                             f"data samples have shape {shape}")
        return self.noise

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self._fitted.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        unexpected = set(state) - {"mean", "scale_tril"}
        if unexpected or (state and not self.fit_noise):
            raise ValueError(f"NoiseContrastiveEstimation(fit_noise={self.fit_noise}) cannot take the saved state "
                             f"{sorted(state)}: the checkpoint was written with fitted noise")
        if state:
            self._fitted = dict(state)
            self.noise = None  # rebuilt from the fitted values at the next step

    def __call__(self, step: TrainingStep) -> tuple[Tensor, dict[str, Tensor]]:
        x = step.jittered_data()
        noise = self._noise(step)
        y = noise.sample(x.shape[0] * self.noise_ratio, generator=step.rng, device=x.device, dtype=x.dtype)
        y = step.memory_format(y)
        log_nu = math.log(self.noise_ratio)
        e_data, e_noise = step.energy_of(x), step.energy_of(y)
        log_noise_data = noise.log_prob(x).to(x.dtype)
        if not bool(torch.isfinite(log_noise_data).all()):  # one sync: data outside the noise's support
            outside = int((~torch.isfinite(log_noise_data)).sum())
            raise ValueError(f"NoiseContrastiveEstimation: the noise {noise!r} has no density at {outside} of "
                             f"{x.shape[0]} data points (outside its support), so their logits are infinite and "
                             "the loss says nothing: use noise that covers the data (a Gaussian, fit_noise=True, "
                             "or a wider Uniform box)")
        logit_data = -e_data - log_noise_data - log_nu
        logit_noise = -e_noise - noise.log_prob(y).to(x.dtype) - log_nu
        softplus = nn.functional.softplus
        loss = softplus(-logit_data).mean() + self.noise_ratio * softplus(logit_noise).mean()
        accuracy = 0.5 * ((logit_data > 0).to(x.dtype).mean() + (logit_noise < 0).to(x.dtype).mean())
        return loss, {"nce": loss.detach(), "energy_data": e_data.detach().mean(),
                      "energy_noise": e_noise.detach().mean(), "accuracy": accuracy.detach()}


# ---------------------------------------------------------------------------------------- DRL
class DiffusionRecoveryLikelihood(Objective):
    """Diffusion recovery likelihood (Gao, Song, Poole, Wu & Kingma 2021): one EBM per noise level.

    The data are noised by a variance-preserving schedule (``samplers.NoiseSchedule``, shared with
    the generator ``samplers.DiffusionRecovery``): per sample a level ``t`` is drawn, ``x_t`` from
    the marginal and ``x_{t+1} = a x_t + s eps``. The noise-conditioned energy ``E(x, t)`` is trained
    by maximum likelihood of the *conditional* ``p(x_t | x_{t+1}) ∝ exp(-E(x_t, t) - ||x~ - x_t||^2 /
    (2 r^2))``, ``x~ = x_{t+1} / a``, ``r = s / a``: negatives are ``steps`` conditional Langevin steps
    started at ``x~`` (step ``b^2 r^2 / 2``, noise ``b r``), and the loss is
    ``mean E(x_t, t) - mean E(sg(x_neg), t) + alpha (mean E(x_t, t)^2 + mean E(x_neg, t)^2)``. The
    conditional is close to a Gaussian around ``x~``, so short chains mix, unlike the marginal.

    The energy must follow the noise-level protocol (``num_levels = T``, ``forward(x, t)``; see
    ``lightning_ebm.energies``). The module's own sampler is not run in training (this objective
    runs its recovery chain itself); for generation use ``DiffusionRecovery`` with the same schedule.

    Args:
        steps: Langevin steps of the recovery chain ``K``.
        b: step-size factor (see ``DiffusionRecovery``).
        sigmas: the noise steps ``s_1 .. s_T``, each in (0, 1) (``NoiseSchedule``); ``None``: the
            next three give them, geometrically spaced.
        num_levels: ``T``, the number of noise steps (and of the energy's levels).
        sigma_min: the first step (level 0 -> 1).
        sigma_max: the top step (level T-1 -> T).
        alpha: weight of the energy-magnitude regulariser (0: none); without it a 2-D toy's energy
            drifts and its chains diverge after a few hundred steps (measured, docs/guide/objectives.md).
        grad_clip: clamp every coordinate of ``grad E`` in the chain.
    """

    needs_negatives = False  # the negatives come from the recovery chain, not from the module's sampler

    def __init__(self, steps: int = 20, b: float = 0.35, sigmas: Sequence[float] | None = None, num_levels: int = 6,
                 sigma_min: float = 0.05, sigma_max: float = 0.9, alpha: float = 0.1,
                 grad_clip: float | None = None) -> None:
        owner = type(self).__name__
        self.alpha = check_float(owner, "alpha", alpha, minimum=0)
        try:
            self.recovery = DiffusionRecovery(steps=steps, b=b, sigmas=sigmas, num_levels=num_levels,
                                              sigma_min=sigma_min, sigma_max=sigma_max, grad_clip=grad_clip)
        except ArgumentError as err:
            raise ArgumentError(str(err).replace("DiffusionRecovery", owner, 1)) from None

    @property
    def schedule(self):  # noqa: ANN201 - a samplers.NoiseSchedule
        """The noise schedule (``samplers.NoiseSchedule``)."""
        return self.recovery.schedule

    def check(self, energy: nn.Module, sampler: Sampler) -> None:
        """The energy must be noise-conditioned with ``T`` levels; a ``DiffusionRecovery`` must share the schedule."""
        check_conditioned(type(self).__name__, energy, self.schedule)
        if isinstance(sampler, DiffusionRecovery) and sampler.schedule != self.schedule:
            raise ArgumentError(f"{type(self).__name__}: the sampler's noise schedule {sampler.schedule} differs "
                                f"from the objective's {self.schedule}; give both the same sigmas / num_levels, "
                                "sigma_min, sigma_max")

    def __call__(self, step: TrainingStep) -> tuple[Tensor, dict[str, Tensor]]:
        check_conditioned(type(self).__name__, step.energy, self.schedule)
        x0 = step.jittered_data()
        n, rng = x0.shape[0], step.rng
        t = torch.randint(self.schedule.num_levels, (n,), generator=rng, device=x0.device)
        eps = torch.randn((2, *x0.shape), generator=rng, device=x0.device, dtype=x0.dtype)
        x_t = step.memory_format(self.schedule.marginal(x0, t, eps[0]))
        x_next = self.schedule.noise_step(x_t, t, eps[1])
        x_neg = step.memory_format(self.recovery.recover(step.energy, x_next, t, rng).state[0])
        e_pos, e_neg = step.energy(x_t, t=t), step.energy(x_neg, t=t)
        check_energy_output(e_pos, x_t)
        check_energy_output(e_neg, x_neg)
        gap = e_pos.mean() - e_neg.mean()
        reg = e_pos.pow(2).mean() + e_neg.pow(2).mean()
        loss = gap + self.alpha * reg if self.alpha > 0 else gap
        recovery_mse = _sum_over_sample((x_neg - x_t).pow(2)).mean() / x_t[0].numel()
        return loss, {"energy_data": e_pos.detach().mean(), "energy_gen": e_neg.detach().mean(),
                      "energy_gap": gap.detach(), "energy_reg": reg.detach(), "recovery_mse": recovery_mse.detach()}


# ---------------------------------------------------------------------------------------- JEM
class JointEnergyModel(Objective):
    """JEM (Grathwohl et al. 2020): a classifier trained as a classifier and as an EBM at once.

    The energy is a classifier read as an energy (``energies.ClassifierEnergy`` or any energy of
    the class-conditional protocol with ``logits``): ``E(x, y) = -f(x)[y]``,
    ``E(x) = -logsumexp_y f(x)[y]``. The loss is

        ``ce_weight * CE(f(x), y)``
        ``+ ml_weight * (mean E(x) - mean E(sg(x_gen)) + alpha * (mean E(x)^2 + mean E(x_gen)^2))``
        ``+ conditional_weight * (mean E(x, y) - mean E(sg(x_gen|y), y))``

    on labelled batches ``(x, y)``: the cross-entropy of ``p(y|x)``, the maximum-likelihood
    (self-adversarial critic) term of ``log p(x)`` with negatives ``x_gen`` from the module's
    sampler and latent (SGLD from a replay buffer, as in the paper), and optionally the term of
    ``log p(x|y)`` with conditional negatives that follow ``-grad_x E(x, y)`` for the batch's
    classes (from the latent's chains of those classes when it keeps chains per class). With
    ``ml_weight = conditional_weight = 0`` it is a plain classifier trained by the same machinery
    (the sampler does not run). Logs ``ce``, ``acc``, ``energy_data`` (``mean E(x)``) and the parts of
    the terms that run (``energy_gen`` is ``mean E`` of the negatives, conditional ones when only
    they run), so ``DivergenceGuard`` watches the energies of every variant.

    Args:
        ce_weight: weight of the cross-entropy.
        ml_weight: weight of the ``log p(x)`` term (1 in the paper).
        conditional_weight: weight of the ``log p(x|y)`` term (0: none).
        alpha: weight of the energy-magnitude regulariser of the generative terms.
    """

    def __init__(self, ce_weight: float = 1.0, ml_weight: float = 1.0, conditional_weight: float = 0.0,
                 alpha: float = 0.0) -> None:
        owner = type(self).__name__
        self.ce_weight = check_float(owner, "ce_weight", ce_weight, minimum=0)
        self.ml_weight = check_float(owner, "ml_weight", ml_weight, minimum=0)
        self.conditional_weight = check_float(owner, "conditional_weight", conditional_weight, minimum=0)
        self.alpha = check_float(owner, "alpha", alpha, minimum=0)
        if self.ce_weight == self.ml_weight == self.conditional_weight == 0:
            raise ArgumentError(f"{owner}: ce_weight, ml_weight and conditional_weight are all 0: nothing to train")
        self.needs_negatives = self.ml_weight > 0 or self.conditional_weight > 0

    #: trains on labelled batches ``(x, y)``
    needs_labels = True

    def _classes(self, energy: nn.Module) -> int:
        owner = type(self).__name__
        classes = energy_classes(energy)
        if classes is None or not callable(getattr(energy, "logits", None)):
            raise ArgumentError(f"{owner} needs a classifier energy (num_classes, logits(x), forward(x, y)); "
                                f"{type(energy).__name__} has {'no num_classes' if classes is None else 'no logits'}: "
                                "wrap the network in lightning_ebm.energies.ClassifierEnergy(backbone, num_classes)")
        return classes

    def check(self, energy: nn.Module, sampler: Sampler) -> None:
        """The energy must be a classifier energy (``num_classes``, ``logits``)."""
        self._classes(energy)

    def check_data(self, energy: nn.Module, datamodule: object) -> None:
        """The DataModule (when there is one) must yield labels of at most the energy's classes."""
        if datamodule is None:
            return
        owner, classes = type(self).__name__, self._classes(energy)
        if getattr(datamodule, "labels", True) is False:
            raise ValueError(f"{owner} trains on labelled batches (x, y), but {type(datamodule).__name__} yields "
                             "no labels: set labels: true on the DataModule")
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes > classes:
            raise ValueError(f"{owner}: {type(datamodule).__name__} has num_classes={data_classes} but the energy "
                             f"has num_classes={classes}; labels would be out of range: give the energy "
                             f"num_classes={data_classes}")

    def __call__(self, step: TrainingStep) -> tuple[Tensor, dict[str, Tensor]]:
        owner = type(self).__name__
        classes = self._classes(step.energy)
        if step.labels is None:
            raise ValueError(f"{owner} trains on labelled batches (x, y) but got unlabelled data; set labels: true on "
                             "the DataModule (or give (x, y) batches with y an integer tensor (B,))")
        x = step.jittered_data()
        y = check_labels(owner, step.labels, classes, x.shape[0], name="the batch's labels")
        logits = step.energy.logits(x)
        ce = nn.functional.cross_entropy(logits, y)
        e_data = -torch.logsumexp(logits, dim=1)
        parts = {"ce": ce.detach(), "acc": (logits.detach().argmax(1) == y).to(x.dtype).mean(),
                 "energy_data": e_data.detach().mean()}
        loss = self.ce_weight * ce
        if self.ml_weight > 0:
            x_gen = step.negatives()
            e_gen = step.energy_of(x_gen)
            gap, reg = e_data.mean() - e_gen.mean(), e_data.pow(2).mean() + e_gen.pow(2).mean()
            loss = loss + self.ml_weight * (gap + self.alpha * reg if self.alpha > 0 else gap)
            parts.update(energy_data=e_data.detach().mean(), energy_gen=e_gen.detach().mean(),
                         energy_gap=gap.detach(), energy_reg=reg.detach())
        if self.conditional_weight > 0:
            y_gen = y[torch.arange(step.num_negatives, device=y.device) % y.shape[0]]  # the data's class mix
            x_cond = step.negatives(y=y_gen)
            e_cond_data = -logits.gather(1, y.view(-1, 1)).squeeze(1)
            logits_gen = step.energy.logits(x_cond)
            e_cond_gen = -logits_gen.gather(1, y_gen.view(-1, 1)).squeeze(1)
            parts.setdefault("energy_gen", -torch.logsumexp(logits_gen.detach(), dim=1).mean())
            gap_c = e_cond_data.mean() - e_cond_gen.mean()
            reg_c = e_cond_data.pow(2).mean() + e_cond_gen.pow(2).mean()
            loss = loss + self.conditional_weight * (gap_c + self.alpha * reg_c if self.alpha > 0 else gap_c)
            parts.update(energy_cond_data=e_cond_data.detach().mean(), energy_cond_gen=e_cond_gen.detach().mean(),
                         energy_cond_gap=gap_c.detach())
        return loss, parts
