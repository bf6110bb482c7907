"""The ``lightning-ebm`` command: LightningCLI subcommands plus ``sample``.

    lightning-ebm fit --config configs/toy2d.yaml
    lightning-ebm fit --config configs/toy2d.yaml --print_config
    lightning-ebm sample --ckpt_path run/checkpoints/last.ckpt --num_samples 1000 --output samples.png
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

import lightning as L
import numpy as np
import torch
import fsspec
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from .callbacks import AtomicCheckpointIO
from .console import DEBUG_ENV, PROG, ConfigError, closest, simplify_parser_message
from .module import EBM

__all__ = ["EBMCLI", "main", "run", "sample_main"]

SAMPLE_FORMATS = (".pt", ".npz", ".png")


class SaveConfigToLoggers(SaveConfigCallback):
    """Save ``config.yaml`` in the run directory and put the resolved config in every W&B run
    (Lightning itself sends W&B only the module's hyper-parameters)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
                logger.experiment.config.update(config, allow_val_change=True)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class EBMArgumentParser(LightningArgumentParser):
    """Lightning's parser whose errors are raised as one short ``ConfigError`` (the console prints it),
    without the usage block and jsonargparse's Union-subtype noise; ``--debug`` keeps them whole."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if _debug() or not self.exit_on_error:
            super().error(message, ex)
        text = simplify_parser_message(message)
        unknown = re.match(r"unrecognized arguments: (--[^\s=]+)", text)
        if unknown:
            text += closest(unknown.group(1), [o for o in self._option_string_actions if o.startswith("--")])
        missing = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", text)
        if missing:
            module = sys.modules.get(missing.group(1))
            names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
            text += closest(missing.group(2), names)
        raise ConfigError(text) from ex


def _class_paths(config: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``(key, class_path)`` of every component in a parsed config, outermost first."""
    found: list[tuple[str, str]] = []
    items = vars(config).items() if isinstance(config, Namespace) else (
        config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ())
    for key, value in items:
        name = f"{prefix}.{key}" if prefix and not isinstance(key, int) else f"{prefix}[{key}]" if prefix else str(key)
        class_path = getattr(value, "class_path", None) if isinstance(value, Namespace) else (
            value.get("class_path") if isinstance(value, dict) else None)
        if isinstance(class_path, str):
            found.append((name, class_path))
        if isinstance(value, (Namespace, dict, list)):
            found.extend(_class_paths(value, name))
    return found


def _where(exc: BaseException, config: Any) -> str:
    """The config key of the component whose constructor raised ``exc`` ("" when it cannot be told)."""
    owners = []
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and tb.tb_frame.f_code.co_name == "__init__":
            owners.append(type(owner))
        tb = tb.tb_next
    paths = _class_paths(config)
    for cls in reversed(owners):  # the innermost constructor first
        names = {f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__}
        keys = [key for key, class_path in paths if class_path in names or class_path.rsplit(".", 1)[-1] in names]
        if keys:
            return keys[-1]
    return ""


def config_error(exc: BaseException, config: Any = None) -> ConfigError:
    """A one-message ``ConfigError`` for an exception raised while building the config's objects."""
    root = _root_cause(exc)
    text = str(root) if isinstance(root, (ValueError, TypeError)) else f"{type(root).__name__}: {root}"
    if isinstance(root, ValueError) and "Does not validate against any of the Union subtypes" in text:
        text = simplify_parser_message(text)
    where = _where(root, config) if config is not None else ""
    return ConfigError(f"{where}: {text}" if where else text)


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return exc


def check_config_files(argv: list[str]) -> None:
    """Every ``--config``/``-c`` file exists and is valid YAML; the error names the file, line and column."""
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            continue
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            yaml.safe_load(file.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"--config {path}{where}: YAML syntax error: {problem}") from None


#: ``ckpt_path`` values that Lightning resolves itself
_CKPT_KEYWORDS = ("last", "best", "hpc", "registry")


class EBMCLI(LightningCLI):
    """LightningCLI for ``EBM`` (or subclasses) and any LightningDataModule.

    ``Trainer(inference_mode=False)`` is the default: the samplers need input gradients during
    validate/test/predict, which ``torch.inference_mode`` would forbid. Checkpoints are written
    with ``AtomicCheckpointIO`` (crash-safe) unless the config names another checkpoint plugin.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs) -> None:
        trainer_defaults = {"inference_mode": False, **kwargs.pop("trainer_defaults", {})}
        kwargs.setdefault("save_config_callback", SaveConfigToLoggers)
        kwargs.setdefault("parser_class", EBMArgumentParser)
        super().__init__(
            EBM,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            trainer_defaults=trainer_defaults,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
            **kwargs,
        )

    def instantiate_classes(self) -> None:
        """Build the config's objects; a constructor's error becomes one ``ConfigError`` naming the key."""
        self._check_ckpt_path()
        if _debug():
            return super().instantiate_classes()
        try:
            super().instantiate_classes()
        except ConfigError:
            raise
        except Exception as err:
            raise config_error(err, self.config.get(str(self.subcommand), self.config)) from err

    def _check_ckpt_path(self) -> None:
        config = self.config.get(str(self.subcommand), None) if self.subcommand else None
        ckpt = config.get("ckpt_path") if config is not None else None
        if isinstance(ckpt, str) and ckpt not in _CKPT_KEYWORDS and not ckpt.startswith("registry:"):
            fs, local = fsspec.core.url_to_fs(ckpt)
            if not fs.exists(local):
                raise ConfigError(f"--ckpt_path {ckpt}: no such file (give a checkpoint written by "
                                  f"`{PROG} fit`, or one of {', '.join(_CKPT_KEYWORDS)})")

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        plugins = kwargs.get("plugins", trainer_config.get("plugins"))
        if not isinstance(plugins, (list, tuple)):
            plugins = [] if plugins is None else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # crash-safe unless the user chose a writer
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)


def sample_main(argv: list[str]) -> Path:
    """``lightning-ebm sample``: draw from a trained model's generator and write a file."""
    parser = argparse.ArgumentParser(
        prog="lightning-ebm sample", description="Draw samples from a trained EBM's generator."
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `lightning-ebm fit`")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--output", required=True, help=f"output file, one of {', '.join(SAMPLE_FORMATS)}")
    parser.add_argument("--batch_size", type=int, default=None, help="run the dynamics in chunks of this size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.suffix not in SAMPLE_FORMATS:
        parser.error(f"--output must end in one of {SAMPLE_FORMATS}, got {args.output!r}")
    if args.num_samples < 1:
        parser.error(f"--num_samples must be a positive integer, got {args.num_samples}")
    if not Path(args.ckpt_path).is_file():
        parser.error(f"--ckpt_path {args.ckpt_path!r} is not a file")
    model = EBM.load_from_checkpoint(args.ckpt_path, map_location=args.device)
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    x = model.generate(args.num_samples, generator=generator, batch_size=args.batch_size).cpu()
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".pt":
        torch.save(x, output)
    elif output.suffix == ".npz":
        np.savez(output, samples=x.numpy())
    else:
        _save_png(x, output)
    print(f"wrote {tuple(x.shape)} samples to {output}")
    return output


def _save_png(x: torch.Tensor, output: Path) -> None:
    from matplotlib.figure import Figure

    if x.ndim == 2 and x.shape[1] == 2:
        fig = Figure(figsize=(5, 5), dpi=100)
        ax = fig.subplots()
        ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_title(f"{x.shape[0]} generated samples")
        fig.savefig(output)
    elif x.ndim == 4:  # images (B, C, H, W) in [-1, 1]
        from torchvision.utils import save_image

        save_image(x, output, nrow=int(np.ceil(np.sqrt(x.shape[0]))), normalize=True, value_range=(-1, 1))
    else:
        raise ValueError(f"a .png needs 2-D points (N, 2) or images (N, C, H, W); got samples of shape "
                         f"{tuple(x.shape)}: use .pt or .npz")


def run(argv: list[str]) -> None:
    """Run one subcommand (``argv`` without the program name); mistakes raise ``ConfigError``."""
    if argv and argv[0] == "sample":
        sample_main(argv[1:])
        return
    check_config_files(argv)
    try:
        _run_cli(argv)
    except ConfigError as err:
        raise ConfigError(_with_source(str(err), argv)) from err.__cause__


def _with_source(message: str, argv: list[str]) -> str:
    """``message`` with where its config key was set: the command line or the ``--config`` file(s)."""
    key = message.split(":", 1)[0]
    if not re.fullmatch(r"[\w.\[\]]+", key) or key.startswith("-"):
        return message
    if any(a.startswith(f"--{key}") or key.startswith(a[2:].split("=", 1)[0] + ".")
           for a in argv if a.startswith("--") and not a.startswith("--config")):
        return f"{message}\n  (set on the command line)"
    files = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    return f"{message}\n  (in {', '.join(files)})" if files else message


def _run_cli(argv: list[str]) -> None:
    # the command line itself goes in as args=None: LightningCLI warns when given both
    EBMCLI(args=None if argv == sys.argv[1:] else argv)


def main(args: ArgsType = None) -> None:
    """Run ``lightning-ebm`` from Python (``args`` as on the command line; default ``sys.argv[1:]``).

    Errors are raised as exceptions; the console script (:mod:`lightning_ebm.console`) prints them
    in a few lines instead.
    """
    run(list(sys.argv[1:] if args is None else args))


if __name__ == "__main__":
    from .console import main as console_main

    console_main()
