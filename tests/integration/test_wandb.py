"""configs/digits_wandb.yaml, offline: the W&B run directory holds the images, the metrics
(FID included) and the resolved config. No account, no network."""

from __future__ import annotations

import struct
import sys
import time
from pathlib import Path

import pytest
import yaml

from lightning_ebm.cli import main

wandb = pytest.importorskip("wandb")
from test_configs import CONFIGS, shrink  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """The CLI is called with ``args``; pytest's own command line must not look like CLI input."""
    monkeypatch.setattr(sys, "argv", ["lightning-ebm"])


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored afterwards, whatever WandbLogger sets
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    yield
    wandb.finish()


def read_records(path: Path) -> list:
    """The records of a run's ``.wandb`` transaction log: a 7-byte header (``:W&B``, magic,
    version), then LevelDB-log blocks of 32 KiB whose chunks (7-byte header: CRC, length, type
    full/first/middle/last) carry serialised ``Record`` protobufs."""
    raw, block, pos, chunks, records = path.read_bytes(), 32768, 7, b"", []
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def test_offline_run_holds_images_metrics_and_config(tmp_path, wandb_offline):
    config = shrink(yaml.safe_load((CONFIGS / "digits_wandb.yaml").read_text()), tmp_path)
    path = tmp_path / "digits_wandb.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path)])
    wandb.finish()
    (run,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    images = {p.name.split("_")[0] for p in (run / "files" / "media" / "images").glob("*.png")}
    assert images == {"samples", "dynamics"}
    (log,) = run.glob("run-*.wandb")
    records = read_records(log)
    deadline = time.monotonic() + 60
    while not any(r.WhichOneof("record_type") == "exit" for r in records):  # wandb-core writes asynchronously
        assert time.monotonic() < deadline, "the W&B run was never closed"
        time.sleep(0.5)
        records = read_records(log)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.update({it.key or "/".join(it.nested_key): it.value_json for it in r.history.item})
    assert {"train/loss", "val/fid", "val/kid_mean", "val/is_mean", "trainer/global_step"} <= set(history)
    assert float(history["val/fid"]) > 0
    config_keys = {
        it.key for r in records if r.WhichOneof("record_type") == "config" for it in r.config.update
    }
    assert {"trainer", "model", "data", "seed_everything"} <= config_keys  # the full resolved config
    # the CSV logger's run directory is there too
    assert list((tmp_path / "runs" / "digits_wandb").glob("version_*/images/samples_step*.png"))
