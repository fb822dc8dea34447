"""Fashion-MNIST as FeatureStores for the real-data benchmark (``benchmarks/real.py``).

The images come from the Debian package ``dataset-fashion-mnist`` (the four IDX files under
``/usr/share/datasets/fashion-mnist``), read with ``gzip`` + ``numpy``; nothing downloads.

Stores (each built once into a cache folder, atomically: written under a temporary name in the
same folder, then renamed):

- ``halves``: modalities ``left`` and ``right``, the two 28 x 14 halves of an image; a token is
  one pixel column (14 tokens of 28 pixels). Splits ``train_left`` (left half only),
  ``train_right`` (right half only), ``val`` and ``test`` (both halves).
- ``quadrants``: modalities ``tl``, ``tr``, ``bl``, ``br``, the four 14 x 14 quadrants, a token
  one column of a quadrant (14 tokens of 14 pixels). Two + two training splits along the
  diagonals, ``train_diag`` (tl, br) and ``train_anti`` (tr, bl), the robot task's shape;
  ``val`` and ``test`` hold all four.
- ``whole``: one modality ``image`` (28 column tokens of 28 pixels), every training image
  complete: the ceiling (a model that sees whole images), same images as ``halves``.

Pixels are scaled to ``[0, 1]`` and standardised with the mean and standard deviation of the
training pool (one scalar each). The 60,000 training images are shuffled once (``seed``) and
cut into disjoint pools: two training splits of ``num_train`` images each, then ``num_val``
validation images; test is the first ``num_test`` images of the official 10,000-image test set.
"""

from __future__ import annotations

import gzip
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"
#: Exit status of the benchmark when the data is missing (CI treats it as a skip; automake's).
SKIP_STATUS = 77
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
STORES = ("halves", "quadrants", "whole")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DataMissing(FileNotFoundError):
    """The Fashion-MNIST files are not there (the message says how to install them)."""


def missing_files(data_dir: Path = DATA_DIR) -> list[Path]:
    return [data_dir / f for pair in FILES.values() for f in pair if not (data_dir / f).is_file()]


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    header = np.frombuffer(raw, dtype=">i4", count=1 + dims)
    if int(header[0]) != magic:
        raise ValueError(f"{path}: expected IDX magic number {magic}, got {int(header[0])}")
    shape = tuple(int(s) for s in header[1:])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + dims))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, got {data.size}")
    return data.reshape(shape)


def load(split: str, data_dir: Path = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) int64)`` of ``"train"`` or ``"test"``."""
    missing = missing_files(data_dir)
    if missing:
        raise DataMissing(f"Fashion-MNIST not found ({missing[0]} is missing); install it with: {INSTALL_HINT}")
    images_file, labels_file = FILES[split]
    images = _read_idx(data_dir / images_file, 2051, 3)
    labels = _read_idx(data_dir / labels_file, 2049, 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{data_dir}: {len(images)} {split} images but {len(labels)} labels")
    return images, labels


def columns(images: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` -> ``(N, W, H)``: one token per pixel column."""
    return np.ascontiguousarray(images.transpose(0, 2, 1))


def pieces(images: np.ndarray, store: str) -> dict[str, np.ndarray]:
    """The modalities of ``store`` cut from standardised ``(N, 28, 28)`` images, column tokens."""
    if store == "whole":
        return {"image": columns(images)}
    if store == "halves":
        return {"left": columns(images[:, :, :14]), "right": columns(images[:, :, 14:])}
    top, bottom = images[:, :14], images[:, 14:]
    return {"tl": columns(top[:, :, :14]), "tr": columns(top[:, :, 14:]),
            "bl": columns(bottom[:, :, :14]), "br": columns(bottom[:, :, 14:])}


#: Training splits of each store: name -> modalities it holds.
LAYOUTS = {
    "halves": {"train_left": ("left",), "train_right": ("right",)},
    "quadrants": {"train_diag": ("br", "tl"), "train_anti": ("bl", "tr")},
    "whole": {"train_a": ("image",), "train_b": ("image",)},
}


def build_store(store: str, path: Path, num_train: int, num_val: int, num_test: int, seed: int = 0,
                data_dir: Path = DATA_DIR) -> Path:
    """Write store ``store`` at ``path`` (atomically: a temporary folder renamed into place).

    An existing ``path`` is left as it is (the cache); delete it to rebuild.
    """
    from umilayers.data import FeatureStore

    path = Path(path)
    if (path / "store.json").is_file():
        return path
    train_images, train_labels = load("train", data_dir)
    test_images, test_labels = load("test", data_dir)
    if 2 * num_train + num_val > len(train_images):
        raise ValueError(f"num_train, num_val: 2 * {num_train} + {num_val} exceeds the "
                         f"{len(train_images)} training images")
    if num_test > len(test_images):
        raise ValueError(f"num_test: at most {len(test_images)}, got {num_test}")
    order = np.random.default_rng(seed).permutation(len(train_images))
    pools = {"a": order[:num_train], "b": order[num_train:2 * num_train],
             "val": order[2 * num_train:2 * num_train + num_val]}
    scaled = train_images.astype(np.float32) / 255.0
    train_pool = scaled[np.concatenate([pools["a"], pools["b"]])]
    mean, std = float(train_pool.mean()), float(train_pool.std())
    standard = lambda x: ((x.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)  # noqa: E731
    example = pieces(standard(train_images[:1]), store)
    shapes = {m: (int(v.shape[1]), int(v.shape[2])) for m, v in example.items()}
    layout = LAYOUTS[store]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fs = FeatureStore.create(tmp, "classification", len(CLASSES), shapes)
        for (name, mods), pool in zip(layout.items(), ("a", "b")):
            rows = pools[pool]
            feats = pieces(standard(train_images[rows]), store)
            fs.write_split(name, "train", {m: feats[m] for m in mods}, train_labels[rows])
        for name, images, labels in (("val", train_images[pools["val"]], train_labels[pools["val"]]),
                                     ("test", test_images[:num_test], test_labels[:num_test])):
            fs.write_split(name, name, pieces(standard(images), store), labels)
        if path.exists():  # a half-built leftover without store.json
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_all(root: Path, num_train: int, num_val: int, num_test: int, seed: int = 0,
              stores: Optional[tuple[str, ...]] = None, data_dir: Path = DATA_DIR) -> dict[str, Path]:
    """Every store under ``root/<store>-<sizes>`` (built once, then reused)."""
    tag = f"n{num_train}-v{num_val}-t{num_test}-s{seed}"
    return {s: build_store(s, Path(root) / f"{s}-{tag}", num_train, num_val, num_test, seed, data_dir)
            for s in (stores or STORES)}
