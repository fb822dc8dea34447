import pytest
import torch

from umilayers.data import collate
from umilayers.data.pairing import pair_same_label


def _batch(labels, modalities, tokens=3, dim=2, padded=None):
    """One row per label; row i has modality modalities[i] filled with the value i."""
    items = []
    for i, (y, m) in enumerate(zip(labels, modalities)):
        length = padded.get(i, tokens) if padded else tokens
        items.append({"index": 100 + i, "split_id": 0, "inputs": {m: torch.full((tokens, dim), float(i))},
                      "lengths": {m: length}, "target": torch.tensor(y)})
    return collate(items)


def test_joined_rows_have_the_same_label_and_the_union_of_modalities():
    labels = [0, 1, 0, 1, 2, 2, 0]
    mods = ["rgb", "rgb", "audio", "audio", "rgb", "rgb", "rgb"]  # the two class-2 rows share rgb
    batch = _batch(labels, mods)
    out, _ = pair_same_label(batch, 1.0, generator=torch.Generator().manual_seed(0))
    assert out.targets.tolist() == labels and out.indices.tolist() == batch.indices.tolist()
    values = {}
    for m in ("audio", "rgb"):
        rows = out.present[m].nonzero().flatten().tolist()
        assert out.inputs[m].shape[0] == len(rows)
        for r, x in zip(rows, out.inputs[m][:, 0, 0].tolist()):
            values[(r, m)] = int(x)
    for r, (y, m) in enumerate(zip(labels, mods)):
        assert values[(r, m)] == r  # a row keeps its own modality
        others = [m2 for m2 in ("audio", "rgb") if m2 != m and (r, m2) in values]
        for m2 in others:  # what it got from a partner: same label, that partner's own modality
            source = values[(r, m2)]
            assert labels[source] == y and mods[source] == m2
    # class 2 has no partner with a disjoint modality: its rows are unchanged
    assert not out.present["audio"][4] and not out.present["audio"][5]
    # every other row found a partner (fraction 1)
    for r in (0, 1, 2, 3, 6):
        assert out.present["audio"][r] and out.present["rgb"][r]


def test_fraction_zero_and_no_partner_leave_the_batch_as_is():
    batch = _batch([0, 1, 0], ["rgb", "rgb", "audio"])
    same, _ = pair_same_label(batch, 0.0)
    assert same is batch
    lonely = _batch([0, 1], ["rgb", "audio"])
    out, pseudo = pair_same_label(lonely, 1.0, torch.full((2, 3), 1 / 3))
    assert out is lonely and torch.equal(pseudo, torch.full((2, 3), 1 / 3))


def test_pseudo_label_of_a_joined_row_is_the_one_closer_to_the_label():
    batch = _batch([1, 1], ["rgb", "audio"])
    pseudo = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1]])  # row 1's is closer to class 1
    out, new = pair_same_label(batch, 1.0, pseudo)
    assert bool(out.present["rgb"].all() and out.present["audio"].all())
    torch.testing.assert_close(new, torch.stack([pseudo[1], pseudo[1]]))


def test_padding_masks_follow_their_rows():
    batch = _batch([0, 0], ["rgb", "audio"], tokens=4, padded={1: 2})
    out, _ = pair_same_label(batch, 1.0)
    assert out.padding_masks["audio"].tolist() == [[False, False, True, True]] * 2
    assert out.padding_masks["rgb"] is None


def test_bad_input_is_refused():
    batch = _batch([0, 1], ["rgb", "audio"])
    with pytest.raises(ValueError, match=r"fraction: expected a probability in \[0, 1\], got 1.5"):
        pair_same_label(batch, 1.5)
    batch.targets = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="classification batches only"):
        pair_same_label(batch, 0.5)
