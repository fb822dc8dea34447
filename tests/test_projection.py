"""FeatureProjection and PooledProjection: softmax invariants, padding, shapes, gradients, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.tolerances import tol
from umilayers.projection import FeatureProjection, PooledProjection

IN_DIM, OUT_DIM, HEADS = 6, 8, 2


def make_projection(num_tokens=3, normalize="inputs", seed=0, **kwargs):
    torch.manual_seed(seed)
    kwargs.setdefault("depth", 1)
    return FeatureProjection(IN_DIM, OUT_DIM, num_tokens, heads=HEADS, normalize=normalize, **kwargs)


@st.composite
def padded_batches(draw, max_batch=3, max_tokens=6, min_batch=0):
    """(x, padding_mask) with at least one valid token per row; padding anywhere in the row."""
    batch = draw(st.integers(min_batch, max_batch))
    tokens = draw(st.integers(1, max_tokens))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, IN_DIM, generator=gen)
    mask = torch.rand(batch, tokens, generator=gen) < draw(st.floats(0.0, 0.8))
    if batch:
        keep = torch.randint(tokens, (batch,), generator=gen)
        mask[torch.arange(batch), keep] = False
    return x, mask


# --- softmax invariants -------------------------------------------------------------------------


@given(data=padded_batches(), num_tokens=st.integers(1, 5), normalize=st.sampled_from(["inputs", "slots"]))
def test_weights_are_a_masked_softmax(data, num_tokens, normalize):
    x, mask = data
    proj = make_projection(num_tokens, normalize)
    out, weights = proj(x, padding_mask=mask, return_weights=True)
    batch, tokens = mask.shape
    assert out.shape == (batch, num_tokens, OUT_DIM)
    assert weights.shape == (batch, tokens, num_tokens)
    assert bool((weights >= 0).all())
    assert bool((weights[mask] == 0).all()), "padding tokens must get exactly zero weight"
    if normalize == "inputs":
        # every output slot is a convex combination of the valid input tokens
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(batch, num_tokens))
    else:
        # released code: every valid input token spreads over the slots
        sums = weights.sum(dim=2)
        torch.testing.assert_close(sums[~mask], torch.ones(int((~mask).sum())))
        assert bool((sums[mask] == 0).all())


@given(data=padded_batches(min_batch=1), normalize=st.sampled_from(["inputs", "slots"]))
def test_output_is_linear_map_of_reorganised_raw_features(data, normalize):
    """Oracle: out == Linear(O^T F) on the raw features, in float64, for both fast paths."""
    x, mask = data
    proj = make_projection(4, normalize).double()
    x = x.double()
    for project_first in (False, True):
        proj.project_first = project_first
        out, weights = proj(x, padding_mask=mask, return_weights=True)
        reorganised = torch.einsum("bnk,bnd->bkd", weights, x.masked_fill(mask[..., None], 0))
        torch.testing.assert_close(out, proj.proj(reorganised), atol=1e-12, rtol=1e-10)


def test_slots_mode_sums_the_inputs_instead_of_averaging():
    """Documented scale of the released code: the slots together hold sum_n F[n] (not a mean)."""
    proj = make_projection(5, "slots")
    x = torch.randn(2, 7, IN_DIM)
    _, weights = proj(x, return_weights=True)
    reorganised = torch.einsum("bnk,bnd->bkd", weights, x)
    torch.testing.assert_close(reorganised.sum(dim=1), x.sum(dim=1), **tol(torch.float32))


# --- padding and permutation ----------------------------------------------------------------------


@given(
    data=padded_batches(min_batch=1),
    extra=st.integers(1, 4),
    normalize=st.sampled_from(["inputs", "slots"]),
    seed=st.integers(0, 2**16),
)
def test_adding_padding_anywhere_leaves_output_unchanged(data, extra, normalize, seed):
    x, mask = data
    proj = make_projection(3, normalize)
    expected, w_expected = proj(x, padding_mask=mask, return_weights=True)
    # insert `extra` padding tokens holding NaN at random places
    batch, tokens = mask.shape
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(tokens + extra, generator=gen)
    real_slots = order[:tokens].sort().values
    x_pad = torch.full((batch, tokens + extra, IN_DIM), float("nan"))
    mask_pad = torch.ones(batch, tokens + extra, dtype=torch.bool)
    x_pad[:, real_slots] = x
    mask_pad[:, real_slots] = mask
    out, weights = proj(x_pad, padding_mask=mask_pad, return_weights=True)
    torch.testing.assert_close(out, expected, **tol(torch.float32))
    torch.testing.assert_close(weights[:, real_slots], w_expected, **tol(torch.float32))
    assert bool((weights[mask_pad] == 0).all())


@pytest.mark.parametrize("normalize", ["inputs", "slots"])
def test_padding_appended_at_end_leaves_output_unchanged_with_positions(normalize):
    proj = make_projection(3, normalize, positions="learned", max_tokens=10)
    x = torch.randn(2, 5, IN_DIM)
    expected = proj(x)
    x_pad = torch.cat([x, torch.randn(2, 4, IN_DIM)], dim=1)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, 5:] = True
    torch.testing.assert_close(proj(x_pad, padding_mask=mask), expected, **tol(torch.float32))


def test_positions_make_the_output_order_dependent():
    proj = make_projection(3, positions="learned", max_tokens=8)
    x = torch.randn(1, 6, IN_DIM)
    assert not torch.allclose(proj(x), proj(x.flip(1)), atol=1e-4)


@given(data=padded_batches(min_batch=1), normalize=st.sampled_from(["inputs", "slots"]), seed=st.integers(0, 999))
def test_without_positions_token_order_does_not_matter(data, normalize, seed):
    x, mask = data
    proj = make_projection(3, normalize)
    perm = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(seed))
    out, weights = proj(x, padding_mask=mask, return_weights=True)
    out_p, weights_p = proj(x[:, perm], padding_mask=mask[:, perm], return_weights=True)
    torch.testing.assert_close(out_p, out, **tol(torch.float32))
    torch.testing.assert_close(weights_p, weights[:, perm], **tol(torch.float32))


# --- shapes and edge sizes ------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["inputs", "slots"])
@pytest.mark.parametrize("shape", [(0, 4), (3, 1), (1, 1), (2, 9)])
@pytest.mark.parametrize("num_tokens", [1, 4])
def test_output_shape_edge_sizes(normalize, shape, num_tokens):
    batch, tokens = shape
    proj = make_projection(num_tokens, normalize)
    out, weights = proj(torch.randn(batch, tokens, IN_DIM), return_weights=True)
    assert out.shape == (batch, num_tokens, OUT_DIM)
    assert weights.shape == (batch, tokens, num_tokens)
    assert bool(torch.isfinite(out).all())
    if tokens == 1 and normalize == "inputs":
        assert bool((weights == 1).all())


def test_depth_zero_has_no_transformer():
    proj = make_projection(3, depth=0)
    assert proj.encoder is None
    assert proj(torch.randn(2, 4, IN_DIM)).shape == (2, 3, OUT_DIM)


def test_head_dim_widens_the_attention_and_lets_heads_not_divide_out_dim():
    torch.manual_seed(0)
    proj = FeatureProjection(IN_DIM, OUT_DIM, 3, depth=2, heads=3, head_dim=5)
    block = proj.encoder.blocks[0]
    assert proj.encoder.head_dim == 5
    assert block.qkv.weight.shape == (45, OUT_DIM) and block.proj.weight.shape == (OUT_DIM, 15)
    default = FeatureProjection(IN_DIM, OUT_DIM, 3, depth=2, heads=HEADS)
    extra = 2 * ((OUT_DIM * 45 + 45 + 15 * OUT_DIM) - (OUT_DIM * 3 * OUT_DIM + 3 * OUT_DIM + OUT_DIM * OUT_DIM))
    assert sum(p.numel() for p in proj.parameters()) == sum(p.numel() for p in default.parameters()) + extra
    x = torch.randn(2, 5, IN_DIM)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 3:] = True
    out, weights = proj(x, padding_mask=mask, return_weights=True)
    assert out.shape == (2, 3, OUT_DIM) and bool((weights[0, 3:] == 0).all())
    with pytest.raises(ValueError, match="head_dim"):
        FeatureProjection(IN_DIM, OUT_DIM, 3, heads=2, head_dim=0)


# --- gradients, device and dtype ------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["inputs", "slots"])
@pytest.mark.parametrize("positions", [None, "learned"])
def test_gradients_reach_input_and_every_parameter(normalize, positions):
    proj = make_projection(3, normalize, positions=positions, max_tokens=6)
    x = torch.randn(2, 5, IN_DIM, requires_grad=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 3:] = True
    proj(x, padding_mask=mask).square().sum().backward()
    assert x.grad is not None and bool(x.grad[~mask].abs().sum() > 0)
    assert bool((x.grad[mask] == 0).all()), "padding values are never read"
    for name, p in proj.named_parameters():
        assert p.grad is not None, name
        assert bool(torch.isfinite(p.grad).all()), name
        if name != "pos_embed":  # rows 5.. of a learned table are unused by a 5-token input
            assert bool(p.grad.abs().sum() > 0), name


def test_factory_kwargs_reach_every_parameter():
    proj = FeatureProjection(IN_DIM, OUT_DIM, 3, depth=2, heads=HEADS, positions="learned", max_tokens=4, device="meta")
    assert {p.device.type for p in proj.parameters()} == {"meta"}
    proj = FeatureProjection(IN_DIM, OUT_DIM, 3, depth=1, heads=HEADS, dtype=torch.float64)
    assert {p.dtype for p in proj.parameters()} == {torch.float64}
    out, weights = proj(torch.randn(2, 3, IN_DIM, dtype=torch.float64), return_weights=True)
    assert out.dtype == torch.float64 and weights.dtype == torch.float64
    pooled = PooledProjection(IN_DIM, OUT_DIM, 3, device="meta", dtype=torch.float16)
    assert {(p.device.type, p.dtype) for p in pooled.parameters()} == {("meta", torch.float16)}


@pytest.mark.parametrize("normalize", ["inputs", "slots"])
def test_bf16_autocast_on_cpu(normalize):
    proj = make_projection(3, normalize)
    x = torch.randn(2, 5, IN_DIM)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 4] = True
    expected = proj(x, padding_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weights = proj(x, padding_mask=mask, return_weights=True)
    assert out.dtype == torch.bfloat16
    assert weights.dtype == torch.float32
    assert bool((weights[mask] == 0).all())
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_bf16_parameters():
    proj = make_projection(3).to(torch.bfloat16)
    out = proj(torch.randn(2, 4, IN_DIM, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


@pytest.mark.slow  # 15-40 s on 2 cores, mostly inductor's first compile
def test_torch_compile_inductor():
    proj = make_projection(3, "inputs")
    compiled = torch.compile(proj)
    x = torch.randn(2, 5, IN_DIM)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[1, 2:] = True
    torch.testing.assert_close(compiled(x, mask), proj(x, mask), **tol(torch.float32))


# --- bad input ------------------------------------------------------------------------------------


def test_all_padding_rows_raise_naming_the_rows():
    proj = make_projection(3)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[1] = True
    mask[3] = True
    with pytest.raises(ValueError, match=r"padding_mask: every token is padding in 2 row\(s\) \[1, 3\]"):
        proj(torch.randn(4, 3, IN_DIM), padding_mask=mask, check_values=True)
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        PooledProjection(IN_DIM, OUT_DIM, 3)(torch.randn(4, 3, IN_DIM), padding_mask=mask, check_values=True)


@pytest.mark.parametrize(
    "x, mask, error, pattern",
    [
        (torch.randn(2, 3, IN_DIM + 1), None, ValueError,
         r"x: expected shape \(B=2, k_m=3, 6\), got \(2, 3, 7\) \(axis 2 should be 6\)"),
        (torch.randn(3, IN_DIM), None, ValueError, r"x: expected a 3-d tensor"),
        (torch.zeros(2, 3, IN_DIM, dtype=torch.long), None, TypeError, r"x: expected a floating-point"),
        ([[0.0] * IN_DIM], None, TypeError, r"x: expected a torch.Tensor, got list"),
        (torch.randn(2, 3, IN_DIM), torch.zeros(2, 4, dtype=torch.bool), ValueError, r"padding_mask: .*k_m is 3"),
        (torch.randn(2, 3, IN_DIM), torch.zeros(2, 3), TypeError, r"padding_mask: expected a torch.bool mask"),
        (torch.randn(2, 0, IN_DIM), None, ValueError, r"x: expected at least one token"),
    ],
)
def test_bad_input_names_the_argument(x, mask, error, pattern):
    for module in (make_projection(3), PooledProjection(IN_DIM, OUT_DIM, 3)):
        with pytest.raises(error, match=pattern):
            module(x, padding_mask=mask)


def test_too_many_tokens_for_max_tokens():
    proj = make_projection(3, positions="learned", max_tokens=4)
    with pytest.raises(ValueError, match=r"x: expected at most max_tokens=4 tokens, got k_m=5"):
        proj(torch.randn(1, 5, IN_DIM))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"normalize": "rows"}, r"normalize: expected one of \['inputs', 'slots'\], got 'rows'"),
        ({"positions": "rope"}, r"positions: expected one of"),
        ({"positions": "learned"}, r"max_tokens: required with positions='learned'"),
        ({"heads": 3}, r"heads: must divide out_dim=8, got heads=3"),
        ({"depth": -1}, r"depth: expected an int >= 0"),
        ({"num_tokens": 0}, r"num_tokens: expected a positive int, got 0"),
        ({"mlp_ratio": 0}, r"mlp_ratio: expected a number > 0"),
    ],
)
def test_bad_constructor_arguments(kwargs, pattern):
    args = {"in_dim": IN_DIM, "out_dim": OUT_DIM, "num_tokens": 3, "heads": HEADS, **kwargs}
    with pytest.raises(ValueError, match=pattern):
        FeatureProjection(**args)


# --- PooledProjection -----------------------------------------------------------------------------


@given(data=padded_batches(), num_tokens=st.integers(1, 4), mode=st.sampled_from(["repeat", "reshape"]))
def test_pooled_projection_is_a_masked_mean_then_linear(data, num_tokens, mode):
    x, mask = data
    torch.manual_seed(0)
    pool = PooledProjection(IN_DIM, OUT_DIM, num_tokens, mode=mode)
    out, weights = pool(x, padding_mask=mask, return_weights=True)
    batch = x.shape[0]
    assert out.shape == (batch, num_tokens, OUT_DIM)
    assert weights.shape == (batch, x.shape[1], num_tokens)
    assert bool((weights[mask] == 0).all())
    if batch:
        torch.testing.assert_close(weights.sum(dim=1), torch.ones(batch, num_tokens))
    means = torch.stack([x[b][~mask[b]].mean(dim=0) for b in range(batch)]) if batch else x.new_zeros(0, IN_DIM)
    width = OUT_DIM if mode == "repeat" else num_tokens * OUT_DIM
    expected = pool.proj(means).reshape(batch, width // OUT_DIM, OUT_DIM).expand(batch, num_tokens, OUT_DIM)
    torch.testing.assert_close(out, expected, **tol(torch.float32))
    # adding NaN padding at the end changes nothing
    x_pad = torch.cat([x, torch.full((batch, 2, IN_DIM), float("nan"))], dim=1)
    mask_pad = torch.cat([mask, torch.ones(batch, 2, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(pool(x_pad, padding_mask=mask_pad), out, **tol(torch.float32))


def test_pooled_projection_gradients_and_bad_mode():
    pool = PooledProjection(IN_DIM, OUT_DIM, 3, mode="reshape")
    x = torch.randn(2, 4, IN_DIM, requires_grad=True)
    pool(x).sum().backward()
    assert x.grad is not None and pool.proj.weight.grad is not None
    with pytest.raises(ValueError, match=r"mode: expected one of \['repeat', 'reshape'\], got 'sum'"):
        PooledProjection(IN_DIM, OUT_DIM, 3, mode="sum")
