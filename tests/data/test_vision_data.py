"""VisionDataModule on tiny datasets written by the tests in each dataset's own on-disk format.

The files are loaded through torchvision's real readers. Only the MD5 checks against the real
archives are bypassed (CIFAR-10, SVHN, CelebA), as torchvision's own tests do.
"""

from __future__ import annotations

import pickle
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets as tvd

from lightning_ebm.data import VisionDataModule


def _pixels(n: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _write_idx(path, array: np.ndarray) -> None:
    """The idx format of MNIST: magic (0, 0, type 0x08 = uint8, ndim), big-endian dims, raw bytes."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def write_mnist(root, folder: str = "MNIST", n: int = 20) -> np.ndarray:
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    images = _pixels(n, 28, 28)
    for split, m in (("train", n), ("t10k", 6)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[:m])
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(m) % 10)
    return images


def write_cifar10(root, n_per_batch: int = 4) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = _pixels(n_per_batch, 3 * 32 * 32, seed=i)  # rows: R plane, G plane, B plane
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": list(range(n_per_batch)), "batch_label": name}, f)
        batches.append(data)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{k}" for k in range(10)]}, f)
    return np.concatenate(batches[:5]).reshape(-1, 3, 32, 32)


def write_svhn(root, n: int = 12) -> np.ndarray:
    from scipy.io import savemat

    images = _pixels(n, 3, 32, 32)
    for split in ("train", "test"):
        # SVHN's .mat layout: X is (32, 32, 3, N), y is (N, 1) with label 10 for the digit 0
        savemat(
            root / f"{split}_32x32.mat",
            {"X": images.transpose(2, 3, 1, 0), "y": (np.arange(n) % 10 + 1)[:, None]},
        )
    return images


def write_celeba(root, n: int = 6) -> None:
    from PIL import Image

    folder = root / "celeba"
    (folder / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for i, name in enumerate(names):  # flat colours survive JPEG compression
        Image.new("RGB", (178, 218), (40 * i, 255 - 40 * i, 128)).save(folder / "img_align_celeba" / name)
    partition = [0] * (n - 2) + [1, 2]
    (folder / "list_eval_partition.txt").write_text(
        "".join(f"{a} {p}\n" for a, p in zip(names, partition, strict=True))
    )
    (folder / "identity_CelebA.txt").write_text("".join(f"{a} {i}\n" for i, a in enumerate(names)))
    bbox = "image_id x_1 y_1 width height"
    (folder / "list_bbox_celeba.txt").write_text(f"{n}\n{bbox}\n" + "".join(f"{a} 1 2 3 4\n" for a in names))
    marks = " ".join(
        f"{part}_{axis}"
        for part in ("lefteye", "righteye", "nose", "leftmouth", "rightmouth")
        for axis in "xy"
    )
    (folder / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\n{marks}\n" + "".join(f"{a}" + " 1" * 10 + "\n" for a in names)
    )
    attrs = " ".join(f"attr{k}" for k in range(40))
    (folder / "list_attr_celeba.txt").write_text(
        f"{n}\n{attrs}\n" + "".join(f"{a}" + " -1 1" * 20 + "\n" for a in names)
    )


@pytest.fixture
def no_md5(monkeypatch):
    """Accept the test-written files in place of the real archives' MD5 sums."""
    for module in (tvd.cifar, tvd.svhn, tvd.celeba):
        monkeypatch.setattr(module, "check_integrity", lambda *args, **kwargs: True)


def _all(loader) -> torch.Tensor:
    return torch.cat(list(loader))


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_from_idx_files(tmp_path, name, folder):
    images = write_mnist(tmp_path, folder)
    dm = VisionDataModule(name=name, root=str(tmp_path), batch_size=4, val_fraction=0.25)
    assert dm.sample_shape == (1, 28, 28)
    dm.setup("fit")
    train, val = _all(dm.train_dataloader()), _all(dm.val_dataloader())
    assert train.shape == (12, 1, 28, 28) and val.shape == (
        5,
        1,
        28,
        28,
    )  # 15 of 20 train (drop_last), 5 held out
    expected = torch.from_numpy(images).float() / 255 * 2 - 1
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(val[:, 0], expected[perm[:5]])  # the seeded split, scaled to [-1, 1]
    assert _all(dm.test_dataloader()).shape == (6, 1, 28, 28)


def test_cifar10_from_pickled_batches(tmp_path, no_md5):
    images = write_cifar10(tmp_path)
    dm = VisionDataModule(name="cifar10", root=str(tmp_path), batch_size=5, val_fraction=0.2)
    dm.setup("fit")
    val = _all(dm.val_dataloader())
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    expected = torch.from_numpy(images[perm[:4].numpy()]).float() / 255 * 2 - 1
    torch.testing.assert_close(val, expected)
    assert _all(dm.train_dataloader()).shape == (15, 3, 32, 32)
    assert _all(dm.test_dataloader()).shape == (4, 3, 32, 32)


def test_svhn_from_mat_files(tmp_path, no_md5):
    images = write_svhn(tmp_path)
    dm = VisionDataModule(name="svhn", root=str(tmp_path), batch_size=3, val_fraction=0.25)
    assert dm.sample_shape == (3, 32, 32)
    dm.setup("fit")
    val = _all(dm.val_dataloader())
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(val, torch.from_numpy(images[perm[:3].numpy()]).float() / 255 * 2 - 1)
    assert _all(dm.test_dataloader()).shape == (12, 3, 32, 32)


def test_celeba_from_its_folder_layout(tmp_path, no_md5):
    write_celeba(tmp_path)
    dm = VisionDataModule(
        name="celeba", root=str(tmp_path), batch_size=2, val_fraction=0.25, center_crop=140, image_size=32
    )
    assert dm.sample_shape == (3, 32, 32)
    dm.setup("fit")
    val = _all(dm.val_dataloader())
    assert val.shape == (1, 3, 32, 32)  # the 4 images of CelebA's own train partition, one held out
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(0))
    colour = torch.tensor([40.0 * int(perm[0]), 255 - 40.0 * int(perm[0]), 128]) / 255 * 2 - 1
    assert (val[0] - colour[:, None, None]).abs().max() < 0.05  # flat colour, up to JPEG error
    with pytest.raises(ValueError, match="CelebA images are 218x178"):
        VisionDataModule(name="celeba", root=str(tmp_path)).setup()


def test_dequantisation_stays_inside_each_grey_level(tmp_path):
    images = write_mnist(tmp_path)
    dm = VisionDataModule(name="mnist", root=str(tmp_path), batch_size=20, val_fraction=0.05, dequantize=True)
    dm.setup()
    x = _all(dm.train_dataloader())
    levels = (x + 1) / 2 * 256  # (v + u) with u in [0, 1)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    v = torch.from_numpy(images[perm[1:].numpy()]).float()
    matched = v[torch.cdist(levels.flatten(1), v.flatten(1)).argmin(1)]  # shuffled: match by content
    assert len(set(torch.cdist(levels.flatten(1), v.flatten(1)).argmin(1).tolist())) == len(v)
    d = levels[:, 0] - matched
    assert (d > -1e-4).all() and (d < 1 + 1e-4).all() and d.std() > 0.2  # u spread over [0, 1)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist", "MNIST/raw/ holding train-images-idx3-ubyte"),
        ("cifar10", "cifar-10-batches-py/ holding data_batch_1..5"),
        ("svhn", "train_32x32.mat"),
        ("celeba", "celeba/ holding img_align_celeba/"),
    ],
)
def test_missing_data_says_what_to_place_where(tmp_path, name, expected):
    dm = VisionDataModule(name=name, root=str(tmp_path / "nowhere"), image_size=32)
    with pytest.raises(FileNotFoundError, match=expected) as info:
        dm.setup()
    assert "download=True" in str(info.value) and str(tmp_path / "nowhere") in str(info.value)


def test_failed_download_says_what_to_place_where(tmp_path, monkeypatch):
    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(tvd.MNIST, "download", offline)
    dm = VisionDataModule(name="mnist", root=str(tmp_path), download=True)
    with pytest.raises(RuntimeError, match="downloading mnist into root=.* failed .*URLError.*MNIST/raw/"):
        dm.prepare_data()


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown name='imagenet'; choose one of"):
        VisionDataModule(name="imagenet")
    with pytest.raises(ValueError, match="val_fraction must be a finite number with 0.0 < x < 1.0, got 0.0"):
        VisionDataModule(val_fraction=0.0)


@pytest.mark.parametrize("name, value, allowed", [
    ("val_fraction", "0.1", "a finite number with 0.0 < x < 1.0"),
    ("batch_size", True, "a positive integer"),
    ("split_seed", None, "an integer"),
    ("download", "no", "True or False"),  # a truthy string would have downloaded
    ("dequantize", 1, "True or False"),
    ("pin_memory", "yes", "True or False"),
])
def test_every_argument_is_checked_by_name(name, value, allowed):
    with pytest.raises(ValueError, match=f"VisionDataModule: {name} must be {allowed}, got {value!r}"):
        VisionDataModule(**{name: value})
