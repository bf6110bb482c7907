"""Evaluation of a classifier read as an energy (JEM): accuracy and calibration, out-of-distribution
detection, and a conditional sample grid. Logger-agnostic, through the module's public methods only
(``logits``, ``generate(n, y=...)``, the energy ``E(x)``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from matplotlib.figure import Figure
from torch import Tensor

from .._checks import check_choice, check_int, check_pair
from ..metrics import auroc, expected_calibration_error, reliability_bins
from .ema import averaged_weights
from .images import default_pixel_scale, image_grid
from .logging import Evaluation, EveryNSteps, log_image

__all__ = ["ClassifierMetrics", "OODDetection", "ConditionalSampleGrid", "ood_sets", "ood_scores",
           "reliability_diagram", "OOD_SETS", "OOD_SCORES"]

#: the out-of-distribution sets built offline from held-out images
OOD_SETS = ("uniform", "shuffled", "inverted")
#: the scores (higher = more in distribution): ``-E(x)``, the top softmax probability, ``-||grad_x E(x)||``
OOD_SCORES = ("energy", "max_softmax", "grad_norm")


def _labelled_batch(batch: Any) -> tuple[Tensor, Tensor] | None:
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor) \
            and not batch[1].is_floating_point() and batch[1].shape == (batch[0].shape[0],):
        return batch[0], batch[1]
    return None


def reliability_diagram(probs: Tensor, labels: Tensor, num_bins: int = 15, title: str = "") -> Figure:
    """Accuracy against confidence per bin (bars) with the diagonal of perfect calibration."""
    conf, acc, count = reliability_bins(probs, labels, num_bins)
    ece = float(expected_calibration_error(probs, labels, num_bins))
    edges = torch.linspace(0, 1, num_bins + 1)
    fig = Figure(figsize=(4.5, 4.5), dpi=90)
    ax = fig.subplots()
    filled = count > 0
    ax.bar(edges[:-1][filled], acc[filled], width=1 / num_bins, align="edge", edgecolor="black",
           color="tab:blue", label="accuracy")
    ax.bar(edges[:-1][filled], (conf - acc)[filled], bottom=acc[filled], width=1 / num_bins, align="edge",
           color="tab:red", alpha=0.35, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} ECE = {ece:.3f}".strip())
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


class ClassifierMetrics(Evaluation):
    """Accuracy, expected calibration error, NLL and a reliability diagram on the labelled validation data.

    Every ``every_n_validations``-th validation run (not the sanity check) the logits of the
    validation batches ``(x, y)`` (``pl_module.logits``) are gathered on this rank; the callback
    logs ``val/ece`` and ``val/nll`` (the module itself logs ``val/acc``) and the picture
    ``reliability`` through ``log_image``, and keeps the numbers in ``last``
    (``acc``, ``ece``, ``nll``). With an ``EMA`` callback the averaged weights classify. A test
    run (``trainer.test``) does the same on the test split: ``test/ece``, ``test/nll``, the
    picture ``test_reliability``.

    Args:
        num_bins: confidence bins of the ECE and the diagram.
        every_n_validations: evaluate at every this-many-th validation run.
    """

    def __init__(self, num_bins: int = 15, every_n_validations: int = 1) -> None:
        super().__init__(every_n_validations)
        self.num_bins = check_int("ClassifierMetrics", "num_bins", num_bins, minimum=1)
        self.last: dict[str, float] = {}
        self._batches: list[tuple[Tensor, Tensor]] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._batches = []

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.due(trainer):
            return
        pair = _labelled_batch(batch)
        if pair is None:
            raise ValueError(f"ClassifierMetrics needs labelled {'test' if trainer.testing else 'validation'} "
                             "batches (x, y): set labels: true on the DataModule")
        self._batches.append(pair)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.count(trainer)
        if not self.due(trainer, finished=True) or not self._batches:
            return
        with averaged_weights(trainer, pl_module):
            logits = torch.cat([pl_module.logits(x) for x, _ in self._batches]).double()
        labels = torch.cat([y for _, y in self._batches]).to(logits.device)
        self._batches = []
        self.last = evaluate_classifier(logits, labels, self.num_bins)
        stage = self.stage(trainer)
        pl_module.log(f"{stage}/ece", self.last["ece"], sync_dist=False)
        pl_module.log(f"{stage}/nll", self.last["nll"], sync_dist=False)
        title = f"{'test, ' if trainer.testing else ''}step {trainer.global_step}"
        log_image(trainer, "test_reliability" if trainer.testing else "reliability",
                  reliability_diagram(logits.softmax(1), labels, self.num_bins, title=title))


def evaluate_classifier(logits: Tensor, labels: Tensor, num_bins: int = 15) -> dict[str, float]:
    """``acc``, ``ece`` and ``nll`` of logits ``(N, C)`` against ``labels`` ``(N,)``."""
    logits = logits.detach().double()
    labels = labels.to(logits.device)
    probs = logits.softmax(1)
    return {"acc": float((logits.argmax(1) == labels).double().mean()),
            "ece": float(expected_calibration_error(probs, labels, num_bins)),
            "nll": float(torch.nn.functional.cross_entropy(logits, labels))}


def ood_sets(x: Tensor, generator: torch.Generator | None = None, names: Sequence[str] = OOD_SETS,
             value_range: tuple[float, float] = (-1.0, 1.0)) -> dict[str, Tensor]:
    """Out-of-distribution sets made from held-out images ``x`` ``(N, *shape)``, offline.

    ``uniform``: uniform noise over ``value_range``; ``shuffled``: each image's pixels (all
    channels of a position move together) permuted at random, so the marginal of the pixel
    values is the data's but the structure is gone; ``inverted``: ``lo + hi - x``.
    """
    lo, hi = value_range
    out: dict[str, Tensor] = {}
    for name in names:
        check_choice("ood_sets", "names", name, OOD_SETS)
        if name == "uniform":
            out[name] = lo + (hi - lo) * torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        elif name == "shuffled":
            flat = x.flatten(2) if x.ndim >= 3 else x.unsqueeze(1)
            perms = torch.stack([torch.randperm(flat.shape[-1], generator=generator) for _ in range(x.shape[0])])
            idx = perms.to(x.device)[:, None, :].expand_as(flat)
            out[name] = flat.gather(-1, idx).reshape(x.shape)
        else:
            out[name] = lo + hi - x
    return out


def ood_scores(pl_module: Any, x: Tensor, scores: Sequence[str] = OOD_SCORES, batch_size: int = 500
               ) -> dict[str, Tensor]:
    """Per-sample scores ``(N,)`` (higher = more in distribution) of a model on ``x``.

    ``energy``: ``-E(x)`` (``log p(x)`` up to ``log Z``); ``max_softmax``: ``max_y p(y|x)``
    (needs ``pl_module.logits``); ``grad_norm``: ``-||grad_x E(x)||`` (points of high density sit
    where the energy is flat: JEM's "approximate mass").
    """
    for name in scores:
        check_choice("ood_scores", "scores", name, OOD_SCORES)
    out: dict[str, list[Tensor]] = {name: [] for name in scores}
    for chunk in x.to(pl_module.device).split(batch_size):
        if "energy" in out:
            with torch.no_grad():
                out["energy"].append(-pl_module(chunk))
        if "max_softmax" in out:
            out["max_softmax"].append(pl_module.logits(chunk).softmax(1).max(1).values)
        if "grad_norm" in out:
            with torch.enable_grad():
                c = chunk.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(pl_module(c).sum(), c)
            out["grad_norm"].append(-g.flatten(1).norm(dim=1))
    return {k: torch.cat(v).detach() for k, v in out.items()}


class OODDetection(Evaluation):
    """OOD AUROC of several scores, held-out data against OOD sets built offline from it.

    Every ``every_n_validations``-th validation run (not the sanity check), up to
    ``num_samples`` held-out images (the first validation batches of this rank) are scored against
    ``ood_sets`` of them (``sets``) and, when ``other`` is given, the validation images of another
    DataModule (set ``other``, e.g. MNIST against FashionMNIST). Logs ``val/auroc/<set>/<score>``
    (rank 0's values under DDP) and keeps them in ``last``. With an ``EMA`` callback the averaged
    weights are scored. A test run (``trainer.test``) scores the test split against sets built
    from it and ``other``'s test images: ``test/auroc/<set>/<score>``.

    Args:
        sets: which of ``OOD_SETS`` to build.
        scores: which of ``OOD_SCORES`` to compute.
        other: a LightningDataModule whose validation images are one more OOD set (same shape).
        num_samples: held-out images per evaluation.
        every_n_validations: evaluate at every this-many-th validation run.
        value_range: the data range (for ``uniform`` and ``inverted``).
        seed: seed of the OOD sets.
    """

    def __init__(self, sets: Sequence[str] = OOD_SETS, scores: Sequence[str] = OOD_SCORES,
                 other: L.LightningDataModule | None = None, num_samples: int = 1000,
                 every_n_validations: int = 1, value_range: tuple[float, float] = (-1.0, 1.0), seed: int = 0) -> None:
        super().__init__(every_n_validations)
        self.sets = [check_choice("OODDetection", "sets", s, OOD_SETS) for s in sets]
        self.scores = [check_choice("OODDetection", "scores", s, OOD_SCORES) for s in scores]
        self.other = other
        self.num_samples = check_int("OODDetection", "num_samples", num_samples, minimum=2)
        self.value_range = check_pair("OODDetection", "value_range", value_range)
        self.seed = check_int("OODDetection", "seed", seed)
        self.last: dict[str, float] = {}
        self._data: list[Tensor] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._data = []

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self.due(trainer) or sum(x.shape[0] for x in self._data) >= self.num_samples:
            return
        self._data.append(batch[0] if isinstance(batch, (list, tuple)) else batch)

    def _other_images(self, split: str = "val") -> Tensor | None:
        if self.other is None:
            return None
        self.other.setup("test" if split == "test" else "validate")
        images, count = [], 0
        for batch in (self.other.test_dataloader() if split == "test" else self.other.val_dataloader()):
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            images.append(x)
            count += x.shape[0]
            if count >= self.num_samples:
                break
        return torch.cat(images)[: self.num_samples]

    def evaluate(self, pl_module: Any, x_in: Tensor, split: str = "val") -> dict[str, float]:
        """``auroc/<set>/<score>`` for held-out ``x_in`` against the OOD sets (``other``: the images of
        its ``split``, ``val`` or ``test``)."""
        sets = ood_sets(x_in, torch.Generator().manual_seed(self.seed), self.sets, self.value_range)
        other = self._other_images(split)
        if other is not None:
            sets["other"] = other
        scores_in = ood_scores(pl_module, x_in, self.scores)
        out = {}
        for set_name, x_out in sets.items():
            scores_out = ood_scores(pl_module, x_out, self.scores)
            for score in self.scores:
                out[f"auroc/{set_name}/{score}"] = float(auroc(scores_in[score], scores_out[score]))
        return out

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.count(trainer)
        if not self.due(trainer, finished=True) or not self._data:
            return
        x_in = torch.cat(self._data)[: self.num_samples]
        self._data = []
        stage = self.stage(trainer)
        with averaged_weights(trainer, pl_module):
            self.last = self.evaluate(pl_module, x_in, stage)
        for name, value in self.last.items():
            pl_module.log(f"{stage}/{name}", value, sync_dist=False, rank_zero_only=True)


class ConditionalSampleGrid(EveryNSteps):
    """Every ``every_n_steps`` training steps (and at the end) log ``conditional_samples``: one row per
    class, ``per_class`` samples of ``generate(n, y=class)`` each, from a fixed seed.

    Args:
        every_n_steps: logging period in optimizer steps.
        per_class: samples (columns) per class.
        classes: the classes (rows); default all of the energy's ``num_classes``.
        value_range: the data range mapped to black..white.
        pixel_scale: enlarge every pixel to this square; default: enough for 32-pixel tiles.
        seed: seed of the latents.
    """

    def __init__(self, every_n_steps: int = 500, per_class: int = 10, classes: Sequence[int] | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0), pixel_scale: int | None = None,
                 seed: int = 0) -> None:
        super().__init__(every_n_steps)
        self.per_class = check_int("ConditionalSampleGrid", "per_class", per_class, minimum=1)
        self.classes = None if classes is None else [check_int("ConditionalSampleGrid", "classes", c, minimum=0)
                                                     for c in classes]
        self.value_range = check_pair("ConditionalSampleGrid", "value_range", value_range)
        self.pixel_scale = check_int("ConditionalSampleGrid", "pixel_scale", pixel_scale, minimum=1, allow_none=True)
        self.seed = check_int("ConditionalSampleGrid", "seed", seed)

    def make_image(self, pl_module: Any) -> Tensor:
        """The grid ``(3, H, W)`` in [0, 1]: row ``i`` holds samples of class ``classes[i]``."""
        shape = tuple(pl_module.latent.shape)
        if len(shape) != 3:
            raise ValueError(f"ConditionalSampleGrid needs image samples (C, H, W); the latent has shape {shape}")
        num_classes = getattr(pl_module.energy, "num_classes", None)
        classes = self.classes if self.classes is not None else list(range(num_classes or 0))
        if not classes:
            raise ValueError("ConditionalSampleGrid needs a class-conditional energy (num_classes) or classes=[...]")
        y = torch.tensor(classes).repeat_interleave(self.per_class)
        gen = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        x = pl_module.generate(y.shape[0], y=y, generator=gen)
        return image_grid(x, nrow=self.per_class, value_range=self.value_range,
                          pixel_scale=self.pixel_scale or default_pixel_scale(shape))

    def log_now(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        with averaged_weights(trainer, pl_module):
            grid = self.make_image(pl_module)
        log_image(trainer, "conditional_samples", grid)
