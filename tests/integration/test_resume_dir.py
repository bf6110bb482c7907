"""``fit --ckpt_path`` continues the run directory the checkpoint came from, and names changed settings.

Before: a resume wrote a new ``version_N`` (one run's metrics.csv split in two) and a 2spirals
checkpoint resumed with the 8gaussians config said nothing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_run_helpers import MAX_STEPS, comparable_rows, metric_rows, run, small_config, training_state
from lightning.pytorch.loggers import CSVLogger
from reliability_helpers import differences

from lightning_ebm._resume import config_differences, continue_csv_metrics, plan_resume
from lightning_ebm.callbacks import PreemptionCheckpoint
from lightning_ebm.cli import EBMCLI

RUN = Path("runs") / "toy2d" / "version_0"
HALF = 60


@pytest.fixture(scope="module")
def half_run(tmp_path_factory) -> Path:
    """The shrunk recipe stopped by max_steps at step 60 (mid-epoch), in runs/toy2d/version_0."""
    cwd = tmp_path_factory.mktemp("half")
    rc, log = run(cwd, "fit", "--config", str(small_config(cwd)), f"--trainer.max_steps={HALF}")
    assert rc == 0, log[-3000:]
    return cwd


def copy_of(half_run: Path, tmp_path: Path) -> Path:
    shutil.copytree(half_run, tmp_path / "w")
    return tmp_path / "w"


def periodic_checkpoint(cwd: Path) -> Path:
    (path,) = (cwd / RUN / "checkpoints").glob("epoch=*-step=*.ckpt")
    return path


def test_an_explicit_checkpoint_of_a_run_continues_that_run_and_equals_the_run_in_one_go(half_run, tmp_path,
                                                                                       reference_run):
    cwd = copy_of(half_run, tmp_path)
    (cwd / "runs" / "toy2d" / "version_1").mkdir()  # another run of the same logger, newer
    ckpt = periodic_checkpoint(cwd)
    step = torch.load(ckpt, weights_only=True)["global_step"]
    assert 0 < step <= HALF
    rc, log = run(cwd, "fit", "--config", str(cwd / "toy2d.yaml"), "--ckpt_path", str(ckpt.relative_to(cwd)))
    assert rc == 0, log[-3000:]
    assert "differs" not in log  # max_steps changed: a trainer setting, silently
    assert sorted(p.name for p in (cwd / "runs" / "toy2d").iterdir()) == ["version_0", "version_1"]
    # resumed from a checkpoint written before last.ckpt, ModelCheckpoint names its own last-v1.ckpt
    newest = max((cwd / RUN / "checkpoints").glob("last*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    assert differences(training_state(reference_run / "checkpoints" / "last.ckpt"), training_state(newest)) == []
    got, want = comparable_rows(cwd / RUN / "metrics.csv"), comparable_rows(reference_run / "metrics.csv")
    assert sorted(got) == sorted(want)  # one metrics.csv, no row twice, none missing
    assert max(int(r["step"]) for r in metric_rows(cwd / RUN / "metrics.csv")) == MAX_STEPS - 1


def test_a_resume_with_other_data_or_model_settings_names_the_keys(half_run, tmp_path):
    cwd = copy_of(half_run, tmp_path)
    rc, log = run(cwd, "fit", "--config", str(small_config(cwd, data="2spirals")), "--ckpt_path", "last",
                  f"--trainer.max_steps={HALF + 2}", "--model.init_args.alpha=0.25")
    assert rc == 0, log[-3000:]
    assert "differs from the one it was trained with" in log
    assert "data.init_args.name: '8gaussians' in the checkpoint, '2spirals' now" in log
    assert "model.init_args.alpha: 0.1 in the checkpoint, 0.25 now" in log
    named = [line.strip() for line in log.splitlines() if " in the checkpoint, " in line]
    assert len(named) == 2, named  # max_steps differs too: a trainer setting, not named


def test_the_config_s_own_logger_version_is_respected(half_run, tmp_path):
    cwd = copy_of(half_run, tmp_path)
    ckpt = RUN / "checkpoints" / "last.ckpt"
    step = torch.load(cwd / ckpt, weights_only=True)["global_step"]
    metrics_before = (cwd / RUN / "metrics.csv").read_bytes()
    rc, log = run(cwd, "fit", "--config", str(cwd / "toy2d.yaml"), "--ckpt_path", str(ckpt),
                  f"--trainer.max_steps={step + 2}", "--trainer.logger.init_args.version=mine")
    assert rc == 0, log[-3000:]
    assert "in the config's own logger version 'mine'" in log
    assert f"Restored all states from the checkpoint at {ckpt}" in log
    assert (cwd / RUN / "metrics.csv").read_bytes() == metrics_before  # the checkpoint's run: untouched
    steps = [int(r["step"]) for r in metric_rows(cwd / "runs" / "toy2d" / "mine" / "metrics.csv")]
    assert steps and min(steps) == step  # logging in 'mine' starts where the checkpoint stopped


def test_last_without_any_checkpoint_starts_a_new_run(tmp_path):
    rc, log = run(tmp_path, "fit", "--config", str(small_config(tmp_path)), "--ckpt_path", "last",
                  "--trainer.max_steps=2")
    assert rc == 0, log[-3000:]
    assert "--ckpt_path last: no checkpoint under runs/toy2d/*/; starting a new run." in log
    assert torch.load(tmp_path / RUN / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


# -- the pieces, without training -----------------------------------------------------------------
def fit_config(tmp_path: Path, ckpt_path: str, version=None, callbacks=()) -> dict:
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(tmp_path / "runs"), "name": "toy", "version": version}}
    return {"ckpt_path": ckpt_path, "trainer": {"logger": logger, "callbacks": list(callbacks),
                                               "default_root_dir": str(tmp_path)}}


def write(path: Path, step: int, mtime: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step}, path)
    os.utime(path, ns=(mtime, mtime))
    return path


def test_last_is_the_newest_checkpoint_of_any_writer_and_pins_its_run(tmp_path):
    root = tmp_path / "runs" / "toy"
    write(root / "version_0" / "checkpoints" / "last.ckpt", 10, 1_000_000_000)
    newest = write(root / "version_1" / "checkpoints" / "last-preempted.ckpt", 7, 3_000_000_000)
    write(root / "version_1" / "checkpoints" / ".last.ckpt.tmp-123", 8, 4_000_000_000)  # a dead writer's file
    write(root / "version_2" / "checkpoints" / "epoch=0-step=3.ckpt", 3, 2_000_000_000)
    config = fit_config(tmp_path, "last")
    plan = plan_resume(config)
    assert plan.ckpt_path == newest and plan.global_step == 7 and plan.run_dir == root / "version_1"
    assert config["ckpt_path"] == str(newest) and config["trainer"]["logger"]["init_args"]["version"] == "version_1"

    # SLURM's hpc checkpoint in default_root_dir, and a callback's own directory, count too
    hpc = write(tmp_path / "hpc_ckpt_1.ckpt", 9, 5_000_000_000)
    plan = plan_resume(fit_config(tmp_path, "last"))
    assert plan.ckpt_path == hpc and plan.run_dir is None  # not inside a run: a new version
    own = write(tmp_path / "mine" / "last-good.ckpt", 11, 6_000_000_000)
    guard = {"class_path": "lightning_ebm.callbacks.DivergenceGuard", "init_args": {"dirpath": str(own.parent)}}
    assert plan_resume(fit_config(tmp_path, "last", callbacks=[guard])).ckpt_path == own

    # an explicit version looks only in its own folder (of the logger's runs)
    hpc.unlink()
    plan = plan_resume(fit_config(tmp_path, "last", version=0))
    assert plan.ckpt_path == root / "version_0" / "checkpoints" / "last.ckpt" and plan.run_dir == root / "version_0"


def test_an_explicit_file_outside_any_run_keeps_the_logger_as_it_is(tmp_path):
    ckpt = write(tmp_path / "elsewhere" / "x.ckpt", 4, 1_000_000_000)
    config = fit_config(tmp_path, str(ckpt))
    plan = plan_resume(config)
    assert plan.ckpt_path == ckpt and plan.run_dir is None
    assert config["trainer"]["logger"]["init_args"]["version"] is None
    assert plan_resume(fit_config(tmp_path, None)) is None


def test_config_differences_name_config_keys_and_ignore_lightning_bookkeeping():
    saved = {"_class_path": "lightning_ebm.EBM", "_instantiator": "x", "alpha": 0.1,
             "sampler": {"class_path": "S", "init_args": {"steps": 60, "step_size": 0.05}}, "shape": (2,)}
    current = {"_class_path": "lightning_ebm.EBM", "_instantiator": "y", "alpha": 0.1,
               "sampler": {"class_path": "S", "init_args": {"steps": 30, "step_size": 0.05}}, "shape": [2],
               "new": 1}
    assert config_differences(saved, current, "model") == [
        "model.init_args.new: '<absent>' in the checkpoint, 1 now",
        "model.init_args.sampler.init_args.steps: 60 in the checkpoint, 30 now",
    ]
    assert config_differences({"_class_path": "A"}, {"_class_path": "B"}, "data") == [
        "data.class_path: 'A' in the checkpoint, 'B' now"]


def test_continue_csv_metrics_keeps_the_rows_before_the_step_and_appends_after_them(tmp_path):
    logger = CSVLogger(tmp_path, name="toy", version="version_0", flush_logs_every_n_steps=1)
    run_dir = tmp_path / "toy" / "version_0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.5\n0,1,1.25\n0,2,9.0\n0,3,9.0\n")
    assert continue_csv_metrics(logger, global_step=2) == 2
    logger.log_metrics({"train/loss": 1.0, "epoch": 0}, step=2)
    logger.save()
    assert (run_dir / "metrics.csv").read_text().splitlines() == [
        "epoch,step,train/loss", "0,0,1.5", "0,1,1.25", "0,2,1.0"]


def test_without_a_run_logger_last_looks_in_default_root_dir_or_leaves_it_to_lightning(tmp_path):
    config = fit_config(tmp_path, "last")
    config["trainer"]["logger"] = False
    assert plan_resume(config) is None and config["ckpt_path"] == "last"  # Lightning's own "last" decides
    ckpt = write(tmp_path / "checkpoints" / "last.ckpt", 5, 1_000_000_000)
    plan = plan_resume(config)
    assert plan.ckpt_path == ckpt and plan.run_dir is None and config["ckpt_path"] == str(ckpt)


def test_the_cli_adds_one_preemption_checkpoint_unless_the_config_has_one(tmp_path):
    found: list = []

    class Probe(EBMCLI):
        def before_fit(self):
            found.append([c for c in self.trainer.callbacks if isinstance(c, PreemptionCheckpoint)])
            raise SystemExit(0)

    config = yaml.safe_load(small_config(tmp_path).read_text())
    base = ["fit", "--config", str(tmp_path / "toy2d.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"]
    with pytest.raises(SystemExit):
        Probe(args=base)
    config["trainer"]["callbacks"].append({"class_path": "lightning_ebm.callbacks.PreemptionCheckpoint",
                                           "init_args": {"filename": "mine"}})
    (tmp_path / "own.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit):
        Probe(args=["fit", "--config", str(tmp_path / "own.yaml"), f"--trainer.logger.init_args.save_dir={tmp_path}"])
    (default,), (own,) = found
    assert default.filename == "last-preempted" and own.filename == "mine"
    assert own.resume_command.startswith(f"lightning-ebm fit --config {tmp_path / 'own.yaml'} ")
    assert own.resume_command.endswith(" --ckpt_path {ckpt_path}")
