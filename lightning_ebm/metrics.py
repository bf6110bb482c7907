"""Sample-quality metrics between two point sets: MMD and sliced Wasserstein distance."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from urllib.error import URLError

import torch
from torch import Tensor

from ._checks import check_choice, check_int, fail

__all__ = ["mmd_rbf", "median_bandwidth", "sliced_wasserstein"]


def _as_2d(x: Tensor, name: str) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim < 2 or x.shape[0] < 2:
        raise fail("metrics", name, "a tensor (N, *shape) with N >= 2", getattr(x, "shape", x))
    return x.flatten(1).double()


def median_bandwidth(x: Tensor, y: Tensor) -> Tensor:
    """Median of the pairwise distances of the pooled sample (the median heuristic)."""
    z = torch.cat([_as_2d(x, "x"), _as_2d(y, "y")])
    d = torch.cdist(z, z)
    n = z.shape[0]
    off_diagonal = d[~torch.eye(n, dtype=torch.bool, device=d.device)]
    return off_diagonal.median()


def mmd_rbf(x: Tensor, y: Tensor, bandwidth: float | Tensor | None = None) -> Tensor:
    """Maximum mean discrepancy with a Gaussian kernel ``exp(-|a-b|^2 / (2 h^2))``.

    Returns ``MMD = sqrt(MMD_b^2)``, the biased (V-statistic) estimate, which is never negative
    and has a positive floor of order ``1/sqrt(N)`` even for two samples of one distribution:
    compare it to the same statistic between two data samples of the same sizes. ``bandwidth``
    ``h`` defaults to the median heuristic on the pooled sample. Computed in float64.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of features, got {x.shape[1]} and {y.shape[1]}")
    h = median_bandwidth(x, y) if bandwidth is None else torch.as_tensor(bandwidth, dtype=torch.float64)
    gamma = 1.0 / (2 * h**2)
    kxx = torch.exp(-gamma * torch.cdist(x, x).pow(2)).mean()
    kyy = torch.exp(-gamma * torch.cdist(y, y).pow(2)).mean()
    kxy = torch.exp(-gamma * torch.cdist(x, y).pow(2)).mean()
    return (kxx + kyy - 2 * kxy).clamp_min(0).sqrt()


def sliced_wasserstein(
    x: Tensor, y: Tensor, num_projections: int = 256, p: int = 2, generator: torch.Generator | None = None
) -> Tensor:
    """Sliced ``p``-Wasserstein distance ``(E_theta W_p^p(<x,theta>, <y,theta>))^(1/p)``.

    Directions are uniform on the sphere (seeded by ``generator``, default seed 0 so the value is
    reproducible). The 1-D distances are exact, from quantile functions on a common grid, so
    ``x`` and ``y`` may have different sizes. Computed in float64.
    """
    x, y = _as_2d(x, "x"), _as_2d(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of features, got {x.shape[1]} and {y.shape[1]}")
    p = check_int("sliced_wasserstein", "p", p, minimum=1)
    num_projections = check_int("sliced_wasserstein", "num_projections", num_projections, minimum=1)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    return _wasserstein_1d_sorted(px, py, p).mean().pow(1.0 / p)


def _wasserstein_1d_sorted(u: Tensor, v: Tensor, p: int) -> Tensor:
    """``W_p^p`` between the empirical laws of sorted columns ``u`` (n, P) and ``v`` (m, P)."""
    n, m = u.shape[0], v.shape[0]
    # quantile levels where either empirical quantile function jumps
    levels = torch.cat([torch.arange(1, n + 1, device=u.device) / n, torch.arange(1, m + 1, device=u.device) / m])
    levels = torch.unique(levels.double().clamp(max=1.0))
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mids = levels - widths / 2
    iu = torch.clamp((mids * n).ceil().long() - 1, 0, n - 1)
    iv = torch.clamp((mids * m).ceil().long() - 1, 0, m - 1)
    return (widths[:, None] * (u[iu] - v[iv]).abs().pow(p)).sum(0)


# ------------------------------------------------------------------------ FID feature extractors
# A feature extractor is any torch.nn.Module mapping images (B, C, H, W), in the data's range [-1, 1],
# to features (B, d); ``num_features`` (d) and ``head`` (a callable features -> class logits,
# needed for the Inception Score) are optional.
__all__ += ["DigitsFeatures", "InceptionFeatures"]

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
)


class _DigitsNet(torch.nn.Module):
    """A small classifier of 8x8 digits; its 64-d penultimate layer gives the digits features."""

    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.SiLU(),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.AvgPool2d(2),
            torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.SiLU(), torch.nn.AvgPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(128, 64), torch.nn.SiLU(),
        )
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class DigitsFeatures(torch.nn.Module):
    """Features of the embedded 8x8 digits for a "digits FID" (and KID, IS) that works offline.

    A small ConvNet classifier trained on the training part of the default digits split
    (``scripts/train_digits_features.py``; weights shipped in ``lightning_ebm/assets``); the
    features are its 64-d penultimate layer, ``head`` its 10 class logits. Inputs are digits
    images in [-1, 1] as ``DigitsDataModule`` makes them: give the same ``image_size`` and
    ``resize_mode`` and the 8x8 digit is recovered (centre crop, or area resize) first.

    Args:
        image_size: side of the input images (8 is native).
        resize_mode: ``"pad"`` or ``"resize"``, as in ``DigitsDataModule``.
        weights_path: a state dict to load instead of the shipped weights.
    """

    num_features = 64

    def __init__(
        self, image_size: int = 8, resize_mode: str = "pad", weights_path: str | None = None
    ) -> None:
        super().__init__()
        check_choice("DigitsFeatures", "resize_mode", resize_mode, ("pad", "resize"))
        image_size = check_int("DigitsFeatures", "image_size", image_size, minimum=8)
        self.image_size, self.resize_mode = image_size, resize_mode
        self.net = _DigitsNet()
        if weights_path is None:
            with resources.files("lightning_ebm").joinpath("assets/digits_features.pt").open("rb") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
        else:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> DigitsFeatures:
        return super().train(False)  # a fixed measuring instrument: always in eval mode

    def _to_8x8(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, self.image_size, self.image_size):
            raise ValueError(f"DigitsFeatures(image_size={self.image_size}) expects images of shape "
                             f"(B, 1, {self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        x = x.to(self.net.head.weight.dtype)
        if self.image_size == 8:
            return x
        if self.resize_mode == "pad":
            lo = (self.image_size - 8) // 2
            return x[:, :, lo : lo + 8, lo : lo + 8]
        return torch.nn.functional.interpolate(x, size=(8, 8), mode="area")

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(B, 64)``."""
        return self.net.features(self._to_8x8(x))

    def head(self, features: Tensor) -> Tensor:
        """Class logits ``(B, 10)`` from features."""
        return self.net.head(features)

    def logits(self, x: Tensor) -> Tensor:
        """Class logits ``(B, 10)`` of images."""
        return self.head(self(x))


class InceptionFeatures(torch.nn.Module):
    """The FID Inception-v3 (2048-d pool features) of torchmetrics / torch-fidelity.

    Inputs are images in [-1, 1] with 1 or 3 channels; they are rounded to uint8 (grey images
    repeated to RGB) and resized to 299x299 inside the network. ``head`` gives the unbiased
    logits the Inception Score uses. Needs ``torch-fidelity`` (``pip install
    "lightning-ebm[fid]"``) and the weights: downloaded once into torch's hub cache, or read from
    ``weights_path`` (offline).

    Args:
        weights_path: a local copy of ``weights-inception-2015-12-05-6726825d.pth``.
        antialias: torchmetrics' resize (True, its default since 1.8) or the TF1-compatible one
            of the original FID code (False; use it for numbers comparable with papers).
    """

    num_features = 2048

    def __init__(self, weights_path: str | None = None, antialias: bool = True) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ModuleNotFoundError(
                "InceptionFeatures needs torch-fidelity: pip install 'lightning-ebm[fid]' (or "
                "torch-fidelity); or give the FID callback another feature extractor (feature=...)"
            )
        target = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"InceptionFeatures: weights_path={str(weights_path)!r} is not a file; "
                                    f"it should be a copy of {INCEPTION_WEIGHTS_URL}")
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=weights_path, antialias=antialias)
        except (OSError, URLError, RuntimeError) as err:
            if weights_path is not None:
                raise
            raise RuntimeError(
                f"could not get the FID Inception weights ({type(err).__name__}: {err}). Download "
                f"{INCEPTION_WEIGHTS_URL} on a machine with network access and either place it at {target} "
                f"(torch's hub cache; set TORCH_HOME to move it) or pass its path as weights_path "
                f"(FIDCallback(inception_weights_path=...))"
            ) from err

    def forward(self, x: Tensor) -> Tensor:
        """Features ``(B, 2048)`` of images in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"InceptionFeatures expects images (B, 1 or 3, H, W), got {tuple(x.shape)}")
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x)

    def head(self, features: Tensor) -> Tensor:
        """The unbiased class logits ``(B, 1008)`` from pool features (Inception Score)."""
        return features @ self.net.fc.weight.T.to(features.dtype)


# ------------------------------------------------------------------------ classifiers and OOD detection
__all__ += ["auroc", "expected_calibration_error", "reliability_bins"]


def auroc(scores_in: Tensor, scores_out: Tensor) -> Tensor:
    """Area under the ROC curve of telling ``scores_in`` (positives) from ``scores_out`` by their value.

    The probability that a random in-distribution score exceeds a random out-of-distribution one,
    ties counting one half (the Mann-Whitney U statistic over ``n_in * n_out``): 1 separates
    perfectly, 0.5 is chance. Higher scores must mean "in distribution". Float64.
    """
    for name, s in (("scores_in", scores_in), ("scores_out", scores_out)):
        if not isinstance(s, Tensor) or s.ndim != 1 or s.numel() < 1 or s.is_complex():
            raise fail("auroc", name, "a non-empty 1-D tensor of scores", getattr(s, "shape", s))
    pos, neg = scores_in.detach().double().cpu(), scores_out.detach().double().cpu()
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise ValueError("auroc: the scores must be finite (NaN or Inf found)")
    neg = neg.sort().values
    below = torch.searchsorted(neg, pos, right=False).double()
    ties = torch.searchsorted(neg, pos, right=True).double() - below
    return (below + 0.5 * ties).sum() / (pos.numel() * neg.numel())


def _check_probs(owner: str, probs: Tensor, labels: Tensor) -> None:
    if not isinstance(probs, Tensor) or probs.ndim != 2 or probs.shape[0] < 1:
        raise fail(owner, "probs", "class probabilities (N, C)", getattr(probs, "shape", probs))
    if not isinstance(labels, Tensor) or labels.shape != (probs.shape[0],) or labels.is_floating_point():
        raise fail(owner, "labels", f"an integer tensor ({probs.shape[0]},)", getattr(labels, "shape", labels))


def reliability_bins(probs: Tensor, labels: Tensor, num_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Per confidence bin: mean confidence, accuracy and count (``(num_bins,)`` each, float64).

    The confidence of a prediction is its top probability; bin ``b`` holds confidences in
    ``(b / num_bins, (b + 1) / num_bins]`` (the first also 0). Empty bins have confidence and
    accuracy 0 and count 0.
    """
    _check_probs("reliability_bins", probs, labels)
    num_bins = check_int("reliability_bins", "num_bins", num_bins, minimum=1)
    probs = probs.detach().double().cpu()
    conf, pred = probs.max(1)
    correct = (pred == labels.detach().cpu()).double()
    b = (conf * num_bins).ceil().long().clamp(1, num_bins) - 1
    count = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, b, torch.ones_like(conf))
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, b, conf)
    acc_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, b, correct)
    safe = count.clamp_min(1)
    return conf_sum / safe, acc_sum / safe, count


def expected_calibration_error(probs: Tensor, labels: Tensor, num_bins: int = 15) -> Tensor:
    """``ECE = sum_b (n_b / N) |accuracy_b - confidence_b|`` over equal-width confidence bins.

    ``probs`` ``(N, C)`` are predicted class probabilities (softmax of the logits), ``labels``
    ``(N,)`` the true classes; the bins are ``reliability_bins``'. 0 is perfectly calibrated.
    """
    conf, acc, count = reliability_bins(probs, labels, num_bins)
    return (count / count.sum() * (acc - conf).abs()).sum()
