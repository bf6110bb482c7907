"""Pictures of an image EBM: a grid of generated samples and a strip of the dynamics from z to x_K."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torchvision.utils import make_grid

from .._checks import check_int, check_pair
from .ema import averaged_weights
from .logging import EveryNSteps, log_image

__all__ = ["SampleGrid", "default_pixel_scale", "image_grid"]


def default_pixel_scale(shape: tuple[int, ...], tile: int = 32) -> int:
    """The pixel enlargement that makes an image of ``shape`` ``(C, H, W)`` at least ``tile`` pixels wide."""
    return max(1, -(-tile // max(shape[1:])))


def image_grid(
    images: Tensor, nrow: int, value_range: tuple[float, float] = (-1.0, 1.0), pixel_scale: int = 1
) -> Tensor:
    """Images ``(N, C, H, W)`` in ``value_range`` as one ``(3, H', W')`` grid in [0, 1].

    Each pixel becomes a ``pixel_scale`` square (nearest neighbour), so tiny images stay
    visible; tiles are separated by grey lines.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid expects images (N, 1 or 3, H, W), got {tuple(images.shape)}")
    lo, hi = value_range
    x = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    if pixel_scale > 1:
        x = x.repeat_interleave(pixel_scale, dim=2).repeat_interleave(pixel_scale, dim=3)
    return make_grid(x, nrow=nrow, padding=max(1, pixel_scale // 2), pad_value=0.5)


class SampleGrid(EveryNSteps):
    """Every ``every_n_steps`` training steps (and at the end of training) log two pictures.

    * ``samples``: a grid of ``num_samples`` generated images ``G(z)``;
    * ``dynamics``: one row per chain (``num_chains`` of them), ``num_frames`` columns from
      ``z`` (left) to ``x_K`` (right), evenly spaced over the sampler's steps.

    The latents come from a fixed seed, so frames of one run are comparable. With an ``EMA``
    callback the averaged weights generate. Logged on rank 0 through ``log_image`` (W&B,
    TensorBoard, or a PNG in the run directory).

    Args:
        every_n_steps: logging period in optimizer steps.
        num_samples: images in the grid.
        num_chains: rows of the dynamics strip (0 = no strip).
        num_frames: columns of the dynamics strip (>= 2: z and x_K at least).
        value_range: the data range mapped to black..white.
        pixel_scale: enlarge every pixel to this square; default: enough for 32-pixel tiles.
        seed: seed of the latents.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 64,
        num_chains: int = 8,
        num_frames: int = 10,
        value_range: tuple[float, float] = (-1.0, 1.0),
        pixel_scale: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(every_n_steps)
        num_samples = check_int("SampleGrid", "num_samples", num_samples, minimum=1)
        num_chains = check_int("SampleGrid", "num_chains", num_chains, minimum=0)
        num_frames = check_int("SampleGrid", "num_frames", num_frames, minimum=2)
        value_range = check_pair("SampleGrid", "value_range", value_range)
        pixel_scale = check_int("SampleGrid", "pixel_scale", pixel_scale, minimum=1, allow_none=True)
        seed = check_int("SampleGrid", "seed", seed)
        self.num_samples, self.num_chains = num_samples, num_chains
        self.num_frames, self.value_range = num_frames, value_range
        self.pixel_scale, self.seed = pixel_scale, seed

    def make_images(self, pl_module: Any) -> tuple[Tensor, Tensor | None]:
        """The sample grid and the dynamics strip (``None`` without chains), ``(3, H, W)`` in [0, 1]."""
        shape = tuple(pl_module.latent.shape)
        if len(shape) != 3:
            raise ValueError(f"SampleGrid needs image samples (C, H, W); the latent has shape {shape}")
        scale = self.pixel_scale or default_pixel_scale(shape)
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        x = pl_module.generate(self.num_samples, generator=gen)
        grid = image_grid(x, nrow=max(1, round(self.num_samples**0.5)), value_range=self.value_range,
                          pixel_scale=scale)
        strip = None
        if self.num_chains:
            _, traj = pl_module.generate(self.num_chains, generator=gen, return_trajectory=True)
            frames = torch.linspace(0, traj.shape[0] - 1, min(self.num_frames, traj.shape[0])).round().long()
            # chain-major order: one row per chain
            tiles = traj[frames.to(traj.device)].transpose(0, 1).flatten(0, 1)
            strip = image_grid(tiles, nrow=len(frames), value_range=self.value_range, pixel_scale=scale)
        return grid, strip

    def log_now(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        with averaged_weights(trainer, pl_module):
            grid, strip = self.make_images(pl_module)
        log_image(trainer, "samples", grid)
        if strip is not None:
            log_image(trainer, "dynamics", strip)
