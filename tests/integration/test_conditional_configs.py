"""The conditional and JEM configs: each parses with its shapes and classes agreeing, and
configs/digits_jem.yaml runs end to end (shrunk) through the CLI with its pictures and metrics,
then ``test`` and ``predict`` on its checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_configs import print_config

from lightning_ebm import EBM
from lightning_ebm.callbacks.classifier import evaluate_classifier
from lightning_ebm.cli import main
from lightning_ebm.data import DigitsDataModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NAMES = ["digits_jem.yaml", "digits_classifier.yaml", "toy2d_conditional.yaml", "cifar10_jem.yaml"]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-ebm"])


@pytest.mark.parametrize("name", NAMES)
def test_config_parses_with_classes_and_labels_agreeing(name):
    config = print_config(CONFIGS / name)
    model = config["model"]["init_args"]
    energy = model["energy"]
    assert energy["class_path"] == "lightning_ebm.energies.ClassifierEnergy"
    classes = energy["init_args"]["num_classes"]
    assert energy["init_args"]["backbone"]["init_args"]["num_outputs"] == classes
    assert model["objective"]["class_path"] == "lightning_ebm.objectives.JointEnergyModel"
    data = config["data"]
    assert data["init_args"]["labels"] is True
    module, _, cls = data["class_path"].rpartition(".")
    datamodule = getattr(__import__(module, fromlist=[cls]), cls)(**data["init_args"])  # no files touched
    assert datamodule.num_classes == classes
    latent = model["latent"]
    shape = latent["init_args"].get("latent", latent)["init_args"]["shape"]
    assert list(datamodule.sample_shape) == shape
    guards = [cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("DivergenceGuard")]
    assert guards and guards[0]["init_args"]["mode"] == "rollback"


def test_the_classifier_baseline_is_jem_without_the_generative_terms():
    jem, plain = (yaml.safe_load((CONFIGS / n).read_text()) for n in ("digits_jem.yaml", "digits_classifier.yaml"))
    objective = plain["model"]["init_args"]["objective"]["init_args"]
    assert objective["ml_weight"] == objective["conditional_weight"] == 0
    for part in ("energy", "optimizer"):
        assert plain["model"]["init_args"][part] == jem["model"]["init_args"][part]
    assert plain["data"] == jem["data"] and plain["trainer"]["max_steps"] == jem["trainer"]["max_steps"]


def test_cifar10_jem_has_the_papers_sampler_settings():
    model = yaml.safe_load((CONFIGS / "cifar10_jem.yaml").read_text())["model"]["init_args"]
    assert model["sampler"]["init_args"] == {"steps": 20, "step_size": 1.0, "noise_std": 0.01}
    assert {k: model["latent"]["init_args"][k] for k in ("capacity", "reinit_prob")} == {
        "capacity": 10000, "reinit_prob": 0.05}


def test_digits_jem_config_runs(tmp_path):
    config = yaml.safe_load((CONFIGS / "digits_jem.yaml").read_text())
    t = config["trainer"]
    t.update(max_steps=2, val_check_interval=2, limit_val_batches=2, log_every_n_steps=1, enable_progress_bar=False)
    t["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    for cb in t["callbacks"]:
        name = cb["class_path"].rsplit(".", 1)[1]
        if name in ("SampleGrid", "ConditionalSampleGrid"):
            cb["init_args"].update(every_n_steps=1)
        if name == "SampleGrid":
            cb["init_args"].update(num_samples=9, num_chains=2)
        if name == "ConditionalSampleGrid":
            cb["init_args"].update(per_class=2)
        if name == "FIDCallback":
            cb["init_args"].update(num_samples=32, kid_subset_size=16)
        if name == "OODDetection":
            cb["init_args"].update(num_samples=32)
    model = config["model"]["init_args"]
    model["energy"]["init_args"]["backbone"]["init_args"]["width"] = 2
    model["sampler"]["init_args"]["steps"] = 2
    model["latent"]["init_args"]["capacity"] = 100
    config["data"]["init_args"]["batch_size"] = 16
    path = tmp_path / "digits_jem.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    (run,) = (tmp_path / "runs" / "digits_jem").glob("version_*")
    assert {p.name for p in (run / "images").glob("*.png")} >= {
        "conditional_samples_step0000002.png", "reliability_step0000002.png", "samples_step0000002.png"}
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    columns = set(header.split(","))
    assert {"train/ce", "train/acc", "train/energy_gap", "train/energy_data", "val/acc", "val/ece",
            "val/auroc/uniform/energy", "val/auroc/shuffled/max_softmax", "val/auroc/inverted/grad_norm",
            "val/fid"} <= columns

    # test: the validation metrics of the model and of every evaluation callback, on the test split
    ckpt = run / "checkpoints" / "last.ckpt"
    main(["test", "--config", str(path), "--ckpt_path", str(ckpt)])
    (test_run,) = set((tmp_path / "runs" / "digits_jem").glob("version_*")) - {run}
    header, row = (test_run / "metrics.csv").read_text().splitlines()
    logged = {k: float(v) for k, v in zip(header.split(","), row.split(","), strict=True) if v}
    assert {"test/acc", "test/ece", "test/nll", "test/mmd", "test/mmd_floor", "test/fid", "test/kid_mean",
            "test/auroc/uniform/energy", "test/auroc/shuffled/grad_norm"} <= set(logged)
    assert not [k for k in logged if k.startswith("val/")]
    assert (test_run / "images" / "test_reliability_step0000000.png").is_file()
    model = EBM.load_from_checkpoint(ckpt).eval()
    data = DigitsDataModule(batch_size=16, labels=True)
    data.setup("test")
    x, y = (torch.cat(parts) for parts in zip(*data.test_dataloader(), strict=True))
    with torch.no_grad():
        logits = model.logits(x)
    expected = evaluate_classifier(logits, y)
    for name in ("acc", "ece", "nll"):
        assert logged[f"test/{name}"] == pytest.approx(expected[name], rel=1e-5, abs=1e-6)

    # predict: the test split's energies and logits in predictions.pt, in the loader's order
    main(["predict", "--config", str(path), "--ckpt_path", str(ckpt)])
    (predict_run,) = set((tmp_path / "runs" / "digits_jem").glob("version_*")) - {run, test_run}
    predictions = torch.load(predict_run / "predictions.pt")
    assert set(predictions) == {"energy", "logits"}
    torch.testing.assert_close(predictions["logits"], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(predictions["energy"], -torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5)
