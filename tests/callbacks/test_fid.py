"""FIDCallback: FID, KID and IS against float64 formulas computed here, caching, checkpoints, DDP."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.error import URLError

import lightning as L
import numpy as np
import pytest
import scipy.linalg
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_ebm import EBM
from lightning_ebm.callbacks import FIDCallback
from lightning_ebm.callbacks.fid import fid_score
from lightning_ebm.data import DigitsDataModule
from lightning_ebm.energies import ConvEnergy
from lightning_ebm.latents import Uniform
from lightning_ebm.samplers import GradientDescent


class Recorder(nn.Module):
    """A fixed float64 feature map ``tanh(flatten(x) @ W)`` (d = 6) with a class head, recording
    every batch it sees (in memory, and as files when ``save_dir`` is set: DDP ranks)."""

    num_features = 6

    def __init__(self, save_dir: str | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.randn(64, 6, generator=g, dtype=torch.float64) / 4)
        self.register_buffer("c", torch.randn(6, 3, generator=g, dtype=torch.float64))
        self.save_dir, self.seen = save_dir, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().cpu().clone())
        if self.save_dir is not None:
            rank = int(os.environ.get("LOCAL_RANK", 0))
            torch.save(x.detach().cpu(), Path(self.save_dir) / f"rank{rank}_{len(self.seen):03d}.pt")
        return torch.tanh(x.double().flatten(1) @ self.w)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.c


def features(x: torch.Tensor) -> np.ndarray:
    return Recorder()(x).numpy()  # same fixed W, float64


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), unbiased covariances, scipy's sqrtm."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


def kid_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 over all samples."""
    k = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3  # noqa: E731
    m = a.shape[0]
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    return float((kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)) / (m * (m - 1)) - 2 * kab.mean())


def inception_score(logits: np.ndarray) -> float:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    marginal = p.mean(0)
    return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean()))


def tiny_model() -> EBM:
    return EBM(
        ConvEnergy(in_channels=1, width=2, image_size=8),
        GradientDescent(steps=2, step_size=0.5),
        Uniform((1, 8, 8)),
    )


def trainer(tmp_path, callbacks, **kwargs) -> L.Trainer:
    defaults = dict(
        max_steps=1,
        val_check_interval=1,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        logger=CSVLogger(tmp_path),
        inference_mode=False,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


@pytest.mark.filterwarnings(r"ignore:std\(\).*degrees of freedom:UserWarning")  # one IS split: no std
def test_fid_kid_is_equal_float64_references(tmp_path):
    torch.manual_seed(0)
    recorder = Recorder()
    callback = FIDCallback(
        recorder,
        num_samples=64,
        batch_size=20,
        kid=True,
        kid_subset_size=64,
        kid_subsets=1,
        inception_score=True,
        is_splits=1,
    )
    dm = DigitsDataModule(batch_size=32)
    trainer(tmp_path, [callback]).fit(tiny_model(), dm)
    seen = recorder.seen
    assert callback.num_real == 64
    real, fake = torch.cat(seen[:2]), torch.cat(seen[2:])
    torch.testing.assert_close(
        real, dm.val_data[:64]
    )  # the first two validation batches, not the sanity check
    assert fake.shape == (64, 1, 8, 8) and [len(s) for s in seen[2:]] == [20, 20, 20, 4]
    fr, ff = features(real), features(fake)
    assert callback.last["fid"] == pytest.approx(frechet(fr, ff), rel=1e-5)
    assert callback.last["kid_mean"] == pytest.approx(kid_unbiased(fr, ff), rel=1e-4, abs=1e-7)
    assert callback.last["is_mean"] == pytest.approx(inception_score(ff @ Recorder().c.numpy()), rel=1e-5)
    assert trainer_metrics_logged(tmp_path) >= {"val/fid", "val/kid_mean", "val/kid_std", "val/is_mean"}


def test_fewer_real_images_than_the_kid_subset_warn_and_use_them_all(tmp_path):
    """A smoke run's short ``limit_val_batches`` leaves fewer real images than ``kid_subset_size``: KID
    then averages subsets of all 32 real and 32 of the 40 generated images, whose mean over subsets is
    the unbiased MMD^2 of the full sets (a U-statistic); the run goes on."""
    recorder = Recorder()
    callback = FIDCallback(recorder, num_samples=40, batch_size=40, kid=True, kid_subset_size=40, kid_subsets=400)
    with pytest.warns(UserWarning, match="kid_subset_size=40 exceeds the 32 real images; KID uses subsets of 32"):
        trainer(tmp_path, [callback], limit_val_batches=1).fit(tiny_model(), DigitsDataModule(batch_size=32))
    real, fake = features(torch.cat(recorder.seen[:1])), features(torch.cat(recorder.seen[1:]))
    assert real.shape[0] == 32 and fake.shape[0] == 40
    k = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3  # noqa: E731
    m, n = real.shape[0], fake.shape[0]
    kaa, kbb = k(real, real), k(fake, fake)
    full = ((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
            - 2 * k(real, fake).mean())
    assert callback.last["kid_mean"] == pytest.approx(full, rel=0.01)
    assert callback.metrics["kid"].subset_size == 40  # the setting itself is left as given


def trainer_metrics_logged(tmp_path) -> set[str]:
    (metrics,) = Path(tmp_path).rglob("metrics.csv")
    return set(metrics.read_text().splitlines()[0].split(","))


def test_real_statistics_once_fixed_latents_and_no_checkpoint_bloat(tmp_path):
    recorder = Recorder()
    callback = FIDCallback(recorder, num_samples=16, batch_size=16, every_n_validations=1)
    model = tiny_model()
    t = trainer(
        tmp_path,
        [callback, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        max_steps=3,
        enable_checkpointing=True,
        limit_val_batches=1,
    )
    t.fit(model, DigitsDataModule(batch_size=32))
    sizes = [len(s) for s in recorder.seen]
    assert sizes == [32, 16, 16, 16]  # real once (first validation), then 16 generated per validation
    assert callback.num_validations == 3 and callback.num_real == 32
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert not [k for k in ckpt["state_dict"] if not k.startswith(("energy.", "log_z"))]  # log Z: the EBM's own
    assert ckpt["callbacks"]["FIDCallback"] == {"num_validations": 3}  # no statistics, only the schedule
    # the same z every time: with the model frozen, the generated images would repeat exactly
    fixed = FIDCallback(Recorder(), num_samples=8, batch_size=8)
    frozen = tiny_model()
    frozen.configure_optimizers = lambda: torch.optim.SGD(frozen.parameters(), lr=0.0)
    trainer(tmp_path / "b", [fixed], max_steps=2, limit_val_batches=1).fit(
        frozen, DigitsDataModule(batch_size=8)
    )
    torch.testing.assert_close(fixed.feature.seen[-1], fixed.feature.seen[-2])


def test_a_resumed_run_keeps_the_every_n_validations_schedule(tmp_path):
    def run(max_steps, ckpt_path=None):
        callback = FIDCallback(Recorder(), num_samples=8, batch_size=8, every_n_validations=2)
        t = trainer(tmp_path, [callback, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
                    max_steps=max_steps, limit_val_batches=1, num_sanity_val_steps=0, enable_checkpointing=True)
        t.fit(tiny_model(), DigitsDataModule(batch_size=8), ckpt_path=ckpt_path)
        return callback

    assert run(3).num_validations == 3
    resumed = run(4, tmp_path / "ckpt" / "last.ckpt")
    assert resumed.num_validations == 4 and "fid" in resumed.last  # the 4th validation, as without the stop


def test_needs_real_images_and_valid_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        FIDCallback(Recorder(), num_samples=0)
    with pytest.raises(ValueError, match="kid_subset_size=100 exceeds num_samples=50"):
        FIDCallback(Recorder(), num_samples=50, kid=True, kid_subset_size=100)
    with pytest.raises(ValueError, match="inception_score=True needs a feature extractor with a `head`"):
        FIDCallback(nn.Flatten(), inception_score=True)
    with pytest.raises(ValueError, match="max_real must be an integer >= 2 or None, got 1"):
        FIDCallback(Recorder(), max_real=1)
    callback = FIDCallback(Recorder(), num_samples=8)
    with pytest.raises(RuntimeError, match="fewer than 2 real images"):
        trainer(tmp_path, [callback], limit_val_batches=1).fit(tiny_model(), DigitsDataModule(batch_size=1))


# ------------------------------------------------------------------------ Inception
def test_missing_inception_weights_say_where_to_put_them(tmp_path, monkeypatch):
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from lightning_ebm.metrics import InceptionFeatures

    def offline(*args, **kwargs):
        raise URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(fidelity, "load_state_dict_from_url", offline)
    target = tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(RuntimeError, match="could not get the FID Inception weights") as info:
        InceptionFeatures()
    assert str(target) in str(info.value) and "weights_path" in str(info.value)
    callback = FIDCallback(num_samples=8)  # the default extractor fails before any training
    with pytest.raises(RuntimeError, match="inception_weights_path"):
        trainer(tmp_path, [callback]).fit(tiny_model(), DigitsDataModule(batch_size=8))
    with pytest.raises(FileNotFoundError, match="weights_path='nope.pth' is not a file"):
        InceptionFeatures(weights_path="nope.pth")


def test_inception_from_a_local_weights_file(tmp_path, monkeypatch):
    """A weights file in the torch-fidelity layout loads offline; features and IS logits agree with
    torch-fidelity's own forward pass."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from torchmetrics.image.fid import NoTrainInceptionV3

    from lightning_ebm.metrics import InceptionFeatures

    with monkeypatch.context() as patch:  # a randomly initialised network, saved as a weights file
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        random_net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"])
    path = tmp_path / "inception.pth"
    torch.save(random_net.state_dict(), path)

    monkeypatch.setattr(
        fidelity, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download")
    )
    extractor = InceptionFeatures(weights_path=str(path))
    grey = torch.rand(2, 1, 16, 16) * 2 - 1
    f = extractor(grey)
    uint8 = ((grey + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    ref_features, ref_logits = random_net._torch_fidelity_forward(uint8)
    torch.testing.assert_close(f, ref_features)
    torch.testing.assert_close(extractor.head(f), ref_logits, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------ DDP
@pytest.mark.ddp
def test_statistics_are_summed_over_ranks(tmp_path):
    """Under DDP each rank sees half of the real and generated images; the logged FID is the FID
    of all of them together (checked against the union of what every rank's extractor saw)."""
    seen_dir = tmp_path / "seen"
    seen_dir.mkdir()
    callback = FIDCallback(Recorder(str(seen_dir)), num_samples=30, batch_size=15)
    t = trainer(
        tmp_path, [callback], strategy="ddp_spawn", devices=2, limit_val_batches=2, num_sanity_val_steps=0
    )
    t.fit(tiny_model(), DigitsDataModule(batch_size=16))
    logged = float(t.callback_metrics["val/fid"])
    per_rank = {r: [torch.load(p) for p in sorted(seen_dir.glob(f"rank{r}_*.pt"))] for r in (0, 1)}
    assert [len(x) for x in per_rank[0]] == [16, 16, 15] and [len(x) for x in per_rank[1]] == [16, 16, 15]
    real = torch.cat([x for r in (0, 1) for x in per_rank[r][:2]])
    fake = torch.cat([x for r in (0, 1) for x in per_rank[r][2:]])
    assert logged == pytest.approx(frechet(features(real), features(fake)), rel=1e-5)
    half = frechet(features(torch.cat(per_rank[0][:2])), features(per_rank[0][2]))
    assert abs(logged - half) > 1e-3  # not one rank's own value


def test_fid_score_of_two_image_sets():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(40, 1, 8, 8, generator=g) * 2 - 1, torch.rand(30, 1, 8, 8, generator=g)
    assert fid_score(a, b, Recorder(), batch_size=16) == pytest.approx(
        frechet(features(a), features(b)), rel=1e-5
    )
    assert fid_score(a, a, Recorder()) == pytest.approx(0.0, abs=1e-6)


class FlippedTestSplit(DigitsDataModule):
    """The digits with a test split unlike the validation split (the images negated)."""

    def test_dataloader(self):
        return torch.utils.data.DataLoader(-self.val_data[:48], batch_size=16)


def test_a_test_run_uses_the_test_split_and_validation_its_own_again(tmp_path):
    recorder = Recorder()
    callback = FIDCallback(recorder, num_samples=24, batch_size=24, every_n_validations=5)
    dm, model = FlippedTestSplit(batch_size=16), tiny_model()
    t = trainer(tmp_path, [callback], max_steps=1, limit_val_batches=2)
    t.fit(model, dm)
    assert callback.last == {}  # the one validation run was not the fifth
    recorder.seen.clear()
    t.test(model, dm)
    real, fake = torch.cat(recorder.seen[:3]), torch.cat(recorder.seen[3:])
    torch.testing.assert_close(real, -dm.val_data[:48])  # every test batch, not the validation statistics
    assert fake.shape[0] == 24
    assert callback.last["fid"] == pytest.approx(frechet(features(real), features(fake)), rel=1e-5)
    assert "test/fid" in t.callback_metrics and "val/fid" not in t.callback_metrics
    assert callback.num_validations == 1  # a test run is not counted as a validation run
    recorder.seen.clear()
    t.validate(model, dm)  # counts as validation run 2 of 5: collects real images but computes nothing
    torch.testing.assert_close(torch.cat(recorder.seen), dm.val_data[:32])
