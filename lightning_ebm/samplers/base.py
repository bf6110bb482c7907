"""The sampler interface: ``sampler(energy, x0) -> x_K``, the generator's dynamics."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._config import RecordInit
from ..energies import check_energy_output

__all__ = ["Sampler", "energy_grad", "StepCallback"]

#: called after every step with a dict holding at least ``step`` (1-based) and ``x``
StepCallback = Callable[[dict[str, Any]], None]


def energy_grad(energy: nn.Module, x: Tensor, create_graph: bool = False) -> Tensor:
    """``grad_x E(x)`` for a batch, keeping no graph and touching no parameter gradient.

    ``torch.autograd.grad`` with respect to ``x`` alone leaves ``param.grad`` untouched and
    computes none of the weight gradients; grad is enabled locally so this works under
    ``torch.no_grad`` (validation, ``generate``) too. With ``create_graph=True`` (unrolled
    dynamics) the result stays differentiable in the energy's parameters and in ``x`` when
    ``x`` already carries a graph.
    """
    with torch.enable_grad():
        if not (create_graph and x.requires_grad):
            x = x.detach().requires_grad_(True)
        e = energy(x)
        check_energy_output(e, x)
        (g,) = torch.autograd.grad(e.sum(), x, create_graph=create_graph)
    return g


def _check_positive(owner: str, name: str, value: Any, integer: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{owner}: {name} must be {kind}, got {value!r}")


class Sampler(RecordInit):
    """Base class of the generator dynamics.

    Subclasses implement ``_run``. Every sampler:

    * follows ``-grad E`` from ``x0`` and returns ``x_K`` detached (no autograd graph across steps,
      no parameter gradients: memory does not grow with the number of steps);
    * works under ``torch.no_grad`` (it enables grad locally), but not under
      ``torch.inference_mode`` (use ``Trainer(inference_mode=False)``);
    * follows the device and dtype of ``x0``;
    * records ``last_nfe``, the number of energy-gradient evaluations of the last call;
    * with ``compile=True`` runs each step (energy gradient and update) through ``torch.compile``,
      with results equal to the eager loop's up to float rounding; ``compile_time`` accumulates
      the seconds spent compiling (the first call per input shape, dtype, device and mode).
    """

    #: False for samplers that inject noise: their generator has no density
    deterministic: bool = True

    def __init__(self, grad_clip: float | None = None, clamp: tuple[float, float] | None = None,
                 compile: bool = False) -> None:
        name = type(self).__name__
        if not isinstance(compile, bool):
            raise ValueError(f"{name}: compile must be True or False, got {compile!r}")
        if grad_clip is not None:
            _check_positive(name, "grad_clip", grad_clip)
        if clamp is not None:
            pair = isinstance(clamp, Sequence) and not isinstance(clamp, str) and len(clamp) == 2
            if not pair or not float(clamp[0]) < float(clamp[1]):
                raise ValueError(f"{name}: clamp must be a pair (low, high) with low < high, got {clamp!r}")
            clamp = (float(clamp[0]), float(clamp[1]))
        self.grad_clip = grad_clip
        self.clamp = clamp
        self.compile = compile
        self.last_nfe = 0
        self.compile_time = 0.0

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
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} needs autograd for grad E(x), which torch.inference_mode forbids. "
                "Call it under torch.no_grad() instead, or build the Trainer with inference_mode=False "
                "(the lightning-ebm CLI does) so validate/test/predict run under no_grad."
            )
        if not isinstance(x0, Tensor) or not x0.is_floating_point():
            raise TypeError(f"x0 must be a floating-point tensor, got {type(x0).__name__} "
                            f"{getattr(x0, 'dtype', '')}")
        x0 = x0.clone() if x0.is_inference() else x0.detach()
        if differentiable_steps:
            if not isinstance(differentiable_steps, int) or differentiable_steps < 0:
                raise ValueError(f"{type(self).__name__}: differentiable_steps must be an integer >= 0, "
                                 f"got {differentiable_steps!r}")
            if not torch.is_grad_enabled():
                raise RuntimeError(f"{type(self).__name__}: differentiable_steps={differentiable_steps} "
                                   "needs grad mode, but it is disabled (torch.no_grad)")
            x, trajectory = self._run(energy, x0, generator, return_trajectory, callback,
                                      differentiable_steps=differentiable_steps)
        else:
            x, trajectory = self._run(energy, x0, generator, return_trajectory, callback)
        return (x, trajectory) if return_trajectory else x

    def _run(self, energy, x0, generator, return_trajectory, callback, differentiable_steps=0
             ) -> tuple[Tensor, Tensor | None]:
        """The dynamics; ``differentiable_steps`` is passed only when positive (see ``__call__``)."""
        raise NotImplementedError

    def _postprocess_grad(self, g: Tensor) -> Tensor:
        return g if self.grad_clip is None else g.clamp(-self.grad_clip, self.grad_clip)

    def _postprocess_x(self, x: Tensor) -> Tensor:
        return x if self.clamp is None else x.clamp(*self.clamp)

    def __repr__(self) -> str:
        state = ("last_nfe", "compile_time")
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k not in state)
        return f"{type(self).__name__}({args})"
