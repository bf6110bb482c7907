"""Speed against the machine's bound: samplers, ODE and recipe training steps vs the careful plain loop.

One process, interleaved rounds (the order rotates every round), medians. Every ratio is the
median over rounds of ``time(reference) / time(contender)`` (> 1: faster than the reference):
the sampler references are the plain loop a careful user writes (a frozen copy of the energy,
``torch.autograd.grad`` on the input; plain Langevin draws its noise from the same generator);
the training reference is a hand-written step (the same loss, Adam, no Lightning). Achieved
GFLOP/s (matmul and convolution FLOPs counted by ``torch.utils.flop_counter`` on one plain step)
stand next to a matmul and a convolution throughput measured in the same run, at the start and
at the end: the bound of this machine. torchebm (0.8.9, when installed) runs its
LangevinDynamics and its ContrastiveDivergence training step on the same networks.

Sections: ``bound``, ``sampler`` (MLP 2-D; ConvEnergy at 8x8, 28x28, 32x32), ``ode`` (equal
evaluations), ``train`` (the toy2d, digits and digits28 recipes' networks and samplers),
``memory`` (peak bytes of one call at K = 10 and 200), ``profile`` (where the digits28 training
step spends its time).

Usage::

    python benchmarks/speed.py --quick          # about 2 minutes: MLP, conv 8x8 and 28x28 eager, toy2d step
    python benchmarks/speed.py                  # everything (compiles the conv nets: 10+ minutes on 2 cores)
    python benchmarks/speed.py --only sampler,memory --threads 1

Pass ``--threads 1`` on a shared machine. The report (markdown) is printed and written to
``benchmarks/results/`` (git-ignored) with the command and the load average.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import signal
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
import yaml
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from lightning_ebm import EBM
from lightning_ebm._config import build
from lightning_ebm.energies import ConvEnergy, MLPEnergy
from lightning_ebm.samplers import ODE, GradientDescent, Langevin

_spec = importlib.util.spec_from_file_location("bench_run", Path(__file__).with_name("run.py"))
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("bound", "sampler", "ode", "train", "memory", "profile")


# --------------------------------------------------------------------------- references and counts
def frozen(energy: nn.Module) -> nn.Module:
    """A copy of ``energy`` with every parameter frozen: what the careful plain loop samples from."""
    twin = copy.deepcopy(energy)
    twin.requires_grad_(False)
    return twin


class _Flops(TorchDispatchMode):
    """Sums ``torch.utils.flop_counter``'s formulas (matmuls, convolutions) over every op dispatched.

    (``FlopCounterMode`` itself tracks modules with hooks that ``torch.autograd.grad`` on a leaf
    refuses, so the plain loop cannot run under it.)"""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def flops(fn: Callable[[], object]) -> int:
    """Matmul and convolution FLOPs of one call (forward and backward), by ``torch.utils.flop_counter``."""
    with _Flops() as counter:
        fn()
    return counter.total


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- the benchmark
class Speed:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.rows, self.notes = args, {s: [] for s in SECTIONS}, []
        self.t0 = time.perf_counter()
        torch.manual_seed(0)
        q = args.quick
        # name: (energy, batch shape, steps K, step size, noise std, compile it)
        cases = {
            "mlp 2-128-128-1": (MLPEnergy(dim=2, hidden=128, num_layers=2), (1024, 2), 40 if q else 100, 0.05,
                                0.05, True),
            "conv 8x8 (digits)": (ConvEnergy(in_channels=1, width=32, image_size=8), (64, 1, 8, 8), 10 if q else 40,
                                  1.0, 0.005, not q),
            "conv 28x28 (digits28)": (ConvEnergy(in_channels=1, width=16, image_size=28), (64, 1, 28, 28),
                                      5 if q else 30, 1.0, 0.005, not q),
        }
        if not q:
            cases["conv 32x32"] = (ConvEnergy(in_channels=3, width=16, image_size=32), (64, 3, 32, 32), 10, 0.01,
                                   0.005, True)
        wanted = {"mlp": "mlp 2-128-128-1", "conv8": "conv 8x8 (digits)", "conv28": "conv 28x28 (digits28)",
                  "conv32": "conv 32x32"}
        keep = {wanted[c] for c in args.cases.split(",")} if args.cases else set(cases)
        self.cases = {name: case for name, case in cases.items() if name in keep}
        self.bounds: dict[str, list[float]] = {"matmul": [], "conv": []}

    def x0(self, shape, seed=0) -> torch.Tensor:
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def progress(self, what: str) -> None:
        print(f"  done: {what} ({time.perf_counter() - self.t0:.0f} s)", file=sys.stderr, flush=True)

    def race(self, contenders: dict[str, Callable], reference: str = "plain") -> dict[str, tuple[float, float]]:
        if reference != "plain":
            contenders = {"plain": contenders[reference], **{k: v for k, v in contenders.items() if k != reference}}
        out = base.race(contenders, self.args.rounds, self.args.warmup, torch.device("cpu"))
        if reference != "plain":
            out = {reference: out.pop("plain"), **out}
        return out

    # ---------------------------------------------------------------- bound
    def bound(self) -> None:
        a = torch.randn(1024, 128)
        b = torch.randn(128, 128)
        conv = nn.Conv2d(16, 32, 4, 2, 1).requires_grad_(False)
        x = torch.randn(64, 16, 28, 28)
        reps = 20 if self.args.quick else 50
        t_mm = median_seconds(lambda: a @ b, reps * 10)
        t_conv = median_seconds(lambda: conv(x), reps)
        self.bounds["matmul"].append(2 * 1024 * 128 * 128 / t_mm / 1e9)
        self.bounds["conv"].append(flops(lambda: conv(x)) / t_conv / 1e9)
        self.progress("bound")

    def bound_text(self) -> str:
        mm, cv = self.bounds["matmul"], self.bounds["conv"]
        return (f"matmul 1024x128 @ 128x128: {' / '.join(f'{v:.0f}' for v in mm)} GFLOP/s; "
                f"conv2d 16->32 4x4 stride 2 on (64, 16, 28, 28): {' / '.join(f'{v:.0f}' for v in cv)} GFLOP/s "
                "(start / end of the run)")

    # ---------------------------------------------------------------- sampler
    def sampler(self) -> None:
        for case, (energy, shape, k, s, sigma, compile) in self.cases.items():
            x0, plain_energy = self.x0(shape), frozen(energy)
            step_flops = flops(partial(base.plain_loop, plain_energy, x0, 1, s))
            for kind, noise in (("GradientDescent", 0.0), ("Langevin", sigma)):
                def make(noise=noise, k=k, s=s, **kw):
                    if noise == 0.0:
                        return GradientDescent(steps=k, step_size=s, **kw)
                    return Langevin(steps=k, step_size=s, noise_std=noise, **kw)

                gen = torch.Generator().manual_seed(1)
                samplers = {"eager": make()}
                if compile and self.args.compile:
                    samplers["compile=True"] = make(compile=True)
                contenders = {"plain": partial(base.plain_loop, plain_energy, x0, k, s, noise, gen)}
                contenders |= {name: partial(smp, energy, x0, generator=gen) for name, smp in samplers.items()}
                if noise and (peer := base.torchebm_langevin(energy, s, noise, torch.device("cpu"))) is not None:
                    contenders["torchebm 0.8.9 LangevinDynamics"] = partial(peer.sample, x=x0, n_steps=k, generator=gen)
                for name, (t, ratio) in self.race(contenders).items():
                    smp = samplers.get(name)
                    note = f"compile {smp.compile_time:.1f} s" if smp is not None and smp.compile_time else ""
                    self.rows["sampler"].append([case, kind, name, f"{t / k * 1e3:.3f}", f"{ratio:.3f}",
                                                 f"{step_flops * k / t / 1e9:.1f}", note])
                self.progress(f"sampler {case} {kind}")

    # ---------------------------------------------------------------- ode
    def ode(self) -> None:
        if "mlp 2-128-128-1" not in self.cases:
            return
        energy, shape, k, s, _, _ = self.cases["mlp 2-128-128-1"]
        nfe = 4 * max(1, k // 4)
        x0, plain_energy = self.x0(shape), frozen(energy)
        odes = {"ODE euler": ODE(t_end=s * nfe, method="euler", step_size=s),
                "ODE rk4": ODE(t_end=s * nfe, method="rk4", step_size=4 * s)}
        if self.args.compile:
            odes["ODE euler compile=True"] = ODE(t_end=s * nfe, method="euler", step_size=s, compile=True)
        contenders = {"plain": partial(base.plain_loop, plain_energy, x0, nfe, s)}
        contenders |= {name: partial(o, energy, x0) for name, o in odes.items()}
        for name, (t, ratio) in self.race(contenders).items():
            self.rows["ode"].append(["mlp 2-128-128-1", name, str(nfe), f"{t / nfe * 1e3:.3f}", f"{ratio:.3f}"])
        assert all(o.last_nfe == nfe for o in odes.values()), {n: o.last_nfe for n, o in odes.items()}
        self.progress("ode")

    # ---------------------------------------------------------------- train
    def recipe(self, name: str) -> tuple[dict, dict]:
        config = yaml.safe_load((ROOT / "configs" / name).read_text())
        return config["model"]["init_args"], config["data"]

    def train(self) -> None:
        a = self.args
        recipes = ["toy2d.yaml"] if a.quick else ["toy2d.yaml", "digits.yaml", "digits28.yaml"]
        for name in recipes:
            model_args, data_spec = self.recipe(name)
            torch.manual_seed(0)
            model = EBM(**model_args, rng_seed=0)
            datamodule = build(data_spec, "data")
            datamodule.setup("fit")
            batches = [b for _, b in zip(range(a.train_steps), datamodule.train_dataloader(), strict=False)]
            batches = [b[0] if isinstance(b, (list, tuple)) else b for b in batches]
            sampler, alpha = model.sampler, model_args.get("alpha", 0.1)
            k, s = sampler.steps, sampler.step_size
            plain_energy = copy.deepcopy(model.energy)
            opt_args = model_args["optimizer"]["init_args"]
            plain_opt = torch.optim.Adam(plain_energy.parameters(), **opt_args)
            gen = torch.Generator().manual_seed(1)

            def plain_step(x, plain_energy=plain_energy, plain_opt=plain_opt, k=k, s=s, latent=model.latent, gen=gen,
                           alpha=alpha, clamp=sampler.clamp):
                z = latent.sample(x.shape[0], generator=gen)  # the recipe's own start (noise: negligible work)
                plain_energy.requires_grad_(False)
                x_gen = base.plain_loop(plain_energy, z, k, s, clamp=clamp)
                plain_energy.requires_grad_(True)
                e_data, e_gen = plain_energy(x), plain_energy(x_gen)
                loss = e_data.mean() - e_gen.mean() + alpha * (e_data.pow(2).mean() + e_gen.pow(2).mean())
                plain_opt.zero_grad()
                loss.backward()
                plain_opt.step()

            step_flops = flops(partial(plain_step, batches[0]))
            ratios, ebm_t, plain_t, peer_t = [], [], [], []
            peer = torchebm_cd(copy.deepcopy(model.energy), s, k, opt_args) if name == "toy2d.yaml" else None
            for _ in range(a.train_rounds):
                stamps = base._Stamps(torch.device("cpu"))
                trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=len(batches), logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                    num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=10**6,
                                    callbacks=[stamps])
                trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
                ebm_t.append(statistics.median(stamps.durations()[a.warmup:]))
                plain_t.append(statistics.median(_durations(plain_step, batches)[a.warmup:]))
                ratios.append(plain_t[-1] / ebm_t[-1])
                if peer is not None:
                    peer_t.append(statistics.median(_durations(peer, batches)[a.warmup:]))
            recipe = f"{name} ({type(model.energy).__name__}, K={k}, batch {batches[0].shape[0]})"
            t_plain, t_ebm = statistics.median(plain_t), statistics.median(ebm_t)
            self.rows["train"].append([recipe, "plain step", f"{t_plain * 1e3:.1f}", "1.000",
                                       f"{step_flops / t_plain / 1e9:.1f}"])
            self.rows["train"].append([recipe, "EBM + Trainer", f"{t_ebm * 1e3:.1f}",
                                       f"{statistics.median(ratios):.3f}", f"{step_flops / t_ebm / 1e9:.1f}"])
            if peer_t:
                t_peer = statistics.median(peer_t)
                self.rows["train"].append([recipe, "torchebm 0.8.9 ContrastiveDivergence", f"{t_peer * 1e3:.1f}",
                                           f"{t_plain / t_peer:.3f}", f"{step_flops / t_peer / 1e9:.1f}"])
            self.progress(f"train {name}")

    # ---------------------------------------------------------------- memory
    def memory(self) -> None:
        cpu = torch.device("cpu")
        names = ["mlp 2-128-128-1"] + ([] if self.args.quick else ["conv 28x28 (digits28)"])
        for case in (n for n in names if n in self.cases):
            energy, shape, _, s, sigma, compile = self.cases[case]
            x0, plain_energy = self.x0(shape), frozen(energy)
            builders = {"plain": lambda k, e=plain_energy, x0=x0, s=s: partial(base.plain_loop, e, x0, k, s),
                        "GradientDescent eager": lambda k, e=energy, x0=x0, s=s: partial(
                            GradientDescent(steps=k, step_size=s), e, x0)}
            if self.args.compile and (compile or case.startswith("conv 28")):
                builders["GradientDescent compile=True"] = lambda k, e=energy, x0=x0, s=s: partial(
                    GradientDescent(steps=k, step_size=s, compile=True), e, x0)
                builders["Langevin compile=True"] = lambda k, e=energy, x0=x0, s=s, sigma=sigma: partial(
                    Langevin(steps=k, step_size=s, noise_std=sigma, compile=True), e, x0,
                    generator=torch.Generator().manual_seed(0))
            for name, make in builders.items():
                runs = [make(k) for k in (10, 200)]
                for run in runs:
                    run()  # compile outside the measurement
                peaks = [base.peak_bytes(run, cpu) for run in runs]
                self.rows["memory"].append([case, name, f"{peaks[0] / 2**20:.2f}", f"{peaks[1] / 2**20:.2f}",
                                            f"{peaks[1] / peaks[0]:.3f}"])
            self.progress(f"memory {case}")

    # ---------------------------------------------------------------- profile
    def profile(self) -> None:
        """Where one plain digits28 training step spends its time (the image path's profile)."""
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

        energy = ConvEnergy(in_channels=1, width=16, image_size=28)
        opt = torch.optim.Adam(energy.parameters(), lr=3e-4)
        x = self.x0((64, 1, 28, 28))

        def step():
            energy.requires_grad_(False)
            x_gen = base.plain_loop(energy, torch.rand_like(x) * 2 - 1, 30, 1.0)
            energy.requires_grad_(True)
            loss = energy(x).mean() - energy(x_gen).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

        step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        self.rows["profile"].append(["```", table, "```"])
        self.progress("profile")


def _durations(step: Callable, batches: list) -> list[float]:
    out = []
    for x in batches:
        t0 = time.perf_counter()
        step(x)
        out.append(time.perf_counter() - t0)
    return out


def torchebm_cd(energy: nn.Module, step_size: float, k: int, opt_args: dict):
    """torchebm's ContrastiveDivergence training step (its Langevin sampler, k steps) on ``energy``; or None."""
    try:
        from torchebm.losses import ContrastiveDivergence  # noqa: PLC0415
    except ImportError:
        return None
    sampler = base.torchebm_langevin(energy, step_size, 1e-3, torch.device("cpu"))
    loss_fn = ContrastiveDivergence(sampler.model, sampler, k_steps=k)
    opt = torch.optim.Adam(energy.parameters(), **opt_args)

    def step(x):
        loss, _ = loss_fn(x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


# --------------------------------------------------------------------------- report
HEADERS = {
    "sampler": ["energy", "sampler", "implementation", "ms/step", "vs plain", "GFLOP/s", "note"],
    "ode": ["energy", "implementation", "grad evals", "ms/eval", "vs plain"],
    "train": ["recipe", "implementation", "ms/step", "vs plain step", "GFLOP/s"],
    "memory": ["energy", "implementation", "peak MiB K=10", "peak MiB K=200", "ratio"],
}


def render(bench: Speed, started: str, load_before: str, wall: float) -> str:
    out = [f"# lightning_ebm speed, {started}", ""]
    out += base.machine_description(bench.args, torch.device("cpu"))
    out += [f"- load average (1, 5, 15 min) before / after: {load_before} / {base.load_average()}",
            f"- command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`".replace("speed.py `", "speed.py`"),
            f"- {bench.args.rounds} interleaved rounds after {bench.args.warmup} warm-ups; wall time {wall:.0f} s"]
    if bench.bounds["matmul"]:
        out.append(f"- bound: {bench.bound_text()}")
    out.append("")
    for section in SECTIONS:
        rows = bench.rows[section]
        if not rows:
            continue
        out += [f"## {section}", ""]
        if section == "profile":
            out += rows[0] + [""]
            continue
        headers = HEADERS[section]
        out += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about 2 minutes: fewer rounds and steps, no conv compiles")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--cases", default=None,
                   help="comma-separated subset of mlp,conv8,conv28,conv32 for sampler/ode/memory (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per contender (default 7, quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls (steps, for train) per contender")
    p.add_argument("--train-steps", type=int, default=None, help="training steps per round (default 6, quick 4)")
    p.add_argument("--train-rounds", type=int, default=None, help="rounds of the train section (default 3, quick 1)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compile=True contenders")
    p.add_argument("--out", type=Path, default=None, help="result file (default: benchmarks/results/speed-<time>.md)")
    args = p.parse_args(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}")
    bad = set((args.cases or "mlp").split(",")) - {"mlp", "conv8", "conv28", "conv32"}
    if bad:
        p.error(f"--cases: unknown case(s) {sorted(bad)}; choose from mlp,conv8,conv28,conv32")
    args.rounds = args.rounds or (3 if args.quick else 7)
    args.train_steps = args.train_steps or (4 if args.quick else 6)
    args.train_rounds = args.train_rounds or (1 if args.quick else 3)
    if args.warmup >= args.train_steps:
        p.error(f"--train-steps ({args.train_steps}) must exceed --warmup ({args.warmup})")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|no `val_dataloader`|max_steps).*")
    if args.threads:
        torch.set_num_threads(args.threads)
    started, load_before = datetime.now().strftime("%Y-%m-%d %H:%M:%S"), base.load_average()
    bench = Speed(args)
    only = args.only.split(",")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # killed: report what was measured
    try:
        for section in SECTIONS:
            if section in only:
                getattr(bench, section)()
        if "bound" in only:
            bench.bound()  # again at the end: the machine's load may have moved
    except KeyboardInterrupt:
        print("interrupted: reporting the sections measured so far", file=sys.stderr)
    report = render(bench, started, load_before, time.perf_counter() - bench.t0)
    print(report)
    out = args.out or Path(__file__).resolve().parent / "results" / f"speed-{datetime.now():%Y%m%d-%H%M%S}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    print(f"written to {out}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
