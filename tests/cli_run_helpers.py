"""Real ``lightning-ebm fit`` subprocesses on a shrunk toy default, for the preemption and resume tests.

The shrunk recipe is ``configs/toy2d.yaml`` with a smaller MLP, 10 sampler steps, batches of 64,
validation every 40 steps, metrics written to ``metrics.csv`` after every step (so a test can see
which step the run has reached) and Plot2D drawing only at the end: 120 steps take ~10 s of CPU.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 120
VAL_EVERY = 40


def small_config(directory: Path, name: str = "toy2d", data: str = "8gaussians") -> Path:
    config = yaml.safe_load((ROOT / "configs" / "toy2d.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=MAX_STEPS, val_check_interval=VAL_EVERY, log_every_n_steps=1,
                   enable_progress_bar=False, enable_model_summary=False)
    trainer["logger"]["init_args"].update(save_dir="runs", name=name, flush_logs_every_n_steps=1)
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("Plot2D"):
            callback["init_args"]["every_n_steps"] = 10_000
    model = config["model"]["init_args"]
    model["energy"]["init_args"].update(hidden=32, num_layers=2)
    model["sampler"]["init_args"]["steps"] = 10
    model["val_max_samples"] = 256
    config["data"]["init_args"].update(name=data, batch_size=64, batches_per_epoch=50, num_val=256)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def lightning_ebm() -> list[str]:
    """The console script of this interpreter's environment (the one a user runs)."""
    script = Path(sys.executable).with_name("lightning-ebm")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lightning_ebm.cli"]


def start(cwd: Path, *args: str, command: list[str] | None = None, log: str = "fit.log") -> subprocess.Popen:
    out = open(cwd / log, "w")  # noqa: SIM115  (closed with the process by the caller's wait)
    return subprocess.Popen([*(command or lightning_ebm()), *args], cwd=cwd, env=child_env(), stdout=out,
                            stderr=subprocess.STDOUT, text=True)


def run(cwd: Path, *args: str, log: str = "fit.log", timeout: float = 300) -> tuple[int, str]:
    process = start(cwd, *args, log=log)
    rc = process.wait(timeout=timeout)
    return rc, (cwd / log).read_text()


def wait_until(condition, timeout: float = 120, what: str = "", process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended (rc {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def metric_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def last_train_step(path: Path) -> int:
    """The highest ``step`` of a training row in ``metrics.csv`` (-1 before the first)."""
    steps = [int(r["step"]) for r in metric_rows(path) if r.get("train/loss")]
    return max(steps, default=-1)


def comparable_rows(path: Path) -> list[tuple]:
    """The rows of ``metrics.csv`` without throughput columns (wall-clock, different in every run)."""
    rows = metric_rows(path)
    return [tuple(sorted((k, v) for k, v in r.items() if "per_sec" not in k)) for r in rows]


def training_state(ckpt: Path) -> dict[str, Any]:
    c = torch.load(ckpt, map_location="cpu", weights_only=False)
    return {"global_step": c["global_step"], "state_dict": c["state_dict"], "optimizer": c["optimizer_states"],
            "rng": c.get("lightning_ebm")}
