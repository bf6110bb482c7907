"""Speed paths of the samplers: compile time, CUDA graphs, memory independent of K, bf16, channels_last.

Compiled-equals-eager for every exported sampler is part of the contract (tests/contracts). Nothing
here is timed (speed claims live in ``benchmarks/run.py``). Training under these paths is in
tests/module/test_speed_training.py.
"""

from __future__ import annotations

import copy
import gc
import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import QuadraticEnergy, random_spd
from sampler_helpers import TinyConv, x0
from torch import nn

from lightning_ebm.energies import MLPEnergy
from lightning_ebm.samplers import HMC, MALA, ODE, GradientDescent, Langevin, _backends

_spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).parents[2] / "benchmarks" / "run.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

CL = torch.channels_last
SHAPE = (256, 2)


@pytest.fixture(scope="module", autouse=True)
def _forget_compiled_graphs():
    """Drop torch.compile's caches after this module: their fake tensors would otherwise stay in the
    process and confuse later tests that scan live tensors (``gc.get_objects()``)."""
    yield
    torch._dynamo.reset()
    gc.collect()


@pytest.fixture(scope="module")
def mlp() -> MLPEnergy:
    torch.manual_seed(0)
    return MLPEnergy(dim=2, hidden=32, num_layers=2)


# ---------------------------------------------------------------- compiled == eager
def test_compiled_gradient_descent_is_the_matrix_power():
    """Against the closed form, in float64: x_K = (I - sA)^K z; compile time counted once."""
    A = random_spd(3, seed=5)
    z = x0((40, 3), dtype=torch.float64)
    sampler, energy = GradientDescent(steps=20, step_size=0.1, compile=True), QuadraticEnergy(A)
    x = sampler(energy, z)
    expected = z @ torch.linalg.matrix_power(torch.eye(3, dtype=torch.float64) - 0.1 * A, 20).T
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
    first = sampler.compile_time
    assert first > 0
    torch.testing.assert_close(sampler(energy, z), expected, rtol=1e-12, atol=1e-12)
    assert sampler.compile_time == first  # same signature: nothing compiled, nothing counted
    assert "compile_time" not in repr(sampler) and "compile=True" in repr(sampler)


@pytest.mark.parametrize("make", [
    lambda c: GradientDescent(steps=23, step_size=0.05, grad_clip=0.5, compile=c),
    lambda c: Langevin(steps=23, step_size=0.05, noise_std=0.1, clamp=(-2.0, 2.0), compile=c),
    lambda c: MALA(steps=13, step_size=0.05, adapt_steps=3, compile=c),
    lambda c: HMC(steps=5, step_size=0.05, num_leapfrog=3, compile=c),
], ids=["gd", "langevin", "mala", "hmc"])
def test_compiled_chunks_equal_eager_with_the_same_random_numbers(make, mlp):
    """K not a multiple of the chunk: full compiled chunks, then the rest step by step; same generator,
    same numbers (the noise of a chunk is drawn before it, in the eager order)."""
    start = x0(SHAPE)
    eager, compiled = make(False), make(True)
    steps = compiled.dynamics()
    c = _backends.chunk_length(steps)
    assert c == max(1, min(steps.num_steps, _backends.CHUNK_EVALUATIONS // steps.evaluations))
    ref = eager(mlp, start, generator=torch.Generator().manual_seed(7))
    out = compiled(mlp, start, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert compiled.last_info["nfe"] == eager.last_info["nfe"]
    for key in set(eager.last_info) - {"nfe"}:  # acceptance, adapted step size
        assert compiled.last_info[key] == pytest.approx(eager.last_info[key], abs=1e-6)
    first = compiled.compile_time
    assert 0 < first == compiled.last_info["compile_time"]
    compiled(mlp, start, generator=torch.Generator().manual_seed(7))
    assert compiled.compile_time == first and compiled.last_info["compile_time"] == 0.0


def test_compiled_chunks_do_not_recompile_across_calls_and_steps(mlp):
    """One graph per chunk length: the steps of a call and later calls reuse it (no recompilation)."""
    from torch._dynamo.utils import counters

    sampler, start = Langevin(steps=35, step_size=0.05, noise_std=0.1, compile=True), x0(SHAPE)
    sampler(mlp, start)  # a chunk of 10 and the single step of the rest, compiled once each
    before = counters["stats"]["unique_graphs"]
    for _ in range(2):
        sampler(mlp, start)
    assert counters["stats"]["unique_graphs"] == before


def test_compiled_memory_is_flat_from_k_10_to_200(mlp):
    """The issue's measure: peak bytes of one call at K = 10 and K = 200, eager and compiled."""
    start, cpu = x0((1024, 2)), torch.device("cpu")
    for compile in (False, True):
        for make in (lambda k, c=compile: GradientDescent(steps=k, step_size=0.05, compile=c),
                     lambda k, c=compile: Langevin(steps=k, step_size=0.05, noise_std=0.1, compile=c)):
            peaks = []
            for k in (10, 200):
                sampler = make(k)
                sampler(mlp, start)  # compile outside the measurement
                peaks.append(bench.peak_bytes(lambda s=sampler: s(mlp, start), cpu))
            assert peaks[1] / peaks[0] < 1.05, (compile, peaks)


def test_eager_sampling_freezes_parameters_only_for_the_call(mlp):
    """The eager loop runs with the parameters frozen (as the careful plain loop does) and gives every
    flag back, also a parameter frozen by the user and also when the energy raises."""
    energy = copy.deepcopy(mlp)
    energy.net[0].bias.requires_grad_(False)
    flags = [p.requires_grad for p in energy.parameters()]
    seen = []

    def record(module, args, output):
        seen.append([p.requires_grad for p in energy.parameters()])

    handle = energy.register_forward_hook(record)
    GradientDescent(steps=3, step_size=0.05)(energy, x0(SHAPE))
    assert seen and not any(any(s) for s in seen)
    assert [p.requires_grad for p in energy.parameters()] == flags

    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, x):
            raise RuntimeError("boom")

    boom = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        GradientDescent(steps=3, step_size=0.05)(boom, x0(SHAPE))
    assert boom.w.requires_grad
    handle.remove()
    # any callable energy: a bound method of a module (frozen too), a plain function (nothing to freeze)
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = copy.deepcopy(mlp)

        def energy(self, x):
            seen.append(any(p.requires_grad for p in self.parameters()))
            return self.net(x)

    holder, seen = Holder(), []
    start = x0(SHAPE)
    torch.testing.assert_close(GradientDescent(steps=3, step_size=0.05)(holder.energy, start),
                               GradientDescent(steps=3, step_size=0.05)(mlp, start))
    assert seen == [False] * 3 and all(p.requires_grad for p in holder.parameters())
    x = GradientDescent(steps=3, step_size=0.05)(lambda y: 0.5 * y.pow(2).sum(1), start)
    torch.testing.assert_close(x, start * 0.95**3)
    # the unrolled generator (differentiable_steps) keeps the parameters live: x_K depends on them
    x = GradientDescent(steps=3, step_size=0.05)(energy, x0(SHAPE), differentiable_steps=1)
    assert x.requires_grad


def test_compiled_path_keeps_the_clear_energy_shape_error():
    class Wrong(nn.Module):
        def forward(self, x):
            return (x**2).sum(1, keepdim=True)  # (B, 1) instead of (B,)

    with pytest.raises(ValueError, match=r"shape \(B,\).*\(4, 1\)"):
        GradientDescent(steps=2, step_size=0.1, compile=True)(Wrong(), torch.randn(4, 2))


def test_cuda_graph_refuses_the_cpu_and_flags_must_be_bool():
    with pytest.raises(RuntimeError, match="cuda_graph=True .* needs x0 on a CUDA device, got x0 on cpu"):
        GradientDescent(steps=2, step_size=0.1, cuda_graph=True)(MLPEnergy(dim=2), torch.randn(4, 2))
    with pytest.raises(ValueError, match="compile must be True or False, got 'yes'"):
        Langevin(steps=2, step_size=0.1, noise_std=0.1, compile="yes")
    with pytest.raises(ValueError, match="cuda_graph must be True or False, got 1"):
        GradientDescent(steps=2, step_size=0.1, cuda_graph=1)
    with pytest.raises(ValueError, match="compile must be True or False"):
        ODE(t_end=1.0, compile=None)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("compile", [False, True], ids=["graph", "compiled_graph"])
def test_cuda_graph_equals_eager_on_cuda(compile):
    torch.manual_seed(0)
    energy = MLPEnergy(dim=2, hidden=32).cuda()
    start = torch.randn(512, 2, device="cuda")
    eager = GradientDescent(steps=10, step_size=0.05)(energy, start)
    graphed = GradientDescent(steps=10, step_size=0.05, cuda_graph=True, compile=compile)
    for _ in range(2):  # capture, then replay
        torch.testing.assert_close(graphed(energy, start), eager, rtol=1e-5, atol=1e-6)
    assert graphed.compile_time > 0 and graphed.last_nfe == 10
    with torch.no_grad():  # the parameters move in place (as an optimiser moves them): the graph follows
        energy.net[0].weight.mul_(0.5)
    torch.testing.assert_close(graphed(energy, start), GradientDescent(steps=10, step_size=0.05)(energy, start),
                               rtol=1e-5, atol=1e-6)
    # bf16 autocast: the energy runs in bf16, the state stays float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = graphed(energy, start)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, graphed(energy, start), rtol=0, atol=2e-2)


@needs_cuda
def test_cuda_graph_langevin_draws_from_the_generator():
    torch.manual_seed(0)
    energy = MLPEnergy(dim=2, hidden=32).cuda()
    start = torch.randn(4096, 2, device="cuda")
    eager = GradientDescent(steps=10, step_size=0.05)(energy, start)
    lang = Langevin(steps=10, step_size=0.05, noise_std=0.1, cuda_graph=True)
    a = lang(energy, start, generator=torch.Generator("cuda").manual_seed(3))
    b = lang(energy, start, generator=torch.Generator("cuda").manual_seed(3))
    c = lang(energy, start, generator=torch.Generator("cuda").manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    # the noise adds variance 10 * 0.1**2 around the deterministic path (to first order)
    assert abs((a - eager).var().item() - 0.1) < 0.02


@needs_cuda
def test_cuda_graph_memory_does_not_grow_with_steps():
    energy = MLPEnergy(dim=64, hidden=256).cuda()
    start = torch.randn(1024, 64, device="cuda")
    peaks = []
    for k in (10, 60):  # the first call captures: the graph's memory pool is filled then
        sampler = GradientDescent(steps=k, step_size=0.05, cuda_graph=True)
        peaks.append(bench.peak_bytes(lambda sampler=sampler: sampler(energy, start), torch.device("cuda")))
    assert peaks[1] / peaks[0] < 1.05, peaks


# ---------------------------------------------------------------- memory
def test_peak_memory_measurement_sees_torch_allocations():
    """The benchmark's CPU peak (profiler allocation events) against allocations of known size."""

    def allocate():
        a = torch.empty(1_000_000)  # 4 MB
        b = torch.empty(500_000)  # 2 MB: peak 6 MB
        del a
        c = torch.empty(250_000)  # 3 MB live
        return b, c

    assert bench.peak_bytes(allocate, torch.device("cpu")) == 6_000_000


def test_memory_measurement_sees_growth_with_steps(mlp):
    """The control: keeping every state (the trajectory) does grow with K, and the measurement shows it."""
    start, cpu = x0(), torch.device("cpu")
    flat = bench.peak_bytes(lambda: GradientDescent(steps=60, step_size=0.05)(mlp, start), cpu)
    grown = bench.peak_bytes(lambda: GradientDescent(steps=60, step_size=0.05)(mlp, start, return_trajectory=True), cpu)
    assert grown > flat + 50 * start.numel() * 4


# ---------------------------------------------------------------- bf16 autocast
class LinearQuadratic(nn.Module):
    """``E(x) = 0.5 |W x|^2`` with ``W = I``: autocast runs the matmul in bf16, ``grad E = x``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2, bias=False)
        nn.init.eye_(self.lin.weight)
        self.seen_dtype = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if not torch.compiler.is_compiling():
            self.seen_dtype = h.dtype
        return 0.5 * h.float().pow(2).sum(1)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_autocast_bf16_keeps_the_update_in_float32(compile):
    """Steps of 1e-3 from x = 1: float32 state reaches (1 - s)^K; a bf16 state would stay at 1."""
    energy, s, k = LinearQuadratic(), 1e-3, 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = GradientDescent(steps=k, step_size=s, compile=compile)(energy, torch.ones(8, 2))
    assert x.dtype == torch.float32
    assert energy.seen_dtype == torch.bfloat16  # the energy did run in bf16
    # the gradient is x rounded to bf16 (relative error <= 2^-9), the update exact in float32
    assert abs(x - (1 - s) ** k).max() < k * s * 2**-8
    assert x.max() < 1 - k * s / 2


# ---------------------------------------------------------------- channels_last
@pytest.mark.parametrize("make", [lambda: GradientDescent(steps=4, step_size=0.1),
                                  lambda: Langevin(steps=4, step_size=0.1, noise_std=0.05),
                                  lambda: GradientDescent(steps=4, step_size=0.1, compile=True)],
                         ids=["gd", "langevin", "gd_compiled"])
def test_channels_last_gives_the_same_samples_and_keeps_the_format(make):
    torch.manual_seed(0)
    energy = TinyConv()
    energy_cl = copy.deepcopy(energy).to(memory_format=CL)
    assert energy_cl.net[0].weight.is_contiguous(memory_format=CL)
    start = x0((4, 3, 8, 8))
    ref = make()(energy, start, generator=torch.Generator().manual_seed(2))
    out = make()(energy_cl, start.contiguous(memory_format=CL), generator=torch.Generator().manual_seed(2))
    assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gpu_script_skips_cleanly_without_cuda(tmp_path):
    """benchmarks/gpu.py, the one prepared GPU check: on a machine without CUDA it says so and exits 0."""
    import subprocess
    import sys

    env = {**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, str(Path(__file__).parents[2] / "benchmarks" / "gpu.py"), "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA device: nothing measured" in result.stdout
    assert not list(tmp_path.iterdir())  # no report with invented figures


def test_speed_benchmark_train_section_runs_on_every_shipped_recipe(monkeypatch):
    """benchmarks/speed.py's train section on the toy2d, digits and digits28 configs as shipped (two
    steps each, untimed claims): its hand-written step must follow whatever latent and clamp a recipe
    uses (it once read a Uniform's low/high and crashed on any other latent)."""
    spec = importlib.util.spec_from_file_location("bench_speed", Path(__file__).parents[2] / "benchmarks" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    monkeypatch.setattr(speed, "torchebm_cd", lambda *args, **kwargs: None)  # the peer (when installed): not here
    args = speed.parse_args(["--only", "train", "--train-steps", "2", "--train-rounds", "1", "--no-compile"])
    run = speed.Speed(args)
    run.train()
    rows = run.rows["train"]
    assert [r[0].split()[0] for r in rows] == ["toy2d.yaml"] * 2 + ["digits.yaml"] * 2 + ["digits28.yaml"] * 2
    assert all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows), rows
