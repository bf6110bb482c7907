"""The examples run (at small sizes) so they never rot, and do what they say."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import drop_in  # noqa: E402


def test_drop_in_ebm_learns_a_ring_from_a_foreign_datamodule(tmp_path):
    model = drop_in.train_ebm_on_my_data(max_steps=150, root=str(tmp_path))
    radius = model.generate(1000, generator=torch.Generator().manual_seed(0)).norm(dim=1)
    # the latent is uniform on [-3, 3]^2 (mean radius about 2.3, spread 0.8); the data ring is 2.0 +- 0.1
    assert abs(radius.mean().item() - 2.0) < 0.15 and radius.std().item() < 0.4
    assert any((tmp_path / "lightning_logs").rglob("samples_2d_step*.png"))


def test_drop_in_jem_classifier_trains_with_the_library_sampler(tmp_path):
    model = drop_in.train_jem(max_steps=60, root=str(tmp_path))
    points = drop_in.ring_points(1000, seed=1)
    accuracy = (model.net(points).argmax(1) == (points[:, 0] > 0).long()).float().mean()
    assert accuracy > 0.9
    assert model.buffer.buffer is not None and model.buffer.state_dict()["_extra_state"]["buffer"].shape == (1000, 2)
