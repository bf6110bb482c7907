"""The ``lightning-ebm`` console script: a fast top-level help and mistakes reported in a few lines.

This module imports nothing heavy: ``lightning-ebm``, ``lightning-ebm --help`` and
``lightning-ebm --version`` answer without importing torch or Lightning. Every subcommand is then
run by :mod:`lightning_ebm.cli`. A configuration mistake (a bad value, a misspelled class path or
option, a YAML syntax error, a missing checkpoint) is printed as one short message naming the
option or config key and the file. So is a mistake that the library's own checks find once the run
has started (a latent that does not fit the data, labels a JEM cannot take, a dataset not in
place): its message, without the traceback. ``--debug`` (anywhere on the command line) or
``LIGHTNING_EBM_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import linecache
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["ConfigError", "main", "simplify_parser_message"]

PROG = "lightning-ebm"

#: subcommands and their one-line descriptions, shown by the top-level help
SUBCOMMANDS = {
    "fit": "train a model (the energy against its sampler's generator)",
    "validate": "run one validation epoch of a model (val/mmd, val/sw and their floors)",
    "test": "run one test epoch of a model",
    "predict": "run prediction with a model",
    "sample": "draw samples from a trained model's generator into a .png, .pt or .npz file",
    "export": "write a checkpoint as a pretrained directory (config.json, safetensors, model card) to share",
}

HELP = f"""usage: {PROG} [-h] [--version] {{{{{",".join(SUBCOMMANDS)}}}}} ...

PyTorch Lightning modules for energy-based models: the energy is the critic, its sampler's
dynamics started from latent noise are the generator.

subcommands:
{{subcommands}}

examples:
  {PROG} fit --config configs/toy2d.yaml
  {PROG} fit --config configs/toy2d.yaml --print_config
  {PROG} fit --help
  {PROG} sample --ckpt_path runs/toy2d/version_0/checkpoints/last.ckpt --num_samples 1000 --output samples.png
  {PROG} export --ckpt_path runs/toy2d/version_0/checkpoints/last.ckpt --output my-ebm

options:
  -h, --help  show this message and exit
  --version   print the version and exit
  --debug     show full tracebacks instead of short error messages (or set LIGHTNING_EBM_DEBUG=1)
"""

DEBUG_ENV = "LIGHTNING_EBM_DEBUG"


class ConfigError(ValueError):
    """A mistake in the command line or the config, already worded for the user (no traceback needed)."""


def _help() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = "\n".join(f"  {name:<{width}}  {text}" for name, text in SUBCOMMANDS.items())
    return HELP.format(subcommands=lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lightning-ebm")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from . import __version__

        return __version__


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


_NOISE = (
    re.compile(r"^\s*- Expected a <class 'NoneType'>\s*$"),
    re.compile(r"^\s*Given value type: "),
    re.compile(r"^\s*Given value: "),
    re.compile(r"^\s*Subtypes: \["),
    re.compile(r"^\s*Does not validate against any of the Union subtypes\s*$"),
    re.compile(r"^\s*Errors:\s*$"),
)
_KEY = re.compile(r'^\s*(?:- )?Parser key "([^"]+)":\s*$')
_CLASS = re.compile(r"^\s*(?:- )?Problem with given class_path '([^']+)':\s*$")


def closest(word: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'X'?)`` for the choice closest to a misspelled ``word``, or ``""``."""
    import difflib

    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def simplify_parser_message(message: str) -> str:
    """jsonargparse's error message without the Union-subtype noise, nested keys joined into one path.

    ``Parser key "model": ... Problem with given class_path 'lightning_ebm.EBM': Parser key "sampler":
    ...: module has no attribute 'X'`` becomes ``model.init_args.sampler: module has no attribute 'X'``.
    """
    path: list[str] = []
    classes: list[str] = []
    rest: list[str] = []
    for line in message.splitlines():
        if any(p.match(line) for p in _NOISE):
            continue
        key = _KEY.match(line)
        if key:
            path.append(key.group(1))
            continue
        cls = _CLASS.match(line)
        if cls:
            classes.append(cls.group(1))
            path.append("init_args")
            continue
        if line.strip():
            rest.append(line.strip().removeprefix("- "))
    while path and path[-1] == "init_args":
        path.pop()
    text = "\n".join(rest) if rest else message.strip()
    if path:
        where = ".".join(path)
        return f"{where}: {text}"
    return text


_PACKAGE = Path(__file__).resolve().parent


#: the exception types the library raises for bad input or set-up found during a run
_RUN_ERRORS = (ValueError, TypeError, RuntimeError, FileNotFoundError, ImportError)


def _worded_for_the_user(err: BaseException) -> bool:
    """Whether ``err`` is one of the library's own messages about bad input: one of ``_RUN_ERRORS``
    raised by a ``raise`` statement inside ``lightning_ebm`` (a data or set-up check found during a
    run, e.g. a latent that does not fit the data, a dataset not in place, an optional extra not
    installed), not an error of torch, Lightning or Python surfacing through the library, which keeps
    its traceback."""
    if not isinstance(err, _RUN_ERRORS) or err.__traceback__ is None:
        return False
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    try:
        inside = Path(filename).resolve().is_relative_to(_PACKAGE)
    except OSError:
        return False
    return inside and linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")


def _print_error(subcommand: str | None, message: str) -> None:
    prog = f"{PROG} {subcommand}" if subcommand else PROG
    sys.stderr.write(f"{prog}: error: {message}\n")
    tips = [f"run `{prog} --help` for the options" if subcommand else f"run `{PROG} --help`",
            "add --debug for the full traceback"]
    sys.stderr.write(f"({'; '.join(tips)})\n")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-ebm`` console script (``argv`` defaults to ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_help())
        if not argv:
            raise SystemExit(2)
        return
    if argv[0] == "--version":
        sys.stdout.write(f"{PROG} {_version()}\n")
        return
    subcommand = argv[0]
    if subcommand not in SUBCOMMANDS:
        hint = closest(subcommand, list(SUBCOMMANDS))
        _print_error(None, f"unknown subcommand {subcommand!r}{hint}; choose one of {', '.join(SUBCOMMANDS)}")
        raise SystemExit(2)
    previous = os.environ.get(DEBUG_ENV)
    if debug:
        os.environ[DEBUG_ENV] = "1"  # the parser then keeps jsonargparse's full messages too
    from . import cli

    try:
        cli.run(argv)
    except ConfigError as err:
        if debug:
            raise
        _print_error(subcommand, str(err))
        raise SystemExit(2) from None
    except _RUN_ERRORS as err:  # a check of the library's that fired during the run
        if debug or not _worded_for_the_user(err):
            raise
        _print_error(subcommand, str(err))
        raise SystemExit(1 if isinstance(err, RuntimeError) else 2) from None
    except KeyboardInterrupt:
        if debug:
            raise
        sys.stderr.write(f"{PROG} {subcommand}: interrupted\n")
        raise SystemExit(130) from None
    finally:  # called from Python (tests), leave the environment as it was
        if previous is None:
            os.environ.pop(DEBUG_ENV, None)
        else:
            os.environ[DEBUG_ENV] = previous


if __name__ == "__main__":
    main()
