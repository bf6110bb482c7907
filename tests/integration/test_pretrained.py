"""Sharing a trained EBM: export a checkpoint, load it in a fresh process, push it to a (local
stand-in of the) Hub; loading never runs a class the config names unless allowed."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors", reason="the hub extra: pip install 'lightning_ebm[hub]'")
hf = pytest.importorskip("huggingface_hub", reason="the hub extra: pip install 'lightning_ebm[hub]'")

from lightning_ebm import EBM  # noqa: E402
from lightning_ebm._config import ComponentConfigError  # noqa: E402
from lightning_ebm.cli import main  # noqa: E402
from lightning_ebm.latents import Gaussian  # noqa: E402
from lightning_ebm.samplers import GradientDescent  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "HF_HUB_OFFLINE": "1"}  # the fresh processes have no network: a directory must load offline


def _python(code: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=ENV)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """The default recipe trained briefly by the CLI, then `lightning-ebm export`ed."""
    root = tmp_path_factory.mktemp("pretrained")
    main(["fit", "--config", str(ROOT / "configs" / "toy2d.yaml"), "--trainer.max_steps=4",
          "--trainer.val_check_interval=4", "--trainer.enable_progress_bar=false",
          f"--trainer.logger.init_args.save_dir={root}", "--data.init_args.batches_per_epoch=4",
          "--data.init_args.num_val=64", "--model.init_args.sampler.init_args.steps=5"])
    ckpt = root / "toy2d" / "version_0" / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt_path", str(ckpt), "--output", str(root / "model")])
    return ckpt, root / "model"


def test_export_writes_config_safetensors_and_a_model_card(exported):
    import safetensors.torch

    import lightning_ebm

    ckpt, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["model_class"] == "lightning_ebm.module.EBM"
    assert config["library_version"] == lightning_ebm.__version__
    assert config["hparams"]["sampler"] == {"class_path": "lightning_ebm.samplers.descent.GradientDescent",
                                            "init_args": {"steps": 5, "step_size": 0.05, "grad_clip": None,
                                                          "clamp": None, "compile": False, "cuda_graph": False}}
    assert config["hparams"]["optimizer"]["class_path"] == "torch.optim.adam.Adam"
    assert config["hparams"]["optimizer"]["init_args"]["betas"] == [0.5, 0.999]
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))  # no pickle anywhere
    model = EBM.load_from_checkpoint(ckpt)
    assert weights.keys() == {k for k, v in model.state_dict().items() if torch.is_tensor(v)}
    card = (folder / "README.md").read_text()
    assert f"lightning-ebm sample --pretrained {folder}" in card and lightning_ebm.__version__ in card
    assert '"steps": 5' in card and "![generated samples](samples.png)" in card
    assert "| val/mmd |" in card and "| val/mmd_floor |" in card  # from the run's metrics.csv
    assert (folder / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_fresh_process_loads_the_directory_and_generates_the_same_samples_bit_for_bit(exported, tmp_path):
    ckpt, folder = exported
    model = EBM.load_from_checkpoint(ckpt)
    z = torch.rand(256, 2) * 8 - 4
    torch.save(z, tmp_path / "z.pt")
    out = _python(f"""
        import sys, torch
        from lightning_ebm import EBM
        model = EBM.from_pretrained({str(folder)!r})
        assert "huggingface_hub" not in sys.modules  # a directory needs no hub, no network
        torch.save(model.generate(256, z=torch.load({str(tmp_path / 'z.pt')!r})), {str(tmp_path / 'x.pt')!r})
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "x.pt"), model.generate(256, z=z))
    # and the CLI: --pretrained samples what --ckpt_path samples
    main(["sample", "--pretrained", str(folder), "--num_samples", "50", "--output", str(tmp_path / "a.pt")])
    main(["sample", "--ckpt_path", str(ckpt), "--num_samples", "50", "--output", str(tmp_path / "b.pt")])
    assert torch.equal(torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt"))


USER_MODULE = '''
from pathlib import Path
from torch import nn

MARKER = Path(__file__).with_name("constructed.txt")


class RingEnergy(nn.Module):
    def __init__(self, dim=2, width=12):
        super().__init__()
        self.dim, self.width = dim, width
        self.net = nn.Sequential(nn.Linear(dim, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1) + 0.1 * x.pow(2).sum(1)


class Tracker(RingEnergy):
    """Stands for an arbitrary class a tampered config names: constructing it leaves a mark."""

    def __init__(self, dim=2, width=12):
        MARKER.write_text("constructed")
        super().__init__(dim, width)
'''


@pytest.fixture()
def user_module(tmp_path):
    folder = tmp_path / "usermod"
    folder.mkdir()
    (folder / "ring_energies_hub.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))
    import ring_energies_hub

    yield ring_energies_hub, folder
    sys.path.remove(str(folder))
    sys.modules.pop("ring_energies_hub", None)


def _small(energy) -> EBM:
    return EBM(energy=energy, sampler=GradientDescent(steps=4, step_size=0.05), latent=Gaussian((2,)))


def test_a_user_energy_from_an_importable_module_round_trips_when_allowed(user_module, tmp_path):
    mod, folder = user_module
    model = _small(mod.RingEnergy(width=7))
    model.save_pretrained(tmp_path / "ring", sample_picture=False)
    z = torch.randn(32, 2)
    torch.save(z, tmp_path / "z.pt")
    out = _python(f"""
        import sys, torch
        sys.path.insert(0, {str(folder)!r})
        from lightning_ebm import EBM
        try:
            EBM.from_pretrained({str(tmp_path / 'ring')!r})
        except ValueError as err:
            print("REFUSED", err)
        model = EBM.from_pretrained({str(tmp_path / 'ring')!r}, allow_classes=["ring_energies_hub.RingEnergy"])
        print("WIDTH", model.energy.width)
        torch.save(model.generate(32, z=torch.load({str(tmp_path / 'z.pt')!r})), {str(tmp_path / 'x.pt')!r})
    """)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REFUSED energy: the config names the class 'ring_energies_hub.RingEnergy'" in out.stdout
    assert "allow_classes=['ring_energies_hub.RingEnergy']" in out.stdout and "WIDTH 7" in out.stdout
    assert torch.equal(torch.load(tmp_path / "x.pt"), model.generate(32, z=z))


MAIN_SCRIPT = '''
import sys
from torch import nn
from lightning_ebm import EBM
from lightning_ebm.latents import Gaussian
from lightning_ebm.samplers import GradientDescent


class MyEnergy(nn.Module):
    def __init__(self, dim=2):
        super().__init__()
        self.dim = dim
        self.lin = nn.Linear(dim, 1)

    def forward(self, x):
        return self.lin(x).squeeze(-1) + x.pow(2).sum(1)


EBM(energy=MyEnergy(), sampler=GradientDescent(steps=2, step_size=0.05),
    latent=Gaussian((2,))).save_pretrained(sys.argv[1], sample_picture=False)
EBM.from_pretrained(sys.argv[1], allow_classes=["__main__.MyEnergy"])  # the script that defines it may
print("SAVED")
'''


def test_an_energy_of_main_gives_a_clear_error_naming_the_class(tmp_path):
    (tmp_path / "train.py").write_text(MAIN_SCRIPT)
    saved = subprocess.run([sys.executable, str(tmp_path / "train.py"), str(tmp_path / "main_model")],
                           capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert saved.returncode == 0 and "SAVED" in saved.stdout, saved.stderr[-3000:]
    assert "MyEnergy is defined in the running script (__main__)" in saved.stderr  # warned at save
    out = _python(f"""
        from lightning_ebm import EBM
        EBM.from_pretrained({str(tmp_path / 'main_model')!r})
    """)
    assert out.returncode != 0
    assert ("ComponentConfigError: energy: the class MyEnergy was defined in the training script (__main__), "
            "which this process cannot import; move MyEnergy into an importable module") in out.stderr
    cli = subprocess.run([sys.executable, "-m", "lightning_ebm.cli", "sample", "--pretrained",
                          str(tmp_path / "main_model"), "--output", str(tmp_path / "x.pt")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV)
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 2, cli.stderr  # the message, the tip
    assert cli.stderr.startswith("lightning-ebm sample: error: energy: the class MyEnergy was defined")


def test_a_tampered_config_is_refused_unless_its_class_is_allowed(user_module, tmp_path):
    mod, _ = user_module
    folder = _small(mod.RingEnergy()).save_pretrained(tmp_path / "m", sample_picture=False)
    sys.modules.pop("ring_energies_hub")  # a fresh process would not have imported it
    original = json.loads((folder / "config.json").read_text())
    config = json.loads(json.dumps(original))
    config["hparams"]["energy"]["class_path"] = "ring_energies_hub.Tracker"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ComponentConfigError, match=r"energy: the config names the class 'ring_energies_hub.Tracker'"
                                                   r", which is not allowed"):
        EBM.from_pretrained(folder)
    assert not mod.MARKER.exists() and "ring_energies_hub" not in sys.modules  # neither imported nor run
    for field, value in (("model_class", "subprocess.Popen"), ("hparams.optimizer", "os.system")):
        bad = json.loads(json.dumps(original))
        if field == "model_class":
            bad["model_class"] = value
        else:
            bad["hparams"]["optimizer"] = {"class_path": value, "init_args": {"command": "true"}}
        (folder / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ComponentConfigError, match=f"names the class '{value}', which is not allowed"):
            EBM.from_pretrained(folder, allow_classes=["ring_energies_hub"])
    (folder / "config.json").write_text(json.dumps(config))
    model = EBM.from_pretrained(folder, allow_classes=["ring_energies_hub.Tracker"])  # allowed: it runs
    assert type(model.energy).__name__ == "Tracker" and mod.MARKER.read_text() == "constructed"


class LocalHub:
    """A stand-in for the Hub: ``HfApi`` and ``snapshot_download`` over a local folder.

    Every call is bound against the real huggingface_hub signatures, so a call the real client
    would reject fails here too.
    """

    def __init__(self, root: Path) -> None:
        self.root, self.calls = root, []
        hub = self
        real_api, self.real_snapshot_download = hf.HfApi, hf.snapshot_download  # taken before any patching

        class Api:
            def __init__(self, token=None, **kwargs):
                inspect.signature(real_api).bind(token=token, **kwargs)

            def create_repo(self, repo_id, **kwargs):
                inspect.signature(real_api.create_repo).bind(self, repo_id, **kwargs)
                hub.calls.append(("create_repo", repo_id, kwargs))
                (hub.root / repo_id).mkdir(parents=True, exist_ok=kwargs.get("exist_ok", False))

            def upload_folder(self, **kwargs):
                inspect.signature(real_api.upload_folder).bind(self, **kwargs)
                hub.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
                shutil.copytree(kwargs["folder_path"], hub.root / kwargs["repo_id"], dirs_exist_ok=True)
                return "commit-1"

        self.Api = Api

    def snapshot_download(self, repo_id, **kwargs):
        inspect.signature(self.real_snapshot_download).bind(repo_id, **kwargs)
        if not (self.root / repo_id).is_dir():
            import httpx
            from huggingface_hub.errors import RepositoryNotFoundError

            url = f"https://huggingface.co/api/models/{repo_id}"
            raise RepositoryNotFoundError(f"404: {repo_id}", response=httpx.Response(404, request=httpx.Request(
                "GET", url)))
        return str(self.root / repo_id)


def test_push_to_hub_then_from_pretrained_by_repo_id(exported, tmp_path, monkeypatch):
    ckpt, _ = exported
    hub = LocalHub(tmp_path / "hub")
    monkeypatch.setattr(hf, "HfApi", hub.Api)
    monkeypatch.setattr(hf, "snapshot_download", hub.snapshot_download)
    model = EBM.load_from_checkpoint(ckpt)
    assert model.push_to_hub("me/toy2d", private=True) == "commit-1"
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"] and hub.calls[0][2]["private"] is True
    pushed = tmp_path / "hub" / "me" / "toy2d"
    assert {p.name for p in pushed.iterdir()} == {"config.json", "model.safetensors", "README.md", "samples.png"}
    assert "lightning-ebm sample --pretrained me/toy2d" in (pushed / "README.md").read_text()
    z = torch.rand(64, 2) * 8 - 4
    assert torch.equal(EBM.from_pretrained("me/toy2d").generate(64, z=z), model.generate(64, z=z))
    with pytest.raises(ComponentConfigError, match=r"could not fetch 'me/other' from the Hugging Face Hub "
                                                   r"\(RepositoryNotFoundError: 404: me/other\)"):
        EBM.from_pretrained("me/other")


def test_missing_extra_or_network_gives_a_clear_message(tmp_path, monkeypatch):
    # no network (the real client, offline): one line saying what failed and what to do
    with pytest.raises(ComponentConfigError, match=r"could not fetch 'nobody/nothing' from the Hugging Face Hub "
                                                   r"\(.*\); check the network, the repo id and your token"):
        EBM.from_pretrained("nobody/nothing", local_files_only=True, cache_dir=tmp_path)
    with pytest.raises(ComponentConfigError, match=r"'missing/dir/x' is neither a directory nor a Hugging Face"):
        EBM.from_pretrained("missing/dir/x")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # the extra not installed
    with pytest.raises(ImportError, match=r"pip install 'lightning_ebm\[hub\]'"):
        EBM.from_pretrained("nobody/nothing")
    with pytest.raises(ImportError, match=r"pip install 'lightning_ebm\[hub\]'"):
        _small(torch.nn.Linear(2, 1)).push_to_hub("me/x")


def test_the_drop_in_example_loads_a_pretrained_directory(exported):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import drop_in
    finally:
        sys.path.remove(str(ROOT / "examples"))
    ckpt, folder = exported
    model, x = drop_in.load_pretrained(str(folder), n=300)
    expected = EBM.load_from_checkpoint(ckpt).generate(300, generator=torch.Generator().manual_seed(0))
    assert model.sampler.steps == 5 and torch.equal(x, expected)


def test_a_float64_model_keeps_every_bit(tmp_path):
    from lightning_ebm.energies import MLPEnergy

    model = _small(MLPEnergy(dim=2, hidden=8)).double()
    loaded = EBM.from_pretrained(model.save_pretrained(tmp_path / "f64", sample_picture=False))
    z = torch.randn(16, 2, dtype=torch.float64)
    assert loaded.dtype == torch.float64 and torch.equal(loaded.generate(16, z=z), model.generate(16, z=z))


def test_an_image_model_round_trips_with_a_readable_sample_grid(tmp_path):
    from PIL import Image

    from lightning_ebm.energies import ConvEnergy
    from lightning_ebm.latents import ReplayBuffer, Uniform

    model = EBM(energy=ConvEnergy(in_channels=1, width=8, image_size=16, spectral_norm=True),
                sampler=GradientDescent(steps=2, step_size=0.1),
                latent=ReplayBuffer(Uniform((1, 16, 16)), capacity=32))
    model.latent.draw(8, generator=torch.Generator().manual_seed(0))  # fill the chains
    folder = model.save_pretrained(tmp_path / "img", include_replay_buffer=True)
    assert min(Image.open(folder / "samples.png").size) >= 256  # 8 x 8 grid of 16 px images, enlarged
    loaded = EBM.from_pretrained(folder)
    assert torch.equal(loaded.latent.buffer, model.latent.buffer)
    z = torch.rand(4, 1, 16, 16) * 2 - 1
    assert torch.equal(loaded.generate(4, z=z), model.eval().generate(4, z=z))
