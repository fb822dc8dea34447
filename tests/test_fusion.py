"""CommonSpaceSum: order independence, sub-batch scatter against a dense reference, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from umilayers.fusion import CommonSpaceSum, common_space_sum, modality_counts

K, D = 3, 4
NAMES = ["audio", "depth", "rgb", "text"]


@st.composite
def sub_batches(draw, max_batch=6, min_batch=1):
    """(dense, present, sub): dense (B, K, D) per modality, masks with >= 1 modality per row, and
    the sub-batch tensors holding only the present rows."""
    batch = draw(st.integers(min_batch, max_batch))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    present = {n: torch.rand(batch, generator=gen) < 0.5 for n in names}
    for row in range(batch):  # every row keeps at least one modality
        if not any(bool(present[n][row]) for n in names):
            present[names[row % len(names)]][row] = True
    dense = {n: torch.randn(batch, K, D, generator=gen) for n in names}
    sub = {n: dense[n][present[n]] for n in names}
    return dense, present, sub


def dense_reference(dense, present):
    """Row-by-row loop in sorted order: the oracle."""
    names = sorted(dense)
    batch = dense[names[0]].shape[0]
    rows = []
    for b in range(batch):
        terms = [dense[n][b] for n in names if bool(present[n][b])]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        rows.append(total)
    return torch.stack(rows) if rows else torch.zeros(0, K, D)


@given(data=sub_batches())
def test_sub_batches_land_in_the_right_rows(data):
    dense, present, sub = data
    out, count = CommonSpaceSum()(sub, present, return_count=True)
    torch.testing.assert_close(out, dense_reference(dense, present), atol=1e-6, rtol=1e-6)
    expected_count = torch.stack([present[n] for n in dense]).sum(0)
    assert torch.equal(count, expected_count)
    assert torch.equal(modality_counts(present), expected_count)


@given(data=sub_batches())
def test_full_batch_with_present_ignores_absent_rows(data):
    dense, present, sub = data
    poisoned = {n: dense[n].masked_fill(~present[n][:, None, None], float("nan")) for n in dense}
    out = common_space_sum(poisoned, present)
    torch.testing.assert_close(out, dense_reference(dense, present), atol=1e-6, rtol=1e-6)
    # mixing the two layouts gives the same result
    mixed = {n: (poisoned[n] if i % 2 else sub[n]) for i, n in enumerate(sorted(dense))}
    torch.testing.assert_close(common_space_sum(mixed, present), out, atol=1e-6, rtol=1e-6)


@given(data=sub_batches(), seed=st.integers(0, 999))
def test_order_of_modalities_does_not_matter(data, seed):
    dense, present, sub = data
    names = list(sub)
    perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = {names[i]: sub[names[i]] for i in perm}
    shuffled_present = {names[i]: present[names[i]] for i in reversed(perm)}
    assert torch.equal(common_space_sum(shuffled, shuffled_present), common_space_sum(sub, present))
    shuffled_dense = {names[i]: dense[names[i]] for i in perm}
    assert torch.equal(common_space_sum(shuffled_dense), common_space_sum(dense))


def test_without_present_is_the_plain_sum():
    features = {n: torch.randn(2, K, D) for n in ("rgb", "audio", "depth")}
    expected = features["audio"] + features["depth"] + features["rgb"]
    torch.testing.assert_close(CommonSpaceSum()(features), expected, atol=0, rtol=0)


def test_one_modality_in_gives_the_same_tensor_out():
    x = torch.randn(3, K, D)
    assert CommonSpaceSum()({"rgb": x}) is x
    assert torch.equal(CommonSpaceSum()({"rgb": x}, {"rgb": torch.ones(3, dtype=torch.bool)}), x)


def test_sub_batch_gradients_reach_each_row_once():
    present = {"rgb": torch.tensor([True, False, True, True]), "audio": torch.tensor([False, True, True, False])}
    rgb = torch.randn(3, K, D, requires_grad=True)
    audio = torch.randn(2, K, D, requires_grad=True)
    weight = torch.randn(4, K, D)
    (common_space_sum({"rgb": rgb, "audio": audio}, present) * weight).sum().backward()
    torch.testing.assert_close(rgb.grad, weight[present["rgb"]])
    torch.testing.assert_close(audio.grad, weight[present["audio"]])


def test_empty_batch():
    present = {"rgb": torch.zeros(0, dtype=torch.bool)}
    assert common_space_sum({"rgb": torch.zeros(0, K, D)}, present).shape == (0, K, D)
    assert common_space_sum({"rgb": torch.zeros(0, K, D)}).shape == (0, K, D)


def test_present_may_list_modalities_absent_from_the_whole_batch():
    present = {"rgb": torch.tensor([True, True]), "audio": torch.tensor([False, False])}
    x = torch.randn(2, K, D)
    assert torch.equal(common_space_sum({"rgb": x}, present), x)


def test_dtype_is_kept():
    x = torch.randn(2, K, D, dtype=torch.bfloat16)
    present = {"rgb": torch.tensor([True, False]), "audio": torch.tensor([True, True])}
    out = common_space_sum({"rgb": x[:1], "audio": x}, present)
    assert out.dtype == torch.bfloat16


def test_torch_compile_traces():
    present = {"rgb": torch.tensor([True, False, True]), "audio": torch.tensor([False, True, True])}
    features = {"rgb": torch.randn(2, K, D), "audio": torch.randn(2, K, D)}
    compiled = torch.compile(CommonSpaceSum(), backend="aot_eager")
    torch.testing.assert_close(compiled(features, present), common_space_sum(features, present))


# --- bad input ------------------------------------------------------------------------------------


def test_rows_without_any_modality_raise_naming_them():
    present = {"rgb": torch.tensor([True, False, False, True]), "audio": torch.tensor([False, False, False, True])}
    features = {"rgb": torch.randn(2, K, D), "audio": torch.randn(1, K, D)}
    with pytest.raises(ValueError, match=r"present: 2 row\(s\) have no modality .*rows \[1, 2\]"):
        common_space_sum(features, present, check_values=True)


def _mask(*values):
    return torch.tensor(values, dtype=torch.bool)


@pytest.mark.parametrize(
    "features, present, error, pattern",
    [
        ({}, None, ValueError, r"features: expected at least one modality"),
        ([torch.zeros(1, K, D)], None, TypeError, r"features: expected a mapping"),
        ({"rgb": torch.zeros(1, K, D), "audio": torch.zeros(1, K + 1, D)}, None, ValueError,
         r"features\['rgb'\]: .*K is 4 from features\['audio'\], got 3"),
        ({"rgb": torch.zeros(1, K, D), "audio": torch.zeros(1, K, D + 1)}, None, ValueError,
         r"features\['rgb'\]: expected shape \(\*, K=3, D=5\), got \(1, 3, 4\) "
         r"\(D is 5 from features\['audio'\], got 4\)"),
        ({"rgb": torch.zeros(1, K)}, None, ValueError, r"features\['rgb'\]: expected a 3-d tensor"),
        ({"rgb": torch.zeros(1, K, D, dtype=torch.long)}, None, TypeError, r"features\['rgb'\]: expected a floating"),
        ({"rgb": torch.zeros(1, K, D), "audio": torch.zeros(1, K, D, dtype=torch.float64)}, None, TypeError,
         r"features\['rgb'\]: expected dtype torch.float64 \(as features\['audio'\]\), got torch.float32"),
        ({"rgb": torch.zeros(2, K, D), "audio": torch.zeros(3, K, D)}, None, ValueError,
         r"features\['rgb'\]: expected 3 rows \(as features\['audio'\]; without present .*got 2"),
        ({"rgb": torch.zeros(4, K, D)}, {"rgb": _mask(True, False, True)}, ValueError,
         r"features\['rgb'\]: expected 2 rows \(present\['rgb'\].sum\(\)\) or 3 rows \(the full batch\), got 4"),
        ({"rgb": torch.zeros(1, K, D)}, {"rgb": _mask(True, False, True)}, ValueError,
         r"features\['rgb'\]: expected 2 rows .* or 3 rows .*, got 1"),
        ({"rgb": torch.zeros(1, K, D), "audio": torch.zeros(1, K, D)}, {"rgb": _mask(True)}, ValueError,
         r"^present: missing the mask of \['audio'\] \(every modality of features needs its \(B,\) mask; "
         r"present has \['rgb'\]\)$"),
        ({"rgb": torch.zeros(1, K, D), "audoi": torch.zeros(1, K, D)}, {"rgb": _mask(True), "audio": _mask(True)},
         ValueError, r"^features: unknown modality \['audoi'\]: present has masks for \['audio', 'rgb'\], not for it$"),
        ({"rgb": torch.zeros(1, K, D)}, {"rgb": _mask(True), "audio": _mask(True)}, ValueError,
         r"present\['audio'\]: marks 1 row\(s\) as having 'audio', but features has no 'audio'"),
        ({"rgb": torch.zeros(1, K, D), "audio": torch.zeros(1, K, D)},
         {"rgb": _mask(True), "audio": _mask(True, False)}, ValueError,
         r"present\['rgb'\]: .*B is 2 from present\['audio'\], got 1"),
        ({"rgb": torch.zeros(1, K, D)}, {"rgb": torch.ones(1)}, TypeError,
         r"present\['rgb'\]: expected a torch.bool mask"),
        ({"rgb": torch.zeros(1, K, D)}, [True], TypeError, r"present: expected a mapping"),
    ],
)
def test_bad_input_names_the_argument(features, present, error, pattern):
    with pytest.raises(error, match=pattern):
        CommonSpaceSum()(features, present, check_values=True)


def test_device_mismatch_is_named():
    features = {"rgb": torch.zeros(1, K, D), "audio": torch.zeros(1, K, D, device="meta")}
    with pytest.raises(ValueError,
                       match=r"features\['rgb'\]: expected device meta \(as features\['audio'\]\), got cpu"):
        common_space_sum(features)


def test_modality_counts_rejects_empty():
    with pytest.raises(ValueError, match="present: expected at least one modality"):
        modality_counts({})
