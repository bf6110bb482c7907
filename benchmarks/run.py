"""Speed and memory of lightning_ebm's samplers against a plain hand-written PyTorch loop.

Every figure is a ratio against the plain loop below, run in the same process, in interleaved
rounds (the order rotates every round, so machine noise hits all contenders alike), after
warm-up; a ratio is the median over rounds of ``time(plain) / time(contender)`` (> 1: faster than
the plain loop). Sections:

* ``sampler``: GradientDescent and Langevin, eager and ``compile=True`` (on CUDA also
  ``cuda_graph=True`` with and without compile; torchebm's LangevinDynamics when torchebm is
  installed), on a 2-D MLP energy and a 32x32 conv energy;
* ``ode``: the ODE sampler (euler, rk4) at the same number of energy-gradient evaluations;
* ``train``: full training steps per second (EBM under a Lightning Trainer vs a plain step);
* ``memory``: peak memory of one sampling call at K = 10 and K = 200 steps.

Usage::

    python benchmarks/run.py                           # everything, CPU (3-4 minutes on 2 cores)
    python benchmarks/run.py --threads 1 --only sampler,memory
    python benchmarks/run.py --device cuda --conv-width 64 [--bf16]

On a machine shared with other jobs, pass ``--threads 1``: threads competing for busy cores
slow every contender down severalfold and drown the ratios in noise.

The table is printed and written to ``benchmarks/results/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from datetime import datetime
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch import nn

import lightning_ebm
from lightning_ebm import EBM
from lightning_ebm.energies import ConvEnergy, MLPEnergy
from lightning_ebm.latents import Gaussian
from lightning_ebm.samplers import ODE, GradientDescent, Langevin

SECTIONS = ("sampler", "ode", "train", "memory")


# --------------------------------------------------------------------------- the reference
def plain_loop(energy: nn.Module, x: torch.Tensor, steps: int, step_size: float, noise_std: float = 0.0,
               generator: torch.Generator | None = None, clamp: tuple[float, float] | None = None) -> torch.Tensor:
    """The reference: what anyone would write by hand, the limit of eager PyTorch."""
    for _ in range(steps):
        x = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(energy(x).sum(), x)
        x = x - step_size * g
        if noise_std:
            x = x + noise_std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        if clamp is not None:
            x = x.clamp(*clamp)
    return x.detach()


# --------------------------------------------------------------------------- energies
def conv_energy(width: int) -> tuple[nn.Module, str]:
    """The library's ``ConvEnergy`` (Nijkamp et al.'s short-run ConvNet) at 32x32 and ``width``."""
    energy = ConvEnergy(width=width)
    return energy, f"ConvEnergy(width={width}) ({sum(p.numel() for p in energy.parameters())} parameters)"


# --------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def race(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int,
         device: torch.device) -> dict[str, tuple[float, float]]:
    """``{name: (median seconds, median over rounds of t_plain / t_name)}``; ``plain`` must be a key."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    sync(device)
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            contenders[name]()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    plain = times["plain"]
    return {n: (statistics.median(t), statistics.median(p / c for p, c in zip(plain, t, strict=True)))
            for n, t in times.items()}


# --------------------------------------------------------------------------- memory
def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of the bytes allocated by ``fn`` above what was allocated when it started.

    CUDA: the caching allocator's ``max_memory_allocated``. CPU: the allocation and free events
    of the PyTorch profiler (``profile_memory=True``), summed in time order: every tensor
    allocation on the CPU is seen, including autograd's and compiled kernels' buffers, and
    nothing else (Python objects are not counted).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


# --------------------------------------------------------------------------- sections
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.rows: dict[str, list[list[str]]] = {s: [] for s in SECTIONS}
        torch.manual_seed(0)
        self.mlp = MLPEnergy(dim=2, hidden=args.mlp_hidden).to(self.device)
        self.conv, self.conv_name = conv_energy(args.conv_width)
        self.conv = self.conv.to(self.device)
        cases = {
            # name: (energy, batch shape, steps, step size, noise std)
            "mlp2d": (self.mlp, (args.mlp_batch, 2), args.mlp_steps, 0.05, 0.05),
            "conv32": (self.conv, (args.conv_batch, 3, 32, 32), args.conv_steps, 0.01, 0.005),
        }
        self.cases = {name: case for name, case in cases.items() if name in args.energies.split(",")}

    def x0(self, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(shape, generator=g, device=self.device)

    def gen(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(1)

    # ---------------------------------------------------------------- sampler
    def sampler(self) -> None:
        a = self.args
        for case, (energy, shape, steps, s, sigma) in self.cases.items():
            x0 = self.x0(shape)
            for kind, noise in (("GradientDescent", 0.0), ("Langevin", sigma)):
                def build(noise=noise, steps=steps, s=s, **kw):
                    if noise == 0.0:
                        return GradientDescent(steps=steps, step_size=s, **kw)
                    return Langevin(steps=steps, step_size=s, noise_std=noise, **kw)

                gen = self.gen()
                samplers = {"lightning_ebm eager": build()}
                if a.compile:
                    samplers["lightning_ebm compile=True"] = build(compile=True)
                if self.device.type == "cuda":
                    samplers["lightning_ebm cuda_graph=True"] = build(cuda_graph=True)
                    if a.compile:
                        samplers["lightning_ebm compile+cuda_graph"] = build(compile=True, cuda_graph=True)
                contenders = {"plain": partial(plain_loop, energy, x0, steps, s, noise, gen)}
                contenders |= {name: partial(smp, energy, x0, generator=gen) for name, smp in samplers.items()}
                if noise and (peer := torchebm_langevin(energy, s, noise, self.device)) is not None:
                    contenders["torchebm LangevinDynamics"] = partial(peer.sample, x=x0, n_steps=steps, generator=gen)
                for name, (t, ratio) in race(contenders, a.rounds, a.warmup, self.device).items():
                    smp = samplers.get(name)
                    note = f"compile {smp.compile_time:.1f} s" if smp is not None and smp.compile_time else ""
                    self.rows["sampler"].append([case, kind, name, f"{steps / t:,.1f}", f"{ratio:.3f}", note])
                self.progress(f"sampler {case} {kind}")

    # ---------------------------------------------------------------- ode
    def ode(self) -> None:
        for case, (energy, shape, steps, s, _) in self.cases.items():
            nfe = 4 * max(1, steps // 4)
            x0 = self.x0(shape)
            euler = ODE(t_end=s * nfe, method="euler", step_size=s)
            rk4 = ODE(t_end=s * nfe, method="rk4", step_size=4 * s)
            contenders = {"plain": partial(plain_loop, energy, x0, nfe, s),
                          "ODE euler": partial(euler, energy, x0), "ODE rk4": partial(rk4, energy, x0)}
            for name, (t, ratio) in race(contenders, self.args.rounds, self.args.warmup, self.device).items():
                self.rows["ode"].append([case, name, str(nfe), f"{nfe / t:,.1f}", f"{ratio:.3f}"])
            assert euler.last_nfe == nfe and rk4.last_nfe == nfe, (euler.last_nfe, rk4.last_nfe)
            self.progress(f"ode {case}")

    # ---------------------------------------------------------------- train
    def train(self) -> None:
        a = self.args
        for case, (energy, shape, steps, s, _) in self.cases.items():
            batch, n_steps = shape[0], a.train_steps
            data = self.x0((batch * n_steps, *shape[1:]), seed=2)
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=batch)
            model = EBM(energy=copy.deepcopy(energy), sampler=GradientDescent(steps=steps, step_size=s),
                        latent=Gaussian(shape=shape[1:]), alpha=0.1, rng_seed=0,
                        optimizer=partial(torch.optim.Adam, lr=1e-4))
            plain_energy = copy.deepcopy(energy)
            plain_opt = torch.optim.Adam(plain_energy.parameters(), lr=1e-4)
            gen = self.gen()
            autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=a.bf16)
            ratios, ebm_times, plain_times = [], [], []

            def plain_epoch(plain_energy=plain_energy, plain_opt=plain_opt, gen=gen, loader=loader,
                            steps=steps, s=s, autocast=autocast) -> list[float]:
                stamps = []
                for (x,) in loader:
                    sync(self.device)
                    stamps.append(time.perf_counter())
                    with autocast:  # what Lightning's bf16-mixed does around training_step
                        z = torch.randn(x.shape, generator=gen, device=x.device)
                        x_gen = plain_loop(plain_energy, z, steps, s)
                        e_data, e_gen = plain_energy(x), plain_energy(x_gen)
                        loss = e_data.mean() - e_gen.mean() + 0.1 * (e_data.pow(2).mean() + e_gen.pow(2).mean())
                    plain_opt.zero_grad()
                    loss.backward()
                    plain_opt.step()
                sync(self.device)
                stamps.append(time.perf_counter())
                return [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]

            devices = [self.device.index or 0] if self.device.type == "cuda" else 1
            for _ in range(a.train_rounds):  # a Trainer's steps, then as many plain steps: medians paired
                stamps = _Stamps(self.device)
                trainer = L.Trainer(accelerator=self.device.type, devices=devices, max_steps=n_steps, logger=False,
                                    precision="bf16-mixed" if a.bf16 else "32-true", enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                                    log_every_n_steps=10**6, callbacks=[stamps])
                trainer.fit(model, train_dataloaders=loader)
                ebm_times.append(statistics.median(stamps.durations()[a.warmup:]))
                plain_times.append(statistics.median(plain_epoch()[a.warmup:]))
                ratios.append(plain_times[-1] / ebm_times[-1])
            self.rows["train"].append([case, "plain", str(steps), f"{1 / statistics.median(plain_times):,.2f}",
                                       "1.000"])
            self.rows["train"].append([case, "EBM + Trainer", str(steps), f"{1 / statistics.median(ebm_times):,.2f}",
                                       f"{statistics.median(ratios):.3f}"])
            self.progress(f"train {case}")

    # ---------------------------------------------------------------- memory
    def memory(self) -> None:
        a = self.args
        for case, (energy, shape, _, s, _) in self.cases.items():
            x0 = self.x0(shape)
            builders = {
                "plain": lambda k, s=s: partial(plain_loop, steps=k, step_size=s),
                "GradientDescent": lambda k, s=s: GradientDescent(steps=k, step_size=s),
            }
            if a.compile:
                builders["GradientDescent compile=True"] = (
                    lambda k, s=s: GradientDescent(steps=k, step_size=s, compile=True))
            if self.device.type == "cuda":  # measured on the first call: the capture fills the graph's pool
                builders["GradientDescent cuda_graph=True (capture)"] = (
                    lambda k, s=s: GradientDescent(steps=k, step_size=s, cuda_graph=True))
            state = x0.numel() * x0.element_size()
            for name, build in builders.items():
                runs = [partial(build(k), energy, x0) for k in a.memory_steps]
                if "capture" not in name:
                    runs[0]()  # warm-up (and compile) outside the measurement
                peaks = [peak_bytes(run, self.device) for run in runs]
                self.rows["memory"].append([case, name, f"{peaks[0] / 2**20:.2f}", f"{peaks[1] / 2**20:.2f}",
                                            f"{peaks[1] / peaks[0]:.3f}", f"{peaks[1] / state:.1f}"])
            self.progress(f"memory {case}")

    def progress(self, what: str) -> None:
        print(f"  done: {what} ({time.perf_counter() - self.t0:.0f} s)", file=sys.stderr, flush=True)


class _Stamps(L.Callback):
    """Records the start of every training batch, so durations are start-to-start (all included)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps[:-1], self.stamps[1:], strict=True)]


def torchebm_langevin(energy: nn.Module, step_size: float, noise: float, device: torch.device):
    """torchebm's LangevinDynamics on the same network, or None when torchebm is not installed."""
    try:
        from torchebm.core import BaseModel  # noqa: PLC0415
        from torchebm.samplers import LangevinDynamics  # noqa: PLC0415
    except ImportError:
        return None

    class Wrapped(BaseModel):
        def __init__(self, net: nn.Module) -> None:
            super().__init__(device=device)
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    # Euler-Maruyama: x + step * (-grad E) + sqrt(2 * noise_scale * step) * N(0, I)-like noise; the
    # noise scale differs in meaning from ours, the cost per step does not
    return LangevinDynamics(Wrapped(energy), step_size=step_size, noise_scale=noise, device=device)


# --------------------------------------------------------------------------- report
HEADERS = {
    "sampler": ["energy", "sampler", "implementation", "steps/s", "vs plain", "note"],
    "ode": ["energy", "implementation", "grad evals", "grad evals/s", "vs plain"],
    "train": ["energy", "implementation", "sampler steps", "train steps/s", "vs plain"],
    "memory": ["energy", "implementation", "peak MiB K={}", "peak MiB K={}", "ratio", "K={} peak / state"],
}


def machine_description(args: argparse.Namespace, device: torch.device) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    lines = [f"- CPU: {cpu}, {os.cpu_count()} logical cores, torch threads: {torch.get_num_threads()}"]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}")
    lines += [f"- torch {torch.__version__}, lightning_ebm {lightning_ebm.__version__}, "
              f"Python {platform.python_version()}, {platform.platform()}"]
    return lines


def render(bench: Bench, started: str, load_before: str, wall: float) -> str:
    a = bench.args
    out = [f"# lightning_ebm benchmark, {started}", ""]
    out += machine_description(a, bench.device)
    out += [f"- load average before / after: {load_before} / {load_average()}",
            f"- command: `python benchmarks/run.py {' '.join(sys.argv[1:])}`".replace("run.py `", "run.py`"),
            f"- precision: {'bf16 autocast (state float32)' if a.bf16 else 'float32'}",
            f"- sizes: MLP 2-D hidden {a.mlp_hidden} batch {a.mlp_batch} K={a.mlp_steps}; {bench.conv_name} "
            f"32x32 batch {a.conv_batch} K={a.conv_steps}; {a.rounds} interleaved rounds after {a.warmup} warm-ups "
            f"(train: {a.train_rounds} rounds of {a.train_steps} steps)",
            f"- wall time: {wall:.0f} s", "",
            "Ratios are the median over rounds of time(plain loop) / time(implementation), measured in the "
            "same process: > 1 is faster than the hand-written loop.", ""]
    k_small, k_large = a.memory_steps
    for section in SECTIONS:
        if not bench.rows[section]:
            continue
        headers = [h.format(k_small if i == 2 else k_large) for i, h in enumerate(HEADERS[section])]
        out += [f"## {section}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(row) + " |" for row in bench.rows[section]]
        out.append("")
    if bench.rows["memory"]:
        how = "torch.cuda.max_memory_allocated" if bench.device.type == "cuda" else (
            "the PyTorch profiler's CPU allocation/free events (profile_memory=True)")
        out += [f"Peak memory: bytes allocated during one sampling call above the start, from {how}; "
                "'state' is the size of x0.", ""]
    return "\n".join(out)


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--energies", default="mlp2d,conv32", help="comma-separated subset of mlp2d,conv32")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per contender")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls (steps, for train) per contender")
    p.add_argument("--mlp-hidden", type=int, default=128)
    p.add_argument("--mlp-batch", type=int, default=1024)
    p.add_argument("--mlp-steps", type=int, default=40, help="sampler steps K per call on the MLP")
    p.add_argument("--conv-width", type=int, default=16, help="base width of ConvEnergy (64 in the paper)")
    p.add_argument("--conv-batch", type=int, default=64)
    p.add_argument("--conv-steps", type=int, default=8, help="sampler steps K per call on the conv energy")
    p.add_argument("--train-steps", type=int, default=6, help="training steps per round (train section)")
    p.add_argument("--train-rounds", type=int, default=3, help="rounds of the train section")
    p.add_argument("--memory-steps", type=int, nargs=2, default=(10, 200), metavar=("K1", "K2"))
    p.add_argument("--bf16", action="store_true",
                   help="run under bf16 autocast (train: Trainer(precision='bf16-mixed')); the state stays float32")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compile=True contenders")
    p.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/<time>.md)")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    if args.warmup >= args.train_steps and "train" in args.only:
        p.error(f"--train-steps ({args.train_steps}) must exceed --warmup ({args.warmup})")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|no `val_dataloader`).*")
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_before = datetime.now().strftime("%Y-%m-%d %H:%M:%S"), load_average()
    bench = Bench(args)
    bench.t0 = time.perf_counter()
    for section in SECTIONS:
        if section in args.only.split(","):
            # the train section sets precision itself, as Lightning does
            with torch.autocast(bench.device.type, dtype=torch.bfloat16, enabled=args.bf16 and section != "train"):
                getattr(bench, section)()
    report = render(bench, started, load_before, time.perf_counter() - bench.t0)
    print(report)
    out = args.out or Path(__file__).resolve().parent / "results" / f"{datetime.now():%Y%m%d-%H%M%S}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    print(f"written to {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
