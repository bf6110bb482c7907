"""Share a trained EBM: a pretrained directory, the Hugging Face Hub, and the ``export`` command.

A pretrained directory holds the whole generator, so that someone else draws the same samples:

    config.json         the module's class and every constructor argument as plain configs
                        (energy, sampler with its settings, latent, objective, ...), no pickle
    model.safetensors   the weights (and, if asked, the replay buffer's chains)
    README.md           a model card: config, last logged metrics, a sample picture, how to sample
    samples.png         that picture

Loading imports only classes of ``lightning_ebm``, ``torch.nn`` and ``torch.optim`` and what the
caller lists in ``allow_classes``; any other class path in ``config.json`` is refused by name.
``huggingface_hub`` and ``safetensors`` are the optional extra ``lightning_ebm[hub]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import _config
from ._config import ComponentConfigError
from .console import ConfigError

if TYPE_CHECKING:
    from .module import EBM

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "export_main", "from_pretrained", "push_to_hub", "save_pretrained"]

CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, PICTURE_NAME = "config.json", "model.safetensors", "README.md", "samples.png"
FORMAT = "lightning_ebm.pretrained"
FORMAT_VERSION = 1
_EXTRA = "pip install 'lightning_ebm[hub]' (huggingface_hub and safetensors)"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(f"lightning_ebm's pretrained format needs safetensors: {_EXTRA}") from None
    return safetensors.torch


def _hf() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(f"sharing through the Hugging Face Hub needs huggingface_hub: {_EXTRA}") from None
    return huggingface_hub


# ------------------------------------------------------------------------------------------ save
def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return value  # json writes NaN/Infinity and reads them back
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    raise ComponentConfigError(f"save_pretrained: {where} is {type(value).__name__} {value!r}, which config.json "
                               "cannot hold: use numbers, strings, lists or components")


def model_config(model: EBM) -> dict[str, Any]:
    """``config.json``'s content for ``model``: its class and its hyper-parameters as plain data."""
    import lightning_ebm

    hparams = dict(model.hparams)
    model_class = hparams.pop("_class_path", None) or _config.class_path(type(model))
    hparams.pop("_instantiator", None)  # a CLI-trained model: its hparams are configs already
    plain, problems = _config.hparams_to_config(hparams)
    blocking = [p for p in problems if "__main__" not in p]
    if blocking:
        raise ComponentConfigError("save_pretrained: the model cannot be described by its config: "
                                   + "; ".join(blocking))
    for problem in problems:
        warnings.warn(f"save_pretrained: {problem}; loading needs allow_classes and that class", stacklevel=3)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = str(param.dtype if param is not None else model.dtype).removeprefix("torch.")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": lightning_ebm.__version__,
            "torch_version": torch.__version__, "model_class": model_class, "dtype": dtype,
            "sample_shape": list(model.latent.shape), "hparams": _jsonable(plain, "hparams")}


def _weights(model: EBM, include_replay_buffer: bool) -> dict[str, torch.Tensor]:
    """The state dict as flat tensors; a module's extra state (a replay buffer's chains) by key."""
    from .latents import ReplayBuffer

    buffers = {f"{name}._extra_state" for name, m in model.named_modules() if isinstance(m, ReplayBuffer)}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key.endswith("._extra_state"):
            if key in buffers and not include_replay_buffer:
                continue
            if not isinstance(value, dict) or not all(v is None or torch.is_tensor(v) for v in value.values()):
                raise ComponentConfigError(f"save_pretrained: the extra state {key} is not a mapping of tensors")
            out.update({f"{key}.{k}": v for k, v in value.items() if v is not None})
        elif torch.is_tensor(value):
            out[key] = value
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def _last_metrics(metrics_csv: Path) -> dict[str, tuple[int | None, float]]:
    """The last logged value of every column of a CSVLogger's metrics.csv, with its step."""
    last: dict[str, tuple[int | None, float]] = {}
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    last[key] = (int(float(step)) if step else None, float(value))
                except ValueError:
                    continue
    return last


def _picture_size(model: EBM) -> int | None:
    """How many samples the card's picture shows: 1000 points in 2-D, 64 images, else none."""
    shape = tuple(model.latent.shape)
    return 1000 if shape == (2,) else 64 if len(shape) == 3 else None


def _save_picture(model: EBM, path: Path, n: int) -> None:
    """A scatter of ``n`` 2-D samples or a grid of ``n`` images, drawn from seed 0."""
    shape = tuple(model.latent.shape)
    x = model.generate(n, generator=torch.Generator(model.device).manual_seed(0)).cpu()
    if shape == (2,):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4, 4), dpi=100)
        ax = fig.subplots()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_title(f"{x.shape[0]} generated samples")
        fig.savefig(path)
        return
    from torchvision.utils import make_grid, save_image

    grid = make_grid(x.float(), nrow=8, normalize=True, value_range=(-1, 1))
    scale = max(1, math.ceil(256 / grid.shape[-1]))  # small images become a readable picture
    save_image(grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2), path)


def _card(config: dict[str, Any], metrics: dict[str, tuple[int | None, float]], picture: int | None,
          source: str) -> str:
    hp = config["hparams"]
    energy = hp.get("energy")
    title = energy["class_path"].rsplit(".", 1)[-1] if _config.is_config(energy) else "EBM"
    lines = [
        "---", "library_name: lightning_ebm", "tags:", "- energy-based-model", "- lightning_ebm", "---", "",
        f"# lightning_ebm: {title} energy with its generator", "",
        "An energy-based model trained with lightning_ebm (`pip install 'lightning-ebm[hub]'`), shipped with "
        "the whole generator (energy, sampler and its settings, latent), so that the same `z` gives the same "
        "samples.", "",
    ]
    if picture:
        lines += ["## Samples", "", f"![generated samples]({PICTURE_NAME})", "",
                  f"`model.generate({picture}, generator=torch.Generator().manual_seed(0))`: the samples "
                  f"`lightning-ebm sample --pretrained {source} --num_samples {picture} --seed 0` draws.", ""]
    lines += ["## Sample from it", "", "```bash", f"lightning-ebm sample --pretrained {source} --num_samples 1000 "
              "--output samples.png", "```", "", "```python", "import torch", "from lightning_ebm import EBM", "",
              f"model = EBM.from_pretrained({source!r})",
              "x = model.generate(1000, generator=torch.Generator().manual_seed(0))", "```", ""]
    if metrics:
        lines += ["## Last logged metrics", "", "| metric | value | step |", "|---|---|---|"]
        lines += [f"| {k} | {v:.6g} | {'' if s is None else s} |" for k, (s, v) in sorted(metrics.items())
                  if not k.startswith("train/") or k == "train/loss"]  # not throughput, step counts, ...
        lines += [""]
    lines += ["## Config", "", "```json", json.dumps(hp, indent=2), "```", "",
              f"lightning_ebm {config['library_version']}, torch {config['torch_version']}, "
              f"format {FORMAT} v{FORMAT_VERSION}.", ""]
    return "\n".join(lines)


def save_pretrained(model: EBM, path: str | Path, *, include_replay_buffer: bool = False,
                    metrics_csv: str | Path | None = None, sample_picture: bool = True,
                    sample_source: str | None = None) -> Path:
    """Write ``model`` as a pretrained directory (see the module docstring); returns the directory.

    Args:
        include_replay_buffer: also store a replay buffer's chains (to continue persistent chains).
        metrics_csv: a CSVLogger ``metrics.csv`` whose last values go into the model card.
        sample_picture: draw samples from a fixed seed into ``samples.png`` for the card.
        sample_source: what the card's commands load (default: the directory's path).
    """
    from .module import EBM

    if not isinstance(model, EBM):
        raise ComponentConfigError(f"save_pretrained: model must be an EBM, got {type(model).__name__}")
    config = model_config(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _safetensors().save_file(_weights(model, include_replay_buffer), str(out / WEIGHTS_NAME),
                             metadata={"format": FORMAT})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    metrics = _last_metrics(Path(metrics_csv)) if metrics_csv is not None else {}
    was_training = model.training
    model.eval()
    picture = _picture_size(model) if sample_picture else None
    if picture:
        _save_picture(model, out / PICTURE_NAME, picture)
    model.train(was_training)
    (out / CARD_NAME).write_text(_card(config, metrics, picture, sample_source or str(out)))
    return out


# ------------------------------------------------------------------------------------------ load
def _resolve(path_or_repo_id: str | Path, revision: str | None, token: str | bool | None,
             cache_dir: str | Path | None, local_files_only: bool) -> Path:
    local = Path(path_or_repo_id)
    if local.is_dir():
        return local
    text = str(path_or_repo_id)
    if local.exists() or not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise ComponentConfigError(f"from_pretrained: {text!r} is neither a directory nor a Hugging Face Hub repo "
                                   "id (owner/name)")
    hf = _hf()
    try:
        folder = hf.snapshot_download(text, revision=revision, token=token, cache_dir=cache_dir,
                                      local_files_only=local_files_only, library_name="lightning_ebm")
    except Exception as err:  # noqa: BLE001 - network, auth, missing repo: one clear message
        raise ComponentConfigError(
            f"from_pretrained: could not fetch {text!r} from the Hugging Face Hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check the network, the repo id and your token, "
            f"or pass a local directory (there is no directory {text!r} either)") from None
    return Path(folder)


def from_pretrained(path_or_repo_id: str | Path, *, allow_classes: Sequence[str] | None = None,
                    map_location: str | torch.device = "cpu", revision: str | None = None,
                    token: str | bool | None = None, cache_dir: str | Path | None = None,
                    local_files_only: bool = False) -> EBM:
    """The model a pretrained directory (or a Hub repo holding one) describes, in eval mode.

    Only classes of ``lightning_ebm``, ``torch.nn`` and ``torch.optim`` are imported, and those
    listed in ``allow_classes`` (class paths or module prefixes, for your own energies).
    """
    from .module import EBM

    folder = _resolve(path_or_repo_id, revision, token, cache_dir, local_files_only)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise ComponentConfigError(f"from_pretrained: {folder} has no {name}; it is not a pretrained directory "
                                       "written by save_pretrained or `lightning-ebm export`")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ComponentConfigError(f"from_pretrained: {folder / CONFIG_NAME} is not a {FORMAT} config")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ComponentConfigError(f"from_pretrained: {folder} has format version {config['format_version']}; this "
                                   f"lightning_ebm reads up to {FORMAT_VERSION}: upgrade lightning_ebm")
    allowed = list(allow_classes or [])
    with _config.allowing(allowed, imported=False):
        cls = _config.import_class(str(config.get("model_class")), "model_class")
        if not (isinstance(cls, type) and issubclass(cls, EBM)):
            raise ComponentConfigError(f"from_pretrained: model_class {config.get('model_class')!r} is not an EBM")
        hparams = config.get("hparams")
        if not isinstance(hparams, dict):
            raise ComponentConfigError(f"from_pretrained: {folder / CONFIG_NAME} has no hparams mapping")
        model = cls(**hparams)
    dtype = getattr(torch, str(config.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ComponentConfigError(f"from_pretrained: dtype {config.get('dtype')!r} in {folder / CONFIG_NAME} is not "
                                   "a floating-point torch dtype")
    model = model.to(dtype)  # before the weights: a float64 model keeps every bit
    tensors = _safetensors().load_file(str(folder / WEIGHTS_NAME))
    state: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if key.endswith("._extra_state") and isinstance(value, dict):
            state[key] = {k: tensors.pop(f"{key}.{k}", None) for k in value}
        elif key in tensors:
            state[key] = tensors.pop(key)
    if tensors:
        raise ComponentConfigError(f"from_pretrained: {WEIGHTS_NAME} holds tensors the model does not have: "
                                   f"{sorted(tensors)[:5]}")
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def push_to_hub(model: EBM, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                commit_message: str = "Upload lightning_ebm model", include_replay_buffer: bool = False,
                metrics_csv: str | Path | None = None) -> Any:
    """``save_pretrained`` into a temporary directory and upload it to the Hub repo ``repo_id``.

    Creates the repo if needed; returns what ``HfApi.upload_folder`` returns (the commit).
    """
    hf = _hf()
    api = hf.HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, include_replay_buffer=include_replay_buffer, metrics_csv=metrics_csv,
                        sample_source=repo_id)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)


# ------------------------------------------------------------------------------------------- CLI
def _run_metrics(ckpt_path: Path) -> Path | None:
    """The run's metrics.csv next to a checkpoint in ``<run>/checkpoints/``, if there is one."""
    for run in (ckpt_path.parent.parent, ckpt_path.parent):
        if (run / "metrics.csv").is_file():
            return run / "metrics.csv"
    return None


def export_main(argv: list[str]) -> Path:
    """``lightning-ebm export``: a checkpoint to a pretrained directory (config.json + safetensors + card)."""
    parser = argparse.ArgumentParser(prog="lightning-ebm export",
                                     description="Write a trained EBM's checkpoint as a pretrained directory.")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `lightning-ebm fit`")
    parser.add_argument("--output", required=True, help="directory to write (config.json, model.safetensors, ...)")
    parser.add_argument("--include_replay_buffer", action="store_true", help="also store the replay buffer")
    parser.add_argument("--no_sample_picture", action="store_true", help="skip drawing samples for the card")
    parser.add_argument("--allow_classes", nargs="*", default=None,
                        help="class paths or module prefixes the checkpoint may import (your own energies)")
    args = parser.parse_args(argv)
    ckpt = Path(args.ckpt_path)
    if not ckpt.is_file():
        parser.error(f"--ckpt_path {args.ckpt_path!r} is not a file")
    from .module import EBM

    try:
        model = EBM.load_from_checkpoint(ckpt, map_location="cpu", allow_classes=args.allow_classes)
        out = save_pretrained(model, args.output, include_replay_buffer=args.include_replay_buffer,
                              metrics_csv=_run_metrics(ckpt), sample_picture=not args.no_sample_picture)
    except (ComponentConfigError, ImportError) as err:  # the console prints it in a few lines
        raise ConfigError(str(err)) from err
    print(f"wrote a pretrained model to {out}: lightning-ebm sample --pretrained {out} --output samples.png")
    return out


def load_for_cli(source: str, device: str, allow_classes: Sequence[str] | None = None) -> EBM:
    """``from_pretrained`` for ``lightning-ebm sample --pretrained``: errors as a ``ConfigError`` (no traceback)."""
    try:
        return from_pretrained(source, map_location=device, allow_classes=allow_classes)
    except (ComponentConfigError, ImportError) as err:
        raise ConfigError(str(err)) from err
