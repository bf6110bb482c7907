"""The one prepared GPU check: the CUDA paths equal eager, sampler steps/s, the CIFAR-10 step against its FLOP bound.

No GPU was available when this was written: every figure it prints is still to be measured. From
the repository root, on a machine with CUDA::

    python benchmarks/gpu.py [--out DIR] [--quick]

Parts, each with its own time limit (``--budget`` seconds, default 75; ``--quick``: 45) so that a
slow one cannot eat the rest: at most about 11 minutes in all (6 with ``--quick``):

1. ``checks``: ``cuda_graph``, ``compile``, compile + ``cuda_graph`` equal eager (GradientDescent,
   MLP and ConvEnergy 32x32); compiled Langevin equals eager with the same generator; bf16
   autocast keeps the state float32 and stays within bf16 rounding of fp32; channels_last
   equals contiguous (eager and compiled). Each line says PASS or FAIL with the largest error.
2. ``sampler``: steps/s of the plain loop, eager, compiled, CUDA graph, compiled + CUDA graph on
   the MLP (2-D, hidden 128, batch 8192, K=100) and ConvEnergy(width 64) 32x32 (batch 100, K=40),
   fp32; achieved TFLOP/s next to a matmul and a convolution throughput measured here.
3. ``train``: the configs/cifar10.yaml training step (ConvEnergy width 64, 100 steps, batch 100)
   on synthetic data under a Lightning Trainer: fp32, bf16-mixed, bf16-mixed with compile +
   cuda_graph and channels_last; time per step against the FLOP bound (one forward and one
   input-backward per sampler step, plus the loss's forwards and backward, at the measured conv
   throughput).
4. ``ddp``: with more than one GPU, the same step in a two-process DDP run (steps/s per process).

Without CUDA it says so and exits 0 at once (tests/samplers/test_speed_paths.py checks that). The
report (markdown) is printed and written to ``--out`` (default: ``$OUT`` or benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _OverBudget(Exception):
    pass


@contextmanager
def budget(seconds: int, lines: list[str], what: str):
    """Stop a part after ``seconds`` (SIGALRM) and say so in the report; the next part still runs."""

    def stop(signum, frame):
        raise _OverBudget

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    start = time.perf_counter()
    try:
        yield
    except _OverBudget:
        lines.append(f"- {what}: stopped after its budget of {seconds} s (partial results above)")
    except Exception as err:  # a failing part is reported, the others still run
        lines.append(f"- {what}: FAILED with {type(err).__name__}: {str(err)[:500]}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        lines.append(f"- {what}: {time.perf_counter() - start:.0f} s")


def check(lines: list[str], what: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    err = float((got.float() - want.float()).abs().max())
    lines.append(f"- {'PASS' if err <= atol else 'FAIL'} {what}: max |difference| {err:.2e} (tolerance {atol:g})")


# --------------------------------------------------------------------------- parts
def checks(lines: list[str]) -> None:
    from lightning_ebm.energies import ConvEnergy, MLPEnergy  # noqa: PLC0415
    from lightning_ebm.samplers import GradientDescent, Langevin  # noqa: PLC0415

    dev = torch.device("cuda")
    torch.manual_seed(0)
    mlp, x_mlp = MLPEnergy(dim=2, hidden=128).to(dev), torch.randn(4096, 2, device=dev)
    conv, x_conv = ConvEnergy(width=32).to(dev), torch.rand(32, 3, 32, 32, device=dev) * 2 - 1
    for name, energy, x, s in (("MLP", mlp, x_mlp, 0.05), ("ConvEnergy 32x32", conv, x_conv, 0.01)):
        ref = GradientDescent(steps=20, step_size=s)(energy, x)
        for label, kw in (("cuda_graph", {"cuda_graph": True}), ("compile", {"compile": True}),
                          ("compile+cuda_graph", {"compile": True, "cuda_graph": True})):
            sampler = GradientDescent(steps=20, step_size=s, **kw)
            sampler(energy, x)  # capture / compile
            check(lines, f"{name} GradientDescent {label} == eager", sampler(energy, x), ref, 1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = GradientDescent(steps=20, step_size=s)(energy, x)
        lines.append(f"- {'PASS' if low.dtype == torch.float32 else 'FAIL'} {name} bf16 autocast: state {low.dtype}")
        check(lines, f"{name} bf16 autocast close to fp32", low, ref, 5e-2)
    gen = partial(torch.Generator(dev).manual_seed, 3)
    eager = Langevin(steps=20, step_size=0.05, noise_std=0.1)(mlp, x_mlp, generator=gen())
    compiled = Langevin(steps=20, step_size=0.05, noise_std=0.1, compile=True)(mlp, x_mlp, generator=gen())
    check(lines, "MLP Langevin compile == eager (same generator)", compiled, eager, 1e-4)
    cl = copy.deepcopy(conv).to(memory_format=torch.channels_last)
    x_cl = x_conv.contiguous(memory_format=torch.channels_last)
    ref = GradientDescent(steps=10, step_size=0.01)(conv, x_conv)
    for label, kw in (("eager", {}), ("compile", {"compile": True})):
        out = GradientDescent(steps=10, step_size=0.01, **kw)(cl, x_cl)
        check(lines, f"ConvEnergy channels_last {label} == contiguous eager", out, ref, 1e-4)
        lines.append(f"- {'PASS' if out.is_contiguous(memory_format=torch.channels_last) else 'FAIL'} "
                     f"channels_last {label} keeps the format")


def bounds() -> tuple[float, float, float]:
    """fp32 matmul, fp32 conv and bf16 conv throughput (TFLOP/s) on this GPU."""
    speed = _load("speed")
    dev = torch.device("cuda")
    a, b = torch.randn(8192, 8192, device=dev), torch.randn(8192, 8192, device=dev)
    conv = torch.nn.Conv2d(128, 256, 4, 2, 1).to(dev).requires_grad_(False)
    x = torch.randn(100, 128, 16, 16, device=dev)

    def timed(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    mm = 2 * 8192**3 / timed(lambda: a @ b) / 1e12
    conv_flops = speed.flops(lambda: conv(x))
    fp32 = conv_flops / timed(lambda: conv(x)) / 1e12
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = conv_flops / timed(lambda: conv(x)) / 1e12
    return mm, fp32, bf16


def sampler(lines: list[str], rows: list[str], bound: tuple[float, float, float]) -> None:
    from lightning_ebm.energies import ConvEnergy, MLPEnergy  # noqa: PLC0415
    from lightning_ebm.samplers import GradientDescent  # noqa: PLC0415

    run, speed = _load("run"), _load("speed")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cases = {"MLP 2-128-128-128-1 batch 8192": (MLPEnergy(dim=2, hidden=128).to(dev), (8192, 2), 100, 0.05),
             "ConvEnergy(width=64) 32x32 batch 100": (ConvEnergy(width=64).to(dev), (100, 3, 32, 32), 40, 0.01)}
    rows += ["| energy | implementation | steps/s | vs plain | TFLOP/s | note |", "|---|---|---|---|---|---|"]
    for case, (energy, shape, k, s) in cases.items():
        x0 = torch.randn(shape, device=dev)
        plain_energy = speed.frozen(energy)
        step_flops = speed.flops(partial(run.plain_loop, plain_energy, x0, 1, s))
        samplers = {"eager": GradientDescent(steps=k, step_size=s),
                    "compile=True": GradientDescent(steps=k, step_size=s, compile=True),
                    "cuda_graph=True": GradientDescent(steps=k, step_size=s, cuda_graph=True),
                    "compile+cuda_graph": GradientDescent(steps=k, step_size=s, compile=True, cuda_graph=True)}
        contenders = {"plain": partial(run.plain_loop, plain_energy, x0, k, s)}
        contenders |= {n: partial(smp, energy, x0) for n, smp in samplers.items()}
        for name, (t, ratio) in run.race(contenders, 7, 2, dev).items():
            smp = samplers.get(name)
            note = f"compile/capture {smp.compile_time:.1f} s" if smp is not None and smp.compile_time else ""
            rows.append(f"| {case} | {name} | {k / t:,.1f} | {ratio:.3f} | {step_flops * k / t / 1e12:.2f} | {note} |")
    rows.append(f"\nBound here: matmul fp32 {bound[0]:.1f} TFLOP/s, conv fp32 {bound[1]:.1f}, "
                f"conv bf16 {bound[2]:.1f}.")


def _cifar_model(sampler_kw: dict | None = None, channels_last: bool = False):
    import yaml  # noqa: PLC0415

    from lightning_ebm import EBM  # noqa: PLC0415

    args = yaml.safe_load((ROOT / "configs" / "cifar10.yaml").read_text())["model"]["init_args"]
    args["sampler"]["init_args"].update(sampler_kw or {})
    return EBM(**args, rng_seed=0, channels_last=channels_last), args


def train(lines: list[str], rows: list[str], bound: tuple[float, float, float], steps: int) -> None:
    import lightning as L  # noqa: PLC0415

    run, speed = _load("run"), _load("speed")
    data = torch.rand(100 * steps, 3, 32, 32) * 2 - 1  # synthetic CIFAR-10-shaped batches
    loader = torch.utils.data.DataLoader(data, batch_size=100)
    model, args = _cifar_model()
    k = args["sampler"]["init_args"]["steps"]
    # the bound: K x (one forward + one input-backward) of a batch, plus the loss (2 forwards, 1 full backward)
    energy = speed.frozen(model.energy).cuda()
    x = torch.randn(100, 3, 32, 32, device="cuda")
    per_step = speed.flops(partial(run.plain_loop, energy, x, 1, 1.0))
    energy.requires_grad_(True)
    loss_flops = speed.flops(lambda: (energy(x).mean() - energy(x).mean()).backward())
    total = k * per_step + loss_flops
    rows += [f"FLOPs per training step: {total / 1e9:,.0f} GFLOP ({k} x {per_step / 1e9:.1f} sampling + "
             f"{loss_flops / 1e9:.1f} loss)", "",
             "| variant | ms/step | TFLOP/s | bound ms/step (conv throughput) | fraction of bound |",
             "|---|---|---|---|---|"]
    variants = {"fp32": ({}, False, "32-true", bound[1]),
                "bf16-mixed": ({}, False, "bf16-mixed", bound[2]),
                "bf16-mixed, compile+cuda_graph, channels_last": ({"compile": True, "cuda_graph": True}, True,
                                                                  "bf16-mixed", bound[2])}
    for name, (kw, cl, precision, tflops) in variants.items():
        model, _ = _cifar_model(kw, cl)
        stamps = run._Stamps(torch.device("cuda"))
        trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=steps, precision=precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[stamps])
        trainer.fit(model, train_dataloaders=loader)
        t = statistics.median(stamps.durations()[2:])
        floor = total / (tflops * 1e12)
        rows.append(f"| {name} | {t * 1e3:.1f} | {total / t / 1e12:.2f} | {floor * 1e3:.1f} | {floor / t:.2f} |")


def ddp(lines: list[str], rows: list[str], steps: int) -> None:
    if torch.cuda.device_count() < 2:
        lines.append(f"- ddp: skipped ({torch.cuda.device_count()} GPU)")
        return
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--ddp-child", str(steps)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    tail = [line for line in result.stdout.splitlines() if line.startswith("ddp:")]
    rows += tail or [f"ddp run failed (rc {result.returncode}): {result.stderr[-1500:]}"]


def ddp_child(steps: int) -> None:
    import lightning as L  # noqa: PLC0415

    run = _load("run")
    data = torch.rand(200 * steps, 3, 32, 32) * 2 - 1
    loader = torch.utils.data.DataLoader(data, batch_size=100)
    model, _ = _cifar_model()
    stamps = run._Stamps(torch.device("cuda"))
    trainer = L.Trainer(accelerator="gpu", devices=2, strategy="ddp", max_steps=steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[stamps])
    trainer.fit(model, train_dataloaders=loader)
    if trainer.global_rank == 0:
        t = statistics.median(stamps.durations()[2:])
        print(f"ddp: 2 processes, {t * 1e3:.1f} ms per step per process (batch 100 each), "
              f"{200 / t:,.0f} images/s in all", flush=True)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="result directory (default: $OUT or benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="smaller budgets and fewer training steps")
    p.add_argument("--budget", type=int, default=None, help="seconds per part (default 75, quick 45)")
    p.add_argument("--ddp-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ddp_child is not None:
        ddp_child(args.ddp_child)
        return 0
    out_dir = args.out or Path(os.environ.get("OUT") or HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing measured (run this on a machine with a GPU)")
        return 0
    seconds = args.budget or (45 if args.quick else 75)
    steps = 6 if args.quick else 12
    lines: list[str] = []
    checks_rows: list[str] = []
    sampler_rows: list[str] = []
    train_rows: list[str] = []
    ddp_rows: list[str] = []
    started = time.perf_counter()
    with budget(seconds, lines, "checks"):
        checks(checks_rows)
    bound = (float("nan"),) * 3
    with budget(seconds, lines, "bounds"):
        bound = bounds()
    with budget(2 * seconds, lines, "sampler"):
        sampler(lines, sampler_rows, bound)
    with budget(2 * seconds, lines, "train"):
        train(lines, train_rows, bound, steps)
    with budget(seconds * 3, lines, "ddp"):
        ddp(lines, ddp_rows, steps)
    name = torch.cuda.get_device_name(0)
    report = [f"# lightning_ebm on {name}, {datetime.now():%Y-%m-%d %H:%M:%S}", "",
              f"- torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)",
              f"- command: `python benchmarks/gpu.py {' '.join(sys.argv[1:])}`",
              f"- wall time {time.perf_counter() - started:.0f} s", "", "## checks", "", *checks_rows, "",
              "## sampler (fp32)", "", *sampler_rows, "", "## cifar10.yaml training step, synthetic data", "",
              *train_rows, "", "## ddp", "", *(ddp_rows or ["(none)"]), "", "## parts", "", *lines, ""]
    text = "\n".join(report)
    print(text)
    path = out_dir / f"gpu-{datetime.now():%Y%m%d-%H%M%S}.md"
    path.write_text(text)
    print(f"written to {path}", file=sys.stderr)
    return 1 if any(line.startswith("- FAIL") for line in checks_rows) else 0


if __name__ == "__main__":
    sys.exit(main())
