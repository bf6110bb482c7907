"""What a run must carry across a checkpoint, per rank: the module's random stream and the chains.

Under DDP every rank draws its own stream and owns its own persistent chains, but only rank 0
writes the checkpoint. ``RunState.save`` therefore gathers every rank's stream and chains into
``checkpoint["lightning_ebm"]["ranks"]`` (a collective: all ranks call it), and ``RunState.load``
hands each rank its own back. The latents are asked through the ``PersistentLatent`` interface
only. The checkpoint layout (kept from earlier releases, so old checkpoints still resume)::

    checkpoint["lightning_ebm"] = {"rng_state": <this rank's stream>,
                                   "ranks": [{"rng_state": ..., "replay_buffers": {name: chains}}, ...]}
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from .latents import PersistentLatent

__all__ = ["RAW_WEIGHTS_KEY", "RunState", "WEIGHT_KEYS", "persistent_latents"]

#: where Lightning's weight averaging (``callbacks.EMA``) keeps the raw weights beside the average
#: (in ``state_dict``) and reloads them from, after the module
RAW_WEIGHTS_KEY = "current_model_state"
#: the checkpoint entries that hold module weights, and so the chains' extra state
WEIGHT_KEYS = ("state_dict", RAW_WEIGHTS_KEY)

_KEY = "lightning_ebm"


def _world(module: L.LightningModule) -> tuple[int, int]:
    """``(world_size, global_rank)``; ``(1, 0)`` outside a Trainer."""
    trainer = module._trainer
    return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)


def persistent_latents(module: L.LightningModule) -> list[tuple[str, PersistentLatent]]:
    """The module's persistent latents with their ``state_dict`` prefixes."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, PersistentLatent)]


class RunState:
    """The module's random stream, one per rank, and the save/restore of everything per rank.

    Args:
        seed: seed of the stream; ``None`` derives it from the global seed. Rank ``r`` seeds with
            ``seed * 1_000_003 + 104_729 * r``, so ranks draw different chains.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._rng: torch.Generator | None = None
        self._rng_rank = 0
        self._pending: Tensor | None = None

    def rng(self, module: L.LightningModule) -> torch.Generator:
        """The stream on the module's device for this rank, made on first use (restored if pending)."""
        rank = _world(module)[1]
        # a stream made in another process (pickled to ddp_spawn workers) belongs to another rank
        if self._rng is None or self._rng.device != module.device or self._rng_rank != rank:
            base = self.seed if self.seed is not None else torch.initial_seed()
            gen = torch.Generator(device=module.device)
            gen.manual_seed((int(base) * 1_000_003 + 104_729 * rank) % (2**63 - 1))
            if self._pending is not None:
                gen.set_state(self._pending)
                self._pending = None
            self._rng, self._rng_rank = gen, rank
        return self._rng

    @staticmethod
    def prepare(module: L.LightningModule, batch_size: int | None) -> None:
        """Before training: every persistent latent checks the batch size and owns its chains."""
        for _, latent in persistent_latents(module):
            latent.prepare(batch_size)

    def save(self, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Write the stream (and under DDP every rank's stream and chains) into ``checkpoint``."""
        checkpoint[_KEY] = {"rng_state": self.rng(module).get_state()}
        if _world(module)[0] > 1:
            # on_save_checkpoint runs on every rank but only rank 0 writes: gather what is per rank
            checkpoint[_KEY]["ranks"] = self._gather(module)

    def _gather(self, module: L.LightningModule) -> list[dict[str, Any]]:
        """Every rank's stream and chains (a collective: all ranks call it)."""
        rng = module.all_gather(self.rng(module).get_state().to(module.device)).cpu()
        states: list[dict[str, Any]] = [{"rng_state": r.clone(), "replay_buffers": {}} for r in rng]
        for name, latent in persistent_latents(module):
            chains = latent.rank_state()
            if chains is None:  # not filled yet: the same on every rank (they step in lockstep)
                continue
            chains_all = module.all_gather(chains.to(module.device)).cpu()  # NCCL gathers device tensors
            for state, mine in zip(states, chains_all, strict=True):
                state["replay_buffers"][name] = mine.clone()
        return states

    def load(self, module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Restore this rank's stream, and put this rank's chains where ``load_state_dict`` finds them."""
        extra = checkpoint.get(_KEY, {})
        state = extra.get("rng_state")
        ranks = extra.get("ranks")
        if ranks:  # written under DDP: take this rank's stream and chains
            world, rank = _world(module)
            if module._trainer is not None and len(ranks) != world:
                rank_zero_warn(
                    f"EBM: the checkpoint holds the state of {len(ranks)} ranks but this run has {world}; "
                    f"rank r takes the replay buffer of rank r % {len(ranks)}, ranks >= {len(ranks)} start "
                    "fresh random streams: this resume is not exact"
                )
            mine = ranks[rank % len(ranks)]
            state = mine["rng_state"] if rank < len(ranks) else None
            self._rng = None
            latents = dict(persistent_latents(module))
            # load_state_dict runs after this hook: swap this rank's chains into the state dict, and
            # into the raw weights that a weight-averaging callback (EMA) reloads after the module
            for name, chains in mine["replay_buffers"].items():
                for key in WEIGHT_KEYS:
                    if key in checkpoint and name in latents:
                        checkpoint[key][f"{name}._extra_state"] = latents[name].extra_state_for(chains)
        if state is not None:
            self._pending = state
            self._rng = None

    @staticmethod
    def strip_hparams(hparams: dict[str, Any]) -> None:
        """Drop persistent chains from the pickled hyper-parameters (they travel in ``state_dict``)."""
        for name, value in hparams.items():
            if isinstance(value, PersistentLatent):
                hparams[name] = value.without_chains()
