"""Callbacks fire under a real Trainer and log through the logger-agnostic helper."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from matplotlib.image import imread
from module_helpers import make_model, make_trainer, tiny_data

from lightning_ebm.callbacks import EMA, Plot2D, log_image
from lightning_ebm.callbacks.ema import averaged_weights
from lightning_ebm.callbacks.plots import energy_on_grid


def test_plot2d_fires_every_n_steps_and_at_the_end(tmp_path):
    callback = Plot2D(every_n_steps=2, num_samples=50, num_trajectories=3, grid_size=20)
    trainer = make_trainer(tmp_path, max_steps=5, limit_val_batches=0, callbacks=[callback])
    trainer.fit(make_model(), tiny_data())
    assert callback.logged_steps == [2, 4, 5]
    images = sorted(p.name for p in (tmp_path / "run" / "version_0" / "images").iterdir())
    assert images == [f"samples_2d_step{s:07d}.png" for s in (2, 4, 5)]
    picture = imread(tmp_path / "run" / "version_0" / "images" / images[-1])
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.std() > 0.05


def flat_energy(module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.energy.parameters()]).clone()


def test_plot2d_draws_the_ema_weights_that_validation_judges(tmp_path):
    class Recording(Plot2D):
        def make_figure(self, trainer, pl_module):
            self.seen = flat_energy(pl_module)
            return super().make_figure(trainer, pl_module)

    class AfterThePlot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.raw = flat_energy(pl_module)
            with averaged_weights(trainer, pl_module):
                self.average = flat_energy(pl_module)

    ema, after = EMA(decay=0.5), AfterThePlot()
    plot = Recording(every_n_steps=2, num_samples=16, num_trajectories=0, grid_size=8)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[ema, plot, after], limit_val_batches=0)
    trainer.fit(make_model(), tiny_data())
    assert not torch.equal(after.average, after.raw)
    torch.testing.assert_close(plot.seen, after.average)


def test_energy_on_grid_is_the_energy_at_the_grid_points():
    model = make_model()
    xs, ys, e = energy_on_grid(model.energy, (-1.0, 1.0, -2.0, 2.0), 5)
    point = torch.tensor([[xs[3], ys[1]]])
    torch.testing.assert_close(e[1, 3], model.energy(point)[0].detach())


def test_log_image_writes_a_png_for_csv_loggers(tmp_path):
    trainer = make_trainer(tmp_path)
    image = np.zeros((3, 8, 10), dtype=np.float32)
    image[0] = 1.0  # red, CHW in [0, 1]
    path = log_image(trainer, "my/key", image, step=3)
    assert path.name == "my_key_step0000003.png"
    stored = imread(path)
    assert stored.shape[:2] == (8, 10) and np.allclose(stored[..., 0], 1.0) and np.allclose(stored[..., 1], 0.0)


def test_plot2d_rejects_bad_arguments_and_non_2d_models():
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer, got 0"):
        Plot2D(every_n_steps=0)
