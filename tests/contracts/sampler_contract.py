"""The sampler contract as a reusable base: subclass ``SamplerContract`` and give it a ``case`` fixture.

Every exported sampler runs it (``test_sampler_contract.py``), eagerly and compiled; a sampler
written only in a test runs it too (``tests/samplers/test_new_sampler.py``). A ``Case`` says how
to build the sampler at a given length and what its closed form on a quadratic energy is.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import QuadraticEnergy, random_spd

import lightning_ebm.samplers as samplers_module
from lightning_ebm.energies import MLPEnergy
from lightning_ebm.samplers import Sampler

_spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).parents[2] / "benchmarks" / "run.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

#: every test runs on this energy and input shape, so a compiled variant compiles once per dtype
SHAPE = (256, 2)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def exported_samplers(module=samplers_module) -> list[str]:
    """Names in ``module.__all__`` that are concrete ``Sampler`` subclasses (the base excluded)."""
    names = []
    for name in module.__all__:
        obj = getattr(module, name)
        if isinstance(obj, type) and issubclass(obj, Sampler) and obj is not Sampler:
            names.append(name)
    return sorted(names)


@dataclass
class Case:
    """How to build one sampler configuration and check it against a closed form.

    ``make(length, compile)``: the sampler with ``length`` (>= 1) times its base number of steps
    (or integration time). ``closed_form(compile)``: asserts the sampler against an analytic result
    on a quadratic energy. ``noisy``: it draws random numbers from ``generator``.
    """

    make: Callable[[int, bool], Sampler]
    closed_form: Callable[[bool], None]
    noisy: bool = False
    compile: bool = False
    #: noise levels of the energy the sampler needs (``energies``' protocol); ``None``: any energy
    num_levels: int | None = None

    def build(self, length: int = 1) -> Sampler:
        return self.make(length, self.compile)

    def eager_twin(self, length: int = 1) -> Sampler:
        return self.make(length, False)


def start(seed: int = 0, dtype: torch.dtype = torch.float32, shape: tuple[int, ...] = SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class SamplerContract:
    """The tests every sampler passes. Subclasses provide the ``case`` fixture (a ``Case``)."""

    @pytest.fixture
    def mlp(self, case) -> MLPEnergy:
        torch.manual_seed(0)
        energy = MLPEnergy(dim=2, hidden=32, num_layers=2, num_levels=case.num_levels)
        if energy.level_embedding is not None:  # distinct levels, so a sampler that mixes them up would show
            torch.nn.init.normal_(energy.level_embedding.weight, std=0.5)
        return energy

    def test_shape_dtype_and_detached(self, case, mlp):
        dtypes = [torch.float32] if case.compile else [torch.float32, torch.float64]
        for dtype in dtypes:
            energy = mlp.to(dtype)
            x0 = start(dtype=dtype)
            x = case.build()(energy, x0, generator=gen(0))
            assert x.shape == x0.shape and x.dtype == dtype and x.device == x0.device
            assert not x.requires_grad and x.grad_fn is None
            assert not torch.equal(x, x0)  # it moved
        mlp.float()

    def test_no_parameter_gradients(self, case, mlp):
        x = case.build()(mlp, start(), generator=gen(0))
        assert all(p.grad is None for p in mlp.parameters())
        assert x.grad_fn is None

    def test_memory_does_not_grow_with_steps(self, case, mlp):
        x0, peaks = start(), []
        # from 5x the base length on, every sampler runs full compiled chunks (a chunk holds its steps'
        # random numbers, drawn before it: memory grows up to the chunk, then stays flat)
        for length in (5, 30):
            sampler = case.build(length)
            sampler(mlp, x0, generator=gen(0))  # warm-up (and compile) outside the measurement
            peaks.append(bench.peak_bytes(lambda s=sampler: s(mlp, x0, generator=gen(0)), torch.device("cpu")))
        assert peaks[0] > x0.numel() * 4  # it saw the activations
        # 6x the steps: a graph kept across steps would add at least one state per step
        assert peaks[1] / peaks[0] < 1.05, peaks

    def test_works_under_no_grad_and_refuses_inference_mode(self, case, mlp):
        x0 = start()
        reference = case.build()(mlp, x0, generator=gen(0))
        with torch.no_grad():
            x = case.build()(mlp, x0, generator=gen(0))
        torch.testing.assert_close(x, reference)
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode=False"):
            case.build()(mlp, x0)
        with torch.inference_mode():
            x_inf = start()  # an inference tensor made earlier is accepted outside
        assert case.build()(mlp, x_inf, generator=gen(0)).shape == SHAPE

    def test_generator_reproducibility(self, case, mlp):
        x0, sampler = start(), case.build()
        a = sampler(mlp, x0, generator=gen(3))
        b = sampler(mlp, x0, generator=gen(3))
        c = sampler(mlp, x0, generator=gen(4))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert (not torch.allclose(a, c)) == case.noisy  # only noise depends on the stream

    def test_last_info_reports_the_call(self, case, mlp):
        sampler = case.build()
        assert sampler.last_nfe == 0 and sampler.last_info == {}
        sampler(mlp, start(), generator=gen(0))
        info = sampler.last_info
        assert all(isinstance(v, float) for v in info.values()), info
        assert info["nfe"] == float(sampler.last_nfe) > 0
        assert ("compile_time" in info) == case.compile
        if case.compile:
            assert 0.0 <= info["compile_time"] <= sampler.compile_time

    def test_trajectory_and_callback(self, case, mlp):
        x0, seen, sampler = start(), [], case.build()
        x, traj = sampler(mlp, x0, generator=gen(1), return_trajectory=True,
                          callback=lambda info: seen.append((info["step"], info["x"])))
        assert traj.shape[1:] == SHAPE and traj.shape[0] >= 2 and not traj.requires_grad
        torch.testing.assert_close(traj[0], x0)
        torch.testing.assert_close(traj[-1], x)
        assert [s for s, _ in seen] == list(range(1, len(seen) + 1)) and len(seen) == traj.shape[0] - 1
        torch.testing.assert_close(torch.stack([s for _, s in seen]), traj[1:])
        assert sampler.last_nfe >= len(seen)

    def test_compiled_equals_eager(self, case, mlp):
        """The speed path computes the eager update: same result, trajectory, callback states, count."""
        if not case.compile:
            pytest.skip("eager variant: it is the reference")
        x0, runs = start(), []
        for sampler in (case.eager_twin(), case.build()):
            seen = []
            x, traj = sampler(mlp, x0, generator=gen(1), return_trajectory=True,
                              callback=lambda info, seen=seen: seen.append(info["x"]))
            runs.append((x, traj, torch.stack(seen), sampler.last_nfe))
        (x_e, traj_e, seen_e, nfe_e), (x_c, traj_c, seen_c, nfe_c) = runs
        torch.testing.assert_close(x_c, x_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(traj_c, traj_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(seen_c, seen_e, rtol=1e-5, atol=1e-6)
        assert nfe_c == nfe_e
        # and the plain call (no trajectory, no callback) too
        torch.testing.assert_close(case.build()(mlp, x0, generator=gen(1)), x_e, rtol=1e-5, atol=1e-6)

    @needs_cuda
    def test_follows_the_cuda_device_and_cuda_graph_equals_eager(self, case, mlp):
        energy, x0 = mlp.to("cuda"), start().to("cuda")
        try:
            x = case.build()(energy, x0, generator=torch.Generator("cuda").manual_seed(0))
            assert x.device == x0.device and x.dtype == x0.dtype
            if "cuda_graph" in inspect.signature(type(case.build())).parameters and not case.noisy:
                twin = case.eager_twin()
                eager = twin(energy, x0)
                graphed = case.build()
                graphed.cuda_graph = True
                for _ in range(2):  # capture, then replay
                    torch.testing.assert_close(graphed(energy, x0), eager, rtol=1e-5, atol=1e-6)
                assert graphed.last_nfe == twin.last_nfe and "compile_time" in graphed.last_info
        finally:
            mlp.to("cpu")

    def test_bad_energy_output_is_named(self, case):
        class Wrong(torch.nn.Module):
            num_levels = case.num_levels

            def forward(self, x, t=None):
                return (x**2).sum(1, keepdim=True)  # (B, 1) instead of (B,)

        with pytest.raises(ValueError, match=r"shape \(B,\).*\(4, 1\)"):
            case.build()(Wrong(), torch.randn(4, 2), generator=gen(0))

    def test_rejects_non_float_start(self, case, mlp):
        with pytest.raises(TypeError, match="floating-point"):
            case.build()(mlp, torch.ones(3, 2, dtype=torch.long))

    def test_closed_form_on_a_quadratic_energy(self, case):
        case.closed_form(case.compile)


# ---------------------------------------------------------------------------------------------- closed forms
def check_matrix_power(sampler: Sampler, step_matrix: Callable[[torch.Tensor], torch.Tensor], num_steps: int,
                       dim: int = 3) -> None:
    """``x_K = M^K z`` on ``E = 0.5 x^T A x`` for a linear step ``x <- M x`` (float64, to 1e-12)."""
    a = random_spd(dim, seed=dim)
    z = start(shape=(40, dim), dtype=torch.float64)
    x = sampler(QuadraticEnergy(a), z)
    expected = z @ torch.linalg.matrix_power(step_matrix(a), num_steps).T
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
