"""The ``lightning-ebm`` command: LightningCLI subcommands plus ``sample``.

    lightning-ebm fit --config configs/toy2d.yaml
    lightning-ebm fit --config configs/toy2d.yaml --print_config
    lightning-ebm sample --ckpt_path run/checkpoints/last.ckpt --num_samples 1000 --output samples.png
    lightning-ebm export --ckpt_path run/checkpoints/last.ckpt --output my-model
    lightning-ebm sample --pretrained my-model --output samples.png
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import fsspec
import lightning as L
import numpy as np
import torch
import yaml
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from . import _quiet_known_noise, _resume
from ._config import ComponentConfigError
from .callbacks import AtomicCheckpointIO, PreemptionCheckpoint
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


#: packages whose classes the help counts instead of listing (they are not energies, samplers or latents)
_LIBRARIES = frozenset({"lightning_ebm", "torch", "torchvision", "torchmetrics", "torchdiffeq", "torch_fidelity",
                        "lightning", "pytorch_lightning", "lightning_fabric", "wandb", "tensorboardX"})


class EBMHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help with "known subclasses" lists led by this library's classes and the user's,
    and the dozens of torch classes (every ``nn.Module`` torch defines) cut to a count."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if not text or "known subclasses: " not in text:
            return text
        head, tail = text.split("known subclasses: ", 1)
        listed, close = (tail[:-1], ")") if tail.endswith(")") else (tail, "")
        paths = [p.strip() for p in listed.split(",") if p.strip()]
        ours = [p for p in paths if p.startswith("lightning_ebm.")]
        users = [p for p in paths if p.split(".", 1)[0] not in _LIBRARIES]
        others = len(paths) - len(ours) - len(users)
        shown = ours + users
        more = f"and {others} from torch and other libraries" if others else ""
        return head + "known subclasses: " + ", ".join([*shown, more] if more else shown) + close


class EBMArgumentParser(LightningArgumentParser):
    """Lightning's parser whose errors are raised as one short ``ConfigError`` (the console prints it),
    without the usage block and jsonargparse's Union-subtype noise; ``--debug`` keeps them whole."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", EBMHelpFormatter)
        super().__init__(*args, **kwargs)

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


#: ``ckpt_path`` values that Lightning resolves itself (``best`` only within the process that ran fit)
_CKPT_KEYWORDS = ("last", "hpc", "registry")


class EBMCLI(LightningCLI):
    """LightningCLI for ``EBM`` (or subclasses) and any LightningDataModule.

    ``Trainer(inference_mode=False)`` is the default: the samplers need input gradients during
    validate/test/predict, which ``torch.inference_mode`` would forbid. Checkpoints are written
    with ``AtomicCheckpointIO`` (crash-safe) unless the config names another checkpoint plugin.
    ``fit`` adds a ``PreemptionCheckpoint`` unless the config has one (SIGTERM, Ctrl-C, SIGUSR1:
    a checkpoint of the step reached, then exit), and ``fit --ckpt_path last`` (or a checkpoint
    file of a run) continues that run's directory; see ``lightning_ebm._resume``. ``predict``
    writes the predictions (``EBM.predict_step``: energies, and logits for a classifier energy)
    to ``predictions.pt`` in the run directory unless the config has a ``BasePredictionWriter``.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs) -> None:
        self._argv = list(sys.argv[1:] if args is None else args) if isinstance(args, (list, type(None))) else None
        self._resume_plan: _resume.ResumePlan | None = None
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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--num_threads", type=int | None, default=None,
            help="torch's intra-op CPU threads (torch.set_num_threads); null: torch's default, one per core. "
                 "Small models (the 2-D recipes) run fastest with 1 on a CPU that other jobs share.")

    def instantiate_classes(self) -> None:
        """Build the config's objects; a constructor's error becomes one ``ConfigError`` naming the key."""
        self._check_ckpt_path()
        self._set_threads()
        if _debug():
            return super().instantiate_classes()
        try:
            super().instantiate_classes()
        except ConfigError:
            raise
        except Exception as err:
            raise config_error(err, self.config.get(str(self.subcommand), self.config)) from err

    def _set_threads(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        threads = config.get("num_threads")
        if threads is not None:
            if isinstance(threads, bool) or threads < 1:
                raise ConfigError(f"--num_threads must be a positive integer or null, got {threads!r}")
            torch.set_num_threads(threads)

    def after_fit(self) -> None:
        """Validate at the last step if the schedule did not, then print where the run's results are."""
        trainer = self.trainer
        if trainer.interrupted:
            return
        if _wants_final_validation(trainer, self._last_validation.step):
            trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
        if trainer.is_global_zero:
            print(run_summary(trainer), flush=True)

    def after_predict(self) -> None:
        """Say where ``PredictionsFile`` wrote the predictions (after the progress bar has closed)."""
        for callback in self.trainer.callbacks:
            if isinstance(callback, PredictionsFile) and callback.path is not None:
                print(f"{PROG} predict: wrote {callback.summary} to {callback.path}", flush=True)

    def _check_ckpt_path(self) -> None:
        """A ``--ckpt_path`` file exists; ``best`` is refused (a new process has no best yet) and, outside
        ``fit`` (which resolves it itself), ``last`` becomes the newest checkpoint of the config's runs."""
        config = self.config.get(str(self.subcommand), None) if self.subcommand else None
        ckpt = config.get("ckpt_path") if config is not None else None
        if ckpt == "best":
            raise ConfigError("--ckpt_path best: Lightning knows the best checkpoint only in the process that "
                              "ran fit; give the checkpoint file (or last)")
        if ckpt == "last" and self.subcommand != "fit":
            # Lightning's own "last" looks in this new run's (empty) folder and then runs the untrained model
            newest = _resume.last_checkpoint(config.get("trainer"))
            if newest is None:
                root = _resume.runs_root(config.get("trainer"))
                where = f"{root}/*/" if root is not None else "the checkpoint folders"
                raise ConfigError(f"--ckpt_path last: no checkpoint under {where}; give a checkpoint file")
            config["ckpt_path"] = ckpt = str(newest)
        if ckpt is not None and self.subcommand != "fit":  # an evaluation writes no checkpoints: nothing to act on
            warnings.filterwarnings("ignore", message=r"The dirpath has changed from", category=UserWarning)
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
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":
            preemption = [c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)]
            if not preemption:
                preemption = [PreemptionCheckpoint()]
                trainer.callbacks.append(preemption[0])
            for callback in preemption:
                callback.resume_command = callback.resume_command or _resume_command(self._argv)
        if self.subcommand == "predict" and not any(isinstance(c, BasePredictionWriter) for c in trainer.callbacks):
            trainer.callbacks.append(PredictionsFile())
        self._last_validation = _LastValidation()
        trainer.callbacks.append(self._last_validation)
        return trainer

    def before_instantiate_classes(self) -> None:
        """``fit --ckpt_path``: resolve ``last``, and log into the run directory the checkpoint is from."""
        if self.subcommand == "fit":
            self._resume_plan = _resume.plan_resume(self.config["fit"])

    def before_fit(self) -> None:
        """On resume: warn about changed model/data settings; keep the run's metrics.csv rows."""
        plan = self._resume_plan
        if plan is None:
            return
        _resume.warn_if_config_differs(plan, self.model, self.datamodule)
        where = f" in {plan.run_dir}" if plan.run_dir is not None else ""
        rank_zero_info(f"{PROG} fit: resuming {plan.ckpt_path} (global step {plan.global_step}){where}")
        if plan.run_dir is not None:
            for logger in self.trainer.loggers:
                if Path(logger.log_dir or "").resolve() == plan.run_dir.resolve():
                    _resume.continue_csv_metrics(logger, plan.global_step)


class PredictionsFile(BasePredictionWriter):
    """Writes a predict run's outputs to ``<run directory>/predictions.pt``: each key of the
    per-batch dicts concatenated over the batches, in the dataloader's order (under DDP each rank
    writes ``predictions_rank<r>.pt`` with the ``indices`` of its samples)."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")
        self.path: Path | None = None
        self.summary = ""

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any,
                           batch_indices: Any) -> None:
        from .callbacks.logging import run_dir

        if predictions and isinstance(predictions[0], list):  # several predict dataloaders: one after another
            predictions = [p for loader in predictions for p in loader]
            batch_indices = [b for loader in batch_indices for b in loader]
        out: dict[str, Any] = {}
        if predictions and isinstance(predictions[0], dict):
            out = {key: torch.cat([p[key].detach().cpu() for p in predictions]) for key in predictions[0]}
        elif predictions:
            out = {"predictions": torch.cat([torch.as_tensor(p).detach().cpu() for p in predictions])}
        name = "predictions.pt"
        if trainer.world_size > 1:
            out["indices"] = torch.as_tensor([i for batch in batch_indices for i in batch])
            name = f"predictions_rank{trainer.global_rank}.pt"
        self.path = run_dir(trainer) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, self.path)
        self.summary = ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items())


def _resume_command(argv: list[str] | None) -> str | None:
    """The ``lightning-ebm`` command line of this run with ``--ckpt_path {ckpt_path}`` in place."""
    if not argv or any(not isinstance(a, str) for a in argv):
        return None
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return f"{PROG} {shlex.join(kept)} --ckpt_path {{ckpt_path}}"


class _LastValidation(L.Callback):
    """Remembers the global step of the last validation run during fitting (not the sanity check)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.step = trainer.global_step


def _wants_final_validation(trainer: L.Trainer, last_step: int | None) -> bool:
    """Whether the run has validation data that was not evaluated at its final step."""
    if trainer.limit_val_batches == 0 or trainer.global_step == 0:
        return False
    has_val = trainer.datamodule is not None and _overrides(trainer.datamodule, "val_dataloader")
    if not has_val:
        return False
    return last_step != trainer.global_step


def _overrides(obj: Any, method: str) -> bool:
    return getattr(type(obj), method, None) is not getattr(L.LightningDataModule, method, None)


def run_summary(trainer: L.Trainer) -> str:
    """Final validation metrics next to their data-vs-data floors, and where the run's files are."""
    from .callbacks.logging import run_dir

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    lines = [f"lightning-ebm fit: finished at step {trainer.global_step}"]
    shown = set()
    for key in sorted(metrics):
        if key.endswith("_floor") or key in shown:
            continue
        floor = metrics.get(f"{key}_floor")
        text = f"  {key:<22} {metrics[key]:.4g}"
        if floor is not None:
            text += f"   (data-vs-data floor {floor:.4g}, ratio {metrics[key] / floor:.2f})" if floor > 0 else (
                f"   (data-vs-data floor {floor:.4g})")
        lines.append(text)
        shown.add(key)
    directory = run_dir(trainer)
    lines.append(f"  run directory          {directory}")
    metrics_file = directory / "metrics.csv"
    if metrics_file.is_file():
        lines.append(f"  metrics                {metrics_file}")
    ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
        trainer.checkpoint_callback, "best_model_path", "")
    if ckpt:
        lines.append(f"  checkpoint             {ckpt}")
    images = sorted((directory / "images").glob("*.png")) if (directory / "images").is_dir() else []
    if images:
        lines.append(f"  pictures               {directory / 'images'} ({len(images)} files, last {images[-1].name})")
    if (directory / "config.yaml").is_file():
        lines.append(f"  config                 {directory / 'config.yaml'}")
    if ckpt:
        lines.append(f"  sample from it:        {PROG} sample --ckpt_path {ckpt} --num_samples 1000 "
                     "--output samples.png")
    return "\n".join(lines)


def sample_main(argv: list[str]) -> Path:
    """``lightning-ebm sample``: draw from a trained model's generator and write a file."""
    parser = argparse.ArgumentParser(
        prog="lightning-ebm sample", description="Draw samples from a trained EBM's generator."
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt_path", help="checkpoint written by `lightning-ebm fit`")
    source.add_argument("--pretrained", help="directory written by `lightning-ebm export` (or save_pretrained), "
                        "or a Hugging Face Hub repo id holding one")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--output", required=True, help=f"output file, one of {', '.join(SAMPLE_FORMATS)}")
    parser.add_argument("--batch_size", type=int, default=None, help="run the dynamics in chunks of this size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    parser.add_argument("--pixel_scale", type=int, default=None,
                        help="images in a .png: enlarge each pixel to this square (default: tiles >= 32 pixels)")
    parser.add_argument("--allow_classes", nargs="*", default=None,
                        help="class paths or module prefixes the model may import (your own energies)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.suffix not in SAMPLE_FORMATS:
        parser.error(f"--output must end in one of {SAMPLE_FORMATS}, got {args.output!r}")
    if args.num_samples < 1:
        parser.error(f"--num_samples must be a positive integer, got {args.num_samples}")
    if args.pixel_scale is not None and args.pixel_scale < 1:
        parser.error(f"--pixel_scale must be a positive integer, got {args.pixel_scale}")
    if args.ckpt_path is not None and not Path(args.ckpt_path).is_file():
        parser.error(f"--ckpt_path {args.ckpt_path!r} is not a file")
    try:  # an unknown device type, or one this machine does not have (cuda without a GPU)
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as err:
        reason = re.split(r"(?<=\.) |\n", str(err), maxsplit=1)[0]
        parser.error(f"--device {args.device!r} cannot be used here (e.g. cpu, cuda:0): {reason}")
    try:
        if args.pretrained is not None:
            from .hub import load_for_cli

            model = load_for_cli(args.pretrained, args.device, args.allow_classes)
        else:
            model = EBM.load_from_checkpoint(args.ckpt_path, map_location=args.device,
                                             allow_classes=args.allow_classes)
    except ComponentConfigError as err:  # a component the checkpoint cannot rebuild: say what, not a traceback
        raise ConfigError(str(err)) from err
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(args.seed)
    x = model.generate(args.num_samples, generator=generator, batch_size=args.batch_size).cpu()
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".pt":
        torch.save(x, output)
    elif output.suffix == ".npz":
        np.savez(output, samples=x.numpy())
    else:
        from .callbacks.images import save_samples_png

        save_samples_png(x, output, args.pixel_scale)
    print(f"wrote {tuple(x.shape)} samples to {output}")
    return output


def run(argv: list[str]) -> None:
    """Run one subcommand (``argv`` without the program name); mistakes raise ``ConfigError``."""
    _quiet_known_noise()  # again: a warnings.catch_warnings() around the caller (pytest's) drops import-time filters
    if argv and argv[0] == "sample":
        sample_main(argv[1:])
        return
    if argv and argv[0] == "export":
        from .hub import export_main

        export_main(argv[1:])
        return
    check_config_files(argv)
    try:
        _run_cli(argv)
    except ConfigError as err:
        raise ConfigError(_with_source(str(err), argv)) from err.__cause__
    except MisconfigurationException as err:  # Lightning's word on a set-up mistake, e.g. no test_dataloader
        if _debug():
            raise
        raise ConfigError(str(err)) from err


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
    files = [f for f in files if _sets_key(f, key)]
    return f"{message}\n  (in {', '.join(files)})" if files else message


def _sets_key(file: str, key: str) -> bool:
    """Whether the YAML ``file`` sets config ``key`` (``a.b[0].c``), or a value above it."""
    try:
        value: Any = yaml.safe_load(Path(file).read_text())
    except (OSError, yaml.YAMLError):
        return False
    for part in re.findall(r"[^.\[\]]+", key):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return False
        if not isinstance(value, (dict, list)):
            return True
    return True


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
