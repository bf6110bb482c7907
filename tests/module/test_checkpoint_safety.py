"""Checkpoints of models built in Python are plain data: they load with ``weights_only=True``,
resume, rebuild their components (the library's and a user's importable ones) by themselves, and
say plainly what is missing where a component cannot be described (a class of ``__main__``)."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from reliability_helpers import single_thread, tiny_data, tiny_ebm, tiny_trainer

from lightning_ebm import EBM
from lightning_ebm._config import ComponentConfigError, to_config
from lightning_ebm.energies import MLPEnergy
from lightning_ebm.latents import Gaussian
from lightning_ebm.samplers import GradientDescent

pytestmark = pytest.mark.usefixtures(single_thread.__name__)
ROOT = Path(__file__).resolve().parents[2]

USER_MODULE = '''
import torch
from torch import nn


class WideEnergy(nn.Module):
    """A user's energy: its constructor arguments are same-named attributes (recoverable)."""

    def __init__(self, dim, width=8, scale=1.0):
        super().__init__()
        self.dim, self.width, self.scale = dim, width, scale
        self.net = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x):
        return self.scale * self.net(x.flatten(1)).squeeze(-1)


class OpaqueEnergy(nn.Module):
    """Its width is not kept as an attribute: it cannot be recovered."""

    def __init__(self, dim, width):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x.flatten(1)).squeeze(-1)


class DeclaredEnergy(OpaqueEnergy):
    """Keeps no attributes, but says its constructor arguments itself (the explicit opt-in)."""

    def __init__(self, dim, width):
        super().__init__(dim, width)
        self._args = {"dim": dim, "width": width}

    def get_init_args(self):
        return dict(self._args)


class LyingEnergy(WideEnergy):
    """Its attribute ``width`` means something else than the argument: rebuilding from it differs."""

    def __init__(self, dim, width=3):
        super().__init__(dim, width=width)
        self.width = 2 * width
'''


def _fit(root: Path, model: EBM, max_steps: int, ckpt_path: Path | None = None) -> L.Trainer:
    trainer = tiny_trainer(root, max_steps=max_steps, callbacks=[ModelCheckpoint(dirpath=root, save_last=True)])
    trainer.fit(model, tiny_data(), ckpt_path=ckpt_path)  # torch's default weights_only=True on resume
    return trainer


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    """An importable module of user energies, written by the test (``user_energies_ckpt``)."""
    folder = tmp_path_factory.mktemp("usermod")
    (folder / "user_energies_ckpt.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))
    import user_energies_ckpt

    yield user_energies_ckpt, folder
    sys.path.remove(str(folder))
    sys.modules.pop("user_energies_ckpt", None)


def test_a_python_built_model_resumes_under_weights_only_and_continues_the_same_run(tmp_path):
    L.seed_everything(0)
    straight = _fit(tmp_path / "straight", tiny_ebm(), 6).lightning_module
    L.seed_everything(0)
    _fit(tmp_path / "a", tiny_ebm(), 3)
    ckpt = tmp_path / "a" / "last.ckpt"
    raw = torch.load(ckpt, weights_only=True)  # plain data: no pickled component
    assert raw["hyper_parameters"]["energy"] == {
        "class_path": "lightning_ebm.energies.MLPEnergy",
        "init_args": {"dim": 2, "hidden": 16, "num_layers": 2, "spectral_norm": False, "num_levels": None,
                      "num_outputs": 1}}
    assert raw["hyper_parameters"]["optimizer"] == {
        "class_path": "torch.optim.adam.Adam", "init_args": {"lr": 1e-2, "betas": (0.5, 0.999)}}
    L.seed_everything(99)  # other weights and seeds: the checkpoint must win
    resumed = _fit(tmp_path / "b", tiny_ebm(), 6, ckpt_path=ckpt).lightning_module
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_load_from_checkpoint_with_weights_only_rebuilds_every_component(tmp_path):
    model = tiny_ebm()
    _fit(tmp_path, model, 3)
    loaded = EBM.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert loaded.energy.net[0].out_features == 16 and len(loaded.energy.net) == 5
    assert (loaded.sampler.steps, loaded.sampler.step_size, loaded.sampler.noise_std) == (4, 0.05, 0.05)
    assert (loaded.latent.capacity, loaded.latent.reinit_prob, loaded.latent.latent.low) == (64, 0.2, -4.0)
    assert isinstance(loaded.optimizer_factory, functools.partial)
    assert loaded.optimizer_factory.func is torch.optim.Adam and loaded.optimizer_factory.keywords["lr"] == 1e-2
    assert loaded.lr_scheduler_factory.keywords == {"step_size": 4, "gamma": 0.7}
    torch.testing.assert_close(loaded.latent.buffer, model.latent.buffer, rtol=0, atol=0)
    z = torch.rand(16, 2) * 8 - 4
    gen = functools.partial(torch.Generator().manual_seed, 5)
    torch.testing.assert_close(loaded.generate(16, z=z, generator=gen()), model.generate(16, z=z, generator=gen()),
                               rtol=0, atol=0)


def test_a_setting_changed_after_construction_is_what_the_checkpoint_records():
    model = EBM(energy=tiny_ebm().energy, sampler=GradientDescent(steps=5, step_size=0.1), latent=Gaussian((2,)))
    model.sampler.steps = 9
    assert to_config(model.sampler)["init_args"]["steps"] == 9


def test_a_user_energy_from_an_importable_module_round_trips(tmp_path, user_module):
    mod, folder = user_module
    model = EBM(energy=mod.WideEnergy(2, width=6, scale=0.5), sampler=GradientDescent(steps=3, step_size=0.05),
                latent=Gaussian((2,)), optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no warning: the config is complete
        warnings.filterwarnings("ignore", message=".*(workers|log_every_n_steps|LeafSpec|litlogger|exists).*")
        _fit(tmp_path, model, 2)
    ckpt = tmp_path / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["energy"] == {
        "class_path": "user_energies_ckpt.WideEnergy", "init_args": {"dim": 2, "width": 6, "scale": 0.5}}
    loaded = EBM.load_from_checkpoint(ckpt)  # in this process the module is imported already
    assert (loaded.energy.width, loaded.energy.scale) == (6, 0.5)
    x = torch.randn(8, 2)
    torch.testing.assert_close(loaded.energy(x), model.energy(x), rtol=0, atol=0)
    # a fresh process: allowed explicitly it imports the module; not allowed, it refuses and says how
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(folder)!r})
        from lightning_ebm import EBM
        try:
            EBM.load_from_checkpoint({str(ckpt)!r})
        except ValueError as err:
            print("REFUSED", err)
        m = EBM.load_from_checkpoint({str(ckpt)!r}, allow_classes=["user_energies_ckpt"])
        print("WIDTH", m.energy.width, float(m.energy(torch.ones(1, 2))))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED" in out.stdout and "'user_energies_ckpt.WideEnergy'" in out.stdout
    assert "allow_classes=['user_energies_ckpt.WideEnergy']" in out.stdout
    assert f"WIDTH 6 {float(model.energy(torch.ones(1, 2)))}" in out.stdout


def test_an_unrecoverable_user_class_warns_at_save_and_fails_short_at_load(tmp_path, user_module):
    mod, _ = user_module
    for cls, what in ((mod.OpaqueEnergy, "constructor arguments ['dim', 'width'] are not attributes"),
                      (mod.LyingEnergy, "gives a different object (width, parameter shapes differ)")):
        model = EBM(energy=cls(2, 3), sampler=GradientDescent(steps=2, step_size=0.05), latent=Gaussian((2,)))
        with pytest.warns(UserWarning, match=rf"energy \({cls.__name__}\).*{re.escape(what)}"):
            _fit(tmp_path / cls.__name__, model, 1)
        ckpt = tmp_path / cls.__name__ / "last.ckpt"
        torch.load(ckpt, weights_only=True)  # still plain data, still resumable
        with pytest.raises(ComponentConfigError, match=rf"energy: .*{cls.__name__}.*pass energy={cls.__name__}"):
            EBM.load_from_checkpoint(ckpt)
        loaded = EBM.load_from_checkpoint(ckpt, energy=cls(2, 3))  # given explicitly, it loads
        torch.testing.assert_close(loaded.energy(torch.ones(1, 2)), model.energy(torch.ones(1, 2)))


def test_an_optimizer_that_cannot_be_recorded_is_named_at_save(tmp_path):
    model = EBM(energy=MLPEnergy(dim=2, hidden=8), sampler=GradientDescent(steps=2, step_size=0.05),
                latent=Gaussian((2,)), optimizer=lambda params: torch.optim.SGD(params, lr=0.01))
    with pytest.warns(UserWarning, match=r"optimizer=<function .*<lambda>.* is not recorded \(it cannot be "
                                         r"pickled\), so loading builds torch.optim.Adam; .*functools.partial"):
        _fit(tmp_path, model, 1)
    assert isinstance(EBM.load_from_checkpoint(tmp_path / "last.ckpt").configure_optimizers(), torch.optim.Adam)


MAIN_SCRIPT = '''
import torch
from torch import nn
import lightning as L
from lightning_ebm import EBM
from lightning_ebm.data import Toy2DDataModule
from lightning_ebm.latents import Gaussian
from lightning_ebm.samplers import GradientDescent


class MyEnergy(nn.Module):
    def __init__(self, dim=2):
        super().__init__()
        self.dim = dim
        self.lin = nn.Linear(dim, 1)

    def forward(self, x):
        return self.lin(x).squeeze(-1) + x.pow(2).sum(1)


model = EBM(energy=MyEnergy(), sampler=GradientDescent(steps=2, step_size=0.05), latent=Gaussian((2,)))
trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                    inference_mode=False, limit_val_batches=0, default_root_dir=ROOT_DIR, accelerator="cpu")
trainer.fit(model, Toy2DDataModule(batch_size=16, batches_per_epoch=2, num_val=16))
trainer.save_checkpoint(ROOT_DIR + "/main.ckpt")
EBM.load_from_checkpoint(ROOT_DIR + "/main.ckpt", weights_only=True)  # in the same script it rebuilds
print("SAVED")
'''


def test_a_class_of_main_warns_at_save_and_the_cli_says_what_is_missing(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(MAIN_SCRIPT.replace("ROOT_DIR", repr(str(tmp_path))))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0 and "SAVED" in out.stdout, out.stderr[-3000:]
    assert "energy (MyEnergy): MyEnergy is defined in the running script (__main__)" in out.stderr
    sample = subprocess.run(
        [sys.executable, "-m", "lightning_ebm.cli", "sample", "--ckpt_path", str(tmp_path / "main.ckpt"),
         "--output", str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert sample.returncode != 0 and not (tmp_path / "x.pt").exists()
    assert "Traceback" not in sample.stderr and len(sample.stderr.strip().splitlines()) <= 2, sample.stderr
    assert "MyEnergy was defined in the training script (__main__)" in sample.stderr
    assert "move MyEnergy into an importable module" in sample.stderr


def test_a_tampered_config_is_refused_naming_the_class(tmp_path):
    model = tiny_ebm()
    _fit(tmp_path, model, 1)
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)
    raw["hyper_parameters"]["energy"] = {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", "x"]}}
    torch.save(raw, tmp_path / "tampered.ckpt")
    with pytest.raises(ComponentConfigError, match=r"energy: the config names the class 'subprocess.Popen'"):
        EBM.load_from_checkpoint(tmp_path / "tampered.ckpt")
    raw["hyper_parameters"]["energy"] = {"class_path": "os.system", "init_args": {}}
    torch.save(raw, tmp_path / "tampered.ckpt")
    with pytest.raises(ComponentConfigError, match=r"'os.system' is not a class"):
        EBM.load_from_checkpoint(tmp_path / "tampered.ckpt", allow_classes=["os"])


def test_an_old_checkpoint_with_pickled_components_says_what_to_do(tmp_path):
    model = tiny_ebm()
    _fit(tmp_path, model, 1)
    raw = torch.load(tmp_path / "last.ckpt", weights_only=True)
    raw["hyper_parameters"]["energy"] = model.energy  # what checkpoints held before: a pickled instance
    torch.save(raw, tmp_path / "old.ckpt")
    with pytest.raises(ComponentConfigError, match=r"pickled Python objects \(it pickles "
                                                   r"lightning_ebm.energies.MLPEnergy\).*weights_only=False"):
        EBM.load_from_checkpoint(tmp_path / "old.ckpt")
    loaded = EBM.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=False)  # the explicit opt-in
    torch.testing.assert_close(loaded.energy(torch.ones(1, 2)), model.energy(torch.ones(1, 2)))


def test_a_cli_trained_checkpoint_keeps_the_cli_format_and_loads(tmp_path):
    from lightning_ebm.cli import main

    main(["fit", "--config", str(ROOT / "configs" / "toy2d.yaml"), "--trainer.max_steps=2",
          "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
          f"--trainer.logger.init_args.save_dir={tmp_path}", "--data.init_args.batches_per_epoch=2",
          "--data.init_args.num_val=32", "--model.init_args.sampler.init_args.steps=2"])
    ckpt = tmp_path / "toy2d" / "version_0" / "checkpoints" / "last.ckpt"
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert hparams["_instantiator"] == "lightning.pytorch.cli.instantiate_module"
    assert hparams["sampler"]["init_args"]["steps"] == 2
    loaded = EBM.load_from_checkpoint(ckpt, weights_only=True)
    assert loaded.sampler.steps == 2 and loaded.generate(4).shape == (4, 2)


def test_a_class_that_declares_its_arguments_round_trips(tmp_path, user_module):
    mod, _ = user_module
    model = EBM(energy=mod.DeclaredEnergy(2, 5), sampler=GradientDescent(steps=2, step_size=0.05),
                latent=Gaussian((2,)))
    _fit(tmp_path, model, 1)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["hyper_parameters"]["energy"]["init_args"] == {
        "dim": 2, "width": 5}
    loaded = EBM.load_from_checkpoint(tmp_path / "last.ckpt")
    torch.testing.assert_close(loaded.energy(torch.ones(3, 2)), model.energy(torch.ones(3, 2)), rtol=0, atol=0)
