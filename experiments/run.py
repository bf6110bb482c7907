"""Reproduce the paper's findings with lightning_ebm: one driver, results as CSV and PNG.

    python experiments/run.py noise      # GradientDescent vs Langevin at several noise levels, 3 seeds
    python experiments/run.py noise_digits --seeds 0 1   # the same on the embedded digits (digits FID)
    python experiments/run.py ode        # GradientDescent vs ODE (rk4, dopri5) at equal gradient budgets
    python experiments/run.py density    # data | generator q | exp(-E)/Z on three toy sets (first seed)
    python experiments/run.py objectives # every objective on three toy sets, 3 seeds: the KLs, MMD, wall time
    python experiments/run.py all

Every training run is a `lightning-ebm fit` command (printed before it runs) on a shipped config
with overrides, so any single result can be reproduced by hand. Results go to
`experiments/results/<experiment>/` (git-ignored): one directory per run holding the Lightning run
and a `result.json`, plus `summary.csv`, `table.md` and a plot. The driver resumes where it
stopped: finished runs (with a `result.json`) are skipped, and an interrupted run restarts from its
`last.ckpt`. `--jobs 2` runs two single-threaded trainings at once, which is faster on 2 cores than
one two-threaded run (the toy models are overhead-bound).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


@dataclass
class Run:
    """One training run: a config, overrides, and the labels it is grouped by in the summary."""

    experiment: str
    name: str
    config: str
    overrides: list[str]
    labels: dict[str, object] = field(default_factory=dict)

    @property
    def directory(self) -> Path:
        return RESULTS / self.experiment / self.name

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "lightning_ebm.cli", "fit", "--config", str(ROOT / self.config),
            f"--trainer.logger.init_args.save_dir={self.directory}", "--trainer.logger.init_args.name=run",
            "--trainer.logger.init_args.version=0", "--trainer.enable_progress_bar=false", *self.overrides,
        ]


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of every metric in a CSVLogger run."""
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if value not in ("", None) and key not in ("epoch",):
                last[key] = float(value)
    return last


def execute(run: Run, threads: int) -> dict:
    result_file = run.directory / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    run_dir = run.directory / "run" / "version_0"
    command = run.command()
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        command.append(f"--ckpt_path={last}")  # resume an interrupted run
    print("$", " ".join(command[1:]), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    run.directory.mkdir(parents=True, exist_ok=True)
    with open(run.directory / "log.txt", "a") as log:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"run {run.experiment}/{run.name} failed; see {run.directory / 'log.txt'}")
    result = {"experiment": run.experiment, "name": run.name, **run.labels,
              "wall_s": round(time.perf_counter() - start, 1), **final_metrics(run_dir)}
    result_file.write_text(json.dumps(result, indent=1))
    return result


def execute_all(runs: list[Run], jobs: int, dataset: str | None = None) -> list[dict]:
    """Run (or resume) every run; with a toy ``dataset``, add the narrow-kernel MMD of each final model."""
    threads = max(1, (os.cpu_count() or 2) // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda r: execute(r, threads), runs))
    if dataset is not None:
        for run, result in zip(runs, results, strict=True):
            if LOCAL_MMD not in result:
                result[LOCAL_MMD] = local_mmd(run.directory / "run" / "version_0" / "checkpoints" / "last.ckpt",
                                              dataset)
                (run.directory / "result.json").write_text(json.dumps(result, indent=1))
    return results


# The median-heuristic bandwidth of val/mmd is about the size of the whole data set (about 4 on
# 8gaussians, whose modes are 2.2 apart), so it barely sees how samples are spread within and between
# modes: a ring through the 8 modes scores like the 8 Gaussians. A fixed narrow kernel does.
LOCAL_BANDWIDTH = 0.25
LOCAL_MMD = f"eval/mmd_h{LOCAL_BANDWIDTH}"
LOCAL_DRAWS = 5


def local_mmd(checkpoint: Path, dataset: str, n: int = 2000, draws: int = LOCAL_DRAWS) -> float:
    """MMD with bandwidth ``LOCAL_BANDWIDTH`` between ``n`` samples of the final generator (fixed
    latents) and ``n`` fresh data points, averaged over ``draws`` independent data samples."""
    import torch

    from lightning_ebm import EBM
    from lightning_ebm.data.toy import sample_toy
    from lightning_ebm.metrics import mmd_rbf

    model = EBM.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    x = model.generate(n, generator=torch.Generator().manual_seed(12345))
    return statistics.fmean(float(mmd_rbf(x, sample_toy(dataset, n, seed=20_000 + d), LOCAL_BANDWIDTH))
                            for d in range(draws))


# ------------------------------------------------------------------ experiments
# 0.316 ~ sqrt(2 * 0.05): exact Langevin at temperature 1 for the recipe's step size 0.05
NOISE_2D = (0.0, 0.01, 0.03, 0.1, 0.316)


NOISE_DIGITS = (0.0, 0.005, 0.01)


def noise_runs(seeds: list[int], levels: tuple[float, ...] = NOISE_2D, experiment: str = "noise",
               config: str = "configs/toy2d.yaml") -> list[Run]:
    runs = []
    for noise in levels:
        for seed in seeds:
            if noise == 0.0:
                sampler = ["--model.init_args.sampler.class_path=lightning_ebm.samplers.GradientDescent"]
            else:
                sampler = ["--model.init_args.sampler.class_path=lightning_ebm.samplers.Langevin",
                           f"--model.init_args.sampler.init_args.noise_std={noise}"]
            runs.append(Run(experiment, f"noise{noise}_seed{seed}", config,
                            [f"--seed_everything={seed}", *sampler], {"noise_std": noise, "seed": seed}))
    return runs


def ode_runs(seeds: list[int], config: str = "configs/toy2d.yaml") -> list[Run]:
    """60 gradient evaluations per sample each: GD 60 x 0.05; rk4 15 steps of 0.2; dopri5 adaptive."""
    variants = {
        "gd": [],
        "rk4": ["--model.init_args.sampler=lightning_ebm.samplers.ODE", "--model.init_args.sampler.init_args.t_end=3.0",
                "--model.init_args.sampler.init_args.method=rk4", "--model.init_args.sampler.init_args.step_size=0.2"],
        "dopri5": ["--model.init_args.sampler=lightning_ebm.samplers.ODE",
                   "--model.init_args.sampler.init_args.t_end=3.0", "--model.init_args.sampler.init_args.method=dopri5",
                   "--model.init_args.sampler.init_args.rtol=1e-2", "--model.init_args.sampler.init_args.atol=1e-2"],
    }
    return [Run("ode", f"{name}_seed{seed}", config, [f"--seed_everything={seed}", *overrides],
                {"sampler": name, "seed": seed})
            for name, overrides in variants.items() for seed in seeds]


DENSITY_DATASETS = ("8gaussians", "checkerboard", "rings")


def density_runs(seeds: list[int], datasets: tuple[str, ...] = DENSITY_DATASETS, ode: bool = False,
                 config: str = "configs/toy2d_density.yaml") -> list[Run]:
    """configs/toy2d_density.yaml (and the ODE variant) on several toy sets: data | q | exp(-E)/Z."""
    configs = {"gd": config}
    if ode:
        configs["ode"] = "configs/toy2d_density_ode.yaml"
    return [Run("density", f"{data}_{sampler}_seed{seed}", config,
                [f"--seed_everything={seed}", f"--data.init_args.name={data}"],
                {"dataset": data, "sampler": sampler, "seed": seed})
            for data in datasets for sampler, config in configs.items() for seed in seeds]


def summarise_density(results: list[dict], out: Path) -> None:
    """One row per run: the three KLs and TVs of the final density panel, and the generator's mass."""
    keys = ["kl_data_gen", "kl_data_ebm", "kl_gen_ebm", "tv_data_gen", "tv_data_ebm", "mass_gen"]
    with open(out / "runs.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(k for r in results for k in r))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(results)
    lines = ["| dataset | sampler | seed | KL(data‖q) | KL(data‖EBM) | KL(q‖EBM) | TV(data,q) | TV(data,EBM) "
             "| ∫q on grid | MMD (floor) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = " | ".join(f"{r.get(f'density/{k}', float('nan')):.3f}" for k in keys)
        lines.append(f"| {r['dataset']} | {r['sampler']} | {r['seed']} | {cells} "
                     f"| {r['val/mmd']:.4f} ({r['val/mmd_floor']:.4f}) |")
        figure = sorted((out / r["name"] / "run" / "version_0" / "images").glob("density_2d_step*.png"))
        if figure:
            (out / f"{r['name']}_density.png").write_bytes(figure[-1].read_bytes())
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


# Every objective with its shipped 2-D config (each config's own budget: 1200 steps, batch 256; generation by
# 60 gradient-descent steps from a Gaussian, except DRL, whose generator runs its noise levels down).
OBJECTIVE_CONFIGS = {
    "maximum likelihood": "configs/toy2d_density.yaml",
    "multi-level DSM": "configs/toy2d_dsm.yaml",
    "sliced SM": "configs/toy2d_ssm.yaml",
    "NCE": "configs/toy2d_nce.yaml",
    "DRL": "configs/toy2d_drl.yaml",
}
#: the density grid of the objective comparison (every toy set lies inside it)
OBJECTIVE_BOUNDS = (-4.5, 4.5, -4.5, 4.5)
#: only the checkpoint: the configs' plotting callbacks would be timed with the training otherwise
CHECKPOINT_ONLY = ('--trainer.callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
                   '"init_args": {"save_last": true}}]')


def objective_runs(seeds: list[int], datasets: tuple[str, ...] = DENSITY_DATASETS,
                   objectives: tuple[str, ...] = tuple(OBJECTIVE_CONFIGS)) -> list[Run]:
    return [Run("objectives", f"{data}_{name.replace(' ', '_')}_seed{seed}", OBJECTIVE_CONFIGS[name],
                [f"--seed_everything={seed}", f"--data.init_args.name={data}", CHECKPOINT_ONLY],
                {"dataset": data, "objective": name, "seed": seed})
            for data in datasets for name in objectives for seed in seeds]


def grid_densities(checkpoint: Path, dataset: str, grid_size: int = 100) -> dict:
    """data, generator ``q`` (``None`` if the generator has no density) and ``exp(-E)/Z`` on one grid."""
    import torch

    from lightning_ebm import EBM, density
    from lightning_ebm.data import toy_log_density

    model = EBM.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    points, area = density.grid_2d(OBJECTIVE_BOUNDS, grid_size, dtype=torch.float32)
    log_data = toy_log_density(dataset, points)
    with torch.no_grad():
        log_ebm = density.ebm_log_density(model.energy, points, area)
    log_gen, note = None, _no_density_note(model)
    if note is None:
        try:
            log_gen = model.generator_log_prob(points, batch_size=4096, generator=torch.Generator().manual_seed(0))
        except ValueError as err:  # a gradient-descent step that is not a contraction of the final energy
            print(f"  {checkpoint.parents[3].name}: no generator density ({str(err).splitlines()[0][:100]})")
            note = "q undefined: the final\ndynamics are not invertible"
    return {"area": area, "size": grid_size, "data": log_data, "gen": log_gen, "ebm": log_ebm, "note": note}


def _no_density_note(model) -> str | None:
    """Why the generator of ``model`` has no density by construction (a noisy sampler), else ``None``."""
    from lightning_ebm import density

    try:
        density.check_density(model.sampler, model.latent)
    except ValueError:
        return "no density\n(noisy generator)"
    return None


def evaluate_objective_runs(runs: list[Run], results: list[dict]) -> None:
    """Add KL(data‖exp(-E)/Z), KL(data‖q) and the narrow-kernel MMD of each final model (once per run)."""
    import torch

    from lightning_ebm import density

    for run, result in zip(runs, results, strict=True):
        checkpoint = run.directory / "run" / "version_0" / "checkpoints" / "last.ckpt"
        grids = run.directory / "grids.pt"
        if "kl_data_ebm" not in result:
            g = grid_densities(checkpoint, result["dataset"])
            torch.save(g, grids)
            result["kl_data_ebm"] = float(density.kl_on_grid(g["data"], g["ebm"], g["area"]))
            if g["gen"] is not None:
                result["kl_data_gen"] = float(density.kl_on_grid(g["data"], g["gen"], g["area"]))
                result["kl_gen_ebm"] = float(density.kl_on_grid(g["gen"], g["ebm"], g["area"]))
            result[LOCAL_MMD] = local_mmd(checkpoint, result["dataset"])
            (run.directory / "result.json").write_text(json.dumps(result, indent=1))


OBJECTIVE_COLUMNS = (("kl_data_ebm", "KL(data‖exp(-E)/Z)", 2), ("kl_data_gen", "KL(data‖q)", 2),
                     ("kl_gen_ebm", "KL(q‖exp(-E)/Z)", 2), (LOCAL_MMD, f"MMD h={LOCAL_BANDWIDTH}", 4),
                     ("wall_s", "wall (s)", 0))


def summarise_objectives(results: list[dict], floors: dict[str, dict], out: Path) -> list[dict]:
    """Mean ± std over seeds per (dataset, objective), with each set's data-vs-data narrow-kernel floor."""
    rows = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        for name in dict.fromkeys(r["objective"] for r in results):
            members = [r for r in results if r["dataset"] == dataset and r["objective"] == name]
            if not members:
                continue
            row: dict = {"dataset": dataset, "objective": name, "runs": len(members)}
            for metric, _, _ in OBJECTIVE_COLUMNS:
                values = [r[metric] for r in members if metric in r]
                if values:
                    row[f"{metric}_mean"] = statistics.fmean(values)
                    row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                    row[f"{metric}_runs"] = len(values)
            rows.append(row)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in results for k in r)))
        writer.writeheader()
        writer.writerows(results)

    def cell(r: dict, m: str, digits: int) -> str:
        if f"{m}_mean" not in r:
            return "—"
        text = f"{r[f'{m}_mean']:.{digits}f}"
        if r[f"{m}_runs"] > 1:
            text += f" ± {r[f'{m}_std']:.{digits}f}"
        if r[f"{m}_runs"] < r["runs"]:  # q exists only where the final dynamics can be inverted
            text += f" ({r[f'{m}_runs']} of {r['runs']})"
        return text

    lines = ["| dataset | objective | runs | " + " | ".join(label for _, label, _ in OBJECTIVE_COLUMNS) + " |",
             "|" + "---|" * (len(OBJECTIVE_COLUMNS) + 3)]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['objective']} | {r['runs']} | "
                     + " | ".join(cell(r, m, d) for m, _, d in OBJECTIVE_COLUMNS) + " |")
    lines.append("")
    for dataset, floor in floors.items():
        lines.append(f"Data vs data ({dataset}), MMD h={LOCAL_BANDWIDTH} over {floor['draws']} pairs of "
                     f"{floor['n']} points: {floor['local_mean']:.4f} ± {floor['local_std']:.4f}.")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def plot_objectives(runs: list[Run], results: list[dict], out: Path) -> list[Path]:
    """Per data set, one row per objective (first seed): data | generator q | exp(-E)/Z, shared colour scale."""
    import torch
    from matplotlib.figure import Figure

    paths = []
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        chosen = [(run, r) for run, r in zip(runs, results, strict=True)
                  if r["dataset"] == dataset and r["seed"] == min(x["seed"] for x in results)]
        fig = Figure(figsize=(7.5, 2.4 * len(chosen)), dpi=90)
        axes = fig.subplots(len(chosen), 3, squeeze=False)
        for row, (run, r) in zip(axes, chosen, strict=True):
            g = torch.load(run.directory / "grids.pt", weights_only=True)
            n = g["size"]
            top = float(g["data"].double().exp().max())
            panels = (("data", g["data"]), (f"q  KL(data‖q)={r.get('kl_data_gen', float('nan')):.2f}", g["gen"]),
                      (f"exp(-E)/Z  KL(data‖·)={r['kl_data_ebm']:.2f}", g["ebm"]))
            for ax, (title, log_p) in zip(row, panels, strict=True):
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(title, fontsize=8)
                if log_p is None:
                    ax.text(0.5, 0.5, g.get("note") or "no density", ha="center", va="center", fontsize=8)
                    continue
                ax.imshow(log_p.double().exp().reshape(n, n).numpy(), origin="lower", extent=OBJECTIVE_BOUNDS,
                          vmin=0, vmax=top, cmap="viridis")
            row[0].set_ylabel(r["objective"], fontsize=9)
        fig.suptitle(f"{dataset}: data | generator q | exp(-E)/Z (seed {chosen[0][1]['seed']})", fontsize=10)
        fig.tight_layout()
        path = out / f"objectives_{dataset}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------ summaries
def _data_args(config: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / config).read_text())["data"]["init_args"]


def data_floor(config: str = "configs/toy2d.yaml", draws: int = 20, dataset: str | None = None) -> dict[str, float]:
    """Spread of the data-vs-data MMD and sliced Wasserstein at the validation sample size.

    Every run logs the floor of one fixed split of its held-out data; how much that statistic
    varies between independent data samples says which differences between runs are real.
    """
    from lightning_ebm.data.toy import sample_toy
    from lightning_ebm.metrics import mmd_rbf, sliced_wasserstein

    data_args = _data_args(config)
    n = min(data_args["num_val"], 4000) // 2  # EBM.val_max_samples (4000) split in halves
    mmd, sw, local = [], [], []
    for draw in range(draws):
        data = sample_toy(dataset or data_args["name"], 2 * n, seed=10_000 + draw)
        mmd.append(float(mmd_rbf(data[:n], data[n:])))
        sw.append(float(sliced_wasserstein(data[:n], data[n:])))
        local.append(float(mmd_rbf(data[:n], data[n:], LOCAL_BANDWIDTH)))
    return {"dataset": dataset or data_args["name"], "n": n, "draws": draws,
            "mmd_mean": statistics.fmean(mmd), "mmd_std": statistics.stdev(mmd),
            "mmd_min": min(mmd), "mmd_max": max(mmd), "sw_mean": statistics.fmean(sw),
            "sw_std": statistics.stdev(sw), "sw_min": min(sw), "sw_max": max(sw),
            "local_mean": statistics.fmean(local), "local_std": statistics.stdev(local),
            "local_min": min(local), "local_max": max(local)}


def write_floor(floor: dict[str, float], out: Path) -> None:
    (out / "floor.json").write_text(json.dumps(floor, indent=1))
    line = (f"\nData vs data ({floor['dataset']}) over {floor['draws']} independent pairs of {floor['n']} points: "
            f"MMD {floor['mmd_mean']:.4f} ± {floor['mmd_std']:.4f} (range {floor['mmd_min']:.4f}–"
            f"{floor['mmd_max']:.4f}), sliced W {floor['sw_mean']:.4f} ± {floor['sw_std']:.4f} "
            f"(range {floor['sw_min']:.4f}–{floor['sw_max']:.4f}), MMD h={LOCAL_BANDWIDTH} "
            f"{floor['local_mean']:.4f} ± {floor['local_std']:.4f} (range {floor['local_min']:.4f}–"
            f"{floor['local_max']:.4f}).\n")
    with open(out / "table.md", "a") as f:
        f.write(line)
    print(line)


METRICS = ("val/mmd", "val/sw", "val/mmd_floor", "val/sw_floor", LOCAL_MMD, "val/fid", "val/kid_mean", "val/is_mean",
           "train/nfe", "wall_s")
COLUMNS_2D = (("val/mmd", "MMD", 4), ("val/mmd_floor", "MMD floor", 4), ("val/sw", "sliced W", 4),
              ("val/sw_floor", "SW floor", 4), (LOCAL_MMD, f"MMD h={LOCAL_BANDWIDTH}", 4),
              ("train/nfe", "grad evals", 0), ("wall_s", "wall (s)", 0))
COLUMNS_IMAGES = (("val/fid", "digits FID", 2), ("val/kid_mean", "KID", 4), ("val/is_mean", "IS", 2),
                  ("wall_s", "wall (s)", 0))


def summarise(results: list[dict], group: str, out: Path,
              columns: tuple[tuple[str, str, int], ...] = COLUMNS_2D) -> list[dict]:
    """Mean and standard deviation over seeds of each metric, per value of ``group``."""
    rows = []
    for key in dict.fromkeys(r[group] for r in results):
        members = [r for r in results if r[group] == key]
        row: dict = {group: key, "runs": len(members)}
        for metric in METRICS:
            values = [r[metric] for r in members if metric in r]
            if values:
                row[f"{metric}_mean"] = statistics.fmean(values)
                row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "runs.csv", "w", newline="") as f:
        keys = list(dict.fromkeys(k for r in results for k in r))
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(results)
    def cell(r: dict, m: str, digits: int) -> str:
        return f"{r[f'{m}_mean']:.{digits}f} ± {r[f'{m}_std']:.{digits}f}" if f"{m}_mean" in r else "-"

    lines = ["| " + " | ".join([group, "runs", *(label for _, label, _ in columns)]) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for r in rows:
        lines.append("| " + " | ".join([str(r[group]), str(r["runs"]),
                                        *(cell(r, m, d) for m, _, d in columns)]) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def plot_noise(rows: list[dict], floor: dict[str, float], out: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), dpi=100)
    axes = fig.subplots(1, 3)
    x = [r["noise_std"] for r in rows]
    panels = (("val/mmd", "mmd", "MMD, median-heuristic bandwidth"), ("val/sw", "sw", "sliced Wasserstein"),
              (LOCAL_MMD, "local", f"MMD, bandwidth {LOCAL_BANDWIDTH} (local shape)"))
    for ax, (metric, key, title) in zip(axes, panels, strict=True):
        ax.errorbar(x, [r[f"{metric}_mean"] for r in rows], yerr=[r[f"{metric}_std"] for r in rows],
                    marker="o", capsize=4, label="generator (mean ± std over seeds)")
        mean, std = floor[f"{key}_mean"], floor[f"{key}_std"]
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.25, lw=0,
                   label=f"data vs data, mean ± std of {floor['draws']} draws")
        ax.axhline(mean, ls="--", c="grey", lw=1)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(-0.002, 1.3 * max(x))
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.set_xlabel("Langevin noise_std (0 = gradient descent)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"{floor['dataset']}, same recipe at every noise level; mean ± std over seeds", fontsize=10)
    fig.tight_layout()
    path = out / "noise.png"
    fig.savefig(path)
    return path


def plot_noise_digits(rows: list[dict], out: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 3.6), dpi=110)
    ax = fig.subplots()
    x = [r["noise_std"] for r in rows]
    ax.errorbar(x, [r["val/fid_mean"] for r in rows], yerr=[r["val/fid_std"] for r in rows], marker="o",
                capsize=4)
    ax.set_xticks(x, [f"{v:g}" for v in x])
    ax.set_xlabel("Langevin noise_std (0 = gradient descent)")
    ax.set_ylabel("digits FID (lower is better)")
    ax.set_title("digits, configs/digits.yaml; mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    path = out / "noise_digits.png"
    fig.savefig(path)
    return path


def main(argv: list[str] | None = None) -> None:
    global RESULTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", choices=["noise", "noise_digits", "ode", "density", "objectives", "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise_levels", type=float, nargs="+", default=None,
                        help="Langevin noise_std values of the noise ablations (0 = GradientDescent; default "
                             f"{NOISE_2D} on 2-D, {NOISE_DIGITS} on digits)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings run at once")
    parser.add_argument("--datasets", nargs="+", default=list(DENSITY_DATASETS),
                        help="toy sets of the density comparison")
    parser.add_argument("--config", default=None,
                        help="config of 'noise', 'noise_digits' and 'ode' instead of the shipped "
                             "configs/toy2d.yaml or configs/digits.yaml")
    parser.add_argument("--dataset", default=None,
                        help="toy set of 'noise' and 'ode' instead of the config's (8gaussians); use another "
                             "--out so the results do not mix")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVE_CONFIGS), choices=list(OBJECTIVE_CONFIGS),
                        metavar="NAME", help=f"objectives of 'objectives' (default all: {list(OBJECTIVE_CONFIGS)})")
    parser.add_argument("--density_ode", action="store_true", help="also run the ODE generator in 'density'")
    parser.add_argument("--density_config", default="configs/toy2d_density.yaml",
                        help="config of the gradient-descent runs of 'density'")
    parser.add_argument("--floor_draws", type=int, default=20,
                        help="independent data-vs-data pairs behind the floor's spread in the tables and plot")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default experiments/results)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="overrides appended to every run (e.g. --trainer.max_steps=100)")
    args = parser.parse_args(argv)
    RESULTS = args.out or RESULTS
    toy_config = args.config or "configs/toy2d.yaml"
    if args.dataset is not None:
        args.extra = [f"--data.init_args.name={args.dataset}", *args.extra]
    start = time.perf_counter()
    if args.experiment in ("noise", "all"):
        runs = noise_runs(args.seeds, tuple(args.noise_levels or NOISE_2D), config=toy_config)
        for run in runs:
            run.overrides += args.extra
        toy_name = args.dataset or _data_args(toy_config)["name"]
        rows = summarise(execute_all(runs, args.jobs, toy_name), "noise_std", RESULTS / "noise")
        floor = data_floor(toy_config, args.floor_draws, args.dataset)
        write_floor(floor, RESULTS / "noise")
        print("plot:", plot_noise(rows, floor, RESULTS / "noise"))
    if args.experiment in ("noise_digits", "all"):
        runs = noise_runs(args.seeds, tuple(args.noise_levels or NOISE_DIGITS), "noise_digits",
                          args.config or "configs/digits.yaml")
        for run in runs:
            run.overrides += args.extra
        rows = summarise(execute_all(runs, args.jobs), "noise_std", RESULTS / "noise_digits", COLUMNS_IMAGES)
        print("plot:", plot_noise_digits(rows, RESULTS / "noise_digits"))
    if args.experiment in ("ode", "all"):
        runs = ode_runs(args.seeds, toy_config)
        for run in runs:
            run.overrides += args.extra
        toy_name = args.dataset or _data_args(toy_config)["name"]
        summarise(execute_all(runs, args.jobs, toy_name), "sampler", RESULTS / "ode")
        write_floor(data_floor(toy_config, args.floor_draws, args.dataset), RESULTS / "ode")
    if args.experiment in ("density", "all"):
        runs = density_runs(args.seeds[:1], tuple(args.datasets), args.density_ode, args.density_config)
        for run in runs:
            run.overrides += args.extra
        summarise_density(execute_all(runs, args.jobs), RESULTS / "density")
    if args.experiment in ("objectives", "all"):
        runs = objective_runs(args.seeds, tuple(args.datasets), tuple(args.objectives))
        for run in runs:
            run.overrides += args.extra
        results = execute_all(runs, args.jobs)
        evaluate_objective_runs(runs, results)
        out = RESULTS / "objectives"
        floors = {d: data_floor("configs/toy2d.yaml", args.floor_draws, d) for d in args.datasets}
        summarise_objectives(results, floors, out)
        print("plots:", *plot_objectives(runs, results, out))
    print(f"total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
