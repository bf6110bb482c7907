"""The EBM's own density beyond 2-D: log Z by AIS, held-out NLL / bits per dimension under the
generator's q and under exp(-E)/Z, and the noise ablation redone with MALA at T = 1.

    python experiments/bits_per_dim.py toy      # (a) 8gaussians: AIS vs grid, NLL/KL under q and exp(-E)/Z
    python experiments/bits_per_dim.py digits   # (b) embedded digits: bits/dim under q and exp(-E)/Z
    python experiments/bits_per_dim.py mala     # (c) MALA (T = 1) vs gradient descent on 8gaussians, 3 seeds
    python experiments/bits_per_dim.py all

Training runs use the conventions of ``experiments/run.py``: each is a ``lightning-ebm fit``
command (printed before it runs) on a shipped config with overrides, results under
``experiments/results/bits_per_dim/`` (git-ignored), finished runs skipped. The evaluation of a
trained run (AIS, densities) is written next to it as ``eval.json`` and also skipped when present.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as base  # noqa: E402 - experiments/run.py, the driver whose machinery this reuses

EXPERIMENT = "bits_per_dim"
GRID_BOX = (-4.5, 4.5, -4.5, 4.5)


def toy_runs(seed: int = 0, extra: list[str] | None = None) -> list[base.Run]:
    """(a) the gradient-descent density recipe and the Langevin recipe, as shipped."""
    return [base.Run(EXPERIMENT, f"toy_{name}_seed{seed}", config, [f"--seed_everything={seed}", *(extra or [])],
                     {"part": "toy", "recipe": name, "seed": seed})
            for name, config in (("gd", "configs/toy2d_density.yaml"), ("langevin", "configs/toy2d_langevin.yaml"))]


def digits_runs(seed: int = 0, max_steps: int = 600, extra: list[str] | None = None) -> list[base.Run]:
    """(b) configs/digits.yaml shortened to ``max_steps``, with gradient descent and Langevin (noise 0.01)."""
    short = [f"--seed_everything={seed}", f"--trainer.max_steps={max_steps}",
             f"--trainer.val_check_interval={max_steps}"]
    langevin = ["--model.init_args.sampler.class_path=lightning_ebm.samplers.Langevin",
                "--model.init_args.sampler.init_args.noise_std=0.01"]
    return [base.Run(EXPERIMENT, f"digits_{name}_seed{seed}", "configs/digits.yaml", [*short, *o, *(extra or [])],
                     {"part": "digits", "recipe": name, "seed": seed})
            for name, o in (("gd", []), ("langevin", langevin))]


def mala_runs(seeds: list[int], max_steps: int | None = None, extra: list[str] | None = None) -> list[base.Run]:
    """(c) configs/toy2d.yaml with its gradient descent (60 steps of 0.05) and with MALA at T = 1, 60 steps
    of the same step size (proposal noise sqrt(2 * 0.05) = 0.316, the 'exact Langevin' level of run.py);
    ``max_steps`` shortens training (default: the config's 1000)."""
    mala = ["--model.init_args.sampler.class_path=lightning_ebm.samplers.MALA"]
    short = [] if max_steps is None else [f"--trainer.max_steps={max_steps}",
                                          f"--trainer.val_check_interval={max_steps}"]
    return [base.Run(EXPERIMENT, f"mala_{name}_seed{seed}" + ("" if max_steps is None else f"_steps{max_steps}"),
                     "configs/toy2d.yaml", [f"--seed_everything={seed}", *short, *o, *(extra or [])],
                     {"part": "mala", "sampler": name, "seed": seed})
            for name, o in (("gd", []), ("mala", mala)) for seed in seeds]


# ------------------------------------------------------------------ evaluation
def _checkpoint(run: base.Run) -> Path:
    return run.directory / "run" / "version_0" / "checkpoints" / "last.ckpt"


def _load(run: base.Run):
    from lightning_ebm import EBM

    model = EBM.load_from_checkpoint(_checkpoint(run), map_location="cpu").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _cached(run: base.Run, compute) -> dict:
    path = run.directory / "eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    out = compute(run)
    out["eval_s"] = round(time.perf_counter() - start, 1)
    path.write_text(json.dumps(out, indent=1))
    return out


def _noise_free(model):
    """The generator's deterministic part: Langevin with its noise removed is gradient descent."""
    from lightning_ebm.samplers import GradientDescent

    s = model.sampler
    return GradientDescent(s.steps, s.step_size, grad_clip=s.grad_clip, clamp=s.clamp)


def evaluate_toy(run: base.Run, ais: dict) -> dict:
    """log Z by AIS (from the grid's box) against grid quadrature; held-out NLL and Monte-Carlo KL from
    the data's exact density, under exp(-E)/Z and under the generator's q (Langevin: its noise-free part)."""
    import torch

    from lightning_ebm import density as dn
    from lightning_ebm.data.toy import Toy2DDataModule, sample_toy
    from lightning_ebm.latents import Uniform

    model = _load(run)
    x = sample_toy("8gaussians", 2000, seed=31_337)
    log_data = Toy2DDataModule("8gaussians").log_density(x).double()
    points, area = dn.grid_2d(GRID_BOX, 400, dtype=torch.float32)
    grid = float(dn.log_partition_on_grid(model.energy, points, area))
    box = Uniform((2,), GRID_BOX[0], GRID_BOX[1])
    result = model.estimate_log_partition(latent=box, generator=torch.Generator().manual_seed(0), **ais)
    out = {"log_z_grid": grid, "log_z_ais": result.log_z, "log_z_stderr": result.stderr, "ais_ess": result.ess,
           "ais_acceptance": result.acceptance, "ais_s": round(result.seconds, 1),
           "nll_data": float(-log_data.mean())}
    inside = ((x >= GRID_BOX[0]) & (x <= GRID_BOX[1])).all(1)
    out["data_inside_box"] = float(inside.double().mean())
    log_ebm = model.log_prob(x)
    out["nll_ebm"] = float(-log_ebm.mean())
    out["kl_data_ebm"] = float((log_data - log_ebm).mean())
    if not model.sampler.deterministic:
        model.sampler = _noise_free(model)
        out["q_of"] = "the noise-free dynamics (GradientDescent, same steps and step size)"
    log_q = model.generator_log_prob(x, batch_size=500).double()
    finite = torch.isfinite(log_q)
    out["q_finite"] = float(finite.double().mean())
    out["nll_q"] = float(-log_q.mean()) if bool(finite.all()) else math.inf
    out["nll_q_finite_part"] = float(-log_q[finite].mean())
    out["kl_data_q"] = float((log_data - log_q).mean()) if bool(finite.all()) else math.inf
    out["bpd_ebm"] = out["nll_ebm"] / (2 * math.log(2))
    out["bpd_q"] = out["nll_q"] / (2 * math.log(2))
    out["bpd_data"] = out["nll_data"] / (2 * math.log(2))
    return out


def digits_held_out(seed: int = 0):
    """The held-out digits (the DataModule's validation split), uniformly dequantised within their 17 levels."""
    import torch

    from lightning_ebm.data.digits import digits_split, digits_to_images, load_digits

    pixels, _ = load_digits()
    _, val = digits_split(len(pixels))
    held = pixels[val]
    noise = torch.rand(held.shape, generator=torch.Generator().manual_seed(seed))
    return digits_to_images(held, 8, "pad", noise=noise)


def evaluate_digits(run: base.Run, ais: dict) -> dict:
    """Held-out bits/dim (17 levels, dequantised) under exp(-E)/Z (AIS from the data cube [-1, 1]^64) and
    under the generator's q (inverting its dynamics; Langevin: its noise-free part)."""
    import torch

    from lightning_ebm.data.digits import DIGITS_LEVELS
    from lightning_ebm.latents import Uniform

    model = _load(run)
    x = digits_held_out()
    out: dict = {"num_points": int(x.shape[0])}
    cube = Uniform((1, 8, 8), -1.0, 1.0)
    # a convergence check first: half the annealing steps should give the same log Z within the error bars
    half = model.estimate_log_partition(latent=cube, generator=torch.Generator().manual_seed(1),
                                        **{**ais, "num_temps": ais["num_temps"] // 2})
    out.update({"log_z_ais_half_temps": half.log_z, "log_z_stderr_half_temps": half.stderr})
    result = model.estimate_log_partition(latent=cube, generator=torch.Generator().manual_seed(0), **ais)
    out.update({"log_z_ais": result.log_z, "log_z_stderr": result.stderr, "ais_ess": result.ess,
                "ais_acceptance": result.acceptance, "ais_s": round(result.seconds, 1),
                "log_z_uniform": 64 * math.log(2.0),
                "ais_acceptance_first_last": [float(result.acceptance_per_temp[0]),
                                              float(result.acceptance_per_temp[-1])]})
    ebm = model.bits_per_dim(x, num_levels=DIGITS_LEVELS)
    out.update({"bpd_ebm": ebm.value, "bpd_ebm_stderr_data": ebm.stderr_data,
                "bpd_ebm_stderr_log_z": ebm.stderr_log_z})
    if not model.sampler.deterministic:
        model.sampler = _noise_free(model)
        out["q_of"] = "the noise-free dynamics (GradientDescent, same steps and step size)"
    try:
        gen = model.bits_per_dim(x, which="generator", num_levels=DIGITS_LEVELS, batch_size=120,
                                 trace="exact")
    except ValueError as err:  # a step that is not invertible at some held-out points
        out["bpd_q_error"] = str(err).splitlines()[0][:300]
    else:
        finite = torch.isfinite(gen.per_example)
        out.update({"bpd_q": gen.value, "bpd_q_stderr_data": gen.stderr_data,
                    "q_finite": float(finite.double().mean()),
                    "bpd_q_finite_part": float(gen.per_example[finite].mean()) if finite.any() else math.nan})
    out["bpd_uniform"] = math.log2(DIGITS_LEVELS)  # the uniform density on the cube, for scale
    return out


def evaluate_mala(run: base.Run) -> dict:
    result = json.loads((run.directory / "result.json").read_text())
    return {k: result[k] for k in ("val/mmd", "val/mmd_floor", "val/sw", base.LOCAL_MMD, "train/nfe", "wall_s")
            if k in result}


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["toy", "digits", "mala", "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of 'mala'")
    parser.add_argument("--digits_steps", type=int, default=600, help="training steps of the digits runs")
    parser.add_argument("--mala_steps", type=int, default=None,
                        help="training steps of the 'mala' runs (default: configs/toy2d.yaml's 1000)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--num_chains", type=int, default=512)
    parser.add_argument("--num_temps", type=int, default=1000)
    parser.add_argument("--step_size", type=float, default=0.05, help="AIS MALA step size (2-D)")
    parser.add_argument("--digits_step_size", type=float, default=0.002, help="AIS MALA step size (digits)")
    parser.add_argument("--train_only", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    if args.out is not None:
        base.RESULTS = args.out
    start = time.perf_counter()
    out = base.RESULTS / EXPERIMENT
    report: dict = {}
    if args.part in ("mala", "all"):
        runs = mala_runs(args.seeds, args.mala_steps, args.extra)
        base.execute_all(runs, args.jobs, "8gaussians")
        if not args.train_only:
            rows = [{**r.labels, **evaluate_mala(r)} for r in runs]
            report["mala"] = rows
            for name in ("gd", "mala"):
                vals = [r for r in rows if r["sampler"] == name]
                print(name, {k: (statistics.fmean(v[k] for v in vals), statistics.stdev(v[k] for v in vals)
                                 if len(vals) > 1 else 0.0)
                             for k in ("val/mmd", "val/mmd_floor", base.LOCAL_MMD, "wall_s")})
            print("floor", base.data_floor("configs/toy2d.yaml", 20))
    if args.part in ("toy", "all"):
        runs = toy_runs(0, args.extra)
        base.execute_all(runs, args.jobs)
        if not args.train_only:
            ais = dict(num_chains=args.num_chains, num_temps=args.num_temps, step_size=args.step_size)
            report["toy"] = [{**r.labels, **_cached(r, lambda r: evaluate_toy(r, ais))} for r in runs]
    if args.part in ("digits", "all"):
        runs = digits_runs(0, args.digits_steps, args.extra)
        base.execute_all(runs, args.jobs)
        if not args.train_only:
            ais = dict(num_chains=args.num_chains // 4, num_temps=args.num_temps,
                       step_size=args.digits_step_size)
            report["digits"] = [{**r.labels, **_cached(r, lambda r: evaluate_digits(r, ais))} for r in runs]
    out.mkdir(parents=True, exist_ok=True)
    if report:
        (out / f"report_{args.part}.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
