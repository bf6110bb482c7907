"""Energy networks (the critics): ``nn.Module`` mapping a batch ``(B, *shape)`` to energies ``(B,)``.

Any ``nn.Module`` with that contract works everywhere in the library; the classes here are the
usual choices. Energies must be smooth in their input (the samplers follow their gradient, the
density code their Hessian), hence SiLU rather than ReLU.

Noise-conditioned energies (diffusion recovery likelihood, ``objectives.DiffusionRecoveryLikelihood``
and ``samplers.DiffusionRecovery``) follow a small protocol that user energies can implement too:

* an attribute ``num_levels`` (int ``T``; ``None`` or ``0`` for an unconditional energy), and
* ``forward(x, t=None)``, ``t`` a LongTensor ``(B,)`` of level indices in ``[0, T)`` (or an int for
  the whole batch); ``t=None`` means level 0, the data level, so the rest of the library (the
  density code, validation) sees the data-level energy ``E(x, 0)`` through the plain ``energy(x)``.

The library's energies take ``num_levels=T`` and add a learned embedding of the level to their first
hidden layer; with ``num_levels=None`` (the default) they are today's networks, parameter for parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_bool, check_choice, check_float, check_int, fail
from ._config import RecordInit

__all__ = ["MLPEnergy", "check_energy_output", "energy_levels"]


def energy_levels(energy: nn.Module) -> int | None:
    """The number of noise levels a noise-conditioned energy takes (its ``num_levels``), ``None`` if unconditional."""
    levels = getattr(energy, "num_levels", None)
    if levels is None or levels == 0:
        return None
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 0:
        raise ValueError(f"{type(energy).__name__}.num_levels must be a non-negative integer or None, got {levels!r}")
    return levels


def _level_embedding(owner: str, num_levels: int | None, width: int) -> nn.Embedding | None:
    """The learned per-level offset of the first hidden layer.

    Zeros at start (every level begins as the unconditional network) and drawn from no random
    stream, so a conditioned energy's other parameters equal the unconditional one's for a seed.
    """
    num_levels = check_int(owner, "num_levels", num_levels, minimum=0, allow_none=True)
    if not num_levels:
        return None
    return nn.Embedding(num_levels, width, _weight=torch.zeros(num_levels, width))


def _levels_of(owner: str, emb: nn.Embedding | None, t: Tensor | int | None, x: Tensor) -> Tensor | None:
    """``t`` as a LongTensor ``(B,)`` on ``x``'s device (``None`` -> level 0); refuses ``t`` without levels."""
    if emb is None:
        if t is not None:
            raise ValueError(f"{owner} was built without noise levels (num_levels=None) but got t; "
                             f"set num_levels to condition it on the noise level")
        return None
    if t is None:
        return torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    t = torch.as_tensor(t, device=x.device)
    if t.dtype not in (torch.int64, torch.int32) or t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
        raise ValueError(f"{owner}: t must be an int or an integer tensor of shape ({x.shape[0]},), "
                         f"got {t.dtype} of shape {tuple(t.shape)}")
    return t.long().expand(x.shape[0])


def check_energy_output(energy: Tensor, x: Tensor) -> None:
    """Raise if an energy network returned anything but one scalar per sample, shape ``(B,)``."""
    if energy.shape != (x.shape[0],):
        if energy.shape == (x.shape[0], 1):
            fix = "Squeeze the last dimension of your network (e.g. `return out.squeeze(-1)`)."
        elif energy.ndim == 2 and energy.shape[0] == x.shape[0]:
            fix = (f"A network with {energy.shape[1]} outputs is a classifier: wrap it in "
                   "lightning_ebm.energies.ClassifierEnergy(backbone, num_classes), or give it one output.")
        else:
            fix = "Return one scalar energy per sample."
        raise ValueError(
            f"energy must map a batch of shape (B, *shape) to energies of shape (B,); "
            f"got input {tuple(x.shape)} -> output {tuple(energy.shape)}. {fix}"
        )


class MLPEnergy(RecordInit, nn.Module):
    """Fully connected energy ``E(x) = MLP(flatten(x))`` with SiLU activations.

    Args:
        dim: number of input features (the product of the sample shape).
        hidden: width of each hidden layer.
        num_layers: number of hidden layers.
        spectral_norm: wrap every linear layer in spectral normalisation (bounds the Lipschitz
            constant, which keeps the sampler's gradient field tame).
        num_levels: ``T`` noise levels to condition on (``forward(x, t)``, a learned embedding of
            the level added to the first hidden layer); ``None``/``0``: unconditional.
        num_outputs: outputs of the last layer; ``1`` (default) is the energy ``(B,)``, more make
            the network a backbone ``(B, num_outputs)`` for ``ClassifierEnergy`` (class logits).
    """

    def __init__(self, dim: int, hidden: int = 128, num_layers: int = 3, spectral_norm: bool = False,
                 num_levels: int | None = None, num_outputs: int = 1) -> None:
        super().__init__()
        dim = check_int("MLPEnergy", "dim", dim, minimum=1)
        hidden = check_int("MLPEnergy", "hidden", hidden, minimum=1)
        num_layers = check_int("MLPEnergy", "num_layers", num_layers, minimum=1)
        spectral_norm = check_bool("MLPEnergy", "spectral_norm", spectral_norm)
        self.dim = dim
        widths = [dim] + [hidden] * num_layers
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [_maybe_sn(nn.Linear(w_in, w_out), spectral_norm), nn.SiLU()]
        num_outputs = check_int("MLPEnergy", "num_outputs", num_outputs, minimum=1)
        layers.append(_maybe_sn(nn.Linear(widths[-1], num_outputs), spectral_norm))
        self.net = nn.Sequential(*layers)
        self.level_embedding = _level_embedding("MLPEnergy", num_levels, hidden)
        self.num_levels = num_levels or None

    def forward(self, x: Tensor, t: Tensor | int | None = None) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.dim:
            raise ValueError(f"MLPEnergy(dim={self.dim}) got inputs with {x.shape[1]} features per sample")
        levels = _levels_of("MLPEnergy", self.level_embedding, t, x)
        if levels is None:
            return self.net(x).squeeze(-1)
        h = self.net[0](x) + self.level_embedding(levels)
        return self.net[1:](h).squeeze(-1)


def _maybe_sn(layer: nn.Module, enabled: bool) -> nn.Module:
    return torch.nn.utils.parametrizations.spectral_norm(layer) if enabled else layer


# ---------------------------------------------------------------------------------------- images
__all__ += ["ConvEnergy", "ResNetEnergy"]
_ACTIVATIONS = ("leaky_relu", "silu")


def _activation(owner: str, name: str, negative_slope: float) -> nn.Module:
    check_choice(owner, "activation", name, _ACTIVATIONS)
    negative_slope = check_float(owner, "negative_slope", negative_slope, minimum=0)
    return nn.LeakyReLU(negative_slope) if name == "leaky_relu" else nn.SiLU()


def _image_size(image_size: int | tuple[int, int], owner: str) -> tuple[int, int]:
    allowed = "an integer >= 4 or a pair (H, W) of them"
    is_int = isinstance(image_size, int) and not isinstance(image_size, bool)
    try:
        size = (image_size, image_size) if is_int else tuple(image_size)
    except TypeError:
        raise fail(owner, "image_size", allowed, image_size) from None
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 4 for s in size):
        raise fail(owner, "image_size", allowed, image_size)
    return size  # type: ignore[return-value]


def _check_image_input(owner: str, x: Tensor, channels: int, size: tuple[int, int] | None) -> None:
    if x.ndim != 4 or x.shape[1] != channels or (size is not None and tuple(x.shape[2:]) != size):
        want = f"(B, {channels}, {size[0]}, {size[1]})" if size is not None else f"(B, {channels}, H, W)"
        raise ValueError(f"{owner} expects images of shape {want}, got {tuple(x.shape)}")


class ConvEnergy(RecordInit, nn.Module):
    """The short-run EBM ConvNet (Nijkamp et al., 2019): ``(B, C, H, W) -> (B,)``.

    A 3x3 convolution to ``width`` channels, then 4x4 stride-2 convolutions with widths
    ``2n, 4n, 8n`` (then ``8n`` again) while the feature map is at least 8 pixels on a side,
    each followed by LeakyReLU(0.2), and a final convolution whose kernel covers the remaining
    map (4x4 for power-of-two sizes, as in the paper; 7x7 for 28x28) to one scalar.

    Args:
        in_channels: image channels (1 for digits and MNIST, 3 for CIFAR-10, SVHN, CelebA).
        width: ``n``, the channels of the first convolution.
        image_size: side of the (square) images, or ``(H, W)``.
        spectral_norm: spectral normalisation on every convolution.
        activation: ``"leaky_relu"`` (the paper's) or ``"silu"``. A piecewise-linear network has
            zero input Hessian almost everywhere, so pick ``"silu"`` when the generator's
            density (``lightning_ebm.density``) matters.
        negative_slope: the LeakyReLU slope.
        num_levels: ``T`` noise levels to condition on (``forward(x, t)``, a learned per-level
            offset of the first convolution's channels); ``None``/``0``: unconditional.
        num_outputs: output channels of the last convolution; ``1`` (default) is the energy
            ``(B,)``, more make it a backbone ``(B, num_outputs)`` for ``ClassifierEnergy``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 64,
        image_size: int | tuple[int, int] = 32,
        spectral_norm: bool = False,
        activation: str = "leaky_relu",
        negative_slope: float = 0.2,
        num_levels: int | None = None,
        num_outputs: int = 1,
    ) -> None:
        super().__init__()
        in_channels = check_int("ConvEnergy", "in_channels", in_channels, minimum=1)
        width = check_int("ConvEnergy", "width", width, minimum=1)
        spectral_norm = check_bool("ConvEnergy", "spectral_norm", spectral_norm)
        self.in_channels, self.image_size = in_channels, _image_size(image_size, "ConvEnergy")
        _activation("ConvEnergy", activation, negative_slope)  # check before building
        act = lambda: _activation("ConvEnergy", activation, negative_slope)  # noqa: E731
        layers: list[nn.Module] = [_maybe_sn(nn.Conv2d(in_channels, width, 3, 1, 1), spectral_norm), act()]
        (h, w), channels, i = self.image_size, width, 0
        while min(h, w) >= 8:
            out = width * 2 ** min(i + 1, 3)
            layers += [_maybe_sn(nn.Conv2d(channels, out, 4, 2, 1), spectral_norm), act()]
            h, w, channels, i = h // 2, w // 2, out, i + 1
        num_outputs = check_int("ConvEnergy", "num_outputs", num_outputs, minimum=1)
        layers.append(_maybe_sn(nn.Conv2d(channels, num_outputs, (h, w), 1, 0), spectral_norm))
        self.net = nn.Sequential(*layers)
        self.level_embedding = _level_embedding("ConvEnergy", num_levels, width)
        self.num_levels = num_levels or None

    def forward(self, x: Tensor, t: Tensor | int | None = None) -> Tensor:
        _check_image_input("ConvEnergy", x, self.in_channels, self.image_size)
        levels = _levels_of("ConvEnergy", self.level_embedding, t, x)
        if levels is None:
            return self.net(x).flatten(1).squeeze(1)
        h = self.net[0](x) + self.level_embedding(levels)[:, :, None, None]
        return self.net[1:](h).flatten(1).squeeze(1)


class _ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, spectral_norm: bool, act: nn.Module) -> None:
        super().__init__()
        self.conv1 = _maybe_sn(nn.Conv2d(c_in, c_out, 3, 1, 1), spectral_norm)
        self.conv2 = _maybe_sn(nn.Conv2d(c_out, c_out, 3, 1, 1), spectral_norm)
        self.skip = _maybe_sn(nn.Conv2d(c_in, c_out, 1), spectral_norm) if c_in != c_out else nn.Identity()
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        out = self.skip(x) + self.conv2(self.act(self.conv1(self.act(x))))
        return nn.functional.avg_pool2d(out, 2) if min(out.shape[-2:]) >= 8 else out


class ResNetEnergy(RecordInit, nn.Module):
    """A small residual energy in the style of IGEBM (Du & Mordatch, 2019): ``(B, C, H, W) -> (B,)``.

    A 3x3 convolution to ``width`` channels, ``num_blocks`` residual blocks (two 3x3
    convolutions and a skip connection each; channels double, up to ``8 * width``, and the map is
    average-pooled by 2 while it is at least 8 pixels on a side), then the activation, a global
    sum over positions and a linear layer to one scalar. Smooth (SiLU, the IGEBM "swish") by
    default; spectral normalisation on every layer by default, as in IGEBM.

    Args:
        in_channels: image channels.
        width: channels after the first convolution.
        num_blocks: residual blocks.
        spectral_norm: spectral normalisation on every convolution and the final linear layer.
        activation: ``"silu"`` or ``"leaky_relu"``.
        negative_slope: the LeakyReLU slope.
        num_levels: ``T`` noise levels to condition on (``forward(x, t)``, a learned per-level
            offset of the first convolution's channels); ``None``/``0``: unconditional.
        num_outputs: outputs of the final linear layer; ``1`` (default) is the energy ``(B,)``,
            more make it a backbone ``(B, num_outputs)`` for ``ClassifierEnergy``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 64,
        num_blocks: int = 3,
        spectral_norm: bool = True,
        activation: str = "silu",
        negative_slope: float = 0.2,
        num_levels: int | None = None,
        num_outputs: int = 1,
    ) -> None:
        super().__init__()
        in_channels = check_int("ResNetEnergy", "in_channels", in_channels, minimum=1)
        width = check_int("ResNetEnergy", "width", width, minimum=1)
        num_blocks = check_int("ResNetEnergy", "num_blocks", num_blocks, minimum=1)
        spectral_norm = check_bool("ResNetEnergy", "spectral_norm", spectral_norm)
        self.in_channels = in_channels
        self.act = _activation("ResNetEnergy", activation, negative_slope)
        self.conv_in = _maybe_sn(nn.Conv2d(in_channels, width, 3, 1, 1), spectral_norm)
        channels = [width * 2 ** min(i, 3) for i in range(num_blocks + 1)]
        self.blocks = nn.ModuleList(
            _ResBlock(c_in, c_out, spectral_norm, self.act)
            for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
        )
        num_outputs = check_int("ResNetEnergy", "num_outputs", num_outputs, minimum=1)
        self.head = _maybe_sn(nn.Linear(channels[-1], num_outputs), spectral_norm)
        self.level_embedding = _level_embedding("ResNetEnergy", num_levels, width)
        self.num_levels = num_levels or None

    def forward(self, x: Tensor, t: Tensor | int | None = None) -> Tensor:
        _check_image_input("ResNetEnergy", x, self.in_channels, None)
        h = self.conv_in(x)
        levels = _levels_of("ResNetEnergy", self.level_embedding, t, x)
        if levels is not None:
            h = h + self.level_embedding(levels)[:, :, None, None]
        for block in self.blocks:
            h = block(h)
        return self.head(self.act(h).sum(dim=(2, 3))).squeeze(-1)


# ---------------------------------------------------------------------------------------- classes
__all__ += ["ClassifierEnergy", "ConditionedEnergy", "energy_classes", "check_labels"]


def energy_classes(energy: nn.Module) -> int | None:
    """The number of classes a class-conditional energy takes (its ``num_classes``), ``None`` if it has none."""
    classes = getattr(energy, "num_classes", None)
    if classes is None or classes == 0:
        return None
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 0:
        raise ValueError(f"{type(energy).__name__}.num_classes must be a positive integer or None, got {classes!r}")
    return classes


def check_labels(owner: str, y: Tensor, num_classes: int, n: int | None = None, name: str = "y",
                 whose: str = "the energy") -> Tensor:
    """``y`` as a LongTensor ``(n,)`` of classes in ``[0, num_classes)``; a clear error otherwise (one sync).

    ``whose``: what ``num_classes`` belongs to, for the message."""
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or y.ndim != 1 \
            or (n is not None and y.shape[0] != n):
        shape = f"({n},)" if n is not None else "(B,)"
        got = f"{y.dtype} of shape {tuple(y.shape)}" if isinstance(y, Tensor) else f"a {type(y).__name__}"
        raise ValueError(f"{owner}: {name} must be an integer tensor of shape {shape} holding classes, got {got}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{owner}: {name} holds labels in [{int(y.min())}, {int(y.max())}], but {whose} has "
                         f"num_classes={num_classes}: labels must be in [0, {num_classes - 1}]")
    return y.long()


class ClassifierEnergy(RecordInit, nn.Module):
    """A classifier read as an energy (JEM, Grathwohl et al. 2020): ``E(x, y) = -f(x)[y]``,
    ``E(x) = -logsumexp_y f(x)[y]``.

    ``f`` is the ``backbone`` (``(B, *shape) -> (B, num_classes)`` logits), or the backbone's
    features ``(B, feature_dim)`` followed by a linear head when ``feature_dim`` is given. Any
    module works: the library energies with ``num_outputs=num_classes`` (``MLPEnergy``,
    ``ConvEnergy``, ``ResNetEnergy``), a user's classifier, or a feature network.

    It implements the class-conditional energy protocol, which a user's energy can implement too:

    * an attribute ``num_classes`` (int ``C``; ``None`` for an unconditional energy), and
    * ``forward(x, y=None)``: ``y`` a LongTensor ``(B,)`` of classes in ``[0, C)`` gives
      ``E(x, y)``; ``y=None`` gives the marginal energy ``E(x)``, so the rest of the library (the
      samplers, the density code, validation) sees ``E(x)`` through the plain ``energy(x)``;
    * optionally ``logits(x)`` ``(B, C)``, with ``E(x, y) = -logits(x)[y]`` (classification).

    ``p(y | x) = softmax(f(x))`` is the classifier; ``exp(-E(x)) / Z`` the density of ``x``.

    Args:
        backbone: the network giving logits (or features, with ``feature_dim``).
        num_classes: ``C``.
        feature_dim: the backbone's feature width; adds a ``Linear(feature_dim, num_classes)`` head.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, feature_dim: int | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, nn.Module):
            raise fail("ClassifierEnergy", "backbone", "an nn.Module mapping (B, *shape) to logits (B, C)", backbone)
        self.num_classes = check_int("ClassifierEnergy", "num_classes", num_classes, minimum=1)
        feature_dim = check_int("ClassifierEnergy", "feature_dim", feature_dim, minimum=1, allow_none=True)
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes) if feature_dim is not None else None

    def logits(self, x: Tensor) -> Tensor:
        """Class logits ``f(x)``, ``(B, num_classes)``."""
        f = self.backbone(x)
        if self.head is not None:
            f = self.head(f)
        if f.shape != (x.shape[0], self.num_classes):
            raise ValueError(f"ClassifierEnergy(num_classes={self.num_classes}): the backbone "
                             f"{type(self.backbone).__name__} maps {tuple(x.shape)} to {tuple(f.shape)}, expected "
                             f"({x.shape[0]}, {self.num_classes}) (give a library energy "
                             f"num_outputs={self.num_classes}, or feature_dim for a feature network)")
        return f

    def forward(self, x: Tensor, y: Tensor | int | None = None) -> Tensor:
        f = self.logits(x)
        if y is None:
            return -torch.logsumexp(f, dim=1)
        if isinstance(y, int) and not isinstance(y, bool):
            y = torch.full((x.shape[0],), y, dtype=torch.long, device=x.device)
        if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
            raise ValueError(f"ClassifierEnergy: y must be an int or an integer tensor of shape ({x.shape[0]},), "
                             f"got {getattr(y, 'dtype', type(y).__name__)} of shape {tuple(getattr(y, 'shape', ()))}")
        return -f.gather(1, y.long().view(-1, 1).to(f.device)).squeeze(1)


class ConditionedEnergy(nn.Module):
    """``x -> energy(x, y=y)`` with the classes ``y`` bound: a class-conditional energy seen as a plain one.

    Every sampler, backend and density rule takes it unchanged, so conditional sampling follows
    ``-grad_x E(x, y)`` with no change to the sampler contract. ``y`` is a LongTensor ``(B,)``
    matching the batch the sampler runs (or an int for all of it).
    """

    def __init__(self, energy: nn.Module, y: Tensor | int) -> None:
        super().__init__()
        classes = energy_classes(energy)
        if classes is None:
            raise ValueError(f"conditional sampling needs a class-conditional energy (an attribute num_classes and "
                             f"forward(x, y)), but {type(energy).__name__} has no num_classes; wrap your network in "
                             "lightning_ebm.energies.ClassifierEnergy")
        self.energy = energy
        self.num_classes = None  # it is the conditional energy of given classes: a plain energy now
        self.y = y

    def forward(self, x: Tensor) -> Tensor:
        y = self.y
        if isinstance(y, Tensor) and y.shape != (x.shape[0],):
            raise ValueError(f"ConditionedEnergy: {y.shape[0] if y.ndim else 0} labels bound but a batch of "
                             f"{x.shape[0]} points given")
        return self.energy(x, y=y)
