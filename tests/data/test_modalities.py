"""collate_modalities / ModalityBatch: the sub-batch layout round-trips and is what the layers take."""

from functools import partial

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from umilayers import CommonSpaceSum, UnseenModalityModel
from umilayers.data import ModalityBatch, collate_modalities

NAMES = ("audio", "depth", "rgb")


@st.composite
def incomplete_items(draw, max_items: int = 6):
    """Items with a random non-empty subset of modalities each; some modalities vary in length.

    Returns ``(items, spec)`` with ``spec[m] = (d_m, fixed k_m or None when it varies)``.
    """
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True))
    spec = {m: (draw(st.integers(1, 4)), draw(st.one_of(st.none(), st.integers(1, 4)))) for m in names}
    n = draw(st.integers(1, max_items))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    items = []
    for _ in range(n):
        have = draw(st.lists(st.sampled_from(sorted(names)), min_size=1, unique=True))
        sample = {}
        for m in names:
            d, k = spec[m]
            if m in have:
                tokens = k if k is not None else draw(st.integers(1, 5))
                sample[m] = torch.randn(tokens, d, generator=generator)
            elif draw(st.booleans()):
                sample[m] = None  # a missing modality may also be spelt None
        items.append(sample)
    return items, spec


def _without_none(sample):
    return {m: t for m, t in sample.items() if t is not None}


def _assert_samples_equal(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        want = _without_none(want)
        assert sorted(got) == sorted(want)
        for m in want:
            assert torch.equal(got[m], want[m]), m


@given(incomplete_items())
def test_layout_and_round_trip(drawn):
    items, spec = drawn
    batch = collate_modalities(items)
    assert isinstance(batch, ModalityBatch)
    assert batch.size == len(items)
    having = sorted({m for item in items for m, t in item.items() if t is not None})
    assert list(batch.inputs) == list(batch.padding_masks) == list(batch.present) == having
    for m in having:
        rows = [i for i, item in enumerate(items) if item.get(m) is not None]
        assert batch.present[m].tolist() == [i in rows for i in range(len(items))]
        assert batch.inputs[m].shape[0] == int(batch.present[m].sum()) == len(rows)
        lengths = [items[i][m].shape[0] for i in rows]
        mask = batch.padding_masks[m]
        if len(set(lengths)) == 1:
            assert mask is None
        else:  # padded at the end, to the longest, with zeros
            assert mask.tolist() == [[j >= n for j in range(max(lengths))] for n in lengths]
            assert bool((batch.inputs[m][mask] == 0).all())
    _assert_samples_equal(batch.unbatch(), items)


@given(incomplete_items(), st.data())
def test_rows_and_select_round_trip(drawn, data):
    items, _ = drawn
    batch = collate_modalities(items)
    positions = data.draw(st.lists(st.integers(0, len(items) - 1), max_size=8))
    picked = batch.rows(torch.tensor(positions, dtype=torch.long))
    _assert_samples_equal(picked.unbatch(), [items[i] for i in positions])
    assert list(picked.present) == list(batch.present)  # every key kept, possibly all False
    keep = data.draw(st.lists(st.booleans(), min_size=len(items), max_size=len(items)))
    masked = batch.rows(torch.tensor(keep))
    _assert_samples_equal(masked.unbatch(), [item for item, k in zip(items, keep) if k])

    chosen = data.draw(st.lists(st.sampled_from(list(batch.present)), min_size=1, unique=True))
    has = batch.has_any(chosen)
    assert has.tolist() == [any(item.get(m) is not None for m in chosen) for item in items]
    narrowed = batch.rows(has).select(chosen)
    expected = [{m: t for m, t in item.items() if m in chosen} for item, h in zip(items, has) if h]
    _assert_samples_equal(narrowed.unbatch(), expected)
    if not bool(has.all()):
        with pytest.raises(ValueError, match="have none of"):
            batch.select(chosen)


@given(incomplete_items())
def test_common_space_sum_takes_the_layout(drawn):
    """Row i of the fused sum is the sum of row i's own modalities' features, for any mix."""
    items, spec = drawn
    generator = torch.Generator().manual_seed(0)
    weights = {m: torch.randn(d, 3, dtype=torch.float64, generator=generator) for m, (d, _) in spec.items()}

    def feature(m, tokens, mask=None):  # (B_m, k_m, d_m) -> (B_m, K=2, D=3): masked token sum
        tokens = tokens.double() if mask is None else tokens.double().masked_fill(mask[..., None], 0)
        return (tokens.sum(1) @ weights[m])[:, None].expand(-1, 2, -1)

    batch = collate_modalities(items)
    features = {m: feature(m, x, batch.padding_masks[m]) for m, x in batch.inputs.items()}
    fused = CommonSpaceSum()(features, batch.present)
    for i, item in enumerate(items):
        own = sum(feature(m, t[None])[0] for m, t in sorted(_without_none(item).items()))
        torch.testing.assert_close(fused[i], own, atol=1e-12, rtol=1e-12)


@given(incomplete_items(max_items=4))
def test_unseen_modality_model_takes_the_layout(drawn):
    """The whole model on a collated batch predicts row i as it predicts item i alone."""
    items, spec = drawn
    torch.manual_seed(0)
    model = UnseenModalityModel({m: d for m, (d, _) in spec.items()}, num_outputs=3, dim=8, num_tokens=4,
                                projection_depth=1, fusion_depth=1, heads=2, dtype=torch.float64)
    model.eval()
    batch = collate_modalities([{m: t.double() for m, t in _without_none(item).items()} for item in items])
    with torch.no_grad():
        together = model(batch.inputs, batch.padding_masks, batch.present).branch_outputs
        for i, item in enumerate(items):
            alone = model({m: t.double()[None] for m, t in _without_none(item).items()}).branch_outputs
            torch.testing.assert_close(together[i], alone[0], atol=1e-10, rtol=1e-10)


def test_tuple_items_mirror_their_structure_through_a_dataloader():
    data = [({"rgb": torch.ones(2, 3)}, 4, torch.tensor([1.0, 2.0])),
            ({"audio": torch.ones(5, 1), "rgb": None}, 7, torch.tensor([3.0, 4.0]))]
    loader = DataLoader(data, batch_size=2, collate_fn=partial(collate_modalities, modalities=NAMES))
    batch, target, extra = next(iter(loader))
    assert target.tolist() == [4, 7] and extra.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert list(batch.present) == list(NAMES)  # depth reported, absent everywhere
    assert batch.present["depth"].tolist() == [False, False] and "depth" not in batch.inputs
    assert batch.modalities == ["audio", "rgb"]
    moved = batch.to("cpu")
    assert torch.equal(moved.inputs["audio"], batch.inputs["audio"]) and moved.padding_masks["rgb"] is None


def test_raw_inputs_of_any_rank_are_stacked():
    images = [torch.randn(3, 4, 4) for _ in range(3)]
    batch = collate_modalities([{"image": images[0]}, {"image": images[1], "tone": torch.randn(7, 1)},
                                {"image": images[2]}])
    assert batch.inputs["image"].shape == (3, 3, 4, 4) and batch.padding_masks["image"] is None
    assert torch.equal(batch.inputs["image"][1], images[1])


@pytest.mark.parametrize(
    "items, kwargs, error, message",
    [
        ([], {}, ValueError, r"items: expected a non-empty sequence"),
        ([{"rgb": None}], {}, ValueError, r"items\[0\]: has no modality"),
        ([{"rgb": torch.ones(2, 3)}, {}], {}, ValueError, r"items\[1\]: has no modality"),
        ([{"rgb": [1.0, 2.0]}], {}, TypeError, r"items\[0\]\['rgb'\]: expected a torch.Tensor, got list"),
        ([{"rgb": torch.ones(0, 3)}], {}, ValueError, r"items\[0\]\['rgb'\]: has 0 tokens"),
        ([{"rgb": torch.ones(2, 3)}, {"rgb": torch.ones(2, 4)}], {}, ValueError,
         r"rows must share every axis but the first .* \[\(2, 3\), \(2, 4\)\]"),
        ([{"rgb": torch.ones(2, 3)}, {"rgb": torch.ones(3, 3)}], {"pad": False}, ValueError,
         r"token counts differ \(\[2, 3\]\) and pad=False"),
        ([{"rgb": torch.ones(2, 3)}, {"rgb": torch.ones(2, 3, dtype=torch.float64)}], {}, ValueError,
         r"items\[1\]\['rgb'\]: expected a 2-d torch.float32 tensor as items\[0\]\['rgb'\]"),
        ([{"rgb": torch.ones(2, 3)}, {"rgb": torch.ones(2)}], {}, ValueError, r"expected a 2-d"),
        ([{"rgb": torch.ones(2, 3)}], {"modalities": ["audio"]}, ValueError,
         r"items\[0\]: unknown modality 'rgb'; expected one of \['audio'\]"),
        ([({"rgb": torch.ones(1)}, 0), ({"rgb": torch.ones(1)},)], {}, TypeError, r"items\[1\]: expected"),
        ([({"rgb": torch.ones(1)}, 0), {"rgb": torch.ones(1)}], {}, TypeError, r"items\[1\]: expected"),
        ([{"rgb": torch.ones(1)}, ({"rgb": torch.ones(1)}, 0)], {}, TypeError, r"items\[1\]: expected a mapping"),
        ([(torch.ones(1), 0)], {}, TypeError, r"items\[0\]: expected a mapping"),
    ],
)
def test_bad_items_get_one_clear_error(items, kwargs, error, message):
    with pytest.raises(error, match=message):
        collate_modalities(items, **kwargs)


def test_rows_refuses_bad_indices():
    batch = collate_modalities([{"rgb": torch.ones(1, 2)}, {"rgb": torch.ones(1, 2)}])
    with pytest.raises(ValueError, match=r"expected a \(2,\) bool mask"):
        batch.rows(torch.tensor([True]))
    with pytest.raises(IndexError, match=r"positions must lie in \[0, 2\)"):
        batch.rows(torch.tensor([2]))
    with pytest.raises(TypeError, match="bool or integer"):
        batch.rows(torch.tensor([0.0]))
