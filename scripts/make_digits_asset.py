"""Write ``lightning_ebm/assets/digits.npz``: the 8x8 handwritten digits, embedded in the package.

The pixels are scikit-learn's bundled copy of the test set of the UCI "Optical Recognition of
Handwritten Digits" data (E. Alpaydin, C. Kaynak, 1998; licence CC BY 4.0): 1,797 images of
8x8 integer pixels in 0..16, with labels 0..9. scikit-learn is needed only to run this script,
never at run time:

    pip install scikit-learn && python scripts/make_digits_asset.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

OUT = Path(__file__).resolve().parents[1] / "lightning_ebm" / "assets" / "digits.npz"


def main() -> None:
    digits = load_digits()
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    assert images.shape == (1797, 8, 8) and images.max() == 16 and (digits.images == images).all()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, images=images, labels=labels)
    print(f"wrote {images.shape[0]} images to {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
