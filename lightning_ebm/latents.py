"""Latents ``p0``: where the generator's dynamics start.

``Uniform`` and ``Gaussian`` have a density (``log_prob``), so a deterministic sampler started
from them defines a generator whose density can be computed (see ``lightning_ebm.density``).
``PersistentLatent`` is the interface of latents that keep chains across training steps: they
draw starting points with slot indices and take the end points back, and own how their chains
travel in a checkpoint (per rank under DDP). ``ReplayBuffer`` implements it: it has no density,
and its contents are training state that travels in the module's ``state_dict``.

Every latent draws through an optional ``torch.Generator`` so the module can own the random
stream (one per rank, saved in checkpoints).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_float, check_int, check_shape, check_type, fail
from ._config import RecordInit
from .energies import check_labels

__all__ = ["Latent", "PersistentLatent", "Uniform", "Gaussian", "Upsampled", "ReplayBuffer"]


class Latent(RecordInit, nn.Module):
    """Base class of latents: ``sample(n)`` draws ``(n, *shape)``; ``log_prob(z)`` gives ``(n,)``."""

    shape: tuple[int, ...]
    #: whether ``log_prob`` is defined (needed for the generator's density)
    has_density: bool = True

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def log_prob(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _check_n(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise fail(f"{type(self).__name__}.sample", "n (the number of samples)", "a positive integer", n)

    def _check_z(self, z: Tensor) -> None:
        if tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"{type(self).__name__}(shape={self.shape}) got z of shape {tuple(z.shape)}")


class Uniform(Latent):
    """Independent uniform noise on ``[low, high]`` in every coordinate (short-run EBMs' usual start)."""

    def __init__(self, shape: Sequence[int], low: float = -1.0, high: float = 1.0) -> None:
        super().__init__()
        self.shape = check_shape("Uniform", "shape", shape)
        low, high = check_float("Uniform", "low", low), check_float("Uniform", "high", high)
        if not low < high:
            raise fail("Uniform", "(low, high)", "finite numbers with low < high", (low, high))
        self.low, self.high = low, high

    def sample(self, n, *, generator=None, device=None, dtype=None) -> Tensor:
        self._check_n(n)
        u = torch.rand((n, *self.shape), generator=generator, device=device, dtype=dtype)
        return self.low + (self.high - self.low) * u

    def log_prob(self, z: Tensor) -> Tensor:
        self._check_z(z)
        flat = z.flatten(1)
        inside = ((flat >= self.low) & (flat <= self.high)).all(dim=1)
        value = -flat.shape[1] * math.log(self.high - self.low)
        return torch.where(inside, torch.full_like(flat[:, 0], value), torch.full_like(flat[:, 0], -math.inf))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, low={self.low}, high={self.high}"


class Gaussian(Latent):
    """Independent Gaussian noise ``N(mean, std^2)`` in every coordinate."""

    def __init__(self, shape: Sequence[int], mean: float = 0.0, std: float = 1.0) -> None:
        super().__init__()
        self.shape = check_shape("Gaussian", "shape", shape)
        self.mean = check_float("Gaussian", "mean", mean)
        self.std = check_float("Gaussian", "std", std, minimum=0, strict=True)

    def sample(self, n, *, generator=None, device=None, dtype=None) -> Tensor:
        self._check_n(n)
        eps = torch.randn((n, *self.shape), generator=generator, device=device, dtype=dtype)
        return self.mean + self.std * eps

    def log_prob(self, z: Tensor) -> Tensor:
        self._check_z(z)
        flat = (z.flatten(1) - self.mean) / self.std
        d = flat.shape[1]
        return -0.5 * flat.pow(2).sum(1) - d * (math.log(self.std) + 0.5 * math.log(2 * math.pi))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, mean={self.mean}, std={self.std}"


class Upsampled(Latent):
    """Coarse noise made smooth: draws from ``latent`` at a low resolution and resizes it to ``size``.

    Images are smooth at the scale of their pixels; pixel-wise noise is not, and a short run of
    gradient descent from it spends its steps removing hundreds of dimensions of high-frequency
    noise before it can draw a shape. ``Upsampled(Uniform([1, 7, 7]), size=[28, 28])`` starts
    every chain as 7x7 uniform noise interpolated to 28x28 (``mode`` as ``F.interpolate``; the
    default, ``bilinear``, keeps the values inside the coarse noise's range). The upsampled
    noise lies on a low-dimensional subspace of the image space, so it has no density there
    (``log_prob`` raises); it wraps any non-persistent latent whose shape is ``(C, h, w)``, and a
    ``ReplayBuffer`` can wrap it in turn.
    """

    has_density = False

    def __init__(self, latent: Latent, size: Sequence[int], mode: str = "bilinear") -> None:
        super().__init__()
        check_type("Upsampled", "latent", latent, Latent, "a Uniform, Gaussian or other non-buffer Latent")
        if isinstance(latent, PersistentLatent) or len(latent.shape) != 3:
            raise fail("Upsampled", "latent", "a non-buffer Latent of shape (channels, height, width)", latent)
        size = check_shape("Upsampled", "size", size)
        if len(size) != 2:
            raise fail("Upsampled", "size", "(height, width) of the images, two positive integers", size)
        self.mode = check_choice("Upsampled", "mode", mode, ("nearest", "bilinear", "bicubic", "area"))
        self.latent, self.size = latent, size
        self.shape = (latent.shape[0], *size)

    def sample(self, n, *, generator=None, device=None, dtype=None) -> Tensor:
        self._check_n(n)
        coarse = self.latent.sample(n, generator=generator, device=device, dtype=dtype)
        corners = {} if self.mode in ("nearest", "area") else {"align_corners": False}
        return torch.nn.functional.interpolate(coarse, size=self.size, mode=self.mode, **corners)

    def log_prob(self, z: Tensor) -> Tensor:
        raise ValueError(
            "Upsampled has no density on the image space (its noise lies on a low-dimensional subspace); "
            "use Uniform or Gaussian at full resolution for the generator's density")

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}"


class PersistentLatent(Latent):
    """A latent that keeps chains across training steps (persistent contrastive divergence).

    Training draws starting points with ``draw`` and gives the chains' end points back with
    ``push``; evaluation uses ``sample``, which never writes. The chains are training state: each
    rank owns its own, and the latent says how they travel in a checkpoint (``rank_state``,
    ``extra_state_for``) and how it is stripped of them for the pickled hyper-parameters
    (``without_chains``). ``lightning_ebm._state`` uses only these methods, never a concrete class.
    """

    has_density = False

    @property
    def base(self) -> Latent:
        """The fresh-noise latent the chains start from (used for the dry run before training)."""
        raise NotImplementedError

    def draw(self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None,
             dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Starting points ``(n, *shape)`` and the slots to ``push`` their end points back to."""
        raise NotImplementedError

    def push(self, x: Tensor, slots: Tensor) -> None:
        """Take the chains' end points ``x`` back into ``slots`` (from ``draw``)."""
        raise NotImplementedError

    def prepare(self, batch_size: int | None) -> None:
        """Before training: fail early if ``batch_size`` chains per step cannot be drawn, and own the
        chains (a ddp_spawn worker receives the parent's tensor in shared memory)."""
        raise NotImplementedError

    def rank_state(self) -> Tensor | None:
        """This rank's chains as one tensor (gathered over ranks into a checkpoint), ``None`` if unfilled."""
        raise NotImplementedError

    def extra_state_for(self, chains: Tensor) -> Any:
        """The ``_extra_state`` entry of ``state_dict`` that restores ``chains`` (from ``rank_state``)."""
        raise NotImplementedError

    def without_chains(self) -> PersistentLatent:
        """A shallow copy holding no chains, to pickle with the hyper-parameters (the chains travel in
        ``state_dict``, not twice)."""
        raise NotImplementedError


class ReplayBuffer(PersistentLatent):
    """Persistent chains: start the dynamics from earlier end points instead of fresh noise.

    ``draw(n)`` picks ``n`` random slots, re-initialises each with probability ``reinit_prob``
    from the wrapped ``latent``, and returns the starting points with their slot indices; the
    module calls ``push(x_K, indices)`` after the dynamics to write the end points back. The
    buffer is filled from ``latent`` on first use. Its contents are saved through
    ``get_extra_state`` (not a registered buffer, so DDP's buffer broadcast never overwrites one
    rank's chains with another's).

    A replay buffer has no density: the generator's distribution depends on the whole training
    history, so ``log_prob`` raises.

    With ``num_classes = C`` the buffer keeps chains per class (as JEM does): slot block ``c``
    (``capacity // C`` slots) holds the chains of class ``c``. ``draw(n, y=y)`` and
    ``sample(n, y=y)`` start each chain from a slot of its own class ``y[i]``; without ``y`` they
    use the whole buffer (the unconditional chains of ``E(x)``).
    """

    def __init__(self, latent: Latent, capacity: int = 10000, reinit_prob: float = 0.05,
                 num_classes: int | None = None) -> None:
        super().__init__()
        check_type("ReplayBuffer", "latent", latent, Latent, "a Uniform, Gaussian or other non-buffer Latent")
        if isinstance(latent, PersistentLatent):
            raise fail("ReplayBuffer", "latent", "a Uniform, Gaussian or other non-buffer Latent", latent)
        self.latent = latent
        self.shape = latent.shape
        self.capacity = check_int("ReplayBuffer", "capacity", capacity, minimum=1)
        self.reinit_prob = check_float("ReplayBuffer", "reinit_prob", reinit_prob, minimum=0.0, maximum=1.0)
        self.num_classes = check_int("ReplayBuffer", "num_classes", num_classes, minimum=1, allow_none=True)
        if self.num_classes is not None and self.capacity < self.num_classes:
            raise ValueError(f"ReplayBuffer: capacity={self.capacity} gives no slot to some of the "
                             f"num_classes={self.num_classes} classes; use capacity >= {self.num_classes}")
        self.buffer: Tensor | None = None

    # ------------------------------------------------------------------ PersistentLatent
    @property
    def base(self) -> Latent:
        return self.latent

    def prepare(self, batch_size: int | None) -> None:
        if isinstance(batch_size, int):
            self.check_batch_size(batch_size)
        if self.buffer is not None:
            self.buffer = self.buffer.clone()

    def rank_state(self) -> Tensor | None:
        return self.buffer

    def extra_state_for(self, chains: Tensor) -> Any:
        return {"buffer": chains}

    def without_chains(self) -> ReplayBuffer:
        stripped = copy.copy(self)
        stripped.buffer = None
        return stripped

    def check_batch_size(self, batch_size: int) -> None:
        """Fail early when a training batch would not fit in the buffer."""
        if batch_size > self.capacity:
            raise ValueError(
                f"ReplayBuffer: capacity={self.capacity} is smaller than the number of chains drawn per "
                f"step ({batch_size}); use capacity >= {batch_size}"
            )

    def _ensure_buffer(self, generator, device, dtype) -> Tensor:
        if self.buffer is None:
            self.buffer = self.latent.sample(self.capacity, generator=generator, device=device, dtype=dtype)
        elif device is not None and self.buffer.device != torch.device(device):
            self.buffer = self.buffer.to(device)
        return self.buffer

    def _class_slots(self, n: int, y: Tensor, generator, device) -> Tensor:
        """A random slot of class ``y[i]``'s block for each of the ``n`` chains."""
        if self.num_classes is None:
            raise ValueError("ReplayBuffer: conditional draws (y=...) need a buffer with chains per class; build it "
                             "with num_classes=C")
        y = check_labels("ReplayBuffer", y, self.num_classes, n, whose="the buffer").to(device)
        per_class = self.capacity // self.num_classes
        offset = torch.randint(0, per_class, (n,), generator=generator, device=device)
        return y * per_class + offset

    def draw(self, n: int, *, generator=None, device=None, dtype=None,
             y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Starting points ``(n, *shape)`` from ``n`` distinct slots (of classes ``y`` when given: see the
        class docstring), and the slot indices to ``push`` to."""
        self._check_n(n)
        self.check_batch_size(n)
        buf = self._ensure_buffer(generator, device, dtype)
        if y is not None:
            idx = self._class_slots(n, y, generator, buf.device)
        else:
            idx = torch.randperm(self.capacity, generator=generator, device=buf.device)[:n]
        return self._start_from(idx, generator, dtype), idx

    def sample(self, n, *, generator=None, device=None, dtype=None, y: Tensor | None = None) -> Tensor:
        """``n`` starting points from random slots (with replacement, so any ``n``), for evaluation;
        from slots of the classes ``y`` ``(n,)`` when given (a buffer with ``num_classes``).

        Training uses ``draw``/``push``; ``sample`` never writes to the buffer. Before the first
        training step the buffer is empty and the points come straight from the wrapped latent
        (what the buffer would have been filled with), so evaluating an untrained model does not
        fix the buffer's contents or its device and dtype.
        """
        self._check_n(n)
        if y is not None and self.num_classes is None:
            self._class_slots(n, y, generator, device)  # raises: no chains per class
        if self.buffer is None:
            return self.latent.sample(n, generator=generator, device=device, dtype=dtype)
        buf = self._ensure_buffer(generator, device, dtype)
        if y is not None:
            idx = self._class_slots(n, y, generator, buf.device)
        else:
            idx = torch.randint(0, self.capacity, (n,), generator=generator, device=buf.device)
        return self._start_from(idx, generator, dtype)

    def _start_from(self, idx: Tensor, generator, dtype) -> Tensor:
        buf = self.buffer
        n = idx.shape[0]
        z = buf[idx].clone()
        fresh = self.latent.sample(n, generator=generator, device=buf.device, dtype=buf.dtype)
        reinit = torch.rand(n, generator=generator, device=buf.device) < self.reinit_prob
        z = torch.where(reinit.view(-1, *[1] * len(self.shape)), fresh, z)
        return z.to(dtype if dtype is not None else buf.dtype)

    @torch.no_grad()
    def push(self, x: Tensor, indices: Tensor) -> None:
        """Write chain end points ``x`` back to the slots they were drawn from."""
        if self.buffer is None:
            raise RuntimeError("ReplayBuffer.push called before draw")
        self.buffer[indices.to(self.buffer.device)] = x.detach().to(self.buffer.device, self.buffer.dtype)

    def log_prob(self, z: Tensor) -> Tensor:
        raise ValueError(
            "ReplayBuffer has no density: its chains start from earlier end points, so their "
            "distribution depends on the whole training history. Use a Uniform or Gaussian latent "
            "to compute the generator's density."
        )

    # the contents are training state: they travel in state_dict, not as a registered buffer
    def get_extra_state(self) -> Any:
        return {"buffer": None if self.buffer is None else self.buffer.detach().clone()}

    def set_extra_state(self, state: Any) -> None:
        buf = state.get("buffer") if isinstance(state, dict) else None
        if buf is not None and tuple(buf.shape) != (self.capacity, *self.shape):
            raise ValueError(
                f"ReplayBuffer: checkpoint holds a buffer of shape {tuple(buf.shape)}, expected "
                f"{(self.capacity, *self.shape)} (capacity, *shape)"
            )
        self.buffer = None if buf is None else buf.clone()

    def _apply(self, fn, recurse: bool = True):
        # follow .to(device)/.double() like a registered buffer would
        if self.buffer is not None:
            self.buffer = fn(self.buffer)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        classes = "" if self.num_classes is None else f", num_classes={self.num_classes}"
        return f"capacity={self.capacity}, reinit_prob={self.reinit_prob}{classes}"
