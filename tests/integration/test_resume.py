"""Exact resume: N steps, a checkpoint, N more steps == 2N uninterrupted steps, bit for bit (CPU).

The model draws from every random stream the library has (replay-buffer draws and re-inits,
Langevin noise, data jitter, the data stream) and runs a learning-rate schedule, validation and
the divergence guard in between; the checkpoint falls in the middle of an epoch or on its end.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from reliability_helpers import differences, single_thread, tiny_data, tiny_ebm, tiny_trainer, training_state

from lightning_ebm.callbacks import DivergenceGuard

pytestmark = pytest.mark.usefixtures(single_thread.__name__)

N = 7  # batches_per_epoch is 5: step 7 is in the middle of the second epoch


def fit(root: Path, max_steps: int, ckpt_path: Path | None = None, seed: int = 0, **checkpoint_kwargs):
    L.seed_everything(seed)  # a resumed run starts from other weights and seeds: the checkpoint must win
    model, data = tiny_ebm(), tiny_data()
    checkpoint = ModelCheckpoint(dirpath=root, **checkpoint_kwargs)
    guard = DivergenceGuard(mode="rollback", snapshot_every_n_steps=2)
    trainer = tiny_trainer(root, max_steps=max_steps, callbacks=[checkpoint, guard])
    trainer.fit(model, data, ckpt_path=ckpt_path)  # a model built in Python, loaded with weights_only=True
    return training_state(trainer, model)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """2N steps in one go, keeping its own checkpoint of step N on the way."""
    root = tmp_path_factory.mktemp("reference")
    state = fit(root, 2 * N, every_n_train_steps=N, save_top_k=-1)
    (mid,) = root.glob(f"*step={N}.ckpt")
    return state, mid


def test_reference_run_is_what_the_comparisons_assume(reference):
    state, mid = reference
    assert state["global_step"] == 2 * N and state["data"] == {"position": 4, "count": 2 * N}
    assert torch.load(mid, weights_only=True)["global_step"] == N


def test_resuming_a_checkpoint_written_mid_run_continues_the_same_run(reference, tmp_path):
    state, mid = reference
    resumed = fit(tmp_path, 2 * N, ckpt_path=mid, seed=123, every_n_train_steps=N)
    assert differences(state, resumed) == []


@pytest.mark.parametrize("stop", [N, 5], ids=["mid-epoch", "epoch-end"])
def test_stopping_after_n_steps_and_resuming_to_2n_equals_2n_in_one_go(reference, tmp_path, stop):
    state = reference[0] if stop == N else fit(tmp_path / "ref", 2 * stop)  # 2 * stop steps in one go
    first = fit(tmp_path / "first", stop, save_last=True)
    assert first["global_step"] == stop
    resumed = fit(tmp_path / "second", 2 * stop, ckpt_path=tmp_path / "first" / "last.ckpt", seed=123)
    assert differences(state, resumed) == []


def _drop_rng(ckpt):
    del ckpt["lightning_ebm"]


def _drop_buffer(ckpt):
    ckpt["state_dict"]["latent._extra_state"] = {"buffer": None}


def _drop_data_stream(ckpt):
    del ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]


@pytest.mark.parametrize("drop", [_drop_rng, _drop_buffer, _drop_data_stream], ids=["rng", "buffer", "data"])
def test_each_saved_stream_matters(reference, tmp_path, drop):
    """Negative control: without any one of the saved states the resumed run is another run."""
    state, mid = reference
    ckpt = torch.load(mid, weights_only=True)
    drop(ckpt)
    torch.save(ckpt, tmp_path / "partial.ckpt")
    resumed = fit(tmp_path, 2 * N, ckpt_path=tmp_path / "partial.ckpt", seed=123)
    assert any(d.startswith("/model/") for d in differences(state, resumed))


def test_a_ddp_checkpoint_gives_each_rank_its_chains_also_in_the_raw_weights_an_ema_reloads(tmp_path):
    """With EMA the module is loaded twice: from ``state_dict`` (the average), then from
    ``current_model_state`` (the raw weights). Both must carry this rank's chains, not rank 0's."""
    from types import SimpleNamespace

    model = tiny_ebm()
    chains = [torch.full((64, 2), float(rank)) for rank in range(2)]
    checkpoint = {
        "state_dict": {"latent._extra_state": {"buffer": chains[0]}},
        "current_model_state": {"latent._extra_state": {"buffer": chains[0]}},
        "lightning_ebm": {"ranks": [{"rng_state": None, "replay_buffers": {"latent": c}} for c in chains]},
    }
    model._trainer = SimpleNamespace(world_size=2, global_rank=1)
    model.on_load_checkpoint(checkpoint)
    for key in ("state_dict", "current_model_state"):
        assert torch.equal(checkpoint[key]["latent._extra_state"]["buffer"], chains[1]), key
