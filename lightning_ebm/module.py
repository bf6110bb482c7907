"""``EBM``: the LightningModule that plays the energy (critic) against its own sampler (generator)."""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from .energies import check_energy_output
from .latents import Latent, ReplayBuffer
from .metrics import mmd_rbf, sliced_wasserstein
from .samplers import Sampler, energy_grad

__all__ = ["EBM"]


_EVAL_SEED_OFFSET = 2_147_483_629  # validation draws its own stream, never the training one


class EBM(L.LightningModule):
    """An energy-based model trained "by maximum likelihood", seen as a self-adversarial game.

    The generator ``G(z) = sampler(energy, z)``, ``z ~ latent``, runs the dynamics of the energy;
    the critic is the energy itself. Each training step minimises the critic loss

        ``mean E(x_data) - mean E(sg(G(z))) + alpha * (mean E(x_data)^2 + mean E(G(z))^2)``

    with the generated samples detached (``sg``), which is the usual maximum-likelihood EBM
    update.

    Args:
        energy: the critic, any ``nn.Module`` mapping ``(B, *shape)`` to ``(B,)``.
        sampler: the generator's dynamics (``GradientDescent``, ``Langevin``, ``ODE`` or any
            ``Sampler``).
        latent: ``p0``, where the dynamics start (``Uniform``, ``Gaussian``, ``ReplayBuffer``).
        alpha: weight of the energy-magnitude regulariser (keeps energies near 0).
        data_noise: standard deviation of Gaussian jitter added to training data (0 = none).
        num_negatives: generated samples per step; ``None`` uses the data batch size.
        optimizer: factory ``params -> Optimizer`` (a class such as ``torch.optim.Adam`` or a
            ``functools.partial``; from YAML, ``class_path`` plus ``init_args``).
        lr_scheduler: optional factory ``optimizer -> LRScheduler``, stepped every training step.
        rng_seed: seed of the module's own random stream (latent draws, noise, jitter); ``None``
            derives it from the global seed. Each DDP rank adds its rank, so ranks draw different
            chains. The stream's state is saved in checkpoints.
        val_max_samples: cap on the held-out points used for the validation metrics.
        check_finite: raise on non-finite values in a training batch (one device sync per step).
        channels_last: for image energies ``(B, C, H, W)``: store the energy's 4-D weights and
            feed data and latents in the channels-last memory format (faster convolutions on
            recent GPUs and oneDNN CPUs; the samplers keep the format of their input).
    """

    def __init__(
        self,
        energy: nn.Module,
        sampler: Sampler,
        latent: Latent,
        alpha: float = 0.1,
        data_noise: float = 0.0,
        num_negatives: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        rng_seed: int | None = None,
        val_max_samples: int = 4000,
        check_finite: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(energy, nn.Module):
            raise TypeError(f"energy must be an nn.Module mapping (B, *shape) -> (B,), got {type(energy).__name__}")
        if not isinstance(sampler, Sampler):
            raise TypeError(f"sampler must be a lightning_ebm.samplers.Sampler, got {type(sampler).__name__}")
        if not isinstance(latent, Latent):
            raise TypeError(f"latent must be a lightning_ebm.latents.Latent, got {type(latent).__name__}")
        for name, value in (("alpha", alpha), ("data_noise", data_noise)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"EBM: {name} must be a finite number >= 0, got {value!r}")
        if num_negatives is not None and (not isinstance(num_negatives, int) or num_negatives < 1):
            raise ValueError(f"EBM: num_negatives must be a positive integer or None, got {num_negatives!r}")
        if not isinstance(val_max_samples, int) or val_max_samples < 4:
            raise ValueError(f"EBM: val_max_samples must be an integer >= 4, got {val_max_samples!r}")
        if not callable(optimizer):
            raise TypeError(f"EBM: optimizer must be a callable params -> Optimizer, got {optimizer!r}")
        if not isinstance(channels_last, bool):
            raise ValueError(f"EBM: channels_last must be True or False, got {channels_last!r}")
        if channels_last and len(latent.shape) != 3:
            raise ValueError(f"EBM: channels_last=True needs image samples of shape (C, H, W), but the latent's "
                             f"shape is {tuple(latent.shape)}")
        with warnings.catch_warnings():
            # components are kept in the hyper-parameters on purpose: load_from_checkpoint needs them
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        self.energy = energy
        self.sampler = sampler
        self.latent = latent
        self.channels_last = channels_last
        if channels_last:
            self.energy.to(memory_format=torch.channels_last)
        self.alpha, self.data_noise = float(alpha), float(data_noise)
        self.num_negatives = num_negatives
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.rng_seed, self.val_max_samples, self.check_finite = rng_seed, val_max_samples, check_finite
        self._rng: torch.Generator | None = None
        self._pending_rng_state: Tensor | None = None
        self._val_batches: list[Tensor] = []
        self._last_step_time: float | None = None

    # ------------------------------------------------------------------ generator
    @property
    def rng(self) -> torch.Generator:
        """The module's training random stream, on the module's device, seeded per rank.

        Created on first use (in the training process, on the training device) from ``rng_seed``
        (or the global seed) and the rank; its state is saved in checkpoints and restored.
        """
        if self._rng is None or self._rng.device != self.device:
            base = self.rng_seed if self.rng_seed is not None else torch.initial_seed()
            rank = self.trainer.global_rank if self._trainer is not None else 0
            gen = torch.Generator(device=self.device)
            gen.manual_seed((int(base) * 1_000_003 + 104_729 * rank) % (2**63 - 1))
            if self._pending_rng_state is not None:
                gen.set_state(self._pending_rng_state)
                self._pending_rng_state = None
            self._rng = gen
        return self._rng

    @torch.no_grad()
    def generate(
        self,
        n: int,
        *,
        z: Tensor | None = None,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
        batch_size: int | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """``n`` samples of the generator ``G(z)``, ``z ~ latent`` (or the given ``z``), detached.

        Args:
            n: number of samples (ignored when ``z`` is given).
            z: starting points ``(n, *shape)``.
            generator: random stream for ``z`` and any sampler noise (default: torch's global).
            return_trajectory: also return the states ``(T, n, *shape)`` of the dynamics.
            batch_size: run the dynamics in chunks of this size to bound memory.
        """
        if z is None:
            z = self.latent.sample(n, generator=generator, device=self.device, dtype=self.dtype)
        else:
            z = z.to(self.device)
        z = self._memory_format(z)
        chunks = [z] if batch_size is None else list(z.split(batch_size))
        outs = [self.sampler(self.energy, c, generator=generator, return_trajectory=return_trajectory)
                for c in chunks]
        if return_trajectory:
            return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs], dim=1)
        return torch.cat(outs)

    def forward(self, x: Tensor) -> Tensor:
        """The energy ``E(x)``, shape ``(B,)``."""
        e = self.energy(x)
        check_energy_output(e, x)
        return e

    # ------------------------------------------------------------------ checks
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_shape = getattr(datamodule, "sample_shape", None)
        if data_shape is not None and tuple(data_shape) != tuple(self.latent.shape):
            raise ValueError(
                f"latent shape {tuple(self.latent.shape)} does not match the data's sample shape "
                f"{tuple(data_shape)} (from {type(datamodule).__name__}); set the latent's shape to "
                f"{list(data_shape)}"
            )
        batch_size = self.num_negatives or getattr(datamodule, "batch_size", None)
        if isinstance(self.latent, ReplayBuffer) and isinstance(batch_size, int):
            self.latent.check_batch_size(batch_size)
        self._dry_run()

    def _dry_run(self) -> None:
        """Check the energy's output shape on two latent draws before any training happens."""
        param = next(self.energy.parameters(), None)
        device = param.device if param is not None else self.device
        dtype = param.dtype if param is not None and param.is_floating_point() else self.dtype
        base = self.latent.latent if isinstance(self.latent, ReplayBuffer) else self.latent
        z = base.sample(2, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
        with torch.no_grad():
            check_energy_output(self.energy(z), z)

    def _data(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        if isinstance(x, dict):
            raise TypeError("EBM expects batches that are a tensor or a tuple whose first item is the data tensor")
        if tuple(x.shape[1:]) != tuple(self.latent.shape):
            raise ValueError(
                f"{stage} batch {batch_idx} has samples of shape {tuple(x.shape[1:])}, but the latent has "
                f"shape {tuple(self.latent.shape)}; they must match"
            )
        if self.check_finite and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x.flatten(1))).any(1).sum())
            raise ValueError(
                f"non-finite values (NaN or Inf) in {bad} sample(s) of {stage} batch {batch_idx} "
                f"(epoch {self.current_epoch}, global step {self.global_step}); clean the data or "
                "check the DataModule's transforms"
            )
        return self._memory_format(x)

    def _memory_format(self, x: Tensor) -> Tensor:
        """``x`` in the channels-last memory format if ``channels_last`` is set (no copy if it already is)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ------------------------------------------------------------------ training
    def _draw_latent(self, n: int, like: Tensor) -> tuple[Tensor, Tensor | None]:
        if isinstance(self.latent, ReplayBuffer):
            z, slots = self.latent.draw(n, generator=self.rng, device=like.device, dtype=like.dtype)
            return self._memory_format(z), slots
        z = self.latent.sample(n, generator=self.rng, device=like.device, dtype=like.dtype)
        return self._memory_format(z), None

    def critic_loss(self, e_data: Tensor, e_gen: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The critic loss and its parts; ``e_gen`` are energies of detached generator samples."""
        gap = e_data.mean() - e_gen.mean()
        reg = e_data.pow(2).mean() + e_gen.pow(2).mean()
        return gap + self.alpha * reg, {"energy_data": e_data.mean(), "energy_gen": e_gen.mean(),
                                        "energy_gap": gap, "energy_reg": reg}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x_data = self._data(batch, batch_idx, "training")
        n = self.num_negatives or x_data.shape[0]
        z, slots = self._draw_latent(n, x_data)
        x_gen = self.sampler(self.energy, z, generator=self.rng)
        if slots is not None:
            self.latent.push(x_gen, slots)
        if self.data_noise > 0:
            noise = torch.randn(x_data.shape, generator=self.rng, device=x_data.device, dtype=x_data.dtype)
            x_data = x_data + self.data_noise * noise
        e_data, e_gen = self(x_data), self(x_gen)
        loss, parts = self.critic_loss(e_data, e_gen)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in parts.items()})
        self.log("train/nfe", float(self.sampler.last_nfe))
        if self._trainer is not None and self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            grad_norm = energy_grad(self.energy, x_gen).flatten(1).norm(dim=1).mean()
            self.log("train/grad_norm_gen", grad_norm)
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("train/samples_per_sec", n / max(now - self._last_step_time, 1e-9))
        self._last_step_time = now
        return loss

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.energy.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._val_batches = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = self._data(batch, batch_idx, "validation")
        self._val_batches.append(x)
        with torch.no_grad():
            self.log("val/energy_data", self(x).mean(), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self._val_batches:
            return
        data = torch.cat(self._val_batches)
        self._val_batches = []
        if self.trainer.world_size > 1:
            data = self.all_gather(data).flatten(0, 1)
        data = data[: self.val_max_samples]
        half = data.shape[0] // 2
        if half < 2:
            return
        ref, floor_sample = data[:half], data[half : 2 * half]
        metrics = self.sample_quality(ref, floor_sample)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, sync_dist=False)

    def sample_quality(self, reference: Tensor, data_sample: Tensor | None = None, seed: int = 0) -> dict[str, Tensor]:
        """MMD and sliced Wasserstein between generated samples and ``reference`` data.

        Generates as many samples as ``reference`` holds from a fixed seeded stream (the same
        ``z`` every time, so values are comparable across epochs and never consume the training
        stream). With ``data_sample`` (independent data of the same size) also returns the
        data-vs-data floors ``mmd_floor`` and ``sw_floor``.
        """
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
        n = reference.shape[0]
        per_rank = -(-n // world)
        gen = torch.Generator(device=self.device).manual_seed(_EVAL_SEED_OFFSET + seed + 7 * rank)
        x_gen = self.generate(per_rank, generator=gen)
        with torch.no_grad():
            e_gen = self(x_gen).mean()
        if world > 1:
            x_gen = self.all_gather(x_gen).flatten(0, 1)
        x_gen = x_gen[:n]
        out = {
            "energy_gen": e_gen,
            "mmd": mmd_rbf(x_gen, reference).float(),
            "sw": sliced_wasserstein(x_gen, reference).float(),
        }
        if data_sample is not None:
            out["mmd_floor"] = mmd_rbf(data_sample, reference).float()
            out["sw_floor"] = sliced_wasserstein(data_sample, reference).float()
        return out

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lightning_ebm"] = {"rng_state": self.rng.get_state()}
        hparams = checkpoint.get("hyper_parameters", {})
        if isinstance(hparams.get("latent"), ReplayBuffer):
            # the chains travel in state_dict; do not pickle a second copy with the hyper-parameters
            stripped = copy.copy(hparams["latent"])
            stripped.__dict__ = dict(stripped.__dict__, buffer=None)
            hparams["latent"] = stripped

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("lightning_ebm", {}).get("rng_state")
        if state is not None:
            self._pending_rng_state = state
            self._rng = None

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, weights_only: bool | None = None,
                             **kwargs: Any) -> EBM:
        """Load a checkpoint written by ``EBM`` (see ``LightningModule.load_from_checkpoint``).

        ``weights_only`` defaults to ``False`` because a checkpoint of a model built in Python
        holds its components (energy, sampler, latent) pickled with the hyper-parameters; load
        only checkpoints you trust. Checkpoints written by the ``lightning-ebm`` CLI hold plain
        configs and also load with ``weights_only=True``.
        """
        if weights_only is None:
            weights_only = False
        return super().load_from_checkpoint(checkpoint_path, *args, weights_only=weights_only, **kwargs)
