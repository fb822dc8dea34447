"""``benchmarks/real.py``'s data side: Fashion-MNIST IDX files to FeatureStores, and the skip
when the data is not installed (fake IDX files here; the real ones are never needed by tests)."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _real_data as data  # noqa: E402
import real  # noqa: E402

from umilayers.data import FeatureStore  # noqa: E402


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(0, 256, (40, 28, 28)), rng.integers(0, 10, 40)),
              "test": (rng.integers(0, 256, (12, 28, 28)), rng.integers(0, 10, 12))}
    for split, (images, labels) in arrays.items():
        images_file, labels_file = data.FILES[split]
        _write_idx(root / images_file, images, 2051)
        _write_idx(root / labels_file, labels, 2049)
    return root, arrays


def test_idx_files_read_back(fake):
    root, arrays = fake
    images, labels = data.load("train", root)
    np.testing.assert_array_equal(images, arrays["train"][0])
    np.testing.assert_array_equal(labels, arrays["train"][1])


def test_stores_cut_images_into_column_tokens(fake, tmp_path):
    root, arrays = fake
    paths = data.build_all(tmp_path, num_train=10, num_val=6, num_test=8, data_dir=root)
    halves, quadrants, whole = (FeatureStore(paths[s], deep=True) for s in data.STORES)
    assert halves.modalities == {"left": (14, 28), "right": (14, 28)}
    assert quadrants.modalities == {m: (14, 14) for m in ("bl", "br", "tl", "tr")}
    assert whole.modalities == {"image": (28, 28)}
    assert [(s.name, s.modalities) for s in halves.splits.values()] == [
        ("train_left", ("left",)), ("train_right", ("right",)), ("val", ("left", "right")),
        ("test", ("left", "right"))]
    assert [halves.splits[s].size for s in halves.splits] == [10, 10, 6, 8]
    assert [s.modalities for s in quadrants.splits.values()][:2] == [("br", "tl"), ("bl", "tr")]
    # the halves (and quadrants) put together are the whole image, column by column
    image = np.load(paths["whole"] / "test" / "image.npy")
    left, right = (np.load(paths["halves"] / "test" / f"{m}.npy") for m in ("left", "right"))
    np.testing.assert_array_equal(np.concatenate([left, right], axis=1), image)
    tl = np.load(paths["quadrants"] / "test" / "tl.npy")
    np.testing.assert_array_equal(tl, image[:, :14, :14])
    np.testing.assert_array_equal(halves.targets("test"), arrays["test"][1][:8])
    # the pools are disjoint: every training and val image is a different row of the training set
    rows = {tuple(np.load(paths["whole"] / s / "image.npy").reshape(-1, 784)[i].round(4))
            for s in ("train_a", "train_b", "val") for i in range(whole.splits[s].size)}
    assert len(rows) == 26
    scaled = (arrays["test"][0][:8].transpose(0, 2, 1) / 255.0)
    corr = np.corrcoef(scaled.ravel(), image.ravel())[0, 1]
    assert corr > 0.999  # a standardisation (one scalar scale and shift) of the pixels


def test_built_stores_are_reused_and_leave_no_temporary_folder(fake, tmp_path):
    root, _ = fake
    path = data.build_store("halves", tmp_path / "halves", 10, 6, 8, data_dir=root)
    stamp = (path / "store.json").stat().st_mtime_ns
    assert data.build_store("halves", path, 10, 6, 8, data_dir=root) == path
    assert (path / "store.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["halves"]
    with pytest.raises(ValueError, match="exceeds the 40 training images"):
        data.build_store("halves", tmp_path / "big", 20, 6, 8, data_dir=root)
    assert [p.name for p in tmp_path.iterdir()] == ["halves"]


def test_missing_data_is_a_skip_with_the_install_command(tmp_path, capsys):
    assert real.main(["--quick", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == data.SKIP_STATUS == 77
    err = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in err and "train-images-idx3-ubyte.gz" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(data.DataMissing, match="apt-get install dataset-fashion-mnist"):
        data.load("train", tmp_path)


def test_bad_task_list_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        real.main(["--tasks", "thirds", "--data", str(tmp_path)])
