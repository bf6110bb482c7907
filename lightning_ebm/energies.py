"""Energy networks (the critics): ``nn.Module`` mapping a batch ``(B, *shape)`` to energies ``(B,)``.

Any ``nn.Module`` with that contract works everywhere in the library; the classes here are the
usual choices. Energies must be smooth in their input (the samplers follow their gradient, the
density code their Hessian), hence SiLU rather than ReLU.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MLPEnergy", "check_energy_output"]


def check_energy_output(energy: Tensor, x: Tensor) -> None:
    """Raise if an energy network returned anything but one scalar per sample, shape ``(B,)``."""
    if energy.shape != (x.shape[0],):
        raise ValueError(
            f"energy must map a batch of shape (B, *shape) to energies of shape (B,); "
            f"got input {tuple(x.shape)} -> output {tuple(energy.shape)}. "
            f"Squeeze the last dimension of your network (e.g. `return out.squeeze(-1)`)."
        )


class MLPEnergy(nn.Module):
    """Fully connected energy ``E(x) = MLP(flatten(x))`` with SiLU activations.

    Args:
        dim: number of input features (the product of the sample shape).
        hidden: width of each hidden layer.
        num_layers: number of hidden layers.
        spectral_norm: wrap every linear layer in spectral normalisation (bounds the Lipschitz
            constant, which keeps the sampler's gradient field tame).
    """

    def __init__(self, dim: int, hidden: int = 128, num_layers: int = 3, spectral_norm: bool = False) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("num_layers", num_layers)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MLPEnergy: {name} must be a positive integer, got {value!r}")
        self.dim = dim
        widths = [dim] + [hidden] * num_layers
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [_maybe_sn(nn.Linear(w_in, w_out), spectral_norm), nn.SiLU()]
        layers.append(_maybe_sn(nn.Linear(widths[-1], 1), spectral_norm))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.dim:
            raise ValueError(f"MLPEnergy(dim={self.dim}) got inputs with {x.shape[1]} features per sample")
        return self.net(x).squeeze(-1)


def _maybe_sn(layer: nn.Module, enabled: bool) -> nn.Module:
    return torch.nn.utils.parametrizations.spectral_norm(layer) if enabled else layer
