"""Two CPU processes (gloo) through Lightning: ddp_spawn from pytest, ddp from the CLI in a subprocess.

Each rank must keep its own replay buffer and random stream, the checkpoint must hold both
ranks' and give each back to its rank, resuming must continue the very same two-process run,
validation metrics must be computed over both ranks' data and samples, and the divergence guard
must act on every rank when any one of them diverges.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from reliability_helpers import (
    CheckRestored,
    DumpRankState,
    InjectFault,
    differences,
    single_thread,
    tiny_data,
    tiny_ebm,
    tiny_trainer,
)

from lightning_ebm import EBM
from lightning_ebm.callbacks import DivergenceGuard
from lightning_ebm.metrics import mmd_rbf, sliced_wasserstein
from lightning_ebm.module import _EVAL_SEED_OFFSET

pytestmark = [pytest.mark.ddp, pytest.mark.usefixtures(single_thread.__name__)]

ROOT = Path(__file__).resolve().parents[2]
N = 4  # steps before the checkpoint; 2N in all (batches_per_epoch is 5: the checkpoint is mid-epoch)


def spawn_fit(root: Path, max_steps: int, callbacks: list, ckpt_path: Path | None = None, seed: int = 0,
              prefill: bool = False, **model_kwargs) -> L.Trainer:
    L.seed_everything(seed)
    model = tiny_ebm(**model_kwargs)
    if prefill:  # chains made in the parent reach the workers through shared memory
        model.latent.draw(1)
    trainer = tiny_trainer(root, max_steps=max_steps, strategy="ddp_spawn", devices=2, val_check_interval=N,
                           callbacks=callbacks)
    trainer.fit(model, tiny_data(), ckpt_path=ckpt_path, weights_only=False)
    return trainer


def checkpoint_state(path: Path) -> dict:
    raw = torch.load(path, weights_only=False)
    return {"state_dict": raw["state_dict"], "optimizer": raw["optimizer_states"],
            "schedulers": raw["lr_schedulers"], "ranks": raw["lightning_ebm"]["ranks"],
            "loops": raw["loops"]["fit_loop"]["state_dict"], "global_step": raw["global_step"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("ddp")
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=N, save_top_k=-1, save_last=True)
    trainer = spawn_fit(root, 2 * N, [checkpoint], prefill=True)
    (mid,) = (root / "ckpt").glob(f"*step={N}.ckpt")
    return root, mid, dict(trainer.callback_metrics)


def test_each_rank_has_its_own_chains_and_stream_and_the_checkpoint_holds_both(uninterrupted):
    _, mid, _ = uninterrupted
    raw = torch.load(mid, weights_only=False)
    ranks = raw["lightning_ebm"]["ranks"]
    assert len(ranks) == 2
    chains = [r["replay_buffers"]["latent"] for r in ranks]
    assert chains[0].shape == chains[1].shape == (64, 2)
    assert not torch.equal(chains[0], chains[1])  # nor one tensor shared from the parent (prefill)
    assert not torch.equal(ranks[0]["rng_state"], ranks[1]["rng_state"])
    # the plain state dict carries rank 0's, for single-process loading
    assert torch.equal(raw["state_dict"]["latent._extra_state"]["buffer"], chains[0])
    assert torch.isfinite(EBM.load_from_checkpoint(mid).latent.buffer).all()


def test_resume_gives_each_rank_its_own_state_and_continues_the_same_run(uninterrupted, tmp_path):
    root, mid, _ = uninterrupted
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=N, save_last=True)
    spawn_fit(tmp_path, 2 * N, [CheckRestored(str(mid), str(tmp_path / "restored")), checkpoint],
              ckpt_path=mid, seed=123)
    for rank in (0, 1):
        seen = json.loads((tmp_path / "restored" / f"rank{rank}.json").read_text())
        assert seen == {"world_size": 2, "buffer_is_mine": True, "rng_is_mine": True,
                        "buffer_is_another_ranks": False}, (rank, seen)
    reference = checkpoint_state(root / "ckpt" / "last.ckpt")
    assert reference["global_step"] == 2 * N
    assert differences(reference, checkpoint_state(tmp_path / "ckpt" / "last.ckpt")) == []


def test_validation_metrics_cover_both_ranks(uninterrupted):
    """Recompute the last validation in one process from the final weights and compare."""
    root, _, metrics = uninterrupted
    model = EBM.load_from_checkpoint(root / "ckpt" / "last.ckpt")
    ranks = torch.load(root / "ckpt" / "last.ckpt", weights_only=False)["lightning_ebm"]["ranks"]
    chains = [r["replay_buffers"]["latent"] for r in ranks]
    data = tiny_data()
    data.setup()
    val = data.val_data  # 64 points; DistributedSampler(shuffle=False) gives rank r the points r, r + 2, ...
    gathered = torch.cat([val[0::2], val[1::2]])  # what all_gather puts together
    reference, floor = gathered[:32], gathered[32:]
    generated = []
    for rank in (0, 1):  # each rank starts its half from its own chains, with its own evaluation stream
        model.latent.buffer = chains[rank]
        stream = torch.Generator().manual_seed(_EVAL_SEED_OFFSET + 7 * rank)
        generated.append(model.generate(16, generator=stream))
    generated = torch.cat(generated)
    with torch.no_grad():
        expected = {
            "val/energy_data": model(val).mean(), "val/energy_gen": model(generated).mean(),
            "val/mmd": mmd_rbf(generated, reference), "val/sw": sliced_wasserstein(generated, reference),
            "val/mmd_floor": mmd_rbf(floor, reference),
        }
    for key, value in expected.items():
        torch.testing.assert_close(metrics[key].float(), value.float(), rtol=1e-5, atol=1e-6, msg=key)
    # rank 0's half alone gives another energy: the logged value is not one rank's
    assert not torch.isclose(metrics["val/energy_gen"], model(generated[:16]).mean().detach(), rtol=1e-4)


def test_guard_rolls_back_every_rank_when_one_rank_diverges(tmp_path):
    fault = InjectFault("nan_after_step", steps=[3], ranks=[1])  # only rank 1's weights turn NaN
    guard = DivergenceGuard(mode="rollback", snapshot_every_n_steps=1)
    spawn_fit(tmp_path, 6, [fault, guard, DumpRankState(str(tmp_path / "end"))], lr_scheduler=None)
    ends = [torch.load(tmp_path / "end" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [e["rollbacks"] for e in ends] == [1, 1]
    assert differences(ends[0]["model"], ends[1]["model"]) == []  # still one model: both went back
    assert all(torch.isfinite(v).all() for v in ends[0]["model"].values() if v.is_floating_point())
    assert not torch.equal(ends[0]["replay_buffer"], ends[1]["replay_buffer"])


def test_guard_stop_mode_under_ddp_saves_both_ranks_and_raises(tmp_path):
    guard = DivergenceGuard(mode="stop", snapshot_every_n_steps=1, dirpath=str(tmp_path / "good"))
    with pytest.raises(Exception, match="DivergenceGuard stopped training") as info:
        spawn_fit(tmp_path, 6, [InjectFault("nan_weight", steps=[3], ranks=[0]), guard], lr_scheduler=None)
    assert "training loss = nan" in str(info.value)
    raw = torch.load(tmp_path / "good" / "last-good.ckpt", weights_only=False)
    assert raw["global_step"] == 4 and len(raw["lightning_ebm"]["ranks"]) == 2
    assert all(torch.isfinite(r["replay_buffers"]["latent"]).all() for r in raw["lightning_ebm"]["ranks"])
    loaded = EBM.load_from_checkpoint(tmp_path / "good" / "last-good.ckpt")
    assert all(torch.isfinite(p).all() for p in loaded.parameters())


# ---------------------------------------------------------------------------- the CLI, strategy=ddp
REPLAY = """
model:
  init_args:
    latent:
      class_path: lightning_ebm.latents.ReplayBuffer
      init_args:
        latent: {class_path: lightning_ebm.latents.Uniform, init_args: {shape: [2], low: -4.0, high: 4.0}}
        capacity: 1024  # Plot2D's pictures draw 1000 samples from it
"""


def cli_fit(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m lightning_ebm.cli fit`` on two CPU processes; Lightning re-launches it for rank 1."""
    (tmp_path / "replay.yaml").write_text(REPLAY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "lightning_ebm.cli", "fit",
        "--config", str(ROOT / "configs" / "toy2d.yaml"), "--config", str(tmp_path / "replay.yaml"),
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
        "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.init_args.batch_size=32", "--data.init_args.batches_per_epoch=6",
        "--data.init_args.num_val=64",
        "--model.init_args.sampler.init_args.steps=3", *extra,
    ]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_cli_ddp_saves_both_ranks_and_restores_each_on_resume(tmp_path):
    cli_fit(tmp_path, "--trainer.max_steps=4")
    last = tmp_path / "toy2d" / "version_0" / "checkpoints" / "last.ckpt"
    raw = torch.load(last, weights_only=True)  # a CLI checkpoint holds plain data only
    ranks = raw["lightning_ebm"]["ranks"]
    assert raw["global_step"] == 4 and len(ranks) == 2
    assert not torch.equal(ranks[0]["replay_buffers"]["latent"], ranks[1]["replay_buffers"]["latent"])
    assert not list(last.parent.glob(".*.tmp-*"))  # written through AtomicCheckpointIO, nothing left behind

    check = "--trainer.callbacks+=reliability_helpers.CheckRestored"
    cli_fit(tmp_path, "--trainer.max_steps=6", f"--ckpt_path={last}", check,
            f"--trainer.callbacks.ckpt_path={last}", f"--trainer.callbacks.out_dir={tmp_path / 'restored'}")
    for rank in (0, 1):
        seen = json.loads((tmp_path / "restored" / f"rank{rank}.json").read_text())
        assert seen == {"world_size": 2, "buffer_is_mine": True, "rng_is_mine": True,
                        "buffer_is_another_ranks": False}, (rank, seen)
    # the resumed run continues its own run directory (no version_1)
    assert not (tmp_path / "toy2d" / "version_1").exists()
    resumed = torch.load(last, weights_only=True)
    assert resumed["global_step"] == 6
