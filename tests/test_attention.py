"""Tests of umilayers.attention: mask invariants, backends against the float32 reference, selection.

xformers is only ever imported inside CUDA-marked tests (never at collection).
"""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.tolerances import tol
from umilayers.attention import (
    BACKENDS,
    ENV_VAR,
    AttentionBackendError,
    GroupMaskedTransformer,
    attention_backend,
    backend_support,
    block_mask,
    check_group_sizes,
    group_attention,
    pack_groups,
    select_backend,
    split_groups,
)

DTYPES = [torch.float32, torch.bfloat16]


# --------------------------------------------------------------------------- strategies / helpers


@st.composite
def group_sizes_st(draw, equal: bool = False) -> list[int]:
    if equal:
        return [draw(st.integers(1, 6))] * draw(st.integers(1, 4))
    return draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))


@st.composite
def case_st(draw, equal: bool = False, min_batch: int = 0, dtypes=tuple(DTYPES)):
    """(q, k, v, group_sizes) with q, k, v of shape (B, H, N, h); size-1 groups included."""
    sizes = draw(group_sizes_st(equal=equal))
    batch = draw(st.integers(min_batch, 3))
    heads = draw(st.integers(1, 3))
    head = draw(st.sampled_from([1, 4, 8, 16]))
    dtype = draw(st.sampled_from(list(dtypes)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (batch, heads, sum(sizes), head)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    return q, k, v, sizes


def run(backend, q, k, v, sizes, kpm=None, grad_out=None):
    """Output and (q, k, v) gradients of one backend, from fresh leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = group_attention(*leaves, sizes, backend=backend, key_padding_mask=kpm)
    if grad_out is None:
        grad_out = torch.ones_like(out)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def reference32(q, k, v, sizes, kpm=None, grad_out=None):
    return run("reference", q.float(), k.float(), v.float(), sizes, kpm, grad_out)


def assert_matches_reference(backend, q, k, v, sizes, kpm=None):
    gen = torch.Generator().manual_seed(0)
    grad_out = torch.randn(q.shape[:3] + v.shape[-1:], generator=gen)
    out, grads = run(backend, q, k, v, sizes, kpm, grad_out)
    ref, ref_grads = reference32(q, k, v, sizes, kpm, grad_out)
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref, **tol(q.dtype, "fwd"))
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.float(), rg, **tol(q.dtype, "bwd"), msg=lambda m: f"d{name}: {m}")


def group_slices(sizes):
    start = 0
    for size in sizes:
        yield slice(start, start + size)
        start += size


# --------------------------------------------------------------------------- mask and packing


@given(group_sizes_st())
def test_block_mask_allows_exactly_sum_of_squares(sizes):
    mask = block_mask(sizes)
    n = sum(sizes)
    assert mask.shape == (n, n) and mask.dtype == torch.bool
    assert int(mask.sum()) == sum(s * s for s in sizes)
    for sl in group_slices(sizes):  # and those entries are the diagonal blocks
        assert bool(mask[sl, sl].all())


@given(group_sizes_st(), st.integers(0, 3), st.integers(1, 4))
def test_split_then_pack_returns_input(sizes, batch, width):
    x = torch.randn(batch, sum(sizes), width)
    parts = split_groups(x, sizes, dim=1)
    assert [p.shape[1] for p in parts] == sizes
    packed, packed_sizes = pack_groups(parts, dim=1)
    assert packed_sizes == sizes
    assert torch.equal(packed, x)
    again = split_groups(packed, packed_sizes, dim=1)
    assert all(torch.equal(a, b) for a, b in zip(again, parts))


# --------------------------------------------------------------------------- backends vs reference


@given(case_st(equal=True))
def test_fold_matches_reference(case):
    assert_matches_reference("fold", *case)


@pytest.mark.parametrize("padded", [False, True])
def test_fold_of_the_layers_layout_matches_reference(padded):
    # q, k, v in a (B, N, H, h) memory layout, as GroupMaskedTransformer's blocks give them (here
    # cut from one (B, N, 3 H h) tensor): fold moves the groups into the batch there (views), next
    # to the heads for contiguous (B, H, N, h) inputs.
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(3, 12, 3, 2, 8, generator=gen)  # (B, N, three, H, h)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # three (B, H, N, h) views
    assert q.stride(1) != 12 * q.stride(2)  # not the heads-outside layout
    kpm = None
    if padded:
        kpm = torch.zeros(3, 12, dtype=torch.bool)
        kpm[0, 2:6] = True
        kpm[1, 6:] = True  # row 1: its second group is only padding
    assert_matches_reference("fold", q, k, v, [6, 6], kpm)
    contiguous = group_attention(q.contiguous(), k.contiguous(), v.contiguous(), [6, 6], "fold", kpm)
    torch.testing.assert_close(group_attention(q, k, v, [6, 6], "fold", kpm), contiguous, **tol(torch.float32))


@given(case_st())
def test_sdpa_matches_reference(case):
    assert_matches_reference("sdpa", *case)


@given(case_st())
def test_padded_fold_matches_reference(case):
    assert_matches_reference("padded_fold", *case)


@given(case_st())
def test_loop_matches_reference(case):
    assert_matches_reference("loop", *case)


@given(case_st(min_batch=1), st.data())
def test_perturbing_one_group_leaves_other_groups_bit_identical(case, data):
    q, k, v, sizes = case
    equal = len(set(sizes)) == 1
    backends = ["reference", "sdpa", "loop", "padded_fold"] + (["fold"] if equal else [])
    j = data.draw(st.integers(0, len(sizes) - 1))
    sl = list(group_slices(sizes))[j]
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, sl] = torch.randn_like(t[:, :, sl], dtype=torch.float32).to(t.dtype) * 3
    others = torch.ones(sum(sizes), dtype=torch.bool)
    others[sl] = False
    for backend in backends:
        out = group_attention(q, k, v, sizes, backend=backend)
        out2 = group_attention(q2, k2, v2, sizes, backend=backend)
        assert torch.equal(out[:, :, others], out2[:, :, others]), backend


@given(case_st(min_batch=1), st.data())
def test_permuting_inside_a_group_permutes_the_output(case, data):
    q, k, v, sizes = case
    j = data.draw(st.integers(0, len(sizes) - 1))
    sl = list(group_slices(sizes))[j]
    perm = torch.arange(sum(sizes))
    perm[sl] = perm[sl][torch.randperm(sizes[j], generator=torch.Generator().manual_seed(j))]
    for backend in ["reference", "sdpa", "loop", "padded_fold"] + (["fold"] if len(set(sizes)) == 1 else []):
        out = group_attention(q, k, v, sizes, backend=backend)
        out_perm = group_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], sizes, backend=backend)
        torch.testing.assert_close(out_perm.float(), out[:, :, perm].float(), **tol(q.dtype, "fwd"))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "fold", "loop", "padded_fold"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_second_run_is_identical(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 12, 8, generator=gen).to(dtype) for _ in range(3))
    kpm = torch.rand(3, 12, generator=gen) < 0.3
    out1, grads1 = run(backend, q, k, v, [6, 6], kpm)
    out2, grads2 = run(backend, q, k, v, [6, 6], kpm)
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "fold", "loop", "padded_fold"])
def test_empty_batch_and_single_token(backend):
    q = torch.randn(0, 2, 6, 4, requires_grad=True)
    out = group_attention(q, q, q, [3, 3], backend=backend)
    assert out.shape == (0, 2, 6, 4)
    out.sum().backward()
    assert q.grad.shape == q.shape
    # one token per group: attention returns v exactly (softmax over a single key is 1)
    q, k, v = (torch.randn(2, 1, 3, 4) for _ in range(3))
    torch.testing.assert_close(group_attention(q, k, v, [1, 1, 1], backend=backend), v)


# --------------------------------------------------------------------------- key padding


@given(case_st(min_batch=1), st.data())
def test_key_padding_matches_reference_and_padded_keys_have_no_influence(case, data):
    q, k, v, sizes = case
    batch, n = q.shape[0], q.shape[2]
    kpm = torch.tensor(data.draw(st.lists(st.booleans(), min_size=batch * n, max_size=batch * n))).view(batch, n)
    backends = ["sdpa", "loop", "padded_fold"] + (["fold"] if len(set(sizes)) == 1 else [])
    for backend in backends:
        assert_matches_reference(backend, q, k, v, sizes, kpm)
    k2, v2 = k.clone(), v.clone()
    k2[kpm[:, None, :, None].expand_as(k)] = 7.0
    v2[kpm[:, None, :, None].expand_as(v)] = -7.0
    for backend in ["reference"] + backends:
        assert torch.equal(
            group_attention(q, k, v, sizes, backend, kpm), group_attention(q, k2, v2, sizes, backend, kpm)
        ), backend


@pytest.mark.parametrize("backend", ["reference", "sdpa", "fold", "loop", "padded_fold"])
def test_group_of_padding_only_gives_zero_rows_and_finite_grads(backend):
    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    kpm = torch.zeros(2, 8, dtype=torch.bool)
    kpm[0, :4] = True  # row 0: the whole first group is padding
    out, grads = run(backend, q, k, v, [4, 4], kpm, torch.randn(2, 2, 8, 4))
    assert torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4]))
    assert out[0, :, 4:].abs().sum() > 0 and out[1].abs().sum() > 0
    assert all(torch.isfinite(g).all() for g in grads)
    # and the queries of that group receive no gradient (they influence nothing)
    assert torch.equal(grads[0][0, :, :4], torch.zeros_like(grads[0][0, :, :4]))


# --------------------------------------------------------------------------- selection


def test_auto_picks_fold_for_equal_groups_then_loop_then_padded_fold_then_sdpa_on_cpu(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    q = torch.randn(2, 2, 6, 4)
    assert select_backend("auto", q, [3, 3]) == "fold"
    assert select_backend("auto", q, [6]) == "fold"
    assert select_backend("auto", q, [2, 4]) == "loop"
    assert select_backend("auto", q, [1, 5], torch.zeros(2, 6, dtype=torch.bool)) == "loop"
    assert select_backend("auto", q, [3, 3], torch.zeros(2, 6, dtype=torch.bool)) == "fold"
    long = torch.randn(1, 1, 514, 4)
    assert select_backend("auto", long, [129, 129, 128, 128]) == "loop"
    assert select_backend("auto", long, [257, 257]) == "fold"
    assert select_backend("auto", long, [65, 65] + [64] * 6) == "loop"  # up to 8 groups
    many = [58] * 8 + [50]  # beyond the loop's group limit; padded work 9 * 58**2 <= 514**2 / 2
    assert select_backend("auto", long, many) == "padded_fold"
    assert select_backend("auto", long, [1] * 8 + [506]) == "sdpa"  # padding 9 * 506**2 > 514**2 / 2


def test_explicit_unsupported_backend_lists_reasons():
    xformers_loaded = "xformers" in sys.modules
    q = torch.randn(2, 2, 6, 4)
    with pytest.raises(AttentionBackendError, match="fold needs equal group sizes") as err:
        group_attention(q, q, q, [2, 4], backend="fold")
    assert err.value.reasons == ["fold needs equal group sizes, got [2, 4]"]
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    with pytest.raises(AttentionBackendError) as err:
        group_attention(q.double(), q.double(), q.double(), [3, 3], backend="xformers", key_padding_mask=kpm)
    reasons = " | ".join(err.value.reasons)
    assert "CUDA" in reasons and "key_padding_mask" in reasons and "float64" in reasons
    assert backend_support("sdpa", q, [2, 4]) == [] and backend_support("reference", q, [1, 5]) == []
    # on a CPU tensor nothing of xformers is imported, not even to list reasons
    assert ("xformers" in sys.modules) == xformers_loaded


def test_context_manager_and_env_var_precedence_and_restore(monkeypatch):
    q = torch.randn(1, 1, 4, 4)
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv(ENV_VAR, "reference")
    assert select_backend("auto", q, [2, 2]) == "reference"  # env var beats auto
    with attention_backend("sdpa"):
        assert select_backend("auto", q, [2, 2]) == "sdpa"  # context beats env var
        assert select_backend("fold", q, [2, 2]) == "fold"  # explicit beats context
        with attention_backend("auto"):
            assert select_backend("auto", q, [2, 2]) == "fold"  # "auto" context ignores the env var
        assert select_backend("auto", q, [2, 2]) == "sdpa"  # inner context restored
    assert select_backend("auto", q, [2, 2]) == "reference"
    with pytest.raises(RuntimeError):  # restored even when the block raises
        with attention_backend("sdpa"):
            raise RuntimeError
    assert select_backend("auto", q, [2, 2]) == "reference"
    monkeypatch.delenv(ENV_VAR)
    assert select_backend("auto", q, [2, 2]) == "fold"
    with attention_backend("fold"):
        with pytest.raises(AttentionBackendError, match="equal group sizes"):
            select_backend("auto", q, [1, 3])
    monkeypatch.setenv(ENV_VAR, "flash")
    with pytest.raises(ValueError, match=ENV_VAR):
        select_backend("auto", q, [2, 2])
    with pytest.raises(ValueError, match="backend"):
        with attention_backend("flash"):
            pass


def test_context_manager_reaches_the_module(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    layer = GroupMaskedTransformer(dim=8, depth=1, heads=2, group_sizes=[1, 3])
    x = torch.randn(2, 4, 8)
    layer(x)  # auto -> sdpa works
    with attention_backend("fold"), pytest.raises(AttentionBackendError):
        layer(x)


# --------------------------------------------------------------------------- input validation


def test_bad_inputs_name_the_argument():
    q = torch.randn(2, 2, 6, 4)
    with pytest.raises(ValueError, match=r"group_sizes: expected sizes summing to N=6, got \[2, 3\]"):
        group_attention(q, q, q, [2, 3])
    with pytest.raises(ValueError, match=r"group_sizes\[1\]: expected a positive group size, got 0"):
        group_attention(q, q, q, [6, 0])
    with pytest.raises(ValueError, match="group_sizes: expected at least one group"):
        check_group_sizes([])
    with pytest.raises(TypeError, match=r"group_sizes\[0\]: expected an int"):
        check_group_sizes([2.5])
    with pytest.raises(ValueError, match=r"q: expected a 4-d tensor of shape \(B, H, N, h\), got 3-d"):
        group_attention(q[0], q[0], q[0], [6])
    with pytest.raises(ValueError, match=r"k: expected shape \(B=2, H=2, N=6, h=4\), got \(2, 2, 5, 4\)"):
        group_attention(q, q[:, :, :5], q, [6])
    with pytest.raises(TypeError, match="one dtype"):
        group_attention(q, q.double(), q, [6])
    with pytest.raises(TypeError, match="key_padding_mask: expected a torch.bool mask"):
        group_attention(q, q, q, [6], key_padding_mask=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="backend: expected one of"):
        group_attention(q, q, q, [6], backend="flash")


def test_module_validation():
    with pytest.raises(AttentionBackendError, match="equal group sizes"):
        GroupMaskedTransformer(dim=8, depth=1, heads=2, group_sizes=[1, 3], backend="fold")
    with pytest.raises(ValueError, match="group_sizes"):
        GroupMaskedTransformer(dim=8, depth=1, heads=2, group_sizes=[1, -3])
    with pytest.raises(ValueError, match="heads"):
        GroupMaskedTransformer(dim=8, depth=1, heads=3)
    with pytest.raises(ValueError, match="backend"):
        GroupMaskedTransformer(dim=8, depth=1, heads=2, backend="flash")
    layer = GroupMaskedTransformer(dim=8, depth=1, heads=2, groups=3)
    with pytest.raises(ValueError, match="N=4 tokens cannot be split into groups=3"):
        layer(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match=r"x: expected shape \(B=1, N=6, 8\), got \(1, 6, 7\)"):
        layer(torch.randn(1, 6, 7))
    with pytest.raises(ValueError, match="padding_mask"):
        layer(torch.randn(1, 6, 8), torch.zeros(1, 5, dtype=torch.bool))


# --------------------------------------------------------------------------- the module


def test_module_backends_agree_when_flipped():
    torch.manual_seed(0)
    layer = GroupMaskedTransformer(dim=16, depth=2, heads=4, groups=2)
    x = torch.randn(3, 10, 16)
    kpm = torch.rand(3, 10) < 0.3
    outputs = {}
    for backend in ["reference", "fold", "loop", "padded_fold", "sdpa", "auto"]:
        layer.backend = backend
        outputs[backend] = layer(x, kpm)
    for backend in ["fold", "loop", "padded_fold", "sdpa", "auto"]:
        torch.testing.assert_close(outputs[backend], outputs["reference"], **tol(torch.float32, "fwd"))


# --------------------------------------------------------------------------- head_dim


def _block_parameters(dim: int, inner: int, hidden: int) -> int:
    """One layer: two LayerNorms, QKV (dim -> 3 inner), output (inner -> dim), MLP (dim -> hidden -> dim)."""
    return 2 * 2 * dim + (dim * 3 * inner + 3 * inner) + (inner * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim)


@pytest.mark.parametrize("dim,heads,head_dim", [(16, 2, None), (16, 2, 8), (16, 3, 12), (12, 8, 4), (20, 1, 64)])
def test_head_dim_sets_the_attention_width(dim, heads, head_dim):
    layer = GroupMaskedTransformer(dim=dim, depth=2, heads=heads, groups=2, head_dim=head_dim)
    inner = heads * (head_dim or dim // heads)
    block = layer.blocks[0]
    assert layer.head_dim == (head_dim or dim // heads) and f"head_dim={layer.head_dim}" in repr(layer)
    assert block.qkv.weight.shape == (3 * inner, dim) and block.proj.weight.shape == (dim, inner)
    assert sum(p.numel() for p in layer.parameters()) == 2 * _block_parameters(dim, inner, 2 * dim)
    x = torch.randn(3, 10, dim, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == x.shape and x.grad.shape == x.shape


def test_heads_need_not_divide_dim_when_head_dim_is_given():
    GroupMaskedTransformer(dim=16, depth=1, heads=3, head_dim=5)
    with pytest.raises(ValueError, match="heads"):
        GroupMaskedTransformer(dim=16, depth=1, heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        GroupMaskedTransformer(dim=16, depth=1, heads=2, head_dim=0)


def test_default_head_dim_is_the_layout_of_dim_over_heads():
    # The default builds the same parameters, in the same order and from the same random draws,
    # as an explicit head_dim = dim // heads: the default is bit for bit what it was before.
    torch.manual_seed(0)
    default = GroupMaskedTransformer(dim=16, depth=2, heads=4, groups=2)
    torch.manual_seed(0)
    explicit = GroupMaskedTransformer(dim=16, depth=2, heads=4, groups=2, head_dim=4)
    assert [(n, p.shape) for n, p in default.named_parameters()] == [(n, p.shape) for n, p in explicit.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    assert default.blocks[0].qkv.weight.shape == (48, 16) and default.blocks[0].proj.weight.shape == (16, 16)
    x = torch.randn(2, 8, 16)
    assert torch.equal(default(x), explicit(x))


@pytest.mark.parametrize("group_sizes", [[5, 5], [3, 7], [2, 3, 5]])
def test_every_backend_matches_the_reference_with_head_dim_not_dim_over_heads(group_sizes):
    torch.manual_seed(0)
    layer = GroupMaskedTransformer(dim=16, depth=2, heads=3, head_dim=12, group_sizes=group_sizes)
    x = torch.randn(3, sum(group_sizes), 16)
    kpm = torch.zeros(3, sum(group_sizes), dtype=torch.bool)
    kpm[1, -2:] = True
    backends = ["sdpa", "loop", "padded_fold", "auto"] + (["fold"] if len(set(group_sizes)) == 1 else [])
    for mask in (None, kpm):
        results = {}
        for backend in ["reference", *backends]:
            layer.backend = backend
            leaf = x.clone().requires_grad_(True)
            out = layer(leaf, mask)
            out.square().sum().backward()
            results[backend] = (out.detach(), leaf.grad, layer.blocks[0].qkv.weight.grad.clone())
            layer.zero_grad(set_to_none=True)
        ref_out, ref_dx, ref_dw = results.pop("reference")
        for backend, (out, dx, dw) in results.items():
            torch.testing.assert_close(out, ref_out, **tol(torch.float32, "fwd"), msg=backend)
            torch.testing.assert_close(dx, ref_dx, **tol(torch.float32, "bwd"), msg=backend)
            torch.testing.assert_close(dw, ref_dw, **tol(torch.float32, "bwd"), msg=backend)


@pytest.mark.parametrize("group_sizes", [[4, 4], [3, 1, 5], [6]])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("padded", [False, True])
def test_first_of_group_computes_only_the_first_queries_exactly(group_sizes, depth, padded):
    torch.manual_seed(0)
    layer = GroupMaskedTransformer(dim=16, depth=depth, heads=3, head_dim=8, group_sizes=group_sizes)
    n = sum(group_sizes)
    x = torch.randn(3, n, 16)
    mask = None
    if padded:
        mask = torch.zeros(3, n, dtype=torch.bool)
        mask[0, -2:] = True
        mask[1, : group_sizes[0]] = True  # row 1: its whole first group is padding
    results = {}
    for fast in (True, False):
        layer.first_queries_only = fast
        leaf = x.clone().requires_grad_(True)
        out = layer(leaf, mask, first_of_group=True)
        out.square().sum().backward()
        results[fast] = (out.detach(), leaf.grad, [p.grad.clone() for p in layer.parameters()])
        layer.zero_grad(set_to_none=True)
    (fast_out, fast_dx, fast_dw), (full_out, full_dx, full_dw) = results[True], results[False]
    assert fast_out.shape == (3, len(group_sizes), 16)
    starts = [sum(group_sizes[:g]) for g in range(len(group_sizes))]
    layer.first_queries_only = True
    torch.testing.assert_close(full_out, layer(x, mask)[:, starts], rtol=0, atol=0)  # the slow path selects
    torch.testing.assert_close(fast_out, full_out, **tol(torch.float32, "fwd"))
    torch.testing.assert_close(fast_dx, full_dx, **tol(torch.float32, "bwd"))
    for a, b in zip(fast_dw, full_dw):
        torch.testing.assert_close(a, b, **tol(torch.float32, "bwd"))


def test_module_groups_are_isolated():
    torch.manual_seed(0)
    layer = GroupMaskedTransformer(dim=16, depth=2, heads=4, group_sizes=[3, 1, 4])
    x = torch.randn(2, 8, 16)
    x2 = x.clone()
    x2[:, 3] += 1.0  # the size-1 group
    out, out2 = layer(x), layer(x2)
    keep = torch.tensor([True] * 3 + [False] + [True] * 4)
    assert torch.equal(out[:, keep], out2[:, keep])
    assert not torch.equal(out[:, 3], out2[:, 3])


def test_module_under_cpu_autocast_bf16():
    torch.manual_seed(0)
    layer = GroupMaskedTransformer(dim=16, depth=2, heads=4, groups=2)
    x = torch.randn(2, 8, 16, requires_grad=True)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert out.shape == x.shape and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_module_under_torch_compile():
    # aot_eager traces forward and backward graphs (~3 s); inductor adds ~20 s of C++ compile
    # on 2 cores for no extra coverage of this module's Python.
    torch.manual_seed(0)
    layer = GroupMaskedTransformer(dim=16, depth=1, heads=2, group_sizes=[3, 5])
    x = torch.randn(2, 8, 16)
    kpm = torch.zeros(2, 8, dtype=torch.bool)
    kpm[1, -2:] = True
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, kpm), layer(x, kpm), **tol(torch.float32, "fwd"))


# --------------------------------------------------------------------------- CUDA only


def _xformers_ops():
    return pytest.importorskip("xformers.ops", reason="xformers cannot be imported")


@pytest.mark.cuda
@pytest.mark.parametrize("sizes", [[5], [3, 3], [1, 4, 2], [129, 128, 1]])
def test_block_mask_equals_xformers_block_diagonal_mask(sizes):
    xops = _xformers_ops()
    bias = xops.fmha.BlockDiagonalMask.from_seqlens(sizes, device=torch.device("cuda"))
    n = sum(sizes)
    materialized = bias.materialize((n, n), device="cuda")
    assert torch.equal(materialized == 0, block_mask(sizes, device=torch.device("cuda")))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sizes", [[8, 8], [1, 7, 16], [257, 257]])
def test_xformers_matches_reference(dtype, sizes):
    _xformers_ops()
    q, k, v = (torch.randn(2, 4, sum(sizes), 32, device="cuda", dtype=dtype) for _ in range(3))
    reasons = backend_support("xformers", q.requires_grad_(), sizes)
    if reasons:
        pytest.skip("xformers backend unusable here: " + "; ".join(reasons))
    assert_matches_reference("xformers", q.detach(), k, v, sizes)
    assert select_backend("auto", q, sizes) == "xformers"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["fold", "loop", "padded_fold", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_fold_and_sdpa_match_reference(backend, dtype):
    q, k, v = (torch.randn(2, 4, 40, 32, device="cuda", dtype=dtype) for _ in range(3))
    kpm = torch.zeros(2, 40, dtype=torch.bool, device="cuda")
    kpm[0, :20] = True
    assert_matches_reference(backend, q, k, v, [20, 20])
    assert_matches_reference(backend, q, k, v, [20, 20], kpm)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["fold", "loop", "padded_fold", "sdpa", "xformers"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backends_match_reference_with_a_head_dim_of_its_own(backend, dtype):
    # The width a module with head_dim=48 (3 heads, dim 64: not dim // heads) hands its kernel.
    q, k, v = (torch.randn(2, 3, 514, 48, device="cuda", dtype=dtype) for _ in range(3))
    if backend == "xformers":
        _xformers_ops()
        reasons = backend_support("xformers", q.clone().requires_grad_(), [257, 257])
        if reasons:
            pytest.skip("xformers backend unusable here: " + "; ".join(reasons))
    assert_matches_reference(backend, q, k, v, [257, 257])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_module_with_head_dim_under_autocast_matches_reference(dtype):
    torch.manual_seed(0)
    layer = GroupMaskedTransformer(dim=64, depth=2, heads=3, head_dim=48, groups=2, device="cuda")
    x = torch.randn(4, 130, 64, device="cuda")
    layer.backend = "reference"
    expected = layer(x)  # float32 throughout
    for backend in ("auto", "fold", "sdpa"):
        layer.backend = backend
        with torch.autocast("cuda", dtype=dtype):
            out = layer(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05, msg=backend)


@pytest.mark.cuda
def test_cuda_module_auto_runs_with_and_without_padding():
    layer = GroupMaskedTransformer(dim=64, depth=1, heads=2, groups=2, device="cuda")
    x = torch.randn(2, 16, 64, device="cuda")
    kpm = torch.zeros(2, 16, dtype=torch.bool, device="cuda")
    kpm[:, -3:] = True
    for mask in (None, kpm):
        out = layer(x, mask)
        layer.backend = "reference"
        torch.testing.assert_close(out, layer(x, mask), **tol(torch.float32, "fwd"))
        layer.backend = "auto"


def test_backends_constant_lists_every_implementation():
    assert set(BACKENDS) == {"auto", "xformers", "fold", "loop", "padded_fold", "sdpa", "reference"}


def test_module_resolves_the_backend_once_per_call(monkeypatch):
    import umilayers.attention as attention

    calls = []
    real = attention.select_backend
    monkeypatch.setattr(attention, "select_backend", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    layer = GroupMaskedTransformer(dim=16, depth=3, heads=2, groups=2)
    layer(torch.randn(2, 8, 16))
    assert len(calls) == 1  # not once per layer


def test_module_takes_an_attention_kernel():
    # Variation by constructor argument (timm's Block(attn_layer=...)): every layer calls the kernel.
    import copy

    from umilayers.attention import group_attention

    seen = []

    def kernel(q, k, v, group_sizes, key_padding_mask):
        seen.append(list(group_sizes))
        return group_attention(q, k, v, group_sizes, "reference", key_padding_mask)

    torch.manual_seed(0)
    layer = GroupMaskedTransformer(dim=16, depth=3, heads=2, groups=2, backend="reference")
    custom = copy.deepcopy(layer)
    custom.backend = kernel
    x = torch.randn(2, 8, 16)
    assert torch.equal(custom(x), layer(x)) and seen == [[4, 4]] * 3
    assert "backend=kernel" in repr(custom)
