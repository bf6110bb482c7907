"""Faster dynamics: ``compile=True`` (one step through ``torch.compile``) and ``cuda_graph=True``.

The eager loops in ``descent.py`` and ``ode.py`` stay the reference; the paths here compute the
same updates in the same order, from the same random numbers, so results agree to float
tolerance. ``torch.autograd.grad`` breaks a torch.compile graph, so the compiled step takes the
input gradient with ``torch.func.grad``, which traces into one graph (forward, backward with
respect to ``x`` only, and the update), run under ``no_grad`` so no parameter is differentiated.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..energies import check_energy_output
from .base import energy_grad

__all__ = ["func_energy_grad", "descent_step", "run_descent", "CompiledFlow"]

log = logging.getLogger(__name__)

#: energy -> input signatures its compiled steps have already seen (compile time is counted once)
_SEEN: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()
#: sampler -> {signature: captured CUDA graph}; kept off the sampler so that it still pickles
_GRAPHS: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
_MAX_GRAPHS = 4


def func_energy_grad(energy: nn.Module, x: Tensor) -> Tensor:
    """``grad_x E(x)`` by ``torch.func.grad``: one traceable graph, no parameter gradient."""
    return torch.func.grad(lambda y: energy(y).sum())(x)


def descent_step(energy: nn.Module, x: Tensor, noise: Tensor | None, step_size: float, noise_std: float,
                 grad_clip: float | None, clamp: tuple[float, float] | None,
                 grad_fn: Callable[[nn.Module, Tensor], Tensor] = func_energy_grad) -> tuple[Tensor, Tensor]:
    """One GradientDescent / Langevin update, in the eager loop's order: ``(x_next, grad)``."""
    g = grad_fn(energy, x)
    if grad_clip is not None:
        g = g.clamp(-grad_clip, grad_clip)
    x = x - step_size * g
    if noise is not None:
        x = x + noise_std * noise
    if clamp is not None:
        x = x.clamp(*clamp)
    return x, g


def flow_step(energy: nn.Module, x: Tensor, grad_clip: float | None) -> Tensor:
    """The ODE's right-hand side ``-grad E(x)`` (clipped like ``GradientFlow``)."""
    g = func_energy_grad(energy, x)
    return -(g if grad_clip is None else g.clamp(-grad_clip, grad_clip))


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # one wrapper per step function: torch.compile caches graphs per code object and guards
    # (energy structure, shapes, dtypes, constants), so samplers share what they can
    return torch.compile(fn, fullgraph=True)


def _first_call(sampler: Any, fn: Callable, energy: nn.Module, x: Tensor, *args: Any) -> Any:
    """``torch.compile(fn)(energy, x, *args)`` for the first step of a call, timed if it compiles.

    torch.compile compiles on the first call per input signature (shapes, dtypes, constants,
    energy mode, autocast): that call's wall time is added to ``sampler.compile_time`` and
    logged. The energy's output shape is checked eagerly here, since a compiled graph cannot
    raise the library's clear error.
    """
    signature = (fn.__name__, tuple(x.shape), x.dtype, x.device, energy.training,
                 torch.is_autocast_enabled(x.device.type), *(a for a in args if not isinstance(a, Tensor)),
                 tuple(a is None for a in args))
    seen = _SEEN.setdefault(energy, set())
    if signature in seen:
        return _compiled(fn)(energy, x, *args)
    check_energy_output(energy(x), x)
    start = time.perf_counter()
    try:
        out = _compiled(fn)(energy, x, *args)
    except torch._dynamo.exc.Unsupported as err:
        raise RuntimeError(
            f"{type(sampler).__name__}(compile=True) could not compile {type(energy).__name__} into one graph "
            f"(torch.compile's reason follows); use compile=False for this energy.\n{err}"
        ) from err
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - start
    seen.add(signature)
    sampler.compile_time += seconds
    log.info("%s: compiled %s for input %s %s on %s in %.1f s", type(sampler).__name__, fn.__name__,
             tuple(x.shape), x.dtype, x.device, seconds)
    return out


def run_descent(sampler: Any, energy: nn.Module, x0: Tensor, generator: torch.Generator | None,
                return_trajectory: bool, callback: Any) -> tuple[Tensor, Tensor | None]:
    """The GradientDescent / Langevin loop with ``compile`` and/or ``cuda_graph``.

    ``cuda_graph`` replays the captured K-step loop; calls that want a trajectory or a callback
    see every step, so they run the per-step loop (compiled if ``compile``) instead.
    """
    if sampler.cuda_graph and not return_trajectory and callback is None:
        return _run_graphed(sampler, energy, x0, generator), None
    noise_std = sampler._noise_std()
    consts = (sampler.step_size, noise_std, sampler.grad_clip, sampler.clamp)
    step = _compiled(descent_step) if sampler.compile else functools.partial(descent_step, grad_fn=energy_grad)
    x = x0
    states = [x] if return_trajectory else None
    with torch.no_grad():
        for k in range(sampler.steps):
            noise = (torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                     if noise_std > 0 else None)
            if k == 0 and sampler.compile:
                x, g = _first_call(sampler, descent_step, energy, x, noise, *consts)
            else:
                x, g = step(energy, x, noise, *consts)
            if states is not None:
                states.append(x)
            if callback is not None:
                callback({"step": k + 1, "x": x, "grad": g})
    sampler.last_nfe = sampler.steps
    return x, (torch.stack(states) if states is not None else None)


def _run_graphed(sampler: Any, energy: nn.Module, x0: Tensor, generator: torch.Generator | None) -> Tensor:
    """Replay the K-step loop captured in a CUDA graph (captured on first use per signature).

    A graph replays fixed kernels on fixed memory: the parameters and buffers must stay where
    they were at capture (optimisers update them in place, so they do); if any moves, or the
    input's shape, dtype, the energy's mode, autocast or the generator change, a new graph is
    captured. Random numbers come from ``generator`` registered with the graph, so every replay
    draws fresh noise from it (not the same numbers as the eager loop, which draws differently).
    """
    name = type(sampler).__name__
    if x0.device.type != "cuda":
        raise RuntimeError(f"{name}: cuda_graph=True captures the loop in a CUDA graph and needs x0 on a CUDA "
                           f"device, got x0 on {x0.device}; on the CPU use compile=True instead")
    noisy = sampler._noise_std() > 0
    tensors = itertools.chain(energy.parameters(), energy.buffers())
    key = (id(energy), tuple(x0.shape), x0.dtype, x0.device, energy.training,
           torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
           id(generator) if noisy else None, tuple(t.data_ptr() for t in tensors))
    graphs = _GRAPHS.setdefault(sampler, {})
    if key not in graphs or graphs[key][-1]() is not energy:  # (an id can be reused after collection)
        if len(graphs) >= _MAX_GRAPHS:
            graphs.pop(next(iter(graphs)))
        graphs[key] = _capture(sampler, energy, x0, generator if noisy else None)
    static_in, graph, static_out = graphs[key][:3]
    static_in.copy_(x0)
    graph.replay()
    sampler.last_nfe = sampler.steps
    return static_out.clone()


def _capture(sampler: Any, energy: nn.Module, x0: Tensor, generator: torch.Generator | None) -> tuple:
    noise_std = sampler._noise_std()
    consts = (sampler.step_size, noise_std, sampler.grad_clip, sampler.clamp)
    step = _compiled(descent_step) if sampler.compile else functools.partial(descent_step, grad_fn=energy_grad)
    if sampler.compile:  # compile before capturing (and count its time there)
        _first_call(sampler, descent_step, energy, x0, torch.zeros_like(x0) if noise_std > 0 else None, *consts)
    start = time.perf_counter()
    static_in = x0.clone()
    # warm up on a side stream before capturing, as torch.cuda.graph requires (and compile here,
    # never during capture); zero noise of the right shape, so no random number is consumed
    side = torch.cuda.Stream(device=x0.device)
    side.wait_stream(torch.cuda.current_stream(x0.device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            step(energy, static_in, torch.zeros_like(static_in) if noise_std > 0 else None, *consts)
    torch.cuda.current_stream(x0.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph), torch.no_grad():
        x = static_in
        for _ in range(sampler.steps):
            noise = (torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                     if noise_std > 0 else None)
            x, _ = step(energy, x, noise, *consts)
    torch.cuda.synchronize(x0.device)
    seconds = time.perf_counter() - start
    sampler.compile_time += seconds
    log.info("%s: captured %d steps for input %s in a CUDA graph in %.1f s", type(sampler).__name__,
             sampler.steps, tuple(x0.shape), seconds)
    # the generator is kept alive with the graph that registered it
    return static_in, graph, x, generator, weakref.ref(energy)


class CompiledFlow(nn.Module):
    """``f(t, x) = -grad E(x)`` through the compiled ``flow_step``, counting evaluations."""

    def __init__(self, sampler: Any, energy: nn.Module, grad_clip: float | None = None) -> None:
        super().__init__()
        self.sampler, self.energy, self.grad_clip = sampler, energy, grad_clip
        self.nfe = 0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        if self.nfe == 1:
            return _first_call(self.sampler, flow_step, self.energy, x, self.grad_clip)
        return _compiled(flow_step)(self.energy, x, self.grad_clip)
