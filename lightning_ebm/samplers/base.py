"""The sampler interface: ``sampler(energy, x0) -> x_K``, the generator's dynamics.

A sampler describes its update once, as a pure function (``Steps``: one step of a discrete
sampler; ``Flow``: the vector field of a continuous one); the runners in ``_backends`` execute
that function eagerly, through ``torch.compile`` or from a CUDA graph, and report what they did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import ArgumentError, check_bool, check_float, check_int, check_pair
from .._config import RecordInit
from ..energies import check_energy_output

__all__ = ["Sampler", "Steps", "Flow", "State", "GradFn", "energy_grad", "energy_and_grad", "clip_grad",
           "StepCallback"]

#: called after every step with a dict holding at least ``step`` (1-based) and ``x``
StepCallback = Callable[[dict[str, Any]], None]
#: a sampler's state between steps; ``state[0]`` is the position ``x``
State = tuple[Tensor, ...]
#: given to an update by the backend that runs it: ``grad(x) -> grad_x E(x)``, and
#: ``grad(x, with_energy=True) -> (grad_x E(x), E(x))`` for updates that also need the energy (MCMC)
GradFn = Callable[..., Any]


def energy_grad(energy: nn.Module, x: Tensor, create_graph: bool = False) -> Tensor:
    """``grad_x E(x)`` for a batch, keeping no graph and touching no parameter gradient.

    ``torch.autograd.grad`` with respect to ``x`` alone leaves ``param.grad`` untouched and
    computes none of the weight gradients; grad is enabled locally so this works under
    ``torch.no_grad`` (validation, ``generate``) too. With ``create_graph=True`` (unrolled
    dynamics) the result stays differentiable in the energy's parameters and in ``x`` when
    ``x`` already carries a graph.
    """
    return energy_and_grad(energy, x, create_graph)[1]


def energy_and_grad(energy: nn.Module, x: Tensor, create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """``(E(x), grad_x E(x))`` from one forward and one input-backward pass (see ``energy_grad``)."""
    with torch.enable_grad():
        if not (create_graph and x.requires_grad):
            x = x.detach().requires_grad_(True)
        e = energy(x)
        check_energy_output(e, x)
        (g,) = torch.autograd.grad(e.sum(), x, create_graph=create_graph)
    return (e if create_graph else e.detach()), g


def clip_grad(g: Tensor, limit: float | None) -> Tensor:
    """``g`` with every coordinate clamped to ``[-limit, limit]`` (``None``: unchanged); the one clipping rule."""
    return g if limit is None else g.clamp(-limit, limit)


@dataclass(frozen=True)
class Steps:
    """A discrete sampler's dynamics as the backends run them: one update, its constants, ``num_steps``.

    ``update(grad, state, noise, k, *constants) -> (state, extras)``: ``grad(x)`` is the energy
    gradient (the backend's: autograd eagerly, ``torch.func`` when compiled; ``grad(x,
    with_energy=True)`` also returns the energies, for an accept/reject), ``state`` a tuple
    whose first entry is the position, ``noise`` the tuple ``draw(x, generator)`` returned for
    this step (``()`` without ``draw``), ``k`` the 0-based step index as a 0-dim int64 tensor.
    ``extras`` (tensors) reach the step callback. The update must be a module-level function of
    tensor operations only (no host sync, no branching on tensor values) so that it traces into
    one graph; the constants are plain Python values (floats, ``None``, tuples).
    """

    update: Callable[..., tuple[State, dict[str, Tensor]]]
    num_steps: int
    constants: tuple = ()
    #: the random numbers of one step, drawn outside the update from ``generator``
    draw: Callable[[Tensor, torch.Generator | None], tuple[Tensor, ...]] | None = None
    #: energy-gradient evaluations per step
    evaluations: int = 1


@dataclass(frozen=True)
class Flow:
    """A continuous sampler's vector field: ``field(grad, x, *constants) -> dx/dt``."""

    field: Callable[..., Tensor]
    constants: tuple = ()


class Sampler(RecordInit):
    """Base class of the generator dynamics.

    A discrete sampler defines ``dynamics()`` (its update, once; see ``Steps``), and optionally
    ``init_state`` and ``info`` when it carries more than the position; the shared backends run
    it. A sampler that is not a sequence of steps (``ODE``) overrides ``_run`` instead. Every
    sampler:

    * follows ``-grad E`` from ``x0`` and returns ``x_K`` detached (no autograd graph across steps,
      no parameter gradients: memory does not grow with the number of steps);
    * works under ``torch.no_grad`` (it enables grad locally), but not under
      ``torch.inference_mode`` (use ``Trainer(inference_mode=False)``);
    * follows the device and dtype of ``x0``;
    * reports its last call in ``last_info`` (always ``"nfe"``, the energy-gradient evaluations;
      ``"compile_time"`` with ``compile=True``; an MCMC sampler adds ``"acceptance"``), and keeps
      ``last_nfe`` (that count) and ``compile_time`` (compilation seconds, accumulated);
    * with ``compile=True`` runs its steps (energy gradient and update) through ``torch.compile``,
      several steps per compiled call (``_backends.chunk_length``), with results equal to the
      eager loop's up to float rounding, from the same random numbers; it compiles on the first
      call per input shape, dtype, device and mode.
    """

    #: False for samplers that inject noise: their generator has no density
    deterministic: bool = True
    #: replay the K-step loop from a CUDA graph (samplers that offer it take it as an argument)
    cuda_graph: bool = False

    def __init__(self, grad_clip: float | None = None, clamp: tuple[float, float] | None = None,
                 compile: bool = False, cuda_graph: bool | None = None) -> None:
        name = type(self).__name__
        self.grad_clip = check_float(name, "grad_clip", grad_clip, minimum=0, strict=True, allow_none=True)
        self.clamp = check_pair(name, "clamp", clamp, allow_none=True)
        self.compile = check_bool(name, "compile", compile)
        if cuda_graph is not None:  # only samplers that offer it carry it (and show it in repr)
            self.cuda_graph = check_bool(name, "cuda_graph", cuda_graph)
        self.last_nfe = 0
        self.compile_time = 0.0
        self.last_info: dict[str, float] = {}

    # ------------------------------------------------------------------ the extension point
    def dynamics(self) -> Steps:
        """The update and its constants (discrete samplers); ``ODE``-like samplers override ``_run``."""
        raise NotImplementedError(f"{type(self).__name__} defines neither dynamics() nor _run()")

    def init_state(self, x0: Tensor) -> State:
        """The state the update starts from (default: the position alone)."""
        return (x0,)

    def check_energy(self, energy: nn.Module) -> None:
        """Raise early if this sampler cannot run ``energy`` (``EBM.setup`` calls it); any energy by default."""

    def info(self, state: State) -> dict[str, float]:
        """What the final state says about the call (e.g. an acceptance rate), for ``last_info``."""
        return {}

    # ------------------------------------------------------------------ calling
    def __call__(
        self,
        energy: nn.Module,
        x0: Tensor,
        *,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        callback: StepCallback | None = None,
        differentiable_steps: int = 0,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Run the dynamics from ``x0``.

        Args:
            energy: ``(B, *shape) -> (B,)``.
            x0: starting points ``(B, *shape)``, floating point.
            generator: random stream for samplers with noise.
            return_trajectory: also return the states ``(T, B, *shape)`` (``x0`` first); costs
                memory linear in ``T``.
            callback: called after every step with ``{"step", "x", ...}``.
            differentiable_steps: keep the autograd graph through the last this many steps, so
                that ``x_K`` is differentiable in the energy's parameters (the generator loss);
                the state before them is detached. Needs grad mode; memory grows with it.
                ``0`` (default): no graph at all.

        Returns:
            ``x_K``, or ``(x_K, trajectory)``; detached unless ``differentiable_steps > 0``.
        """
        name = type(self).__name__
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{name} needs autograd for grad E(x), which torch.inference_mode forbids. "
                "Call it under torch.no_grad() instead, or build the Trainer with inference_mode=False "
                "(the lightning-ebm CLI does) so validate/test/predict run under no_grad."
            )
        if not isinstance(x0, Tensor) or not x0.is_floating_point():
            raise ArgumentError(f"{name}: x0 must be a floating-point tensor, got {type(x0).__name__} "
                                f"{getattr(x0, 'dtype', '')}")
        x0 = x0.clone() if x0.is_inference() else x0.detach()
        if differentiable_steps:
            check_int(name, "differentiable_steps", differentiable_steps, minimum=0)
            if not torch.is_grad_enabled():
                raise RuntimeError(f"{name}: differentiable_steps={differentiable_steps} "
                                   "needs grad mode, but it is disabled (torch.no_grad)")
            x, trajectory = self._run(energy, x0, generator, return_trajectory, callback,
                                      differentiable_steps=differentiable_steps)
        else:
            x, trajectory = self._run(energy, x0, generator, return_trajectory, callback)
        return (x, trajectory) if return_trajectory else x

    def _run(self, energy, x0, generator, return_trajectory, callback, differentiable_steps=0
             ) -> tuple[Tensor, Tensor | None]:
        """Run ``steps()`` through the backend this sampler asks for; record what the call did."""
        from . import _backends  # noqa: PLC0415 - _backends imports this module

        steps = self.dynamics()
        if differentiable_steps > steps.num_steps:
            raise ArgumentError(f"{type(self).__name__}: differentiable_steps must be <= steps="
                                f"{steps.num_steps}, got {differentiable_steps}")
        run = _backends.run_steps(
            steps, energy, self.init_state(x0), generator=generator, return_trajectory=return_trajectory,
            callback=callback, differentiable_steps=differentiable_steps,
            compile=self.compile and not differentiable_steps, cuda_graph=self.cuda_graph and not differentiable_steps,
            owner=type(self).__name__,
        )
        self._record(run, self.info(run.state))
        return run.state[0], run.trajectory

    def _record(self, run: Any, extra: dict[str, float] | None = None) -> None:
        """Set ``last_info``, ``last_nfe`` and ``compile_time`` from a backend's report."""
        self.last_nfe = run.nfe
        self.compile_time += run.compile_time
        info = {"nfe": float(run.nfe)}
        if self.compile or self.cuda_graph:
            info["compile_time"] = float(run.compile_time)
        info.update(extra or {})
        self.last_info = info

    def __repr__(self) -> str:
        state = ("last_nfe", "compile_time", "last_info")
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k not in state)
        return f"{type(self).__name__}({args})"
