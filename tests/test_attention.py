"""Tests of umilayers.attention: mask invariants, backends against a float32 oracle, choice, module.

The oracle (:func:`reference_attention`) is explicit float32 ``softmax(Q K^T / sqrt(h) + mask) V``.
xformers is imported only inside the tests that need it (never at collection); on the CPU its
backend runs with only the kernel call replaced by the oracle applied to the materialized bias.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import umilayers.attention as attention
from tests.tolerances import tol
from umilayers.attention import (
    BACKENDS,
    AttentionBackendError,
    GroupMaskedTransformer,
    block_mask,
    check_group_sizes,
    group_attention,
)

DTYPES = [torch.float32, torch.bfloat16]


# --------------------------------------------------------------------------- the oracle


def reference_attention(q, k, v, group_sizes, key_padding_mask=None):
    """Float32 group attention written out; a query with no allowed key gives zero."""
    allowed = block_mask(group_sizes, q.device)
    if key_padding_mask is not None:
        allowed = allowed[None, None] & ~key_padding_mask[:, None, None, :]
    empty = ~allowed.any(dim=-1, keepdim=True)
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores.masked_fill(~(allowed | empty), float("-inf")), dim=-1)
    return (weights @ v.float()).masked_fill(empty, 0.0).to(q.dtype)


def attend(backend, q, k, v, group_sizes, key_padding_mask=None):
    """``group_attention`` with ``backend``, or the oracle for ``"reference"``."""
    if backend == "reference":
        return reference_attention(q, k, v, group_sizes, key_padding_mask)
    return group_attention(q, k, v, group_sizes, backend, key_padding_mask)


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


def run(fn, q, k, v, grad_out=None):
    """Output and (q, k, v) gradients of ``fn(q, k, v)``, from fresh leaf copies of the inputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.ones_like(out)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def assert_matches_reference(backend, q, k, v, sizes, kpm=None):
    """Output and gradients of ``backend`` against the oracle on float32 copies (tests/tolerances.py)."""
    gen = torch.Generator().manual_seed(0)
    grad_out = torch.randn(q.shape[:3] + v.shape[-1:], generator=gen)
    out, grads = run(lambda a, b, c: attend(backend, a, b, c, sizes, kpm), q, k, v, grad_out)
    ref, ref_grads = run(lambda a, b, c: reference_attention(a, b, c, sizes, kpm), q.float(), k.float(), v.float(),
                         grad_out)
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref, **tol(q.dtype, "fwd"))
    for name, g, rg in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.float(), rg, **tol(q.dtype, "bwd"), msg=lambda m, name=name: f"d{name}: {m}")


def group_slices(sizes):
    start = 0
    for size in sizes:
        yield slice(start, start + size)
        start += size


def backends_for(sizes):
    """The oracle and every CPU backend that serves these group sizes."""
    return ["reference", "mask"] + (["fold"] if len(set(sizes)) == 1 else [])


def same_weights(layer: GroupMaskedTransformer, backend) -> GroupMaskedTransformer:
    """``layer`` built again with another backend, with its parameters."""
    other = GroupMaskedTransformer(layer.dim, len(layer.blocks), layer.heads, groups=layer.groups,
                                   group_sizes=layer.group_sizes, backend=backend, head_dim=layer.head_dim)
    other.load_state_dict(layer.state_dict())
    return other


def reference_kernel(q, k, v, group_sizes, key_padding_mask):
    return reference_attention(q, k, v, group_sizes, key_padding_mask)


# --------------------------------------------------------------------------- mask


@given(group_sizes_st())
def test_block_mask_allows_exactly_sum_of_squares(sizes):
    mask = block_mask(sizes)
    n = sum(sizes)
    assert mask.shape == (n, n) and mask.dtype == torch.bool
    assert int(mask.sum()) == sum(s * s for s in sizes)
    for sl in group_slices(sizes):  # and those entries are the diagonal blocks
        assert bool(mask[sl, sl].all())


# --------------------------------------------------------------------------- backends vs reference


@given(case_st(equal=True))
def test_fold_matches_reference(case):
    assert_matches_reference("fold", *case)


@given(case_st())
def test_mask_matches_reference(case):
    assert_matches_reference("mask", *case)


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


@given(case_st(), st.booleans())
def test_auto_is_fold_for_equal_groups_and_mask_otherwise(case, padded):
    q, k, v, sizes = case
    kpm = torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool) if padded else None
    chosen = "fold" if len(set(sizes)) == 1 else "mask"
    assert torch.equal(group_attention(q, k, v, sizes, "auto", kpm), group_attention(q, k, v, sizes, chosen, kpm))


@given(case_st(min_batch=1), st.data())
def test_perturbing_one_group_leaves_other_groups_bit_identical(case, data):
    q, k, v, sizes = case
    j = data.draw(st.integers(0, len(sizes) - 1))
    sl = list(group_slices(sizes))[j]
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, sl] = torch.randn_like(t[:, :, sl], dtype=torch.float32).to(t.dtype) * 3
    others = torch.ones(sum(sizes), dtype=torch.bool)
    others[sl] = False
    for backend in backends_for(sizes):
        out = attend(backend, q, k, v, sizes)
        out2 = attend(backend, q2, k2, v2, sizes)
        assert torch.equal(out[:, :, others], out2[:, :, others]), backend


@given(case_st(min_batch=1), st.data())
def test_permuting_inside_a_group_permutes_the_output(case, data):
    q, k, v, sizes = case
    j = data.draw(st.integers(0, len(sizes) - 1))
    sl = list(group_slices(sizes))[j]
    perm = torch.arange(sum(sizes))
    perm[sl] = perm[sl][torch.randperm(sizes[j], generator=torch.Generator().manual_seed(j))]
    for backend in backends_for(sizes):
        out = attend(backend, q, k, v, sizes)
        out_perm = attend(backend, q[:, :, perm], k[:, :, perm], v[:, :, perm], sizes)
        torch.testing.assert_close(out_perm.float(), out[:, :, perm].float(), **tol(q.dtype, "fwd"))


@pytest.mark.parametrize("backend", ["fold", "mask"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_second_run_is_identical(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 12, 8, generator=gen).to(dtype) for _ in range(3))
    kpm = torch.rand(3, 12, generator=gen) < 0.3
    fn = lambda a, b, c: group_attention(a, b, c, [6, 6], backend, kpm)  # noqa: E731
    out1, grads1 = run(fn, q, k, v)
    out2, grads2 = run(fn, q, k, v)
    assert torch.equal(out1, out2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))


@pytest.mark.parametrize("backend", ["fold", "mask"])
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
    for backend in backends_for(sizes)[1:]:
        assert_matches_reference(backend, q, k, v, sizes, kpm)
    k2, v2 = k.clone(), v.clone()
    k2[kpm[:, None, :, None].expand_as(k)] = 7.0
    v2[kpm[:, None, :, None].expand_as(v)] = -7.0
    for backend in backends_for(sizes):
        assert torch.equal(attend(backend, q, k, v, sizes, kpm), attend(backend, q, k2, v2, sizes, kpm)), backend


@pytest.mark.parametrize("backend", ["fold", "mask"])
def test_group_of_padding_only_gives_zero_rows_and_finite_grads(backend):
    q, k, v = (torch.randn(2, 2, 8, 4) for _ in range(3))
    kpm = torch.zeros(2, 8, dtype=torch.bool)
    kpm[0, :4] = True  # row 0: the whole first group is padding
    out, grads = run(lambda a, b, c: group_attention(a, b, c, [4, 4], backend, kpm), q, k, v, torch.randn(2, 2, 8, 4))
    assert torch.equal(out[0, :, :4], torch.zeros_like(out[0, :, :4]))
    assert out[0, :, 4:].abs().sum() > 0 and out[1].abs().sum() > 0
    assert all(torch.isfinite(g).all() for g in grads)
    # and the queries of that group receive no gradient (they influence nothing)
    assert torch.equal(grads[0][0, :, :4], torch.zeros_like(grads[0][0, :, :4]))


# --------------------------------------------------------------------------- choice and errors


def test_module_chooses_its_backend_once_at_construction():
    def build(**kwargs):
        return GroupMaskedTransformer(dim=8, depth=1, heads=2, **kwargs)

    assert build().backend == "fold"  # one group
    assert build(groups=3).backend == "fold"
    assert build(group_sizes=[4, 4]).backend == "fold"
    assert build(group_sizes=[1, 5]).backend == "mask"
    assert build(groups=2, backend="mask").backend == "mask"
    assert "backend='mask'" in repr(build(group_sizes=[1, 5]))
    assert build(groups=2, backend="xformers").backend == "xformers"  # no device given: checked per call


def test_unsupported_backends_say_every_reason():
    xformers_loaded = "xformers" in sys.modules
    q = torch.randn(2, 2, 6, 4)
    with pytest.raises(AttentionBackendError, match="fold needs equal group sizes") as err:
        group_attention(q, q, q, [2, 4], backend="fold")
    assert err.value.reasons == ["fold needs equal group sizes, got [2, 4]"]
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    with pytest.raises(AttentionBackendError) as err:
        group_attention(q.double(), q.double(), q.double(), [3, 3], backend="xformers", key_padding_mask=kpm)
    assert len(err.value.reasons) == 3
    reasons = " | ".join(err.value.reasons)
    assert "CUDA" in reasons and "key_padding_mask" in reasons and "float64" in reasons
    assert str(err.value).startswith("attention backend 'xformers' cannot serve this input:")
    # the module: what is known at construction is refused there, the rest at the call
    with pytest.raises(AttentionBackendError, match="equal group sizes"):
        GroupMaskedTransformer(dim=8, depth=1, heads=2, group_sizes=[1, 3], backend="fold")
    with pytest.raises(AttentionBackendError, match="needs a CUDA device, got cpu"):
        GroupMaskedTransformer(dim=8, depth=1, heads=2, groups=2, backend="xformers", device="cpu")
    layer = GroupMaskedTransformer(dim=8, depth=1, heads=2, groups=2, backend="xformers")
    with pytest.raises(AttentionBackendError, match="needs a CUDA tensor, got device cpu"):
        layer(torch.randn(2, 4, 8))
    # on a CPU tensor nothing of xformers is imported, not even to list reasons
    assert ("xformers" in sys.modules) == xformers_loaded


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
        group_attention(q, q, q, [6], backend="loop")


def test_module_validation():
    with pytest.raises(ValueError, match="group_sizes"):
        GroupMaskedTransformer(dim=8, depth=1, heads=2, group_sizes=[1, -3])
    with pytest.raises(ValueError, match="heads"):
        GroupMaskedTransformer(dim=8, depth=1, heads=3)
    with pytest.raises(ValueError, match="backend"):
        GroupMaskedTransformer(dim=8, depth=1, heads=2, backend="sdpa")
    layer = GroupMaskedTransformer(dim=8, depth=1, heads=2, groups=3)
    with pytest.raises(ValueError, match="N=4 tokens cannot be split into groups=3"):
        layer(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match=r"x: expected shape \(B=1, N=6, 8\), got \(1, 6, 7\)"):
        layer(torch.randn(1, 6, 7))
    with pytest.raises(ValueError, match="padding_mask"):
        layer(torch.randn(1, 6, 8), torch.zeros(1, 5, dtype=torch.bool))


# --------------------------------------------------------------------------- the module


def fwd_bwd(layer, x, mask=None, **kwargs):
    """Output, input gradient and parameter gradients of ``layer(x, mask).square().sum()``."""
    leaf = x.clone().requires_grad_(True)
    out = layer(leaf, mask, **kwargs)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad(set_to_none=True)
    return out.detach(), leaf.grad, grads


def assert_same_fwd_bwd(found, expected, dtype=torch.float32, msg=""):
    (out, dx, dw), (ref_out, ref_dx, ref_dw) = found, expected
    torch.testing.assert_close(out, ref_out, **tol(dtype, "fwd"), msg=lambda m: f"{msg} output: {m}")
    torch.testing.assert_close(dx, ref_dx, **tol(dtype, "bwd"), msg=lambda m: f"{msg} dx: {m}")
    for a, b in zip(dw, ref_dw):
        torch.testing.assert_close(a, b, **tol(dtype, "bwd"), msg=lambda m: f"{msg} dw: {m}")


@pytest.mark.parametrize("group_sizes", [[5, 5], [3, 7], [2, 3, 5]])
def test_every_backend_matches_the_reference_with_head_dim_not_dim_over_heads(group_sizes):
    torch.manual_seed(0)
    layer = GroupMaskedTransformer(dim=16, depth=2, heads=3, head_dim=12, group_sizes=group_sizes)
    x = torch.randn(3, sum(group_sizes), 16)
    kpm = torch.zeros(3, sum(group_sizes), dtype=torch.bool)
    kpm[1, -2:] = True
    kpm[2, : group_sizes[0]] = True  # row 2: its whole first group is padding
    oracle = same_weights(layer, reference_kernel)
    backends = ["auto", "mask"] + (["fold"] if len(set(group_sizes)) == 1 else [])
    for mask in (None, kpm):
        expected = fwd_bwd(oracle, x, mask)
        for backend in backends:
            assert_same_fwd_bwd(fwd_bwd(same_weights(layer, backend), x, mask), expected, msg=backend)


def _block_parameters(dim: int, inner: int, hidden: int) -> int:
    """One layer: two LayerNorms, QKV (dim -> 3 inner), output (inner -> dim), MLP (dim -> hidden -> dim)."""
    return (2 * 2 * dim + (dim * 3 * inner + 3 * inner) + (inner * dim + dim)
            + (dim * hidden + hidden) + (hidden * dim + dim))


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
    assert ([(n, p.shape) for n, p in default.named_parameters()]
            == [(n, p.shape) for n, p in explicit.named_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    assert default.blocks[0].qkv.weight.shape == (48, 16) and default.blocks[0].proj.weight.shape == (16, 16)
    x = torch.randn(2, 8, 16)
    assert torch.equal(default(x), explicit(x))


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
        results[fast] = fwd_bwd(layer, x, mask, first_of_group=True)
    assert results[True][0].shape == (3, len(group_sizes), 16)
    starts = [sum(group_sizes[:g]) for g in range(len(group_sizes))]
    layer.first_queries_only = True
    torch.testing.assert_close(results[False][0], layer(x, mask)[:, starts], rtol=0, atol=0)  # the slow path selects
    assert_same_fwd_bwd(results[True], results[False])


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


def test_module_takes_an_attention_kernel():
    # Variation by constructor argument (timm's Block(attn_layer=...)): every layer calls the kernel.
    seen = []

    def kernel(q, k, v, group_sizes, key_padding_mask):
        seen.append(list(group_sizes))
        return group_attention(q, k, v, group_sizes, "fold", key_padding_mask)

    torch.manual_seed(0)
    layer = GroupMaskedTransformer(dim=16, depth=3, heads=2, groups=2)
    custom = same_weights(layer, kernel)
    x = torch.randn(2, 8, 16)
    assert torch.equal(custom(x), layer(x)) and seen == [[4, 4]] * 3
    assert "backend=kernel" in repr(custom)


def test_backends_constant_names_every_kernel():
    assert set(BACKENDS) == {"auto", *attention._KERNELS}


# --------------------------------------------------------------------------- xformers on the CPU


def _xformers_ops():
    return pytest.importorskip("xformers.ops", reason="xformers cannot be imported")


@pytest.fixture
def xformers_on_reference(monkeypatch):
    """xformers with ONLY its kernel call replaced: ``memory_efficient_attention`` becomes float32
    attention with the bias materialized (as xformers' own tests use ``ref_attention``); the calls
    are recorded (query shape, materialized bias)."""
    xops = _xformers_ops()
    calls = []

    def memory_efficient_attention(query, key, value, attn_bias=None):
        one, m, heads, width = query.shape  # the packed BMHK layout (1, B N, H, h)
        bias = attn_bias.materialize((m, m), dtype=torch.float32, device=query.device)
        calls.append({"shape": tuple(query.shape), "bias": bias})
        q, k, v = (t.float().transpose(1, 2) for t in (query, key, value))  # (1, H, M, h)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(width) + bias, dim=-1)
        return (weights @ v).transpose(1, 2).to(query.dtype)

    monkeypatch.setattr(xops, "memory_efficient_attention", memory_efficient_attention)
    return calls


@pytest.mark.parametrize("sizes", [[5], [3, 3], [1, 4, 2], [129, 128, 1]])
def test_block_mask_equals_xformers_block_diagonal_mask(sizes):
    xops = _xformers_ops()
    bias = xops.fmha.BlockDiagonalMask.from_seqlens(sizes)
    n = sum(sizes)
    assert torch.equal(bias.materialize((n, n)) == 0, block_mask(sizes))


@pytest.mark.parametrize("sizes", [[4, 4], [2, 2, 2], [3, 5], [1, 4, 2]])
@pytest.mark.parametrize("batch", [0, 1, 2, 3])
def test_xformers_path_on_the_cpu_equals_fold_or_mask(xformers_on_reference, sizes, batch):
    # The backend's own code (packed layout, the BlockDiagonalMask of B copies of the groups, the
    # reshape back) with only the kernel replaced, against fold (equal groups) or mask, output
    # and gradients; contiguous (B, H, N, h) inputs and the module's (B, N, H, h) views.
    gen = torch.Generator().manual_seed(batch)
    n = sum(sizes)
    other = "fold" if len(set(sizes)) == 1 else "mask"
    contiguous = [torch.randn(batch, 3, n, 8, generator=gen) for _ in range(3)]
    views = list(torch.randn(batch, n, 3, 3, 8, generator=gen).permute(2, 0, 3, 1, 4))
    grad_out = torch.randn(batch, 3, n, 8, generator=gen)
    for q, k, v in (contiguous, views):
        found = run(lambda a, b, c: attention._xformers(a, b, c, sizes, None), q, k, v, grad_out)
        expected = run(lambda a, b, c: group_attention(a, b, c, sizes, other), q, k, v, grad_out)
        torch.testing.assert_close(found[0], expected[0], **tol(torch.float32, "fwd"))
        for g, eg in zip(found[1], expected[1]):
            torch.testing.assert_close(g, eg, **tol(torch.float32, "bwd"))
    if batch:  # one (B N, B N) block-diagonal bias of B copies of the groups, in the packed layout
        assert [c["shape"] for c in xformers_on_reference] == [(1, batch * n, 3, 8)] * 2
        assert torch.equal(xformers_on_reference[0]["bias"] == 0, block_mask(sizes * batch))
    else:
        assert xformers_on_reference == []


@pytest.mark.parametrize("group_sizes", [[5, 5], [3, 7]])
def test_module_on_the_xformers_path_on_the_cpu_equals_fold_or_mask(xformers_on_reference, group_sizes):
    torch.manual_seed(0)
    layer = GroupMaskedTransformer(dim=16, depth=2, heads=3, head_dim=8, group_sizes=group_sizes)
    x = torch.randn(3, sum(group_sizes), 16)
    expected = fwd_bwd(layer, x)  # auto: fold or mask
    # the backend's kernel given as the module's kernel: the per-call CUDA check is the only part left out
    assert_same_fwd_bwd(fwd_bwd(same_weights(layer, attention._xformers), x), expected)
    assert len(xformers_on_reference) == 2


# --------------------------------------------------------------------------- CUDA only


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sizes", [[8, 8], [1, 7, 16], [257, 257]])
def test_xformers_matches_reference(dtype, sizes):
    _xformers_ops()
    q, k, v = (torch.randn(2, 4, sum(sizes), 32, device="cuda", dtype=dtype) for _ in range(3))
    assert_matches_reference("xformers", q, k, v, sizes)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["fold", "mask"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_fold_and_mask_match_reference(backend, dtype):
    q, k, v = (torch.randn(2, 4, 40, 32, device="cuda", dtype=dtype) for _ in range(3))
    kpm = torch.zeros(2, 40, dtype=torch.bool, device="cuda")
    kpm[0, :20] = True
    assert_matches_reference(backend, q, k, v, [20, 20])
    assert_matches_reference(backend, q, k, v, [20, 20], kpm)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["fold", "mask", "xformers"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backends_match_reference_with_a_head_dim_of_its_own(backend, dtype):
    # The width a module with head_dim=48 (3 heads, dim 64: not dim // heads) hands its kernel.
    if backend == "xformers":
        _xformers_ops()
    q, k, v = (torch.randn(2, 3, 514, 48, device="cuda", dtype=dtype) for _ in range(3))
    assert_matches_reference(backend, q, k, v, [257, 257])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_module_with_head_dim_under_autocast_matches_reference(dtype):
    torch.manual_seed(0)
    layer = GroupMaskedTransformer(dim=64, depth=2, heads=3, head_dim=48, groups=2, device="cuda")
    x = torch.randn(4, 130, 64, device="cuda")
    expected = same_weights(layer, reference_kernel).cuda()(x)  # float32 throughout
    for backend in ("auto", "fold", "mask"):
        with torch.autocast("cuda", dtype=dtype):
            out = same_weights(layer, backend).cuda()(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05, msg=backend)


@pytest.mark.cuda
def test_cuda_module_runs_with_and_without_padding():
    layer = GroupMaskedTransformer(dim=64, depth=1, heads=2, groups=2, device="cuda")
    oracle = same_weights(layer, reference_kernel).cuda()
    x = torch.randn(2, 16, 64, device="cuda")
    kpm = torch.zeros(2, 16, dtype=torch.bool, device="cuda")
    kpm[:, -3:] = True
    for mask in (None, kpm):
        torch.testing.assert_close(layer(x, mask), oracle(x, mask), **tol(torch.float32, "fwd"))
