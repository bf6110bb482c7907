"""The ``lightning-ebm`` command: LightningCLI subcommands plus ``sample``.

    lightning-ebm fit --config configs/toy2d.yaml
    lightning-ebm fit --config configs/toy2d.yaml --print_config
    lightning-ebm sample --ckpt_path run/checkpoints/last.ckpt --num_samples 1000 --output samples.png
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from . import _resume
from .callbacks import AtomicCheckpointIO, PreemptionCheckpoint
from .module import EBM

__all__ = ["EBMCLI", "main", "sample_main"]

SAMPLE_FORMATS = (".pt", ".npz", ".png")


class SaveConfigToLoggers(SaveConfigCallback):
    """Save ``config.yaml`` in the run directory and put the resolved config in every W&B run
    (Lightning itself sends W&B only the module's hyper-parameters)."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
                logger.experiment.config.update(config, allow_val_change=True)


class EBMCLI(LightningCLI):
    """LightningCLI for ``EBM`` (or subclasses) and any LightningDataModule.

    ``Trainer(inference_mode=False)`` is the default: the samplers need input gradients during
    validate/test/predict, which ``torch.inference_mode`` would forbid. Checkpoints are written
    with ``AtomicCheckpointIO`` (crash-safe) unless the config names another checkpoint plugin.
    ``fit`` adds a ``PreemptionCheckpoint`` unless the config has one (SIGTERM, Ctrl-C, SIGUSR1:
    a checkpoint of the step reached, then exit), and ``fit --ckpt_path last`` (or a checkpoint
    file of a run) continues that run's directory; see ``lightning_ebm._resume``.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs) -> None:
        self._argv = list(sys.argv[1:] if args is None else args) if isinstance(args, (list, type(None))) else None
        self._resume_plan: _resume.ResumePlan | None = None
        trainer_defaults = {"inference_mode": False, **kwargs.pop("trainer_defaults", {})}
        kwargs.setdefault("save_config_callback", SaveConfigToLoggers)
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
        if plan.run_dir is not None:
            for logger in self.trainer.loggers:
                if Path(logger.log_dir or "").resolve() == plan.run_dir.resolve():
                    _resume.continue_csv_metrics(logger, plan.global_step)


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
    return f"lightning-ebm {shlex.join(kept)} --ckpt_path {{ckpt_path}}"


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


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-ebm`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "sample":
        sample_main(argv[1:])
        return
    EBMCLI(args=None if args is None else argv)


if __name__ == "__main__":
    main()
