"""Runners of a sampler's dynamics: eager, compiled (``torch.compile``) and CUDA graph.

They run any ``Steps`` (a discrete update) or ``Flow`` (a vector field) handed to them: they know
no sampler class, read no sampler attribute and write nothing into a sampler; each call returns a
``Run`` that says what it did (evaluations, compile seconds), and the sampler records it.

All paths compute the same update in the same order from the same random numbers (drawn outside
the update, by ``Steps.draw``), so compiled results equal eager ones to float tolerance.
``torch.autograd.grad`` breaks a torch.compile graph, so the compiled step takes the input
gradient with ``torch.func.grad``, which traces into one graph (forward, backward with respect to
``x`` only, and the update), run under ``no_grad`` so no parameter is differentiated.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..energies import check_energy_output
from .base import Flow, GradFn, State, StepCallback, Steps, energy_and_grad, energy_grad

__all__ = ["Run", "run_steps", "VectorField", "func_energy_grad"]

log = logging.getLogger(__name__)

#: energy -> signatures its compiled functions have already seen (compile time is counted once)
_SEEN: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()
#: energy -> {key: captured CUDA graph}; kept off every sampler, so samplers still pickle
_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_MAX_GRAPHS = 4


@dataclass
class Run:
    """What one call of the dynamics did: the final state, the trajectory, evaluations, compile seconds."""

    state: State
    trajectory: Tensor | None
    nfe: int
    compile_time: float = 0.0


def func_energy_grad(energy: nn.Module, x: Tensor) -> Tensor:
    """``grad_x E(x)`` by ``torch.func.grad``: one traceable graph, no parameter gradient."""
    return torch.func.grad(lambda y: energy(y).sum())(x)


def _sum_and_values(energy: nn.Module, y: Tensor) -> tuple[Tensor, Tensor]:
    e = energy(y)
    return e.sum(), e


def _func(energy: nn.Module) -> GradFn:
    """The ``GradFn`` of compiled steps: ``torch.func`` transforms, which trace into one graph."""

    def grad(x: Tensor, with_energy: bool = False) -> Any:
        if with_energy:  # (grad, E) in the same pass
            return torch.func.grad(functools.partial(_sum_and_values, energy), has_aux=True)(x)
        return func_energy_grad(energy, x)

    return grad


def _autograd(energy: nn.Module, create_graph: bool) -> GradFn:
    """The ``GradFn`` of eager steps: ``torch.autograd.grad`` on the input."""

    def grad(x: Tensor, with_energy: bool = False) -> Any:
        if with_energy:
            e, g = energy_and_grad(energy, x, create_graph=create_graph)
            return g, e
        return energy_grad(energy, x, create_graph=create_graph)

    return grad


def _step(update: Callable, energy: nn.Module, state: State, noise: tuple, k: Tensor, constants: tuple) -> Any:
    return update(_func(energy), state, noise, k, *constants)


def _field(field: Callable, energy: nn.Module, x: Tensor, constants: tuple) -> Tensor:
    return field(_func(energy), x, *constants)


def _variant(constants: tuple, *more: Any) -> tuple:
    """A hashable key of one sampler configuration (its constants, the chunk length)."""
    key = (constants, *more)
    try:
        hash(key)
    except TypeError:
        return (repr(key),)
    return key


@functools.cache
def _compiled(template: Callable, target: Callable, variant: tuple = ()) -> Callable:
    """``torch.compile`` of ``template`` for one update or field ``target`` and one configuration.

    torch.compile keeps its graphs (and its recompile limit, 8) per code object; a copy of the
    template's code per target and configuration (``variant``: constants, chunk length) gives
    every sampler configuration its own cache, as a hand-written compiled step per sampler
    would have, so only shapes, dtypes and modes count towards the limit.
    """
    name = f"{template.__name__}_{getattr(target, '__name__', 'fn')}"
    code = template.__code__.replace(co_name=name, co_qualname=name)
    return torch.compile(types.FunctionType(code, template.__globals__, name), fullgraph=True)


def _first_call(owner: str, template: Callable, target: Callable, energy: nn.Module, x: Tensor,
                *args: Any, variant: tuple = ()) -> tuple[Any, float]:
    """The compiled ``template(target, energy, x-or-state, ...)``; seconds spent compiling, if it compiled.

    torch.compile compiles on the first call per input signature (shapes, dtypes, constants,
    energy mode, autocast). The energy's output shape is checked eagerly here, since a compiled
    graph cannot raise the library's clear error.
    """
    fn = _compiled(template, target, variant)
    tensors = [t for t in (x if isinstance(x, tuple) else (x,))]
    position = tensors[0]
    signature = (template, target, variant, tuple((tuple(t.shape), t.dtype, t.stride()) for t in tensors),
                 position.device, energy.training, torch.is_autocast_enabled(position.device.type),
                 repr([a if not isinstance(a, (Tensor, tuple)) else _shapes(a) for a in args]))
    seen = _SEEN.setdefault(energy, set())
    if signature in seen:
        return fn(target, energy, x, *args), 0.0
    check_energy_output(energy(position), position)
    start = time.perf_counter()
    try:
        out = fn(target, energy, x, *args)
    except torch._dynamo.exc.Unsupported as err:
        raise RuntimeError(
            f"{owner}(compile=True) could not compile {type(energy).__name__} into one graph "
            f"(torch.compile's reason follows); use compile=False for this energy.\n{err}"
        ) from err
    if position.device.type == "cuda":
        torch.cuda.synchronize(position.device)
    seconds = time.perf_counter() - start
    seen.add(signature)
    log.info("%s: compiled %s for input %s %s on %s in %.1f s", owner, getattr(target, "__name__", target),
             tuple(position.shape), position.dtype, position.device, seconds)
    return out, seconds


def _shapes(a: Any) -> Any:
    if isinstance(a, Tensor):
        return (tuple(a.shape), a.dtype)
    if isinstance(a, tuple):
        return tuple(_shapes(b) for b in a)
    return a


def _draw(steps: Steps, x: Tensor, generator: torch.Generator | None) -> tuple:
    return () if steps.draw is None else steps.draw(x, generator)


# ---------------------------------------------------------------------------------------------- steps
#: energy-gradient evaluations unrolled into one compiled call (``compile=True``): enough to amortise
#: the per-call cost (guards, argument handling, Python) over several steps, few enough that the
#: unrolled graph compiles in seconds
CHUNK_EVALUATIONS = 10


def chunk_length(steps: Steps) -> int:
    """Steps per compiled call: ``CHUNK_EVALUATIONS`` gradient evaluations' worth, at least 1, at most K."""
    return max(1, min(steps.num_steps, CHUNK_EVALUATIONS // steps.evaluations))


def _chunk(update: Callable, energy: nn.Module, state: State, noises: tuple, ks: Tensor, constants: tuple) -> State:
    """``len(noises)`` updates unrolled in one graph; only the final state leaves it (no trajectory)."""
    grad = _func(energy)
    for i, noise in enumerate(noises):
        state, _ = update(grad, state, noise, ks[i], *constants)
    return state


def _frozen(energy: Callable) -> contextlib.AbstractContextManager:
    """Parameters not requiring grad for the duration (restored after): autograd then records no
    parameter edge at all, which is what the careful hand-written loop does.

    The energy may be any callable: a module's parameters, a bound method's module's (e.g. a
    LightningModule's ``self.energy``), or none for a plain function.
    """
    owner = energy if isinstance(energy, nn.Module) else getattr(energy, "__self__", None)
    params = [p for p in owner.parameters() if p.requires_grad] if isinstance(owner, nn.Module) else []

    @contextlib.contextmanager
    def frozen():
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    return frozen()


def _fast_autograd(energy: nn.Module) -> GradFn:
    """The eager ``GradFn`` of the plain loop: grad already enabled, the energy's output shape
    checked on the first evaluation only (eagerly it cannot change between steps)."""
    unchecked = True

    def grad(x: Tensor, with_energy: bool = False) -> Any:
        nonlocal unchecked
        x = x.detach().requires_grad_(True)
        e = energy(x)
        if unchecked:
            check_energy_output(e, x)
            unchecked = False
        (g,) = torch.autograd.grad(e.sum(), x)
        return (g, e.detach()) if with_energy else g

    return grad


def run_steps(
    steps: Steps,
    energy: nn.Module,
    state: State,
    *,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    callback: StepCallback | None = None,
    differentiable_steps: int = 0,
    compile: bool = False,
    cuda_graph: bool = False,
    owner: str = "sampler",
) -> Run:
    """Run ``steps.num_steps`` updates from ``state``: eagerly, compiled, or replayed from a CUDA graph.

    ``compile`` runs ``chunk_length(steps)`` updates per compiled call (the random numbers of a
    chunk are drawn before it, in the eager order, so results equal eager); the last
    ``K mod chunk`` steps run through the compiled single step. ``cuda_graph`` replays the
    captured K-step loop (compiled steps if ``compile``). Calls that want a trajectory or a
    callback see every step, so they run step by step instead. The last ``differentiable_steps``
    eager steps keep their autograd graph (the unrolled generator).
    """
    if cuda_graph and not return_trajectory and callback is None:
        return _run_graphed(steps, energy, state, generator, compile, owner)
    if compile and not return_trajectory and callback is None:
        return _run_chunked(steps, energy, state, generator, owner)
    if not (compile or differentiable_steps or return_trajectory or callback is not None):
        return _run_eager(steps, energy, state, generator)
    n = steps.num_steps
    ks = torch.arange(n, device=state[0].device)
    positions = [state[0]] if return_trajectory else None
    first_unrolled = n - differentiable_steps
    compile_time = 0.0
    eager = (_autograd(energy, False), _autograd(energy, True))
    with torch.no_grad() if (compile or cuda_graph) else contextlib.nullcontext():
        for k in range(n):
            noise = _draw(steps, state[0], generator)
            if compile and k == 0:
                (state, extras), seconds = _first_call(owner, _step, steps.update, energy, state, noise, ks[k],
                                                       steps.constants, variant=_variant(steps.constants))
                compile_time += seconds
            elif compile:
                state, extras = _compiled(_step, steps.update, _variant(steps.constants))(
                    steps.update, energy, state, noise, ks[k], steps.constants)
            else:
                state, extras = steps.update(eager[k >= first_unrolled], state, noise, ks[k], *steps.constants)
            if positions is not None:
                positions.append(state[0])
            if callback is not None:
                callback({"step": k + 1, "x": state[0], **extras})
    trajectory = torch.stack(positions) if positions is not None else None
    return Run(state, trajectory, n * steps.evaluations, compile_time)


def _run_eager(steps: Steps, energy: nn.Module, state: State, generator: torch.Generator | None) -> Run:
    """The plain loop: parameters frozen, ``torch.autograd.grad`` on the input, nothing else per step."""
    n = steps.num_steps
    ks = torch.arange(n, device=state[0].device).unbind()
    grad = _fast_autograd(energy)
    update, constants, draw = steps.update, steps.constants, steps.draw
    with torch.enable_grad(), _frozen(energy):
        for k in range(n):
            noise = () if draw is None else draw(state[0], generator)
            state = update(grad, state, noise, ks[k], *constants)[0]
    return Run(state, None, n * steps.evaluations, 0.0)


def _run_chunked(steps: Steps, energy: nn.Module, state: State, generator: torch.Generator | None,
                 owner: str) -> Run:
    """``compile=True`` without trajectory or callback: ``chunk_length`` steps per compiled call."""
    n, c = steps.num_steps, chunk_length(steps)
    device = state[0].device
    ks = torch.arange(n, device=device)
    full, rest = divmod(n, c)
    chunk_ks = ks[: full * c].view(full, c).unbind() if full else ()
    compile_time = 0.0
    chunk_variant, step_variant = _variant(steps.constants, c), _variant(steps.constants)
    chunk, step = _compiled(_chunk, steps.update, chunk_variant), _compiled(_step, steps.update, step_variant)
    update, constants = steps.update, steps.constants
    with torch.no_grad():
        for j in range(full):
            noises = tuple(_draw(steps, state[0], generator) for _ in range(c))
            if j == 0:
                state, seconds = _first_call(owner, _chunk, update, energy, state, noises, chunk_ks[j], constants,
                                             variant=chunk_variant)
                compile_time += seconds
            else:
                state = chunk(update, energy, state, noises, chunk_ks[j], constants)
        for k in range(full * c, n):
            noise = _draw(steps, state[0], generator)
            if k == full * c:
                (state, _), seconds = _first_call(owner, _step, update, energy, state, noise, ks[k], constants,
                                                  variant=step_variant)
                compile_time += seconds
            else:
                state, _ = step(update, energy, state, noise, ks[k], constants)
    return Run(state, None, n * steps.evaluations, compile_time)


def _run_graphed(steps: Steps, energy: nn.Module, state: State, generator: torch.Generator | None,
                 compile: bool, owner: str) -> Run:
    """Replay the K-step loop captured in a CUDA graph (captured on first use per signature).

    A graph replays fixed kernels on fixed memory: the parameters and buffers must stay where
    they were at capture (optimisers update them in place, so they do); if any moves, or the
    input's shape, dtype, the energy's mode, autocast or the generator change, a new graph is
    captured. Random numbers come from ``generator`` registered with the graph, so every replay
    draws fresh noise from it (not the same numbers as the eager loop, which draws differently).
    """
    x0 = state[0]
    if x0.device.type != "cuda":
        raise RuntimeError(f"{owner}: cuda_graph=True captures the loop in a CUDA graph and needs x0 on a CUDA "
                           f"device, got x0 on {x0.device}; on the CPU use compile=True instead")
    noisy = steps.draw is not None
    tensors = itertools.chain(energy.parameters(), energy.buffers())
    key = (steps.update, steps.constants, steps.num_steps, steps.draw, compile,
           tuple((tuple(t.shape), t.dtype) for t in state), x0.device, energy.training,
           torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
           id(generator) if noisy else None, tuple(t.data_ptr() for t in tensors))
    graphs = _GRAPHS.setdefault(energy, {})
    compile_time = 0.0
    if key not in graphs:
        if len(graphs) >= _MAX_GRAPHS:
            graphs.pop(next(iter(graphs)))
        graphs[key], compile_time = _capture(steps, energy, state, generator if noisy else None, compile, owner)
    static_in, graph, static_out = graphs[key][:3]
    for dst, src in zip(static_in, state, strict=True):
        dst.copy_(src)
    graph.replay()
    return Run(tuple(t.clone() for t in static_out), None, steps.num_steps * steps.evaluations, compile_time)


def _capture(steps: Steps, energy: nn.Module, state: State, generator: torch.Generator | None, compile: bool,
             owner: str) -> tuple[tuple, float]:
    x0 = state[0]
    ks = torch.arange(steps.num_steps, device=x0.device)
    # random numbers of the right shapes from a throwaway stream: warm-up consumes none of the caller's
    spare = torch.Generator(x0.device).manual_seed(0)
    compile_time = 0.0
    if compile:  # compile before capturing (and count its time there), never during capture
        _, compile_time = _first_call(owner, _step, steps.update, energy, state, _draw(steps, x0, spare), ks[0],
                                      steps.constants, variant=_variant(steps.constants))

    def step(st: State, noise: tuple, k: Tensor) -> State:
        if compile:
            return _compiled(_step, steps.update, _variant(steps.constants))(steps.update, energy, st, noise, k,
                                                                             steps.constants)[0]
        return steps.update(_autograd(energy, False), st, noise, k, *steps.constants)[0]

    start = time.perf_counter()
    static_in = tuple(t.clone() for t in state)
    # warm up on a side stream before capturing, as torch.cuda.graph requires
    side = torch.cuda.Stream(device=x0.device)
    side.wait_stream(torch.cuda.current_stream(x0.device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            step(static_in, _draw(steps, x0, spare), ks[0])
    torch.cuda.current_stream(x0.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if generator is not None:
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph), torch.no_grad():
        st = static_in
        for k in range(steps.num_steps):
            st = step(st, _draw(steps, st[0], generator), ks[k])
    torch.cuda.synchronize(x0.device)
    seconds = time.perf_counter() - start
    log.info("%s: captured %d steps for input %s in a CUDA graph in %.1f s", owner, steps.num_steps,
             tuple(x0.shape), seconds)
    # the generator is kept alive with the graph that registered it
    return (static_in, graph, st, generator), compile_time + seconds


# ---------------------------------------------------------------------------------------------- flows
class VectorField(nn.Module):
    """``f(t, x)`` of a ``Flow`` for an ODE solver: eager (optionally with a graph) or compiled; counts calls.

    ``nfe`` counts evaluations and ``compile_time`` the seconds the first compiled evaluation
    spent compiling; the energy is a submodule, so adjoint solvers see its parameters.
    """

    def __init__(self, flow: Flow, energy: nn.Module, *, compile: bool = False, create_graph: bool = False,
                 owner: str = "sampler") -> None:
        super().__init__()
        self.flow, self.energy = flow, energy
        self.use_compile, self.create_graph, self.owner = compile, create_graph, owner
        self.nfe = 0
        self.compile_time = 0.0

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.nfe += 1
        if not self.use_compile:
            return self.flow.field(_autograd(self.energy, self.create_graph), x, *self.flow.constants)
        if self.nfe == 1:
            out, seconds = _first_call(self.owner, _field, self.flow.field, self.energy, x, self.flow.constants,
                                       variant=_variant(self.flow.constants))
            self.compile_time += seconds
            return out
        return _compiled(_field, self.flow.field, _variant(self.flow.constants))(self.flow.field, self.energy, x,
                                                                                 self.flow.constants)
