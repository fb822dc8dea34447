import json
import os

import numpy as np
import pytest

from umilayers.data.store import FeatureStore, StoreError, check_store

MODS = {"rgb": (4, 6), "audio": (3, 5)}


def feats(n, mods=("rgb",), seed=0):
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((n, *MODS[m])).astype(np.float32) for m in mods}


def make(tmp_path, name="s"):
    store = FeatureStore.create(tmp_path / name, "classification", 3, MODS)
    store.write_split("train_a", "train", feats(5, ("rgb",)), np.array([0, 1, 2, 0, 1]))
    store.write_split("train_b", "train", feats(4, ("audio",)), np.array([2, 2, 1, 0]),
                      lengths={"audio": np.array([1, 2, 3, 3])})
    store.write_split("val", "val", feats(3, ("rgb", "audio")), np.array([0, 1, 2]))
    return store


def edit_meta(path, fn):
    meta = json.loads((path / "store.json").read_text())
    fn(meta)
    (path / "store.json").write_text(json.dumps(meta))


def test_round_trip(tmp_path):
    make(tmp_path)
    features = feats(5, ("rgb",))
    store = FeatureStore(tmp_path / "s", deep=True)
    assert store.task == "classification" and store.num_outputs == 3
    assert store.modalities == {"audio": (3, 5), "rgb": (4, 6)}
    assert [(s.name, s.role, s.size, s.modalities) for s in store.splits.values()] == [
        ("train_a", "train", 5, ("rgb",)),
        ("train_b", "train", 4, ("audio",)),
        ("val", "val", 3, ("audio", "rgb")),
    ]
    assert store.splits_with_role("train") == ["train_a", "train_b"]
    assert store.train_index() == {"train_a": 0, "train_b": 5} and store.num_train == 9
    np.testing.assert_array_equal(np.load(tmp_path / "s/train_a/rgb.npy"), features["rgb"])
    np.testing.assert_array_equal(store.targets("train_b"), [2, 2, 1, 0])
    assert store.targets("train_b").dtype == np.int64
    summary = check_store(tmp_path / "s")
    for text in ("train_a", "train_b", "val", "audio,rgb", "float32", "OK"):
        assert text in summary


def test_float16_and_float64_inputs(tmp_path):
    store = FeatureStore.create(tmp_path / "s", "regression", 2, {"rgb": (4, 6)})
    store.write_split("tr", "train", {"rgb": np.zeros((2, 4, 6), np.float16)}, np.zeros((2, 2)))
    store.write_split("te", "test", {"rgb": np.zeros((2, 4, 6), np.float64)}, np.zeros((2, 2)))
    assert np.load(tmp_path / "s/tr/rgb.npy").dtype == np.float16
    assert np.load(tmp_path / "s/te/rgb.npy").dtype == np.float32
    assert np.load(tmp_path / "s/te/targets.npy").dtype == np.float32


def test_retrieval_store_needs_text_and_checks_caption_shape(tmp_path):
    with pytest.raises(StoreError, match="needs a 'text' entry"):
        FeatureStore.create(tmp_path / "a", "retrieval", 8, {"rgb": (4, 6)})
    store = FeatureStore.create(tmp_path / "b", "retrieval", 8, {"rgb": (4, 6)}, text=(5, 7))
    with pytest.raises(StoreError, match=r"targets.*expected shape \(2, 5, 7\).*found \(2, 5, 6\)"):
        store.write_split("tr", "train", feats(2), np.zeros((2, 5, 6), np.float32))
    store.write_split("tr", "train", feats(2), np.zeros((2, 5, 7), np.float32),
                      target_lengths=np.array([5, 2]))
    np.testing.assert_array_equal(np.load(tmp_path / "b/tr/targets.lengths.npy"), [5, 2])


def test_create_refuses_non_empty_directory(tmp_path):
    make(tmp_path)
    with pytest.raises(StoreError, match="not empty"):
        FeatureStore.create(tmp_path / "s", "classification", 3, MODS)
    store = FeatureStore.create(tmp_path / "s", "classification", 3, MODS, overwrite=True)
    assert store.splits == {}


# ----------------------------------------------------------------- bad input: write_split
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"features": {"rgb": np.zeros((2, 4, 5), np.float32)}},
         r"features\['rgb'\] \(rgb.npy\): expected shape \(size=2, tokens=4, dim=6\), found \(2, 4, 5\)"),
        ({"features": {"depth": np.zeros((2, 4, 6), np.float32)}},
         r"unknown modality \['depth'\] \(declared modalities: \['audio', 'rgb'\]\)"),
        ({"targets": np.array([0, 3])}, r"targets \(targets.npy\): labels expected in \[0, 3\), found range \[0, 3\]"),
        ({"targets": np.zeros(0, np.int64), "features": {"rgb": np.zeros((0, 4, 6), np.float32)}},
         "empty split"),
        ({"features": {"rgb": np.full((2, 4, 6), np.nan, np.float32)}},
         r"rgb.npy\): expected finite values, found 48 NaN/inf"),
        ({"lengths": {"rgb": np.array([-1, 4])}},
         r"lengths\['rgb'\] \(rgb.lengths.npy\): lengths expected in \[0, 4\], found range \[-1, 4\]"),
        ({"lengths": {"rgb": np.array([0, 5])}},
         r"lengths\['rgb'\] \(rgb.lengths.npy\): lengths expected in \[0, 4\], found range \[0, 5\]"),
        ({"lengths": {"rgb": np.array([0, 4])}},
         r"1 sample\(s\) have length 0 for every modality .* rows \[0\]"),
        ({"targets": np.array([0.0, 1.0])}, "expected integer class labels, found dtype float64"),
        ({"role": "training"}, r"role expected one of \['train', 'val', 'test'\], found 'training'"),
    ],
)
def test_write_split_bad_input(tmp_path, kwargs, match):
    store = FeatureStore.create(tmp_path / "s", "classification", 3, MODS)
    args = {"name": "tr", "role": "train", "features": feats(2), "targets": np.array([0, 1])}
    args.update(kwargs)
    before = (tmp_path / "s/store.json").read_text()
    with pytest.raises(StoreError, match=match):
        store.write_split(**args)
    assert (tmp_path / "s/store.json").read_text() == before
    assert sorted(os.listdir(tmp_path / "s")) == ["store.json"]


def test_failed_write_is_invisible_and_keeps_store_json(tmp_path, monkeypatch):
    store = make(tmp_path)
    before = (tmp_path / "s/store.json").read_text()
    real_save, calls = np.save, []

    def failing_save(file, array, **kw):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(file, array, **kw)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        store.write_split("test", "test", feats(3, ("rgb", "audio")), np.array([0, 1, 2]))
    monkeypatch.undo()
    assert len(calls) == 2  # the failure happened midway through the split's files
    assert (tmp_path / "s/store.json").read_text() == before
    assert sorted(os.listdir(tmp_path / "s")) == ["store.json", "train_a", "train_b", "val"]
    assert "test" not in FeatureStore(tmp_path / "s").splits
    # the same split can be written afterwards
    store.write_split("test", "test", feats(3, ("rgb", "audio")), np.array([0, 1, 2]))
    assert FeatureStore(tmp_path / "s").splits["test"].size == 3


def test_failed_metadata_write_keeps_old_store_json(tmp_path, monkeypatch):
    store = make(tmp_path)
    before = (tmp_path / "s/store.json").read_text()
    monkeypatch.setattr(os, "replace", _replace_failing_for("store.json"))
    with pytest.raises(OSError):
        store.write_split("test", "test", feats(3, ("rgb",)), np.array([0, 1, 2]))
    monkeypatch.undo()
    assert (tmp_path / "s/store.json").read_text() == before
    assert "test" not in store.splits and "test" not in FeatureStore(tmp_path / "s").splits
    assert not [n for n in os.listdir(tmp_path / "s") if n.startswith(".")]


def _replace_failing_for(target):
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(target):
            raise OSError("cannot rename")
        real(src, dst)

    return replace


def test_overwrite_split(tmp_path):
    store = make(tmp_path)
    with pytest.raises(StoreError, match="already exists"):
        store.write_split("val", "val", feats(2, ("rgb",)), np.array([0, 1]))
    store.write_split("val", "val", feats(2, ("rgb",)), np.array([0, 1]), overwrite=True)
    reopened = FeatureStore(tmp_path / "s", deep=True)
    assert reopened.splits["val"].size == 2 and reopened.splits["val"].modalities == ("rgb",)
    assert sorted(os.listdir(tmp_path / "s/val")) == ["rgb.npy", "targets.npy"]


# ----------------------------------------------------------------- bad input: opening a store
def test_missing_file(tmp_path):
    make(tmp_path)
    os.remove(tmp_path / "s/train_b/audio.npy")
    with pytest.raises(StoreError, match=r"train_b/audio.npy: missing file \(modality 'audio' of split 'train_b'\)"):
        FeatureStore(tmp_path / "s")


def test_missing_store_json(tmp_path):
    with pytest.raises(StoreError, match=r"store.json: missing file"):
        FeatureStore(tmp_path)


def test_wrong_shape_on_disk(tmp_path):
    make(tmp_path)
    np.save(tmp_path / "s/val/rgb.npy", np.zeros((3, 4, 7), np.float32))
    with pytest.raises(StoreError, match=r"val/rgb.npy: expected shape \(size=3, tokens=4, dim=6\), found \(3, 4, 7\)"):
        FeatureStore(tmp_path / "s")


def test_wrong_size_in_store_json(tmp_path):
    make(tmp_path)
    edit_meta(tmp_path / "s", lambda m: m["splits"]["train_a"].update(size=6))
    with pytest.raises(StoreError,
                       match=r"train_a/rgb.npy: expected shape \(size=6, tokens=4, dim=6\), found \(5, 4, 6\)"):
        FeatureStore(tmp_path / "s")


def test_unknown_modality_in_split(tmp_path):
    make(tmp_path)
    edit_meta(tmp_path / "s", lambda m: m["splits"]["val"].update(modalities=["rgb", "depth"]))
    with pytest.raises(StoreError, match=r"store.json: split 'val': unknown modality \['depth'\]"):
        FeatureStore(tmp_path / "s")


def test_file_on_disk_not_listed(tmp_path):
    make(tmp_path)
    np.save(tmp_path / "s/train_a/audio.npy", np.zeros((5, 3, 5), np.float32))
    with pytest.raises(StoreError, match=r"train_a/audio.npy: modality 'audio' is on disk but not listed"):
        FeatureStore(tmp_path / "s")


def test_eval_modality_unseen_in_training(tmp_path):
    store = FeatureStore.create(tmp_path / "s", "classification", 3, MODS)
    store.write_split("train", "train", feats(2, ("rgb",)), np.array([0, 1]))
    store.write_split("val", "val", feats(2, ("rgb", "audio")), np.array([0, 1]))
    with pytest.raises(StoreError, match=r"val split 'val' has modality \['audio'\] that no training split has "
                                         r"\(training modalities: \['rgb'\]\)"):
        FeatureStore(tmp_path / "s")
    # writing the missing training split in any order makes the store valid
    store.write_split("train_b", "train", feats(2, ("audio",)), np.array([0, 1]))
    FeatureStore(tmp_path / "s")


def test_no_training_split(tmp_path):
    store = FeatureStore.create(tmp_path / "s", "classification", 3, MODS)
    store.write_split("test", "test", feats(2), np.array([0, 1]))
    with pytest.raises(StoreError, match="no training split"):
        FeatureStore(tmp_path / "s")


def test_empty_split_in_store_json(tmp_path):
    make(tmp_path)
    edit_meta(tmp_path / "s", lambda m: m["splits"]["val"].update(size=0))
    with pytest.raises(StoreError, match=r"store.json: split 'val': empty split \(size 0\)"):
        FeatureStore(tmp_path / "s")


def test_labels_out_of_range_on_disk(tmp_path):
    make(tmp_path)
    np.save(tmp_path / "s/val/targets.npy", np.array([0, 5, -1]))
    with pytest.raises(StoreError, match=r"val/targets.npy: labels expected in \[0, 3\), "
                                         r"found range \[-1, 5\] \(2 out of range\)"):
        FeatureStore(tmp_path / "s")


def test_lengths_out_of_range_on_disk(tmp_path):
    make(tmp_path)
    np.save(tmp_path / "s/train_b/audio.lengths.npy", np.array([1, 2, 3, 4]))
    with pytest.raises(StoreError, match=r"audio.lengths.npy: lengths expected in \[0, 3\], found range \[1, 4\]"):
        FeatureStore(tmp_path / "s")


def test_nan_features_found_by_deep_check_only(tmp_path):
    make(tmp_path)
    bad = np.load(tmp_path / "s/val/audio.npy")
    bad[2, 1, 0] = np.nan
    np.save(tmp_path / "s/val/audio.npy", bad)
    FeatureStore(tmp_path / "s")  # the cheap check does not read features
    with pytest.raises(StoreError, match=r"val/audio.npy: expected finite values, "
                                         r"found NaN/inf in 1 entries \(first bad row 2\)"):
        FeatureStore(tmp_path / "s", deep=True)
    with pytest.raises(StoreError, match="first bad row 2"):
        check_store(tmp_path / "s")


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(format="other/1"), r"'format' expected 'umilayers-store/1', found 'other/1'"),
        (lambda m: m.update(task="ranking"), r"'task' expected one of .*found 'ranking'"),
        (lambda m: m.pop("modalities"), r"missing key 'modalities'"),
        (lambda m: m["splits"]["val"].update(role="dev"), r"split 'val': 'role' expected one of .*found 'dev'"),
        (lambda m: m["modalities"].update(rgb={"tokens": 4}),
         r"modality 'rgb': expected \{'tokens': int, 'dim': int\}"),
    ],
)
def test_bad_store_json(tmp_path, edit, match):
    make(tmp_path)
    edit_meta(tmp_path / "s", edit)
    with pytest.raises(StoreError, match=match):
        FeatureStore(tmp_path / "s")


def test_store_error_is_value_error():
    assert issubclass(StoreError, ValueError)


# ---------------------------------------------------------------- several captions per row

def multi_caption_store(tmp_path, name="m"):
    """Retrieval, up to 3 captions of 5 tokens x 7 per row; rows hold 3, 1 and 2 captions."""
    store = FeatureStore.create(tmp_path / name, "retrieval", 8, {"rgb": (4, 6)}, text=(5, 7), captions=3)
    rng = np.random.default_rng(0)
    counts = np.array([3, 1, 2])
    lengths = np.array([[5, 2, 4], [3, 0, 0], [1, 5, 0]])
    text = rng.standard_normal((3, 3, 5, 7)).astype(np.float16)
    text[lengths == 0] = 0
    store.write_split("tr", "train", feats(3), text, target_lengths=lengths, target_counts=counts)
    return store, text, lengths, counts


def test_several_captions_per_row_round_trip(tmp_path):
    store, text, lengths, counts = multi_caption_store(tmp_path)
    meta = json.loads((tmp_path / "m" / "store.json").read_text())
    assert meta["text"] == {"tokens": 5, "dim": 7, "captions": 3}
    opened = FeatureStore(tmp_path / "m", deep=True)
    assert opened.max_captions == 3 and opened.text == (5, 7)
    np.testing.assert_array_equal(opened.caption_counts("tr"), counts)
    assert np.load(tmp_path / "m" / "tr" / "targets.npy").dtype == np.float16  # kept as written
    np.testing.assert_array_equal(np.load(tmp_path / "m" / "tr" / "targets.lengths.npy"), lengths)
    assert "captions per row <= 3" in opened.summary()


def test_single_caption_stores_are_unchanged(tmp_path):
    store = FeatureStore.create(tmp_path / "b", "retrieval", 8, {"rgb": (4, 6)}, text=(5, 7))
    assert json.loads((tmp_path / "b" / "store.json").read_text())["text"] == {"tokens": 5, "dim": 7}
    store.write_split("tr", "train", feats(2), np.zeros((2, 5, 7), np.float32), target_lengths=np.array([5, 2]))
    opened = FeatureStore(tmp_path / "b")
    assert opened.max_captions == 1
    np.testing.assert_array_equal(opened.caption_counts("tr"), [1, 1])
    with pytest.raises(StoreError, match="several captions per row"):
        store.write_split("tr2", "train", feats(2), np.zeros((2, 5, 7), np.float32),
                          target_counts=np.array([1, 1]))


def test_several_captions_checked_before_writing(tmp_path):
    store, text, lengths, counts = multi_caption_store(tmp_path)
    with pytest.raises(StoreError, match=r"expected shape \(3, 3, 5, 7\) \(size, captions, text_tokens, text_dim\)"):
        store.write_split("x", "train", feats(3), text[:, 0])
    bad = lengths.copy()
    bad[1, 2] = 2  # a token count in a slot past the row's count
    with pytest.raises(StoreError, match=r"1 entries out of range, first row 1 caption 2: 2"):
        store.write_split("x", "train", feats(3), text, target_lengths=bad, target_counts=counts)
    with pytest.raises(StoreError, match=r"first row 1 caption 1: 0"):  # without counts every slot is a caption
        store.write_split("x", "train", feats(3), text, target_lengths=lengths)
    with pytest.raises(StoreError, match=r"target_counts.*lengths expected in \[1, 3\], found range \[0, 3\]"):
        store.write_split("x", "train", feats(3), text, target_counts=np.array([3, 0, 2]))
    with pytest.raises(StoreError, match=r"target_lengths.*expected shape \(size=3, captions=3\)"):
        store.write_split("x", "train", feats(3), text, target_lengths=np.array([5, 3, 1]), target_counts=counts)
    assert list(FeatureStore(tmp_path / "m").splits) == ["tr"]
    np.save(tmp_path / "m" / "tr" / "targets.counts.npy", np.array([3, 4, 2]))
    with pytest.raises(StoreError, match=r"targets.counts.npy: lengths expected in \[1, 3\]"):
        FeatureStore(tmp_path / "m")
