"""``EBM``: the LightningModule that plays the energy (critic) against its own sampler (generator)."""

from __future__ import annotations

import math
import operator
import pickle
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from . import _config, _quiet_known_noise, density
from ._checks import ArgumentError, check_bool, check_choice, check_float, check_int, check_type, fail
from ._state import RunState
from .energies import ConditionedEnergy, check_energy_output, check_labels, energy_classes
from .latents import Latent, PersistentLatent
from .metrics import mmd_rbf, sliced_wasserstein
from .objectives import MaximumLikelihood, Objective, TrainingStep, generator_loss
from .samplers import Sampler, energy_grad

__all__ = ["EBM"]


_EVAL_SEED_OFFSET = 2_147_483_629  # validation draws its own stream, never the training one
_OBJECTIVE_KEY = "lightning_ebm_objective"  # checkpoint key of the objective's own state (see Objective.state_dict)


_SCALE_HINT = "images of 0..255: x.float() / 127.5 - 1 maps them to [-1, 1]"
_NOT_ESTIMATED = -1.0  # log_z_stderr before any estimate: finite (every state stays finite), never a real error bar


def _fill_missing_log_partition(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A state dict from before ``log_z`` existed loads as "not estimated" (``log_z_stderr = -1``)."""
    state_dict.setdefault(prefix + "log_z", torch.zeros((), dtype=torch.float64))
    state_dict.setdefault(prefix + "log_z_stderr", torch.full((), _NOT_ESTIMATED, dtype=torch.float64))


def _check_batch_size(method: str, batch_size: Any) -> None:
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool)
                                   or batch_size < 1):
        raise fail(f"EBM.{method}", "batch_size", "a positive integer or None", batch_size)


def _call_factory(name: str, factory: Any, arg: Any) -> Any:
    """``factory(arg)``; the arguments it rejects (torch's ``Invalid learning rate: -1.0``) are named as its."""
    try:
        return factory(arg)
    except (ValueError, TypeError) as err:
        raise ArgumentError(f"EBM: {name}: {err}") from err


class EBM(L.LightningModule):
    """An energy-based model: an energy (critic) trained against its own sampler (generator).

    The generator ``G(z) = sampler(energy, z)``, ``z ~ latent``, runs the dynamics of the energy;
    the critic is the energy itself. What each training step minimises is the ``objective``; the
    default, ``MaximumLikelihood(alpha, generator_loss_weight, generator_loss_steps)``, is the
    usual maximum-likelihood EBM update

        ``mean E(x_data) - mean E(sg(G(z))) + alpha * (mean E(x_data)^2 + mean E(G(z))^2)``

    with the generated samples detached (``sg``).

    Validation logs ``val/mmd`` and ``val/sw`` of generated samples against held-out data next
    to their data-vs-data floors, and ``val/energy_data`` (``val/acc`` for a classifier energy);
    ``trainer.test`` logs the same on the test split as ``test/...``; ``trainer.predict`` returns
    per batch ``{"energy": E(x)}``, plus ``"logits"`` for a classifier energy.

    Args:
        energy: the critic, any ``nn.Module`` mapping ``(B, *shape)`` to ``(B,)``.
        sampler: the generator's dynamics (``GradientDescent``, ``Langevin``, ``ODE`` or any
            ``Sampler``).
        latent: ``p0``, where the dynamics start (``Uniform``, ``Gaussian``, ``ReplayBuffer``).
        alpha: weight of the energy-magnitude regulariser of the default objective.
        data_noise: standard deviation of Gaussian jitter added to training data (0 = none).
        num_negatives: generated samples per step; ``None`` uses the data batch size.
        optimizer: factory ``params -> Optimizer`` (a class such as ``torch.optim.Adam`` or a
            ``functools.partial``; from YAML, ``class_path`` plus ``init_args``).
        lr_scheduler: optional factory ``optimizer -> LRScheduler``, stepped every training step.
        rng_seed: seed of the module's own random stream (latent draws, noise, jitter); ``None``
            derives it from the global seed. Each DDP rank adds its rank, so ranks draw different
            chains. The stream's state is saved in checkpoints.
        val_max_samples: cap on the held-out points used for the validation (and test) metrics.
        check_finite: raise on non-finite values in a training batch (one device sync per step).
        generator_loss_weight: weight of the default objective's optional generator loss
            ``mean E_sg(G(z))`` through the last ``generator_loss_steps`` steps of the dynamics
            (see ``objectives.MaximumLikelihood``); ``0`` (default) trains the critic alone.
        generator_loss_steps: how many final steps of the dynamics the generator loss unrolls.
        channels_last: for image energies ``(B, C, H, W)``: store the energy's 4-D weights and
            feed data and latents in the channels-last memory format (faster convolutions on
            recent GPUs and oneDNN CPUs; the samplers keep the format of their input).
        objective: the training loss (an ``objectives.Objective``); ``None`` builds
            ``MaximumLikelihood`` from ``alpha``, ``generator_loss_weight`` and
            ``generator_loss_steps``, which must then keep their defaults.
    """

    def __init__(
        self,
        energy: nn.Module,
        sampler: Sampler,
        latent: Latent,
        alpha: float = 0.1,
        data_noise: float = 0.0,
        num_negatives: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        rng_seed: int | None = None,
        val_max_samples: int = 4000,
        check_finite: bool = True,
        generator_loss_weight: float = 0.0,
        generator_loss_steps: int = 1,
        channels_last: bool = False,
        objective: Objective | None = None,
    ) -> None:
        super().__init__()
        # components may arrive as plain configs ({"class_path", "init_args"}): from a checkpoint or
        # a pretrained directory; factories (optimizer, lr_scheduler) become functools.partial
        energy, sampler, latent = (_config.build(v, k) for k, v in (("energy", energy), ("sampler", sampler),
                                                                     ("latent", latent)))
        optimizer = _config.build(optimizer, "optimizer", factory=True)
        lr_scheduler = _config.build(lr_scheduler, "lr_scheduler", factory=True)
        objective = _config.build(objective, "objective")
        check_type("EBM", "energy", energy, nn.Module, "an nn.Module mapping (B, *shape) -> (B,)")
        check_type("EBM", "sampler", sampler, Sampler, "a lightning_ebm.samplers.Sampler")
        check_type("EBM", "latent", latent, Latent, "a lightning_ebm.latents.Latent")
        check_type("EBM", "objective", objective, (Objective, type(None)),
                   "a lightning_ebm.objectives.Objective or None")
        self.alpha = check_float("EBM", "alpha", alpha, minimum=0)
        self.data_noise = check_float("EBM", "data_noise", data_noise, minimum=0)
        self.num_negatives = check_int("EBM", "num_negatives", num_negatives, minimum=1, allow_none=True)
        self.val_max_samples = check_int("EBM", "val_max_samples", val_max_samples, minimum=4)
        self.check_finite = check_bool("EBM", "check_finite", check_finite)
        self.channels_last = check_bool("EBM", "channels_last", channels_last)
        self.generator_loss_weight = check_float("EBM", "generator_loss_weight", generator_loss_weight, minimum=0)
        self.generator_loss_steps = check_int("EBM", "generator_loss_steps", generator_loss_steps, minimum=1)
        self.rng_seed = check_int("EBM", "rng_seed", rng_seed, allow_none=True)
        if not callable(optimizer):
            raise fail("EBM", "optimizer", "a callable params -> Optimizer", optimizer)
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise fail("EBM", "lr_scheduler", "None or a callable optimizer -> LRScheduler (e.g. "
                       "functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=1000))", lr_scheduler)
        if channels_last and len(latent.shape) != 3:
            raise ValueError(f"EBM: channels_last=True needs image samples of shape (C, H, W), but the latent's "
                             f"shape is {tuple(latent.shape)}")
        defaults = (self.alpha, self.generator_loss_weight, self.generator_loss_steps) == (0.1, 0.0, 1)
        if objective is not None and not defaults:
            raise ValueError(f"EBM: give either objective={objective!r} or alpha, generator_loss_weight and "
                             "generator_loss_steps (which build the default MaximumLikelihood), not both")
        with warnings.catch_warnings():
            # components are kept in the hyper-parameters on purpose: checkpoints store them as configs
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        self.energy = energy
        self.sampler = sampler
        self.latent = latent
        self.objective = objective if objective is not None else MaximumLikelihood(
            self.alpha, self.generator_loss_weight, self.generator_loss_steps)
        if channels_last:
            self.energy.to(memory_format=torch.channels_last)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self._run_state = RunState(self.rng_seed)
        self._val_batches: list[Tensor] = []
        self._last_step_time: float | None = None
        self._divergence_reported = False
        self._init_log_partition()

    # ------------------------------------------------------------------ generator
    @property
    def rng(self) -> torch.Generator:
        """The module's training random stream, on the module's device, seeded per rank.

        Created on first use (in the training process, on the training device) from ``rng_seed``
        (or the global seed) and the rank; its state is saved in checkpoints and restored.
        """
        return self._run_state.rng(self)

    @torch.no_grad()
    def generate(
        self,
        n: int,
        *,
        z: Tensor | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        batch_size: int | None = None,
        return_log_prob: bool = False,
        trace: str | None = None,
        num_probes: int = 1,
        series_terms: int = 16,
        y: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` samples of the generator ``G(z)``, ``z ~ latent`` (or the given ``z``), detached.

        Args:
            n: number of samples (ignored when ``z`` is given).
            z: starting points ``(n, *shape)``.
            generator: random stream for ``z`` and any sampler noise (default: torch's global).
            return_trajectory: also return the states ``(T, n, *shape)`` of the dynamics.
            batch_size: run the dynamics in chunks of this size to bound memory.
            return_log_prob: return ``(x, log_q)`` with the generator's log-density ``log q(x)``
                by change of variables (``lightning_ebm.density.sample_with_log_prob``); needs a
                deterministic sampler and a latent with a density.
            trace: how traces / log-determinants are computed for ``return_log_prob``:
                ``"exact"``, ``"hutchinson"``, or ``None`` (by dimension).
            num_probes: Rademacher probes per sample for ``trace="hutchinson"``.
            series_terms: terms of the log-det power series (Hutchinson, gradient descent).
            y: classes to generate (a class-conditional energy, ``energies.ClassifierEnergy``): an
                int for all ``n`` samples or a LongTensor ``(n,)``; the dynamics then follow
                ``-grad_x E(x, y)``, from the latent's chains of those classes when it keeps chains
                per class (``ReplayBuffer(num_classes=...)``).
        """
        _check_batch_size("generate", batch_size)
        if y is not None:
            y = self._generation_classes(y, n if z is None else z.shape[0])
        if return_log_prob:  # fail before drawing anything
            density.check_density(self.sampler, self.latent)
            if return_trajectory:
                raise ValueError("generate: return_log_prob and return_trajectory cannot be combined")
        if z is None:
            by_class = {"y": y} if y is not None and getattr(self.latent, "num_classes", None) else {}
            z = self.latent.sample(n, generator=generator, device=self.device, dtype=self._energy_dtype(), **by_class)
        else:
            z = self._points(z, "generate", "z")
        z = self._memory_format(z)
        chunks = [z] if batch_size is None else list(z.split(batch_size))
        ys = [None] * len(chunks) if y is None else list(y.split(chunks[0].shape[0]))
        energies = [self.energy if c is None else ConditionedEnergy(self.energy, c) for c in ys]
        if return_log_prob:
            pairs = [density.sample_with_log_prob(e, self.sampler, self.latent, c, trace=trace,
                                                  num_probes=num_probes, series_terms=series_terms,
                                                  generator=generator) for e, c in zip(energies, chunks, strict=True)]
            return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        outs = [self.sampler(e, c, generator=generator, return_trajectory=return_trajectory)
                for e, c in zip(energies, chunks, strict=True)]
        if return_trajectory:
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs], dim=1)
        return torch.cat(outs)

    def _generation_classes(self, y: Tensor | int, n: int) -> Tensor:
        """``y`` of ``generate`` as a LongTensor ``(n,)`` on the module's device, checked against the energy."""
        classes = energy_classes(self.energy)
        if classes is None:
            raise ValueError(f"EBM.generate: y={y!r} asks for conditional samples, but the energy "
                             f"{type(self.energy).__name__} is not class-conditional (no num_classes); wrap it in "
                             "lightning_ebm.energies.ClassifierEnergy")
        integer = isinstance(y, Tensor) and not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
        if integer and y.ndim == 0:  # a 0-dim integer tensor: one class for all
            y = int(y)
        if not isinstance(y, (Tensor, bool)) and hasattr(y, "__index__"):  # an int, a NumPy integer
            y = torch.full((n,), operator.index(y), dtype=torch.long)
        return check_labels("EBM.generate", y, classes, n).to(self.device)

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """Class logits ``f(x)`` ``(B, C)`` of a classifier energy (``energies.ClassifierEnergy``)."""
        logits = getattr(self.energy, "logits", None)
        if not callable(logits):
            raise ValueError(f"EBM.logits needs a classifier energy with logits(x) (energies.ClassifierEnergy); "
                             f"{type(self.energy).__name__} has none")
        return logits(self._points(x, "logits"))

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """The most probable class ``argmax_y p(y | x)`` ``(B,)`` of a classifier energy."""
        return self.logits(x).argmax(1)

    @torch.no_grad()
    def generator_log_prob(
        self,
        x: Tensor,
        *,
        trace: str | None = None,
        num_probes: int = 1,
        series_terms: int = 16,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
        tol: float | None = None,
        max_iter: int = 500,
    ) -> Tensor:
        """The generator's log-density ``log q(x)`` at any points ``x`` ``(B, *shape)``, shape ``(B,)``.

        Inverts the dynamics (``lightning_ebm.density.log_prob``): the ODE backwards in time,
        gradient descent step by step by fixed-point iteration (``tol``, ``max_iter``; a step
        that does not converge raises). ``trace``, ``num_probes``, ``series_terms`` and
        ``generator`` (the probes' stream) as in ``generate``; ``batch_size`` bounds memory.
        """
        _check_batch_size("generator_log_prob", batch_size)
        x = self._points(x, "generator_log_prob")
        chunks = [x] if batch_size is None else list(x.split(batch_size))
        return torch.cat([density.log_prob(self.energy, self.sampler, self.latent, c, trace=trace,
                                           num_probes=num_probes, series_terms=series_terms,
                                           generator=generator, tol=tol, max_iter=max_iter) for c in chunks])

    def forward(self, x: Tensor) -> Tensor:
        """The energy ``E(x)``, shape ``(B,)``."""
        e = self.energy(x)
        check_energy_output(e, x)
        return e

    # ------------------------------------------------------------------ the EBM's own density
    def _init_log_partition(self) -> None:
        """Buffers for ``log Z`` and its standard error, ``(0, -1)`` until estimated (a negative error
        bar: unknown; finite, so that checks that every state is finite, such as the divergence guard's
        tests, hold, and equal models compare equal, which NaN would break): they travel in the ``state_dict``,
        hence in checkpoints and ``save_pretrained``; state dicts written before they existed load as
        not estimated."""
        self.register_buffer("log_z", torch.zeros((), dtype=torch.float64))
        self.register_buffer("log_z_stderr", torch.full((), _NOT_ESTIMATED, dtype=torch.float64))
        self.register_load_state_dict_pre_hook(_fill_missing_log_partition)

    def estimate_log_partition(self, *, latent: Latent | None = None, num_chains: int = 256,
                               num_temps: int = 1000, transition: str = "mala", step_size: Any = 0.05,
                               generator: torch.Generator | None = None, **kwargs: Any) -> density.AISResult:
        """Estimate ``log Z = log int exp(-E)`` by annealed importance sampling and store it (``log_z``,
        ``log_z_stderr``), so that ``log_prob`` and ``bits_per_dim`` can use it.

        ``latent`` is AIS's ``p0`` (default: the module's latent, or a ``ReplayBuffer``'s ``base``); a
        ``Uniform`` box restricts ``Z`` to the box. The energy is evaluated in ``eval()`` mode. The
        other arguments are those of ``lightning_ebm.density.estimate_log_partition``.
        """
        if latent is None:
            latent = self.latent.base if isinstance(self.latent, PersistentLatent) else self.latent
        was_training = self.energy.training
        self.energy.eval()
        try:
            result = density.estimate_log_partition(self.energy, latent, num_chains=num_chains,
                                                    num_temps=num_temps, transition=transition,
                                                    step_size=step_size, generator=generator,
                                                    **{"device": self.device, **kwargs})
        finally:
            self.energy.train(was_training)
        self.log_z.fill_(result.log_z)
        self.log_z_stderr.fill_(result.stderr)
        return result

    def _require_log_z(self, method: str) -> Tensor:
        if not float(self.log_z_stderr) >= 0:
            raise RuntimeError(f"EBM.{method}: log Z has not been estimated (log_z_stderr is -1); call "
                               "model.estimate_log_partition(...) first (it stores log_z and log_z_stderr, which "
                               "checkpoints then carry)")
        return self.log_z

    @torch.no_grad()
    def log_prob(self, x: Tensor, *, batch_size: int | None = None) -> Tensor:
        """The EBM's own log-density ``-E(x) - log Z`` at ``x`` ``(B, *shape)``, float64 ``(B,)``.

        Needs ``log Z`` (``estimate_log_partition``; a ``Uniform`` AIS latent makes this a density on
        its box). The energy is read as it is (call ``eval()`` first if it has dropout).
        """
        _check_batch_size("log_prob", batch_size)
        log_z = self._require_log_z("log_prob")
        x = self._points(x, "log_prob")
        chunks = [x] if batch_size is None else list(x.split(batch_size))
        return torch.cat([-self(c).double() for c in chunks]) - log_z

    def bits_per_dim(self, x: Tensor, *, which: str = "ebm", data_range: tuple[float, float] | None = (-1.0, 1.0),
                     num_levels: int | None = None, batch_size: int | None = None,
                     **generator_kwargs: Any) -> density.BitsPerDim:
        """Held-out bits/dim ``-log p(x) / (D ln 2)`` under ``exp(-E)/Z`` (``which="ebm"``) or under the
        generator's ``q`` (``which="generator"``, by ``generator_log_prob``; ``generator_kwargs`` go there).

        With ``num_levels`` the data are discrete (``num_levels`` levels evenly spread over ``data_range``,
        dequantised uniformly within a level) and the result is the dequantisation bound on the discrete
        bits/dim: ``log p + D log((high - low) / num_levels)`` (``density.bits_per_dim``); without it,
        continuous bits/dim (``data_range`` unused). ``stderr_log_z`` carries log Z's AIS error, common to
        all points; ``stderr_data`` the points' sampling error.
        """
        check_choice("EBM.bits_per_dim", "which", which, ("ebm", "generator"))
        num_dims = int(math.prod(x.shape[1:]))
        if which == "ebm":
            log_p = self.log_prob(x, batch_size=batch_size)
            stderr_log_z = float(self.log_z_stderr) / (num_dims * math.log(2.0))
        else:
            log_p = self.generator_log_prob(x, batch_size=batch_size, **generator_kwargs).double()
            stderr_log_z = 0.0
        if num_levels is None:
            bpd = -log_p / (num_dims * math.log(2.0))
        else:
            bpd = density.bits_per_dim(log_p, num_dims, data_range=data_range, num_levels=num_levels)
        bpd = bpd.double().cpu()
        n = bpd.numel()
        stderr_data = float(bpd.std(correction=1) / math.sqrt(n)) if n > 1 else math.nan
        return density.BitsPerDim(value=float(bpd.mean()), stderr_data=stderr_data, stderr_log_z=stderr_log_z,
                                  per_example=bpd)

    # ------------------------------------------------------------------ checks
    def setup(self, stage: str) -> None:
        _quiet_known_noise()  # Lightning's own deprecated-API warning, dropped by catch_warnings() around a run
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_shape = getattr(datamodule, "sample_shape", None)
        if data_shape is not None and tuple(data_shape) != tuple(self.latent.shape):
            raise ValueError(
                f"latent shape {tuple(self.latent.shape)} does not match the data's sample shape "
                f"{tuple(data_shape)} (from {type(datamodule).__name__}); set the latent's shape to "
                f"{list(data_shape)}"
            )
        batch_size = self.num_negatives or getattr(datamodule, "batch_size", None)
        draws = self.objective.needs_negatives and isinstance(batch_size, int)
        self._run_state.prepare(self, batch_size if draws else None)
        self.objective.check(self.energy, self.sampler)
        check_data = getattr(self.objective, "check_data", None)  # objectives that need labelled data
        if callable(check_data):
            check_data(self.energy, datamodule)
        self.sampler.check_energy(self.energy)
        self._dry_run()

    def _dry_run(self) -> None:
        """Check the energy's output shape on two latent draws before any training happens."""
        param = next(self.energy.parameters(), None)
        device = param.device if param is not None else self.device
        base = self.latent.base if isinstance(self.latent, PersistentLatent) else self.latent
        z = base.sample(2, generator=torch.Generator().manual_seed(0), dtype=self._energy_dtype()).to(device)
        with torch.no_grad():
            check_energy_output(self.energy(z), z)

    def _data(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if isinstance(x, dict):
            raise TypeError("EBM expects batches that are a tensor or a tuple whose first item is the data tensor")
        if tuple(x.shape[1:]) != tuple(self.latent.shape):
            raise ValueError(
                f"{stage} batch {batch_idx} has samples of shape {tuple(x.shape[1:])}, but the latent has "
                f"shape {tuple(self.latent.shape)}; they must match"
            )
        if not x.is_floating_point():
            raise ArgumentError(f"{stage} batch {batch_idx} holds {x.dtype} data, but the energy takes floating-point "
                                f"samples: convert them in the dataset or DataModule ({_SCALE_HINT})")
        x = x.to(self._energy_dtype(x.dtype))
        if self.check_finite and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
            raise ValueError(
                f"non-finite values (NaN or Inf) in {bad} sample(s) of {stage} batch {batch_idx} "
                f"(epoch {self.current_epoch}, global step {self.global_step}); clean the data or "
                "check the DataModule's transforms"
            )
        return self._memory_format(x)

    def _energy_dtype(self, default: torch.dtype | None = None) -> torch.dtype:
        """The floating dtype of the energy's parameters; ``default`` (else the module's) for an energy without any."""
        param = next((p for p in self.energy.parameters() if p.is_floating_point()), None)
        return param.dtype if param is not None else default or self.dtype

    def _points(self, x: Any, method: str, name: str = "x") -> Tensor:
        """``x`` ``(B, *shape)`` on the module's device in the energy's dtype (other float dtypes are cast, as
        batches are); a clear error for another shape or integer values."""
        shape = tuple(self.latent.shape)
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != shape:
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
            raise ArgumentError(f"EBM.{method}: {name} must be a tensor of shape (B, {', '.join(map(str, shape))}) "
                                f"(points of the latent's shape {shape}), got {got}")
        if not x.is_floating_point():
            raise ArgumentError(f"EBM.{method}: {name} must hold floating-point values, got {x.dtype} ({_SCALE_HINT})")
        return x.to(device=self.device, dtype=self._energy_dtype(x.dtype))

    @staticmethod
    def _labels(batch: Any, x: Tensor, strict: bool = False) -> Tensor | None:
        """The labels ``y`` of an ``(x, y)`` batch (an integer tensor ``(B,)``), ``None`` for unlabelled batches.

        A second item that is not such a tensor is ignored (a label-free model keeps working on any
        batch), unless ``strict`` (an objective that needs labels): it is then passed on as it is, for
        the objective's label check to say what is wrong with it.
        """
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            return None
        y = batch[1]
        if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.shape != (x.shape[0],):
            return y if strict else None
        return y.to(x.device)

    def _memory_format(self, x: Tensor) -> Tensor:
        """``x`` in the channels-last memory format if ``channels_last`` is set (no copy if it already is)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ------------------------------------------------------------------ training
    def critic_loss(self, e_data: Tensor, e_gen: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The critic loss and its parts (the objective's, ``MaximumLikelihood.critic_loss``)."""
        if not hasattr(self.objective, "critic_loss"):
            raise AttributeError(f"EBM.critic_loss is the maximum-likelihood critic loss; the objective "
                                 f"{self.objective!r} has none")
        return self.objective.critic_loss(e_data, e_gen)

    def generator_loss(self, x_gen: Tensor) -> Tensor:
        """``mean E(x_gen)`` with the critic held fixed (``objectives.generator_loss``)."""
        return generator_loss(self.energy, x_gen)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x_data = self._data(batch, batch_idx, "training")
        n = self.num_negatives or x_data.shape[0]
        step = TrainingStep(self.energy, self.sampler, self.latent, self.rng, x_data, n,
                            data_noise=self.data_noise, memory_format=self._memory_format,
                            labels=self._labels(batch, x_data, strict=getattr(self.objective, "needs_labels", False)))
        loss, parts = self.objective(step)
        if self._trainer is not None and self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self._report_divergence(loss)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, sync_dist=True)
        if step.generated is not None:
            self._log_sampler(step.generated)
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("train/samples_per_sec", n / max(now - self._last_step_time, 1e-9))
        self._last_step_time = now
        return loss

    def _report_divergence(self, loss: Tensor) -> None:
        """Warn once per fit when the loss is no longer finite (checked every ``log_every_n_steps``, one sync):
        without a ``DivergenceGuard`` nothing else would say so, and the run would go on training on NaN."""
        if not self._divergence_reported and not bool(torch.isfinite(loss)):
            self._divergence_reported = True
            rank_zero_warn(f"EBM: train/loss is {float(loss.detach())} at global step {self.global_step}: the run has "
                           "diverged. Lower the learning rate or the sampler's step size, or add "
                           "lightning_ebm.callbacks.DivergenceGuard, which stops or rolls back such a run")

    def _log_sampler(self, x_gen: Tensor) -> None:
        """What the sampler reported of its last call (``train/sampler/*``) and the gradient at its output."""
        info = getattr(self.sampler, "last_info", None) or {"nfe": self.sampler.last_nfe}
        self.log_dict({f"train/sampler/{k}": float(v) for k, v in info.items()})
        self.log("train/nfe", float(info["nfe"]))  # the name before train/sampler/nfe, kept for users
        if self._trainer is not None and self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            grad_norm = energy_grad(self.energy, x_gen).flatten(1).norm(dim=1).mean()
            self.log("train/grad_norm_gen", grad_norm)

    def on_fit_start(self) -> None:
        self._divergence_reported = False

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    def configure_optimizers(self) -> Any:
        optimizer = _call_factory("optimizer", self.optimizer_factory, self.energy.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = _call_factory("lr_scheduler", self.lr_scheduler_factory, optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ validation, test and predict
    def on_validation_epoch_start(self) -> None:
        self._val_batches = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._evaluation_epoch_end("val")

    def on_test_epoch_start(self) -> None:
        self._val_batches = []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """The validation metrics on the test split, logged as ``test/...``."""
        self._evaluation_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._evaluation_epoch_end("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """``{"energy": E(x)}`` ``(B,)`` of a batch, plus ``"logits"`` ``(B, C)`` for a classifier energy."""
        x = self._data(batch, batch_idx, "predict")
        with torch.no_grad():
            out = {"energy": self(x)}
            if callable(getattr(self.energy, "logits", None)):
                out["logits"] = self.energy.logits(x)
        return out

    def _evaluation_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        x = self._data(batch, batch_idx, "validation" if stage == "val" else stage)
        self._val_batches.append(x)
        with torch.no_grad():
            self.log(f"{stage}/energy_data", self(x).mean(), sync_dist=True)
            y = self._labels(batch, x)
            if y is not None and callable(getattr(self.energy, "logits", None)):  # a classifier energy
                self.log(f"{stage}/acc", (self.energy.logits(x).argmax(1) == y).float().mean(), sync_dist=True)

    def _evaluation_epoch_end(self, stage: str) -> None:
        if not self._val_batches:
            return
        data = torch.cat(self._val_batches)
        self._val_batches = []
        if self.trainer.world_size > 1:
            data = self.all_gather(data).flatten(0, 1)
        data = data[: self.val_max_samples]
        half = data.shape[0] // 2
        if half < 2:
            return
        ref, floor_sample = data[:half], data[half : 2 * half]
        metrics = self.sample_quality(ref, floor_sample)
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=False)

    def sample_quality(self, reference: Tensor, data_sample: Tensor | None = None, seed: int = 0) -> dict[str, Tensor]:
        """MMD and sliced Wasserstein between generated samples and ``reference`` data.

        Generates as many samples as ``reference`` holds from a fixed seeded stream (the same
        ``z`` every time, so values are comparable across epochs and never consume the training
        stream). With ``data_sample`` (independent data of the same size) also returns the
        data-vs-data floors ``mmd_floor`` and ``sw_floor``.
        """
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
        n = reference.shape[0]
        per_rank = -(-n // world)
        gen = torch.Generator(device=self.device).manual_seed(_EVAL_SEED_OFFSET + seed + 7 * rank)
        x_gen = self.generate(per_rank, generator=gen)
        if world > 1:
            x_gen = self.all_gather(x_gen).flatten(0, 1)
        x_gen = x_gen[:n]
        with torch.no_grad():
            e_gen = self(x_gen).mean()  # over all ranks' samples, the same value on every rank
        out = {
            "energy_gen": e_gen,
            "mmd": mmd_rbf(x_gen, reference).float(),
            "sw": sliced_wasserstein(x_gen, reference).float(),
        }
        if data_sample is not None:
            out["mmd_floor"] = mmd_rbf(data_sample, reference).float()
            out["sw_floor"] = sliced_wasserstein(data_sample, reference).float()
        return out

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._run_state.save(self, checkpoint)  # a collective under DDP: every rank's stream and chains
        objective_state = self.objective.state_dict()
        if objective_state:  # what the objective fitted outside the energy (NCE's fitted noise)
            checkpoint[_OBJECTIVE_KEY] = objective_state
        self._strip_hparams(checkpoint)
        if "hyper_parameters" in checkpoint:  # components as plain configs: loads with weights_only=True
            checkpoint["hyper_parameters"], problems = _config.hparams_to_config(checkpoint["hyper_parameters"])
            problems += self._dropped_factories(checkpoint["hyper_parameters"])
            for problem in problems:  # Python's warning filter shows each message once, not at every save
                rank_zero_warn(f"EBM checkpoint: {problem}. The checkpoint resumes training all the same; "
                               "where this part cannot be rebuilt, pass it to load_from_checkpoint")

    def _dropped_factories(self, hparams: dict[str, Any]) -> list[str]:
        """The optimizer / scheduler factories that Lightning left out of the hyper-parameters (it drops
        what cannot be pickled, such as a lambda), which loading would silently replace by the defaults."""
        problems = []
        for name, factory, default in (("optimizer", self.optimizer_factory, "torch.optim.Adam"),
                                        ("lr_scheduler", self.lr_scheduler_factory, "no scheduler")):
            if name not in hparams and factory is not None and factory is not torch.optim.Adam:
                problems.append(f"{name}={factory!r} is not recorded (it cannot be pickled), so loading builds "
                                f"{default}; give a class or a functools.partial, e.g. "
                                "functools.partial(torch.optim.SGD, lr=0.01), to record it")
        return problems

    def _strip_hparams(self, checkpoint: dict[str, Any]) -> None:
        """Keep the hyper-parameters pickled in ``checkpoint`` free of training state (chains)."""
        RunState.strip_hparams(checkpoint.get("hyper_parameters", {}))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._run_state.load(self, checkpoint)
        self.objective.load_state_dict(checkpoint.get(_OBJECTIVE_KEY, {}))

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, weights_only: bool | None = None,
                             allow_classes: Sequence[str] | None = None, **kwargs: Any) -> EBM:
        """Load a checkpoint written by ``EBM`` (see ``LightningModule.load_from_checkpoint``).

        Checkpoints hold their components as plain configs and load with ``weights_only=True``
        (the default here; Lightning's own default is ``False``). Rebuilding imports only classes
        of ``lightning_ebm``, ``torch.nn``, ``torch.optim``, classes already imported, and
        ``allow_classes`` (class paths or module prefixes, for your own classes in modules not
        imported yet). A component that could not
        be recorded is passed as an argument (``energy=MyEnergy(...)``). ``weights_only=False``
        reads older checkpoints with pickled components: only for checkpoints you trust.
        """
        if weights_only is None:  # Lightning's own default is False (with a log line); ours is the safe one
            weights_only = True
        try:
            with _config.allowing(allow_classes):
                return super().load_from_checkpoint(checkpoint_path, *args, weights_only=weights_only, **kwargs)
        except pickle.UnpicklingError as err:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            what = f" (it pickles {found.group(1)})" if found else ""
            raise _config.ComponentConfigError(
                f"EBM.load_from_checkpoint: {checkpoint_path} holds pickled Python objects{what}, which torch "
                "refuses to load with weights_only=True; it was written by an older lightning_ebm. If you trust "
                "the file, load it with weights_only=False") from None

    # ------------------------------------------------------------------ sharing (lightning_ebm.hub)
    def save_pretrained(self, path: str | Path, *, include_replay_buffer: bool = False,
                        metrics_csv: str | Path | None = None, sample_picture: bool = True) -> Path:
        """Write the whole generator as a directory: config.json, model.safetensors, a model card.

        No pickle: components are plain configs, weights are safetensors (the ``hub`` extra). See
        ``lightning_ebm.hub.save_pretrained``.
        """
        from . import hub

        return hub.save_pretrained(self, path, include_replay_buffer=include_replay_buffer,
                                   metrics_csv=metrics_csv, sample_picture=sample_picture)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | Path, *, allow_classes: Sequence[str] | None = None,
                        **kwargs: Any) -> EBM:
        """Load a directory written by ``save_pretrained`` or a Hugging Face Hub repo holding one.

        Imports only classes of ``lightning_ebm``, ``torch.nn``, ``torch.optim`` and
        ``allow_classes``. See ``lightning_ebm.hub.from_pretrained`` for the other arguments.
        """
        from . import hub

        model = hub.from_pretrained(path_or_repo_id, allow_classes=allow_classes, **kwargs)
        if not isinstance(model, cls):
            raise _config.ComponentConfigError(f"{cls.__name__}.from_pretrained: {path_or_repo_id} holds a "
                                               f"{type(model).__name__}, not a {cls.__name__}")
        return model

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> Any:
        """``save_pretrained`` and upload to the Hugging Face Hub repo ``repo_id`` (created if needed).

        See ``lightning_ebm.hub.push_to_hub`` for the arguments (token, private, commit_message, ...).
        """
        from . import hub

        return hub.push_to_hub(self, repo_id, **kwargs)
