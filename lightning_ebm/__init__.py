"""lightning_ebm: energy-based models as self-adversarial games, as PyTorch Lightning modules.

The energy is the critic; its sampler's dynamics, started from latent noise, are the generator.

Submodules and ``EBM`` are imported on first use, so that ``import lightning_ebm`` and the
``lightning-ebm --help`` console script cost nothing before they are needed.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = ("callbacks", "data", "density", "energies", "latents", "metrics", "samplers")

__all__ = ["EBM", *_SUBMODULES, "__version__"]

if TYPE_CHECKING:  # for type checkers and IDEs: the names ``__getattr__`` provides
    from . import callbacks, data, density, energies, latents, metrics, samplers  # noqa: F401
    from .module import EBM  # noqa: F401


class _DropLitTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "try installing [lit" not in str(record.msg)


def _quiet_known_noise() -> None:
    """Silence two messages that every run printed and that no user can act on: Lightning 2.6's own use
    of torch's deprecated ``isinstance(treespec, LeafSpec)`` (a FutureWarning from Lightning's code,
    fixed upstream, not ours to change) and its advertisements for its cloud logger and model registry. Nothing else."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning,
                            module=r"lightning\.pytorch\.utilities\._pytree")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLitTips) for f in logger.filters):
            logger.addFilter(_DropLitTips())


_quiet_known_noise()


def __getattr__(name: str) -> Any:
    if name == "EBM":
        from .module import EBM

        return EBM
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'lightning_ebm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
