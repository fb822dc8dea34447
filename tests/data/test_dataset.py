import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from umilayers.data import Batch, FeatureStore, collate
from umilayers.data.dataset import set_epoch

MODS = {"rgb": (4, 3), "audio": (5, 2)}


@pytest.fixture()
def store(tmp_path):
    s = FeatureStore.create(tmp_path / "s", "classification", 3, MODS)
    rgb = np.arange(3 * 4 * 3, dtype=np.float16).reshape(3, 4, 3)
    s.write_split("train_a", "train", {"rgb": rgb}, np.array([0, 1, 2]))
    audio = -np.arange(2 * 5 * 2, dtype=np.float32).reshape(2, 5, 2)
    s.write_split("train_b", "train", {"audio": audio}, np.array([2, 1]),
                  lengths={"audio": np.array([5, 2])})
    both = {"rgb": np.ones((2, 4, 3), np.float32), "audio": np.ones((2, 5, 2), np.float32)}
    s.write_split("test", "test", both, np.array([1, 0]))
    return FeatureStore(tmp_path / "s")


def test_items_follow_the_contract(store):
    item = store.dataset("train_b")[1]
    assert set(item) == {"index", "split_id", "inputs", "lengths", "target"}
    assert item["index"] == 3 + 1  # global train id: offset of train_b (3) + row
    assert item["split_id"] == 1
    assert list(item["inputs"]) == ["audio"] and item["inputs"]["audio"].dtype == torch.float32
    np.testing.assert_array_equal(item["inputs"]["audio"].numpy(), -np.arange(10, 20).reshape(5, 2))
    assert item["lengths"] == {"audio": 2}
    assert item["target"].dtype == torch.int64 and int(item["target"]) == 1
    rgb = store.dataset("train_a")[2]
    assert rgb["inputs"]["rgb"].dtype == torch.float32 and rgb["lengths"] == {"rgb": 4}
    test = store.dataset("test")[1]
    assert test["index"] == 1 and test["split_id"] == 2  # val/test: the plain row
    assert sorted(test["inputs"]) == ["audio", "rgb"]


def test_dataset_index_errors(store):
    ds = store.dataset("train_b")
    assert len(ds) == 2 and ds[-1]["index"] == ds[1]["index"]
    with pytest.raises(IndexError, match="out of range"):
        ds[2]
    with pytest.raises(KeyError, match="not in store"):
        store.dataset("nope")


def test_train_dataset_has_all_global_ids(store):
    ds = store.train_dataset()
    assert len(ds) == store.num_train == 5
    assert [ds[i]["index"] for i in range(len(ds))] == list(range(5))


def test_collate_sub_batches_and_masks(store):
    ds = store.train_dataset()
    items = [ds[4], ds[0], ds[3], ds[2]]  # audio(len 2), rgb, audio(len 5), rgb
    batch = collate(items)
    assert isinstance(batch, Batch) and batch.size == 4
    assert list(batch.inputs) == ["audio", "rgb"]
    assert batch.indices.tolist() == [4, 0, 3, 2]
    assert batch.split_ids.tolist() == [1, 0, 1, 0]
    assert batch.present["audio"].tolist() == [True, False, True, False]
    assert batch.present["rgb"].tolist() == [False, True, False, True]
    assert batch.inputs["audio"].shape == (2, 5, 2) and batch.inputs["rgb"].shape == (2, 4, 3)
    torch.testing.assert_close(batch.inputs["audio"][0], items[0]["inputs"]["audio"])
    torch.testing.assert_close(batch.inputs["rgb"][1], items[3]["inputs"]["rgb"])
    assert batch.padding_masks["audio"].tolist() == [
        [False, False, True, True, True],
        [False, False, False, False, False],
    ]
    assert batch.padding_masks["rgb"] is None  # no row of the batch is padded
    assert batch.targets.tolist() == [1, 0, 2, 2] and batch.targets.dtype == torch.int64
    assert batch.text_padding_mask is None


def test_collate_rejects_empty():
    with pytest.raises(ValueError, match="at least one item"):
        collate([])


def test_batch_to_keeps_structure(store):
    batch = collate([store.dataset("test")[0], store.dataset("test")[1]])
    moved = batch.to("cpu")
    assert moved.padding_masks == {"audio": None, "rgb": None}
    assert moved.inputs["rgb"].shape == (2, 4, 3) and moved.present["audio"].all()
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert moved.targets.tolist() == [1, 0]


def test_regression_and_retrieval_targets(tmp_path):
    reg = FeatureStore.create(tmp_path / "r", "regression", 2, {"rgb": (2, 2)})
    reg.write_split("tr", "train", {"rgb": np.zeros((3, 2, 2), np.float32)},
                    np.arange(6, dtype=np.float64).reshape(3, 2))
    batch = collate([reg.dataset("tr")[i] for i in range(3)])
    assert batch.targets.dtype == torch.float32 and batch.targets.shape == (3, 2)
    ret = FeatureStore.create(tmp_path / "t", "retrieval", 8, {"rgb": (2, 2)}, text=(4, 3))
    ret.write_split("tr", "train", {"rgb": np.zeros((2, 2, 2), np.float32)},
                    np.ones((2, 4, 3), np.float32), target_lengths=np.array([4, 1]))
    items = [ret.dataset("tr")[i] for i in range(2)]
    assert items[1]["target_length"] == 1
    batch = collate(items)
    assert batch.targets.shape == (2, 4, 3)
    assert batch.text_padding_mask.tolist() == [[False] * 4, [False, True, True, True]]


def test_pickles_without_open_maps_and_works_with_workers(store):
    ds = store.train_dataset()
    ds[0]  # opens the memory maps of the first split
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.datasets[0]._arrays is None
    loader = DataLoader(ds, batch_size=5, shuffle=False, num_workers=2, collate_fn=collate)
    (batch,) = list(loader)
    assert batch.indices.tolist() == [0, 1, 2, 3, 4]
    assert batch.present["rgb"].tolist() == [True, True, True, False, False]


def test_length_zero_marks_a_modality_missing_for_one_sample(tmp_path):
    s = FeatureStore.create(tmp_path / "s", "classification", 3, MODS)
    s.write_split("train_a", "train", {"rgb": np.ones((2, 4, 3), np.float32)}, np.array([0, 1]))
    s.write_split("train_b", "train", {"audio": np.ones((2, 5, 2), np.float32)}, np.array([0, 1]))
    both = {"rgb": np.ones((3, 4, 3), np.float32), "audio": np.ones((3, 5, 2), np.float32)}
    s.write_split("test", "test", both, np.array([1, 0, 2]),
                  lengths={"rgb": np.array([4, 0, 2]), "audio": np.array([0, 5, 5])})
    data = FeatureStore(tmp_path / "s").dataset("test")
    assert sorted(data[0]["inputs"]) == ["rgb"] and sorted(data[1]["inputs"]) == ["audio"]
    batch = collate([data[0], data[1], data[2]])
    assert batch.present["rgb"].tolist() == [True, False, True]
    assert batch.present["audio"].tolist() == [False, True, True]
    assert batch.inputs["rgb"].shape[0] == 2 and batch.inputs["audio"].shape[0] == 2


def test_a_sample_without_any_modality_is_refused(tmp_path):
    from umilayers.data import StoreError

    s = FeatureStore.create(tmp_path / "s", "classification", 3, MODS)
    both = {"rgb": np.ones((3, 4, 3), np.float32), "audio": np.ones((3, 5, 2), np.float32)}
    with pytest.raises(StoreError, match=r"1 sample\(s\) have length 0 for every modality.*rows \[1\]"):
        s.write_split("train", "train", both, np.array([1, 0, 2]),
                      lengths={"rgb": np.array([4, 0, 2]), "audio": np.array([5, 0, 5])})


# ---------------------------------------------------------------- several captions per row

def _captions_store(tmp_path):
    """Rows with 3, 1 and 2 captions (up to 3); caption c of row r is filled with 10 r + c."""
    store = FeatureStore.create(tmp_path / "c", "retrieval", 8, {"rgb": (2, 2)}, text=(4, 3), captions=3)
    counts = np.array([3, 1, 2])
    lengths = np.array([[4, 2, 1], [3, 0, 0], [1, 4, 0]])
    text = np.zeros((3, 3, 4, 3), np.float32)
    for r in range(3):
        for c in range(counts[r]):
            text[r, c] = 10 * r + c
    store.write_split("tr", "train", {"rgb": np.zeros((3, 2, 2), np.float32)}, text,
                      target_lengths=lengths, target_counts=counts)
    store.write_split("te", "test", {"rgb": np.zeros((3, 2, 2), np.float32)}, text,
                      target_lengths=lengths, target_counts=counts)
    return FeatureStore(tmp_path / "c"), counts, lengths


def _caption_of(item):
    return int(item["target"][0, 0]) % 10


def test_first_caption_keeps_the_one_caption_item(tmp_path):
    store, counts, lengths = _captions_store(tmp_path)
    item = store.dataset("te")[2]
    assert set(item) == {"index", "split_id", "inputs", "lengths", "target", "target_length", "caption"}
    assert item["target"].shape == (4, 3) and int(item["target"][0, 0]) == 20 and item["target_length"] == 1
    batch = collate([store.dataset("te")[i] for i in range(3)])
    assert batch.targets.shape == (3, 4, 3) and batch.caption_counts is None
    assert batch.caption_slots.tolist() == [0, 0, 0]


def test_random_caption_per_row_and_epoch(tmp_path):
    store, counts, lengths = _captions_store(tmp_path)
    data = store.train_dataset(caption="random", caption_seed=5)
    seen = {r: set() for r in range(3)}
    for epoch in range(12):
        set_epoch(data, epoch)
        for r in range(3):
            item = data[r]
            c = _caption_of(item)
            assert item["caption"] == c  # the slot is reported (pseudo-labels look it up)
            seen[r].add(c)
            assert item["target_length"] == lengths[r, c] and int(item["target"][0, 0]) == 10 * r + c
    assert seen == {0: {0, 1, 2}, 1: {0}, 2: {0, 1}}  # every caption over epochs, never an empty slot
    # the same draw in another process (a fresh dataset) for the same seed and epoch
    again = store.train_dataset(caption="random", caption_seed=5)
    set_epoch(again, 7)
    set_epoch(data, 7)
    assert [_caption_of(again[r]) for r in range(3)] == [_caption_of(data[r]) for r in range(3)]
    with pytest.raises(ValueError, match="caption: expected one of"):
        store.dataset("tr", caption="every")


def test_all_captions_for_evaluation(tmp_path):
    store, counts, lengths = _captions_store(tmp_path)
    items = [store.dataset("te", caption="all")[r] for r in range(3)]
    assert items[1]["caption_count"] == 1 and items[1]["target_length"].tolist() == [3, 0, 0]
    batch = collate(items)
    assert batch.targets.shape == (3, 3, 4, 3)
    assert batch.caption_counts.tolist() == [3, 1, 2]
    assert batch.text_padding_mask.shape == (3, 3, 4)
    assert batch.text_padding_mask[0, 1].tolist() == [False, False, True, True]
    assert batch.text_padding_mask[1, 1].all()  # an empty slot is all padding
    # the flat list of captions the metric takes (each caption a query), and their videos
    valid = torch.arange(3)[None, :] < batch.caption_counts[:, None]
    assert batch.targets[valid][:, 0, 0].tolist() == [0, 1, 2, 10, 20, 21]
    from umilayers.metrics import caption_owners

    assert caption_owners(batch.caption_counts).tolist() == [0, 0, 0, 1, 2, 2]
