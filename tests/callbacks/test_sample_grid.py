"""SampleGrid under a real Trainer: the hooks fire and the pictures hold what they claim."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from image_helpers import fit, tile, tiny_model
from matplotlib.image import imread

from lightning_ebm.callbacks import SampleGrid


def test_sample_grid_logs_generated_images_and_the_dynamics(tmp_path):
    model = tiny_model()
    grid = SampleGrid(every_n_steps=2, num_samples=6, num_chains=3, num_frames=4, pixel_scale=2, seed=5)
    trainer = fit(tmp_path, model, [grid])
    images = Path(trainer.log_dir) / "images"
    assert grid.logged_steps == [2, 4]
    for step in (2, 4):
        for key in ("samples", "dynamics"):
            assert (images / f"{key}_step{step:07d}.png").is_file()
    # rebuild what the final pictures should show, by hand: 8x8 images, each pixel a 2x2 block
    gen = torch.Generator().manual_seed(5)
    z = model.latent.sample(6, generator=gen)
    x = model.sampler(model.energy, z)
    z_chain = model.latent.sample(3, generator=gen)
    x_chain = model.sampler(model.energy, z_chain)
    to_png = lambda a: np.kron(((a[0].numpy() + 1) / 2).clip(0, 1), np.ones((2, 2)))  # noqa: E731
    samples = imread(images / "samples_step0000004.png")
    assert samples.shape[:2] == (1 + 3 * 17, 1 + 2 * 17)  # 6 tiles, round(sqrt(6)) = 2 per row, 1-pixel lines
    for i in range(6):
        np.testing.assert_allclose(tile(samples, i // 2, i % 2, 16, 1), to_png(x[i]), atol=1 / 255)
    strip = imread(images / "dynamics_step0000004.png")
    assert strip.shape[:2] == (1 + 3 * 17, 1 + 4 * 17)  # one row per chain, four frames
    for r in range(3):
        np.testing.assert_allclose(tile(strip, r, 0, 16, 1), to_png(z_chain[r]), atol=1 / 255)
        np.testing.assert_allclose(tile(strip, r, 3, 16, 1), to_png(x_chain[r]), atol=1 / 255)
