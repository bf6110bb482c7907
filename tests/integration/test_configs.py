"""The image configs: every one parses, shapes agree, and configs/digits.yaml runs end to end
(shrunk) through the CLI, then `lightning-ebm sample` draws an image grid from its checkpoint."""

from __future__ import annotations

import contextlib
import io
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from matplotlib.image import imread

from lightning_ebm._config import build
from lightning_ebm.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
IMAGE_CONFIGS = [
    "digits.yaml",
    "digits_wandb.yaml",
    "digits_drl.yaml",
    "mnist.yaml",
    "mnist_cpu.yaml",
    "digits28.yaml",
    "cifar10.yaml",
    "cifar10_langevin.yaml",
    "celeba.yaml",
]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """The CLI is called with ``args``; pytest's own command line must not look like CLI input."""
    monkeypatch.setattr(sys, "argv", ["lightning-ebm"])


def print_config(path: Path) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(path), "--print_config"])
    assert info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("name", IMAGE_CONFIGS)
def test_config_parses_and_shapes_agree(name):
    config = print_config(CONFIGS / name)
    model = config["model"]["init_args"]
    energy = model["energy"]["init_args"]
    shape = list(build(model["latent"], "latent").shape)
    assert shape == [energy["in_channels"], energy["image_size"], energy["image_size"]]
    datamodule = build(config["data"], "data")  # no files touched
    assert list(datamodule.sample_shape) == shape


def test_wandb_variant_is_digits_plus_a_wandb_logger():
    plain, wandb = (yaml.safe_load((CONFIGS / n).read_text()) for n in ("digits.yaml", "digits_wandb.yaml"))
    loggers = wandb["trainer"].pop("logger")
    plain["trainer"].pop("logger")
    assert plain == wandb
    assert [lg["class_path"].rsplit(".", 1)[1] for lg in loggers] == ["CSVLogger", "WandbLogger"]


def shrink(config: dict, root: Path) -> dict:
    """The same recipe, sized for a test: tiny network, two steps, few samples."""
    t = config["trainer"]
    t.update(
        max_steps=2, val_check_interval=2, limit_val_batches=2, log_every_n_steps=1, enable_progress_bar=False
    )
    for logger in t["logger"] if isinstance(t["logger"], list) else [t["logger"]]:
        logger["init_args"]["save_dir"] = str(root / "runs")
    for cb in t["callbacks"]:
        name = cb["class_path"].rsplit(".", 1)[1]
        if name == "SampleGrid":
            cb["init_args"].update(every_n_steps=1, num_samples=9, num_chains=2)
        if name == "FIDCallback":
            cb["init_args"].update(num_samples=32, kid_subset_size=16)
    model = config["model"]["init_args"]
    model["energy"]["init_args"]["width"] = 2
    model["sampler"]["init_args"]["steps"] = 2
    config["data"]["init_args"]["batch_size"] = 16
    return config


def test_digits_config_runs_and_samples(tmp_path):
    path = tmp_path / "digits.yaml"
    path.write_text(yaml.safe_dump(shrink(yaml.safe_load((CONFIGS / "digits.yaml").read_text()), tmp_path)))
    main(["fit", "--config", str(path)])
    (run,) = (tmp_path / "runs" / "digits").glob("version_*")
    assert (run / "config.yaml").is_file()
    assert {p.name for p in (run / "images").glob("*.png")} >= {
        "samples_step0000002.png",
        "dynamics_step0000002.png",
    }
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    columns = header.split(",")
    fid = [
        float(r.split(",")[columns.index("val/fid")]) for r in rows if r.split(",")[columns.index("val/fid")]
    ]
    assert len(fid) == 1 and fid[0] > 0
    assert {"val/kid_mean", "val/is_mean", "val/mmd"} <= set(columns)
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert "current_model_state" in state  # EMA on: the average is the state_dict
    out = tmp_path / "samples.png"
    main(["sample", "--ckpt_path", str(ckpt), "--num_samples", "16", "--output", str(out)])
    # 4x4 grid of 8x8 digits enlarged 4x to readable 32-pixel tiles, 2-pixel padding (was 42x42 in all)
    assert imread(out).shape[:2] == (2 + 4 * (32 + 2), 2 + 4 * (32 + 2))


def test_cpu_28x28_twins_differ_only_in_the_data():
    """configs/mnist_cpu.yaml and configs/digits28.yaml: one recipe, two data sets (and two run names)."""
    mnist, digits = (yaml.safe_load((CONFIGS / n).read_text()) for n in ("mnist_cpu.yaml", "digits28.yaml"))
    assert mnist["trainer"]["logger"]["init_args"].pop("name") == "mnist_cpu"
    assert digits["trainer"]["logger"]["init_args"].pop("name") == "digits28"
    mnist_data, digits_data = mnist.pop("data"), digits.pop("data")
    assert mnist == digits
    assert mnist_data["init_args"]["name"] == "mnist"
    assert digits_data["init_args"] == {"image_size": 28, "resize_mode": "resize", "batch_size": 64}
    # both are 28x28 images of one channel, and the FID's feature network undoes the digits' resize
    fid = next(cb for cb in digits["trainer"]["callbacks"] if cb["class_path"].endswith("FIDCallback"))
    assert fid["init_args"]["feature"]["init_args"] == {"image_size": 28, "resize_mode": "resize"}


def _write_idx(path: Path, array: np.ndarray) -> None:
    """MNIST's idx format: magic (0, 0, 0x08 = uint8, ndim), big-endian dimensions, raw bytes."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_mnist_cpu_config_runs_on_idx_files(tmp_path):
    """configs/mnist_cpu.yaml (shrunk) end to end on MNIST-format files written here: no download."""
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, size=(160, 28, 28), dtype=np.uint8)
    for split, n in (("train", 160), ("t10k", 16)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[:n])
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    config = shrink(yaml.safe_load((CONFIGS / "mnist_cpu.yaml").read_text()), tmp_path)
    config["data"]["init_args"].update(root=str(tmp_path / "data"), download=False, val_fraction=0.25)
    path = tmp_path / "mnist_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    (run,) = (tmp_path / "runs" / "mnist_cpu").glob("version_*")
    header, *rows = (run / "metrics.csv").read_text().splitlines()
    column = header.split(",").index("val/fid")
    fid = [float(r.split(",")[column]) for r in rows if r.split(",")[column]]
    assert len(fid) == 1 and fid[0] > 0
    assert {"samples_step0000002.png", "dynamics_step0000002.png"} <= {p.name for p in (run / "images").glob("*.png")}
