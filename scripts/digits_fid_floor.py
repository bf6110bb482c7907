"""The digits FID between real digits: the floor a generator's digits FID is compared with.

FID (shipped digits features) between ``--num`` distinct training digits (a seeded draw from the
training part of the default split) and the 359 held-out digits, i.e. what FIDCallback reports for a
generator that produced real training images. Also prints the value for uniform noise.

    python scripts/digits_fid_floor.py --num 1000
"""

from __future__ import annotations

import argparse

import torch

from lightning_ebm.callbacks.fid import fid_score
from lightning_ebm.data import DigitsDataModule
from lightning_ebm.data.digits import digits_to_images
from lightning_ebm.metrics import DigitsFeatures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000, help="training digits (FIDCallback's num_samples)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dm = DigitsDataModule()
    dm.setup()
    train = digits_to_images(dm.train_pixels)
    g = torch.Generator().manual_seed(args.seed)
    if not 2 <= args.num <= len(train):
        parser.error(f"--num must be in 2..{len(train)}, got {args.num}")
    draw = train[torch.randperm(len(train), generator=g)[: args.num]]  # distinct real digits
    noise = torch.rand(args.num, 1, 8, 8, generator=g) * 2 - 1
    feature = DigitsFeatures()
    print(f"digits FID, {args.num} training digits vs {len(dm.val_data)} held-out: "
          f"{fid_score(dm.val_data, draw, feature):.2f}")
    print(f"digits FID, {args.num} uniform-noise images vs held-out: "
          f"{fid_score(dm.val_data, noise, feature):.2f}")


if __name__ == "__main__":
    main()
