"""Train the digits feature network and write ``lightning_ebm/assets/digits_features.pt``.

A small ConvNet classifier (``lightning_ebm.metrics._DigitsNet``) trained on the training part
of the default digits split only (``lightning_ebm.data.digits_split()``), with random one-pixel
shifts as augmentation. Its 64-d penultimate layer gives the "digits FID" features. CPU, about
half a minute; prints the held-out accuracy:

    python scripts/train_digits_features.py
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from lightning_ebm.data.digits import digits_split, digits_to_images, load_digits
from lightning_ebm.metrics import _DigitsNet

OUT = Path(__file__).resolve().parents[1] / "lightning_ebm" / "assets" / "digits_features.pt"


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction (background -1 comes in)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2, x.shape[0], 1), generator=g)
    rows, cols = (torch.arange(8) + dy)[:, :, None], (torch.arange(8) + dx)[:, None, :]
    return padded[torch.arange(x.shape[0])[:, None, None], 0, rows, cols].unsqueeze(1)


def main(epochs: int = 60, batch_size: int = 64, seed: int = 0) -> None:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    pixels, labels = load_digits()
    train, val = digits_split()
    x_train, y_train = digits_to_images(pixels[train]), labels[train]
    x_val, y_val = digits_to_images(pixels[val]), labels[val]
    net = _DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(x_train), generator=g)
        for idx in perm.split(batch_size):
            loss = F.cross_entropy(net(shift(x_train[idx], g)), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if (epoch + 1) % 10 == 0:
            net.eval()
            with torch.no_grad():
                acc = (net(x_val).argmax(1) == y_val).float().mean().item()
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy {acc:.4f} "
                  f"({len(val)} images)")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
