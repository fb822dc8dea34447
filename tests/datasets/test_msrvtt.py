"""MSR-VTT adapter: fixtures in the Collaborative Experts (and MMT) release layouts."""

from __future__ import annotations

import importlib.util
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from umilayers.datasets import msrvtt

ROOT = Path(__file__).resolve().parents[2]
NAN = float("nan")
DIMS = {"rgb": 6, "object": 5, "scene": 7, "audio": 4, "face": 3, "ocr": 8, "speech": 8}
SEQUENCE = {"audio", "ocr", "speech"}  # stored (T, d); the rest (d,)
# Which modalities each video lacks. "a*" videos suit the audio/ocr/speech group, "b*" the
# object/scene/face group; "n0" fits neither (only rgb + face).
LACKS = {
    "video0": {"face"}, "video1": {"face", "object"}, "video2": {"scene", "face"},
    "video3": {"ocr"}, "video4": {"audio", "ocr"}, "video5": {"speech", "ocr"},
    "video6": set(), "video7": {"object", "scene", "audio", "ocr", "speech"},
    "video8": {"ocr", "speech"}, "video9": set(), "video10": set(), "video11": {"face"},
    "video12": set(), "video13": {"ocr", "speech"},
}
TRAIN = [f"video{i}" for i in range(10)]
TEST = ["video10", "video11", "video12", "video13"]


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_release(base: Path, layout: str = "ce", lacks=LACKS, drop_text=(), key_missing=()):
    """A tiny CE (or MMT) release: split lists, per-expert pickles with NaN for missing,
    word2vec caption features, raw captions and the 1k-A caption index."""
    rng = np.random.default_rng(0)
    root = base / "MSRVTT" / "high-quality" / "structured-symlinks"
    root.mkdir(parents=True)
    (root / "train_list_jsfusion.txt").write_text("\n".join(TRAIN) + "\n")
    (root / "val_list_jsfusion.txt").write_text("\n".join(TEST) + "\n")
    videos = TRAIN + TEST
    files = (msrvtt.CE_FEATURE_FILES if layout == "ce"
             else {m: f"mmt_feats/{f}" for f, m in msrvtt.MMT_FEATURE_FILES.items()})
    for m, rel in files.items():
        feats = {}
        for i, v in enumerate(videos):
            if (m, v) in key_missing:
                continue
            if m in lacks[v]:
                feats[v] = NAN
            elif m in SEQUENCE:
                feats[v] = rng.normal(size=(2 + i % 4, DIMS[m])).astype(np.float32)
            else:
                feats[v] = rng.normal(size=(DIMS[m],)).astype(np.float32)
        _dump(root / rel, feats)
    text = {v: [rng.normal(size=(3 + (c + i) % 5, 10)).astype(np.float32) for c in range(3)]
            for i, v in enumerate(videos) if v not in drop_text}
    _dump(root / "aggregated_text_feats" / "w2v.pkl", text)
    _dump(root / "raw-captions.pkl", {v: [["a", "man", str(c)] for c in range(3)] for v in videos})
    _dump(root / "jsfusion_val_caption_idx.pkl", {v: 2 for v in TEST})
    return base / "MSRVTT"


def test_as_token_array_missing_markers():
    assert msrvtt.as_token_array(NAN) is None
    assert msrvtt.as_token_array(None) is None
    assert msrvtt.as_token_array(np.array([1.0, np.nan])) is None
    assert msrvtt.as_token_array(np.zeros((0, 4))) is None
    assert msrvtt.as_token_array(np.zeros(4)).shape == (1, 4)  # zeros are data, not missing


def test_load_ce_layout(tmp_path):
    data = msrvtt.load_msrvtt(write_release(tmp_path), log=lambda s: None)
    assert data.layout == "ce"
    assert data.root.name == "structured-symlinks"
    assert data.dims == DIMS
    assert data.available("video7") == {"rgb", "face"}
    assert data.features["audio"]["video4"] is None
    assert data.features["ocr"]["video0"].shape[1] == 8
    assert len(data.text["video3"]) == 3
    assert data.test_caption == {v: 2 for v in TEST}


def test_load_mmt_layout(tmp_path):
    data = msrvtt.load_msrvtt(write_release(tmp_path, layout="mmt"), log=lambda s: None)
    assert data.layout == "mmt"
    assert data.dims == DIMS
    assert data.available("video1") == {"rgb", "scene", "audio", "ocr", "speech"}


def test_group_assignment_rule():
    groups, dropped = msrvtt.assign_training_groups(
        TRAIN, {v: set(msrvtt.MSRVTT_MODALITIES) - LACKS[v] for v in TRAIN}, seed=0)
    a, b = groups["train_rgb_audio_ocr_speech"], groups["train_rgb_object_scene_face"]
    assert dropped == ["video7"]
    assert not set(a) & set(b) and sorted(a + b + dropped) == sorted(TRAIN)
    for v in a:  # at least 3 of 4 of the group's modalities
        assert len({"rgb", "audio", "ocr", "speech"} - LACKS[v]) >= 3
    for v in b:
        assert len({"rgb", "object", "scene", "face"} - LACKS[v]) >= 3
    # videos eligible for one group only go there
    assert {"video1", "video2"} <= set(a) and {"video4", "video5", "video8"} <= set(b)
    assert abs(len(a) - len(b)) <= 1


def test_splits_disjoint_with_table1_modalities(tmp_path):
    data = msrvtt.load_msrvtt(write_release(tmp_path), log=lambda s: None)
    s = msrvtt.split_msrvtt(data, seed=1, val_size=2)
    assert s.modalities["train_rgb_audio_ocr_speech"] == ("rgb", "audio", "ocr", "speech")
    assert s.modalities["train_rgb_object_scene_face"] == ("rgb", "object", "scene", "face")
    assert s.modalities["val"] == s.modalities["test"] == msrvtt.MSRVTT_MODALITIES
    seen = [v for vids in s.videos.values() for v in vids]
    assert len(seen) == len(set(seen))
    assert sorted(seen + s.dropped) == sorted(TRAIN + TEST)
    assert s.videos["test"] == TEST and len(s.videos["val"]) == 2
    assert s.rows["test"] == [(v, 2) for v in TEST]  # the 1k-A caption index
    assert msrvtt.split_msrvtt(data, seed=1, val_size=2).videos == s.videos


def test_split_arrays_mark_missing_by_length_zero(tmp_path):
    data = msrvtt.load_msrvtt(write_release(tmp_path), log=lambda s: None)
    s = msrvtt.split_msrvtt(data, seed=0, val_size=2)
    arrays = msrvtt.split_arrays(data, s)
    test = arrays["test"]
    row = TEST.index("video11")  # lacks face
    assert test["lengths"]["face"][row] == 0 and not test["features"]["face"][row].any()
    assert test["lengths"]["rgb"][row] == 1
    ocr = data.features["ocr"]["video10"]
    np.testing.assert_array_equal(test["features"]["ocr"][0, : len(ocr)], ocr)
    assert test["lengths"]["ocr"][0] == len(ocr)
    np.testing.assert_array_equal(test["text"][1, : test["text_lengths"][1]], data.text["video11"][2])


def test_missing_caption_names_file_and_video(tmp_path):
    root = write_release(tmp_path, drop_text=("video3",))
    with pytest.raises(msrvtt.MSRVTTDataError, match=r"w2v\.pkl.*'video3'.*--skip-missing"):
        msrvtt.load_msrvtt(root, log=lambda s: None)
    logs = []
    data = msrvtt.load_msrvtt(root, skip_missing=True, log=logs.append)
    assert "video3" not in data.lists["train"]
    assert any("skipped 1 video" in line for line in logs)


def test_missing_key_in_a_modality_pickle_means_missing(tmp_path):
    root = write_release(tmp_path, key_missing={("face", "video6")})
    data = msrvtt.load_msrvtt(root, log=lambda s: None)
    assert "face" not in data.available("video6")


def test_bad_feature_size_is_reported(tmp_path):
    root = write_release(tmp_path)
    path = root / "high-quality" / "structured-symlinks" / msrvtt.CE_FEATURE_FILES["scene"]
    feats = pickle.loads(path.read_bytes())
    feats["video5"] = np.zeros(99, np.float32)
    _dump(path, feats)
    with pytest.raises(msrvtt.MSRVTTDataError, match="densenet161-avg.pickle.*'video5'.*size 99"):
        msrvtt.load_msrvtt(root, log=lambda s: None)


def test_no_split_list(tmp_path):
    with pytest.raises(msrvtt.MSRVTTDataError, match="no split list"):
        msrvtt.load_msrvtt(tmp_path, log=lambda s: None)


def _store_module():
    from umilayers.data import store

    return store


def test_build_store_complete_rows(tmp_path):
    store_mod = _store_module()
    summary = msrvtt.build_msrvtt_store(write_release(tmp_path), tmp_path / "store", val_size=2,
                                        missing="complete", embed_dim=16, log=lambda s: None)
    store = store_mod.FeatureStore(tmp_path / "store")
    assert store.task == "retrieval" and store.num_outputs == 16
    assert store.text == (7, 10)
    assert store.modalities["ocr"] == (5, 8) and store.modalities["rgb"] == (1, 6)
    assert store.splits["test"].size == 2  # video10 and video12 have everything
    assert summary["left_out_incomplete_rows"]["test"] == 2
    rows = json.loads((tmp_path / "store" / "msrvtt_rows.json").read_text())
    assert rows["rows"]["test"] == [["video10", 2, "a man 2"], ["video12", 2, "a man 2"]]


def test_build_store_per_row_missing(tmp_path):
    store_mod = _store_module()
    msrvtt.build_msrvtt_store(write_release(tmp_path), tmp_path / "store", val_size=2,
                              embed_dim=16, log=lambda s: None)
    store = store_mod.FeatureStore(tmp_path / "store")
    assert store.splits["test"].size == 4
    item = store.dataset("test")[TEST.index("video11")]
    assert "face" not in item["inputs"] or item["lengths"]["face"] == 0


def _example():
    spec = importlib.util.spec_from_file_location("msrvtt_train", ROOT / "examples" / "msrvtt_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_extract_only_and_errors(tmp_path, capsys):
    _store_module()
    main = _example().main
    root = write_release(tmp_path)
    assert main(["--data", str(root), "--out", str(tmp_path / "run"), "--extract-only",
                 "--val-size", "2", "--missing", "complete", "--embed-dim", "16"]) == 0
    assert (tmp_path / "run" / "store" / "store.json").is_file()
    assert main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "r2"), "--extract-only"]) == 1
    assert "no split list" in capsys.readouterr().err


def test_example_end_to_end(tmp_path):
    """Per-row missing modalities (the default) all the way through training and evaluation."""
    root = write_release(tmp_path)
    run = tmp_path / "run"
    assert _example().main(["--data", str(root), "--out", str(run), "--val-size", "2",
                            "--embed-dim", "16", "--epochs", "1",
                            "--unimodal-epochs", "1", "--pseudo-window", "1", "--dim", "16",
                            "--projection-depth", "1", "--fusion-depth", "1", "--heads", "2", "--num-tokens", "4", "--quiet",
                            "--device", "cpu"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test" in metrics
    assert metrics["test"]["mean_rank"] >= 1.0
