"""Resume in the run directory a checkpoint came from, and say when the config has changed since.

Used by the ``lightning-ebm`` CLI for ``fit --ckpt_path last`` and ``fit --ckpt_path <file>``:

- ``last`` is the newest checkpoint (by modification time) of the runs of the config's logger
  (``<save_dir>/<name>/version_*/``, or the one version the config names), whatever wrote it:
  ModelCheckpoint's ``last.ckpt`` and periodic files, ``PreemptionCheckpoint``'s emergency file,
  the divergence guard's ``last-good.ckpt``, the directories the config gives those callbacks, and
  SLURM's ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir`` and ``<default_root_dir>/checkpoints``. No
  checkpoint: a fresh run, with a warning (so one job script serves the first job and its requeued
  successors); with a logger other than CSV or TensorBoard, Lightning's own ``last`` then looks.
- a checkpoint inside ``<save_dir>/<name>/<version>/`` continues that version (same folder, same
  ``metrics.csv``, whose rows after the checkpoint's step are dropped: the resumed run logs them
  again) unless the config names a version itself, which is respected.
- the model's and the datamodule's hyper-parameters are compared with the checkpoint's; the keys
  that differ are named in a warning (trainer settings such as ``max_steps`` may differ silently).
"""

from __future__ import annotations

import csv
import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["ResumePlan", "config_differences", "continue_csv_metrics", "last_checkpoint", "plan_resume",
           "runs_root", "warn_if_config_differs"]

_RUN_LOGGERS = ("CSVLogger", "TensorBoardLogger")
_CKPT_DIR_CALLBACKS = ("ModelCheckpoint", "PreemptionCheckpoint", "DivergenceGuard", "OnExceptionCheckpoint")


@dataclass
class ResumePlan:
    """What ``plan_resume`` decided: the checkpoint, the run directory it continues, its contents."""

    ckpt_path: Path
    run_dir: Path | None = None
    checkpoint: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def global_step(self) -> int:
        return int(self.checkpoint.get("global_step", 0))


def _get(ns: Any, key: str, default: Any = None) -> Any:
    if ns is None:
        return default
    if isinstance(ns, dict):
        return ns.get(key, default)
    return getattr(ns, key, default)


def _set(ns: Any, key: str, value: Any) -> None:
    if isinstance(ns, dict):
        ns[key] = value
    else:
        setattr(ns, key, value)


def _class_name(entry: Any) -> str:
    return str(_get(entry, "class_path", "")).rsplit(".", 1)[-1]


def _run_logger(trainer_config: Any) -> Any:
    """The config's logger entry whose ``log_dir`` is the run directory (as ``callbacks.run_dir`` picks it)."""
    loggers = _get(trainer_config, "logger")
    entries = loggers if isinstance(loggers, list) else [loggers]
    for entry in entries:
        if _class_name(entry) in _RUN_LOGGERS and _get(entry, "init_args") is not None:
            return entry
    return None


def _logger_root(entry: Any) -> Path:
    """``<save_dir>/<name>`` of a CSV or TensorBoard logger entry (the class defaults where not given)."""
    args = _get(entry, "init_args")
    name = _get(args, "name", _default_name(entry))
    save_dir = Path(str(_get(args, "save_dir", ".")))
    return save_dir / name if name else save_dir


def _default_name(entry: Any) -> str | None:
    from lightning.pytorch import loggers

    cls = getattr(loggers, _class_name(entry), None)
    if cls is None:
        return "lightning_logs"
    parameter = inspect.signature(cls.__init__).parameters.get("name")
    return None if parameter is None else parameter.default


def _version_folder(version: Any) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def _checkpoints_under(directory: Path, recursive: bool) -> list[Path]:
    if not directory.is_dir():
        return []
    found = directory.rglob("*.ckpt") if recursive else directory.glob("*.ckpt")
    return [p for p in found if p.is_file() and not p.name.startswith(".")]  # skip writers' temporary files


def _newest(paths: list[Path]) -> Path | None:
    stamped = []
    for p in set(paths):
        try:
            stamped.append((p.stat().st_mtime_ns, str(p), p))
        except FileNotFoundError:
            continue
    return max(stamped)[2] if stamped else None


def _load(path: Path) -> dict[str, Any]:
    """The checkpoint's dictionary, memory-mapped; ``weights_only`` where its contents allow it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # classes outside torch's allow-list: the fit that follows loads the same file
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def runs_root(trainer_config: Any) -> Path | None:
    """``<save_dir>/<name>`` of the config's CSV or TensorBoard logger, whose versions are its runs."""
    logger = _run_logger(trainer_config)
    return _logger_root(logger) if logger is not None else None


def last_checkpoint(trainer_config: Any) -> Path | None:
    """The checkpoint ``--ckpt_path last`` means: the newest one of the config logger's runs and callbacks."""
    logger = _run_logger(trainer_config)
    root = runs_root(trainer_config)
    explicit_version = _get(_get(logger, "init_args"), "version") if logger is not None else None
    candidates: list[Path] = []
    if root is not None:
        runs = ([root / _version_folder(explicit_version)] if explicit_version is not None
                else [p for p in root.glob("*") if p.is_dir()])
        for run in runs:
            candidates += _checkpoints_under(run, recursive=True)
    for entry in _get(trainer_config, "callbacks") or []:
        dirpath = _get(_get(entry, "init_args"), "dirpath")
        if _class_name(entry) in _CKPT_DIR_CALLBACKS and dirpath:
            candidates += _checkpoints_under(Path(str(dirpath)), recursive=False)
    default_root = Path(str(_get(trainer_config, "default_root_dir") or "."))
    candidates += [p for p in _checkpoints_under(default_root, recursive=False) if p.name.startswith("hpc_ckpt_")]
    candidates += _checkpoints_under(default_root / "checkpoints", recursive=False)  # logger=False runs
    return _newest(candidates)


def plan_resume(fit_config: Any) -> ResumePlan | None:
    """Resolve ``ckpt_path`` of a parsed ``fit`` config in place; pin the logger to the run's version.

    Returns ``None`` when there is nothing to resume (no ``ckpt_path``, or ``last`` and no
    checkpoint yet: then ``ckpt_path`` becomes ``None`` and a fresh run starts).
    """
    requested = _get(fit_config, "ckpt_path")
    if requested is None or requested in ("best", "hpc", "registry"):
        return None
    trainer_config = _get(fit_config, "trainer")
    logger = _run_logger(trainer_config)
    root = runs_root(trainer_config)
    explicit_version = _get(_get(logger, "init_args"), "version") if logger is not None else None

    if requested == "last":
        newest = last_checkpoint(trainer_config)
        if newest is None:
            if root is None:  # a logger this module does not know: let Lightning's own "last" look
                return None
            rank_zero_warn(f"--ckpt_path last: no checkpoint under {root}/*/; starting a new run.")
            _set(fit_config, "ckpt_path", None)
            return None
        path = newest
    else:
        path = Path(str(requested))
        if not path.is_file():
            return None  # Lightning reports a missing file in its own words

    run_dir = None
    if root is not None:
        try:
            relative = path.resolve().relative_to(root.resolve())
        except ValueError:
            relative = None
        if relative is not None and len(relative.parts) > 1:
            folder = relative.parts[0]
            if explicit_version is None:
                _set(_get(logger, "init_args"), "version", folder)
                run_dir = root / folder
            elif _version_folder(explicit_version) == folder:
                run_dir = root / folder
            else:
                rank_zero_warn(f"resuming {path} (from run {root / folder}) in the config's own logger version "
                               f"{explicit_version!r}: {root / _version_folder(explicit_version)}")
    _set(fit_config, "ckpt_path", str(path))
    return ResumePlan(ckpt_path=path, run_dir=run_dir, checkpoint=_load(path))


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        if not value and prefix:
            out[prefix] = {}
        for key, item in value.items():
            if key == "_instantiator":
                continue
            name = "class_path" if key == "_class_path" else str(key)
            _flatten(item, f"{prefix}.{name}" if prefix else name, out)
    elif isinstance(value, tuple):
        out[prefix] = list(value)
    else:
        out[prefix] = value
    return out


def _config_key(group: str, key: str) -> str:
    return f"{group}.{key}" if key == "class_path" else f"{group}.init_args.{key}"


def config_differences(saved: dict[str, Any], current: dict[str, Any], group: str) -> list[str]:
    """``group.init_args.<key>: <saved> (checkpoint) vs <current> (config)`` for each key that differs."""
    a, b = _flatten(dict(saved), "", {}), _flatten(dict(current), "", {})
    lines = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
        if old != new:
            lines.append(f"{_config_key(group, key)}: {old!r} in the checkpoint, {new!r} now")
    return lines


def warn_if_config_differs(plan: ResumePlan, model: Any, datamodule: Any) -> list[str]:
    """Warn, naming the keys, when the model or data hyper-parameters differ from the checkpoint's."""
    lines = []
    for group, saved_key, obj in (("model", "hyper_parameters", model), ("data", "datamodule_hyper_parameters",
                                                                         datamodule)):
        saved = plan.checkpoint.get(saved_key)
        current = getattr(obj, "hparams", None)
        if saved is not None and current is not None:
            lines += config_differences(saved, dict(current), group)
    if lines:
        rank_zero_warn(f"resuming {plan.ckpt_path} with a model or data config that differs from the one it was "
                       "trained with:\n  " + "\n  ".join(lines))
    return lines


def continue_csv_metrics(logger: Any, global_step: int) -> int:
    """Keep a CSVLogger's ``metrics.csv`` rows of the steps before ``global_step``; return how many.

    Lightning's CSV writer deletes the file of a version folder it opens; this reads it first and
    writes back the rows the checkpoint covers (``step < global_step``), dropping those of steps
    the resumed run will log again.
    """
    from lightning.pytorch.loggers import CSVLogger

    if not isinstance(logger, CSVLogger) or logger._experiment is not None:
        return 0
    path = Path(logger.log_dir) / "metrics.csv"
    rows: list[dict[str, str]] = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if not r.get("step") or int(float(r["step"])) < global_step]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Experiment logs directory")
        writer = logger.experiment
    if rows:
        writer.metrics = rows
        writer.save()
    return len(rows)
