"""The lightning-ebm command: fit, --print_config, every shipped config, sample."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from lightning_ebm import EBM
from lightning_ebm.cli import EBMCLI, main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def fit_tiny(tmp_path: Path, *extra: str) -> Path:
    main([
        "fit", "--config", str(ROOT / "configs" / "toy2d.yaml"),
        "--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.init_args.batches_per_epoch=6", "--data.init_args.num_val=64",
        "--model.init_args.sampler.init_args.steps=3",
        *extra,
    ])
    return tmp_path / "toy2d" / "version_0"


def test_fit_leaves_checkpoint_config_metrics_and_pictures(tmp_path):
    run = fit_tiny(tmp_path)
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    assert any((run / "images").glob("samples_2d_step*.png"))
    model = EBM.load_from_checkpoint(run / "checkpoints" / "last.ckpt", weights_only=True)  # plain config
    assert model.sampler.steps == 3 and model.generate(5).shape == (5, 2)
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val/mmd" in header and "val/mmd_floor" in header


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_parses(config):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(out.getvalue())
    assert resolved["model"]["class_path"] == "lightning_ebm.EBM"
    assert resolved["trainer"]["inference_mode"] is False


def test_print_config_shows_overrides():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "toy2d.yaml"),
              "--model.init_args.sampler.init_args.step_size=0.02", "--print_config"])
    resolved = yaml.safe_load(out.getvalue())
    assert resolved["model"]["init_args"]["sampler"]["init_args"]["step_size"] == 0.02


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    run = fit_tiny(tmp_path_factory.mktemp("fit"))
    return run / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".png"])
def test_sample_writes_each_format(trained_checkpoint, tmp_path, suffix):
    output = tmp_path / f"samples{suffix}"
    main(["sample", "--ckpt_path", str(trained_checkpoint), "--num_samples", "40", "--output", str(output)])
    if suffix == ".pt":
        x = torch.load(output)
        assert x.shape == (40, 2)
        model = EBM.load_from_checkpoint(trained_checkpoint)
        expected = model.generate(40, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(x, expected)
    elif suffix == ".npz":
        assert np.load(output)["samples"].shape == (40, 2)
    else:
        assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sample_rejects_unknown_formats_and_missing_checkpoints(trained_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt_path", str(trained_checkpoint), "--output", str(tmp_path / "x.txt")])
    assert "--output must end in one of ('.pt', '.npz', '.png')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "x.pt")])
    assert "is not a file" in capsys.readouterr().err


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "lightning_ebm.cli", "fit", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--trainer.max_steps" in result.stdout


def test_bad_config_values_fail_with_the_argument_named(tmp_path):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises((SystemExit, ValueError)) as info:
        fit_tiny(tmp_path, "--model.init_args.sampler.init_args.step_size=-0.1")
    message = err.getvalue() + str(info.value)
    assert "step_size" in message


class TrainOnly(L.LightningDataModule):
    """A user's DataModule with training data only."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=16)


def test_test_on_data_without_a_test_split_is_a_short_error(trained_checkpoint, tmp_path, capsys, monkeypatch):
    from lightning_ebm.console import main as console_main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        console_main(["test", "--config", str(ROOT / "configs" / "toy2d.yaml"), "--ckpt_path",
                      str(trained_checkpoint), f"--data={__name__}.TrainOnly",
                      f"--trainer.logger.init_args.save_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "lightning-ebm test: error: `test_dataloader` must be implemented" in err
    assert "Traceback" not in err and len(err.splitlines()) <= 3


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_ckpt_path_last_outside_fit_is_the_newest_checkpoint_of_the_runs(trained_checkpoint, tmp_path, subcommand):
    """Lightning's own ``last`` looks in the new run's empty folder, then evaluates the untrained model."""
    ckpt = tmp_path / "toy2d" / "version_0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(trained_checkpoint, ckpt)
    split = {"validate": "val"}.get(subcommand, subcommand)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = EBMCLI(args=[subcommand, "--config", str(ROOT / "configs" / "toy2d.yaml"), "--ckpt_path", "last",
                           f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                           f"--trainer.limit_{split}_batches=2"])
    assert cli.trainer.ckpt_path == str(ckpt)
    # an evaluation writes no checkpoints: Lightning's note that its checkpoint folder moved is noise there
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
