"""What a newcomer meets in the first hour: optional extras, threads, the end of a run, pictures, messages."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from reliability_helpers import InjectFault, tiny_data, tiny_ebm, tiny_trainer

import lightning_ebm.cli  # noqa: F401  (Lightning's log handler binds stderr now, not a test's capture)
from lightning_ebm.callbacks import DivergenceError, DivergenceGuard, Plot2D
from lightning_ebm.cli import main
from lightning_ebm.data import DigitsDataModule

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "configs" / "toy2d.yaml")

# torch-fidelity as on a fresh `pip install -e .`: not importable and no package metadata (torchmetrics
# reads the metadata to decide what `torchmetrics.image` exports)
BLOCK_FIDELITY = """
import sys, importlib.metadata as md
sys.modules["torch_fidelity"] = None
real_version, real_distribution = md.version, md.distribution
def _hide(real):
    def lookup(name):
        if name.replace("-", "_") == "torch_fidelity":
            raise md.PackageNotFoundError(name)
        return real(name)
    return lookup
md.version, md.distribution = _hide(real_version), _hide(real_distribution)
"""


def test_the_library_and_the_digits_fid_work_without_torch_fidelity():
    code = BLOCK_FIDELITY + """
import torch, lightning_ebm
from lightning_ebm.callbacks import FIDCallback
from lightning_ebm.callbacks.fid import fid_score
from lightning_ebm.data import load_digits
import lightning_ebm.cli
from lightning_ebm.metrics import DigitsFeatures, InceptionFeatures
from lightning_ebm.data.digits import digits_to_images
pixels = load_digits()[0]
real = digits_to_images(pixels[:300], 8, "pad")
fake = digits_to_images(pixels[300:600], 8, "pad")
same = fid_score(real, fake, DigitsFeatures())
noise = fid_score(real, torch.rand_like(fake) * 2 - 1, DigitsFeatures())
assert 0 <= same < noise, (same, noise)
try:
    InceptionFeatures()
except ModuleNotFoundError as err:
    assert "lightning-ebm[fid]" in str(err), err
else:
    raise AssertionError("InceptionFeatures built without torch-fidelity")
print("ok", same, noise)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]


def fit_toy(tmp_path: Path, *extra: str) -> Path:
    main(["fit", "--config", TOY, "--trainer.enable_progress_bar=false",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.num_val=200",
          "--model.init_args.sampler.init_args.steps=3", *extra])
    return tmp_path / "toy2d" / "version_0"


def test_a_run_shorter_than_its_validation_interval_still_ends_with_validation_and_a_summary(tmp_path, capsys):
    run = fit_toy(tmp_path, "--trainer.max_steps=7", "--trainer.val_check_interval=500")
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    final = [r for r in rows if r.get("val/mmd")]
    assert len(final) == 1 and int(final[0]["step"]) == 7
    out = capsys.readouterr().out
    assert "lightning-ebm fit: finished at step 7" in out
    mmd = float(final[0]["val/mmd"])
    assert re.search(rf"val/mmd\s+{mmd:.4g}\s+\(data-vs-data floor ", out), out
    assert f"run directory          {run}" in out and "checkpoint " in out and ".ckpt" in out
    assert "lightning-ebm sample --ckpt_path" in out


def test_a_run_that_validated_at_its_last_step_does_not_validate_twice(tmp_path):
    run = fit_toy(tmp_path, "--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.callbacks=[]")
    steps = [int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/mmd")]
    assert steps == [2, 5]  # Lightning logs validation at the step index of the last batch


def test_num_threads_from_the_config_and_the_command_line():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with pytest.raises(SystemExit):
            main(["fit", "--config", TOY, "--print_config"])  # parses, prints, runs nothing
        lightning_ebm.cli.EBMCLI(args=["--config", TOY, "--num_threads=1"], run=False)
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        lightning_ebm.cli.EBMCLI(args=["--config", TOY], run=False)  # the recipe itself asks for one
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_sample_writes_a_readable_image_grid(tmp_path):
    from lightning_ebm import EBM
    from lightning_ebm.energies import ConvEnergy
    from lightning_ebm.latents import Uniform
    from lightning_ebm.samplers import GradientDescent

    model = EBM(ConvEnergy(in_channels=1, width=8, image_size=8), GradientDescent(steps=2, step_size=0.1),
                Uniform(shape=(1, 8, 8)))
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, inference_mode=False, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    trainer.save_checkpoint(tmp_path / "digits.ckpt")
    output = tmp_path / "grid.png"
    main(["sample", "--ckpt_path", str(tmp_path / "digits.ckpt"), "--num_samples", "64", "--output", str(output)])
    from matplotlib.image import imread

    height, width = imread(output).shape[:2]
    assert height >= 8 * 32 and width >= 8 * 32  # 8 x 8 tiles of at least 32 pixels (was 82 x 82 in all)
    main(["sample", "--ckpt_path", str(tmp_path / "digits.ckpt"), "--num_samples", "4", "--output", str(output),
          "--pixel_scale", "1"])
    assert imread(output).shape[0] < 32


class NoValData(L.LightningDataModule):
    """A user's DataModule: loaders only, no ``val_data`` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.points = torch.randn(512, 2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.points, batch_size=64)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.points[:300] + 5.0, batch_size=100)


def test_plot2d_draws_the_data_of_a_datamodule_without_val_data(tmp_path, monkeypatch):
    drawn = []
    from matplotlib.figure import Figure

    def record(energy, x, data, *args, **kwargs):
        drawn.append(data)
        return Figure(figsize=(1, 1))

    monkeypatch.setattr("lightning_ebm.callbacks.plots.plot_2d", record)
    trainer = tiny_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[Plot2D(every_n_steps=2)])
    trainer.fit(tiny_ebm(), NoValData())
    assert drawn and drawn[-1] is not None and drawn[-1].shape == (300, 2)
    assert float(drawn[-1].mean()) > 4.0  # the validation points (shifted by 5), not the training ones


def test_the_guard_does_not_advise_rollback_once_its_rollbacks_are_spent(tmp_path):
    fault = InjectFault("nan_weight", steps=list(range(3, 100)))
    guard = DivergenceGuard(mode="rollback", max_rollbacks=1, snapshot_every_n_steps=1)
    trainer = tiny_trainer(tmp_path, max_steps=10, limit_val_batches=0, callbacks=[fault, guard])
    with pytest.raises(DivergenceError) as info, pytest.warns(UserWarning):
        trainer.fit(tiny_ebm(), tiny_data())
    message = str(info.value)
    assert "all 1 rollbacks are spent" in message and "mode='rollback'" not in message
    assert "lower the learning rate" in message and "max_rollbacks" in message


def test_a_run_prints_neither_the_leafspec_warning_nor_the_cloud_logging_tip(tmp_path, recwarn, caplog):
    fit_toy(tmp_path, "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--trainer.callbacks=[]")
    assert not [w for w in recwarn if "LeafSpec" in str(w.message)]
    assert "litlogger" not in caplog.text and "litmodels" not in caplog.text


@pytest.mark.parametrize("name", ["digits.yaml", "digits_wandb.yaml"])
def test_digits_recipes_log_within_an_epoch(name):
    import yaml

    config = yaml.safe_load((ROOT / "configs" / name).read_text())
    data = DigitsDataModule(**config["data"]["init_args"])
    data.setup("fit")
    assert config["trainer"]["log_every_n_steps"] <= len(data.train_dataloader())
