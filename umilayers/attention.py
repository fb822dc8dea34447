"""Group-masked attention: token i attends to token j only inside their contiguous group (Eq. 2).

The dual-branch prediction of the paper runs both branches in one pass; each branch's tokens
attend only to the tokens of the same branch. Here a sequence of ``N`` tokens is cut into
contiguous groups of sizes ``n_1 + ... + n_G = N`` and attention is block-diagonal over them.

Backends (see ``docs/attention.rst``):

- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` with a ``BlockDiagonalMask`` in
  the packed layout ``(1, B * N, H, h)``; CUDA only, no key padding.
- ``"fold"``: equal groups moved into the batch dimension (next to the heads or into the batch,
  whichever is a view of the input's layout), plain ``F.scaled_dot_product_attention`` without
  a mask (exact; ~1/G of the dense work; no copies).
- ``"padded_fold"``: unequal groups each padded to the largest, then folded like ``"fold"``
  with the padding masked (exact; ``G * max(n_g)**2`` work instead of ``N**2``).
- ``"loop"``: a Python loop over the groups, one plain ``F.scaled_dot_product_attention`` per
  group without a mask (key padding: a ``(B, 1, 1, n_g)`` key mask per group), outputs
  concatenated (exact; ``sum(n_g**2)`` work, ``G`` kernel calls).
- ``"sdpa"``: ``F.scaled_dot_product_attention`` with one ``(N, N)`` boolean block mask,
  broadcast over batch and heads (with key padding: one ``(B, 1, N, N)`` boolean mask).
- ``"reference"``: explicit float32 ``softmax(Q K^T / sqrt(h) + mask) V``, the test oracle.
- ``"auto"``: the first of xformers, fold, loop, padded_fold, sdpa that supports the input
  (loop only for at most ``_LOOP_MAX_GROUPS`` groups; padded_fold only when its padded work is
  at most half the dense ``N**2``).

Selection: a backend other than ``"auto"`` given to the function or the module wins; otherwise
the innermost :func:`attention_backend` context; otherwise the environment variable
``UMILAYERS_ATTN_BACKEND``; otherwise automatic selection. :func:`group_attention` validates and
selects on every call; :class:`GroupMaskedTransformer` does both once per forward call, and its
layers call the chosen kernel (:func:`resolve_kernel`) directly.

A query whose group holds no unpadded key attends to nothing: its output is exactly zero, and
no NaN reaches the gradients, in every backend.

Shape letters: ``B`` batch, ``N`` tokens, ``D`` width, ``H`` heads, ``G`` groups, ``h`` head size.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from umilayers._validation import (
    check_bool_mask,
    check_choice,
    check_head_dim,
    check_int,
    check_number,
    check_positive_int,
    check_tensor,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "AttentionBackendError",
    "AttentionKernel",
    "attention_backend",
    "backend_support",
    "select_backend",
    "resolve_kernel",
    "group_attention",
    "block_mask",
    "check_group_sizes",
    "split_groups",
    "pack_groups",
    "GroupMaskedTransformer",
]

#: Names accepted wherever a backend is chosen.
BACKENDS = ("auto", "xformers", "fold", "loop", "padded_fold", "sdpa", "reference")
#: Environment variable read (at call time) when neither the caller nor a context chose.
ENV_VAR = "UMILAYERS_ATTN_BACKEND"
#: Order in which ``"auto"`` tries the backends.
_AUTO_ORDER = ("xformers", "fold", "loop", "padded_fold", "sdpa")
#: ``auto`` takes loop only for at most this many groups (one kernel call per group; see
#: docs/attention.rst for the measurements behind the number).
_LOOP_MAX_GROUPS = 8
#: ``auto`` takes padded_fold only when ``G * max(n_g)**2 <= _PADDED_FOLD_MAX_WORK * N**2``.
_PADDED_FOLD_MAX_WORK = 0.5
#: Floating dtypes xformers' kernels accept.
_XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_override: Optional[str] = None  # set by attention_backend(); a plain global like torch.backends
_xformers_cache: dict[str, Any] = {}  # "module" -> xformers.ops or None, "error" -> str
_xformers_support_cache: dict[tuple, tuple[str, ...]] = {}


class AttentionBackendError(ValueError):
    """An explicitly requested attention backend cannot serve the input.

    ``reasons`` lists why, one string per reason (like xformers' ``not_supported_reasons``).

    Example::

        >>> import torch
        >>> q = torch.randn(1, 2, 5, 8)
        >>> try:
        ...     group_attention(q, q, q, [2, 3], backend="fold")
        ... except AttentionBackendError as err:
        ...     print(err.reasons[0])
        fold needs equal group sizes, got [2, 3]
    """

    def __init__(self, backend: str, reasons: Sequence[str]) -> None:
        self.backend = backend
        self.reasons = list(reasons)
        lines = "\n  - ".join(self.reasons)
        super().__init__(f"attention backend {backend!r} cannot serve this input:\n  - {lines}")


# --------------------------------------------------------------------------- groups and masks


def check_group_sizes(group_sizes: Any, n: Optional[int] = None, name: str = "group_sizes") -> list[int]:
    """Validate group sizes (a non-empty sequence of positive ints, summing to ``n`` if given).

    Returns:
        The sizes as a list of ``int``.

    Raises:
        TypeError: not a sequence of ints.
        ValueError: empty, a size below 1, or a sum different from ``n``.
    """
    if isinstance(group_sizes, Tensor):
        group_sizes = group_sizes.tolist()
    if isinstance(group_sizes, (str, bytes)) or not isinstance(group_sizes, Sequence):
        raise TypeError(f"{name}: expected a sequence of positive ints, got {type(group_sizes).__name__}")
    sizes = list(group_sizes)
    if not sizes:
        raise ValueError(f"{name}: expected at least one group, got an empty sequence")
    for i, size in enumerate(sizes):
        check_int(f"{name}[{i}]", size)
        if size < 1:
            raise ValueError(f"{name}[{i}]: expected a positive group size, got {size} (sizes {sizes})")
    if n is not None and sum(sizes) != n:
        raise ValueError(f"{name}: expected sizes summing to N={n}, got {sizes} (sum {sum(sizes)})")
    return sizes


def _group_ids(group_sizes: Sequence[int], device: Optional[torch.device]) -> Tensor:
    counts = torch.tensor(list(group_sizes), device=device)
    return torch.repeat_interleave(torch.arange(len(group_sizes), device=device), counts)


def block_mask(group_sizes: Sequence[int], device: Optional[torch.device] = None) -> Tensor:
    """Boolean ``(N, N)`` mask, True where token i may attend to token j (same group).

    It has exactly ``sum(n_g ** 2)`` True entries.

    Example::

        >>> block_mask([1, 2]).int()
        tensor([[1, 0, 0],
                [0, 1, 1],
                [0, 1, 1]], dtype=torch.int32)
    """
    ids = _group_ids(check_group_sizes(group_sizes), device)
    return ids[:, None] == ids[None, :]


def split_groups(x: Tensor, group_sizes: Sequence[int], dim: int = -2) -> list[Tensor]:
    """Cut ``x`` along ``dim`` into its contiguous groups (views, no copy).

    Example::

        >>> [t.shape[0] for t in split_groups(torch.zeros(5, 3), [2, 3], dim=0)]
        [2, 3]
    """
    check_tensor("x", x)
    sizes = check_group_sizes(group_sizes, x.shape[dim])
    return list(torch.split(x, sizes, dim=dim))


def pack_groups(groups: Sequence[Tensor], dim: int = -2) -> tuple[Tensor, list[int]]:
    """Concatenate groups along ``dim``; the inverse of :func:`split_groups`.

    Returns:
        ``(packed, group_sizes)``.

    Example::

        >>> x, sizes = pack_groups([torch.zeros(2, 3), torch.ones(1, 3)], dim=0)
        >>> x.shape, sizes
        (torch.Size([3, 3]), [2, 1])
    """
    if not groups:
        raise ValueError("groups: expected at least one tensor, got none")
    for i, g in enumerate(groups):
        check_tensor(f"groups[{i}]", g)
    return torch.cat(list(groups), dim=dim), [int(g.shape[dim]) for g in groups]


def _allowed(group_sizes: Sequence[int], key_padding_mask: Optional[Tensor], device) -> Tensor:
    """Allowed-entry mask: ``(N, N)`` without padding, ``(B, 1, N, N)`` with it."""
    allowed = block_mask(group_sizes, device)
    if key_padding_mask is not None:
        allowed = allowed[None, None] & ~key_padding_mask[:, None, None, :]
    return allowed


def _guard_empty_rows(allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Rows with no allowed key: let them attend everywhere, and report them to zero later.

    A softmax over an all ``-inf`` row is NaN, and NaN poisons the backward pass even when the
    output is zeroed afterwards; attending to every key then multiplying by zero is exact.
    """
    empty = ~allowed.any(dim=-1, keepdim=True)
    return allowed | empty, empty


# --------------------------------------------------------------------------- the backends


def _reference(q: Tensor, k: Tensor, v: Tensor, group_sizes, key_padding_mask) -> Tensor:
    allowed, empty = _guard_empty_rows(_allowed(group_sizes, key_padding_mask, q.device))
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    out = (weights @ v.float()).masked_fill(empty, 0.0)
    return out.to(q.dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, group_sizes, key_padding_mask) -> Tensor:
    allowed = _allowed(group_sizes, key_padding_mask, q.device)
    if key_padding_mask is None:  # groups are non-empty: no empty row, the (N, N) mask suffices
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    allowed, empty = _guard_empty_rows(allowed)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed).masked_fill(empty, 0.0)


def _fold(q: Tensor, k: Tensor, v: Tensor, group_sizes, key_padding_mask) -> Tensor:
    # Each group becomes a batch entry of its own, folded where that is a view of the input (no
    # copy of q, k, v, forward or backward): next to the heads, (B, H G, n, h), for a (B, H, N, h)
    # layout (contiguous inputs); into the batch, (B G, H, n, h), for a (B, N, H, h) layout (the
    # q, k, v of GroupMaskedTransformer's blocks, (B, N, H h) products viewed per head, whose
    # output then also goes back to (B, N, H h) as a view). Folding the module's q, k, v next to the
    # heads copied all four in a two-group layer (6% of the layer's time forward + backward).
    batch, heads, n, _ = q.shape
    groups = len(group_sizes)
    if all(t.stride(1) == n * t.stride(2) for t in (q, k, v)):
        return _fold_heads(q, k, v, groups, key_padding_mask)
    size = n // groups
    q, k, v = (t.unflatten(2, (groups, size)).transpose(1, 2).reshape(batch * groups, heads, size, t.shape[-1])
               for t in (q, k, v))
    if key_padding_mask is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        keep = ~key_padding_mask.reshape(batch * groups, 1, 1, size)
        empty = ~keep.any(dim=-1, keepdim=True)  # (B G, 1, 1, 1): a group made only of padding
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | empty).masked_fill(empty, 0.0)
    return out.unflatten(0, (batch, groups)).transpose(1, 2).reshape(batch, heads, n, out.shape[-1])


def _fold_heads(q: Tensor, k: Tensor, v: Tensor, groups: int, key_padding_mask) -> Tensor:
    """:func:`_fold` for a ``(B, H, N, h)`` layout: ``(B, H, G n, h) -> (B, H G, n, h)``."""
    batch, heads, n, _ = q.shape
    size = n // groups
    q, k, v = (t.reshape(batch, heads * groups, size, t.shape[-1]) for t in (q, k, v))
    if key_padding_mask is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        keep = ~key_padding_mask.reshape(batch, 1, groups, 1, size)
        empty = ~keep.any(dim=-1, keepdim=True)  # (B, 1, G, 1, 1): a group made only of padding
        keep = keep.expand(-1, heads, -1, -1, -1).reshape(batch, heads * groups, 1, size)
        empty = empty.expand(-1, heads, -1, -1, -1).reshape(batch, heads * groups, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep | empty).masked_fill(empty, 0.0)
    return out.reshape(batch, heads, n, out.shape[-1])


def _loop(q: Tensor, k: Tensor, v: Tensor, group_sizes, key_padding_mask) -> Tensor:
    # torch.split, not one slice per group: split's backward is one concatenation, while each
    # slice's backward would write its gradient into a fresh zero tensor of the full size.
    sizes = list(group_sizes)
    parts = zip(*(torch.split(t, sizes, dim=2) for t in (q, k, v)))
    if key_padding_mask is None:
        outs = [F.scaled_dot_product_attention(qg, kg, vg) for qg, kg, vg in parts]
    else:
        outs = []
        for (qg, kg, vg), pad in zip(parts, torch.split(key_padding_mask, sizes, dim=1)):
            keep = ~pad[:, None, None, :]  # (B, 1, 1, n_g)
            empty = ~keep.any(dim=-1, keepdim=True)  # (B, 1, 1, 1): this group is only padding
            out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=keep | empty)
            outs.append(out.masked_fill(empty, 0.0))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _padded_fold(q: Tensor, k: Tensor, v: Tensor, group_sizes, key_padding_mask) -> Tensor:
    longest = max(group_sizes)

    def pad(t: Tensor, value: Any = 0.0) -> Tensor:  # (..., N, *) -> (..., G * longest, *)
        dim = 2 if t.dim() == 4 else 1
        tail = (0, 0) if t.dim() == 4 else ()
        parts = torch.split(t, list(group_sizes), dim=dim)
        return torch.cat([F.pad(p, (*tail, 0, longest - p.shape[dim]), value=value) for p in parts], dim=dim)

    if key_padding_mask is None:
        key_padding_mask = torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    out = _fold(pad(q), pad(k), pad(v), [longest] * len(group_sizes), pad(key_padding_mask, True))
    parts = torch.split(out, longest, dim=2)
    return torch.cat([p[:, :, :n] for p, n in zip(parts, group_sizes)], dim=2)


def _load_xformers() -> Any:
    """``xformers.ops`` or None; imported on first use only, and only for a CUDA input."""
    if "module" not in _xformers_cache:
        try:
            import xformers.ops as xops  # noqa: PLC0415 (lazy on purpose: no CPU kernels)

            _xformers_cache["module"] = xops
        except Exception as err:  # ImportError, or a broken binary extension
            _xformers_cache["module"] = None
            _xformers_cache["error"] = f"{type(err).__name__}: {err}"
    return _xformers_cache["module"]


def _xformers_bias(xops: Any, group_sizes: Sequence[int], batch: int, device: torch.device) -> Any:
    return xops.fmha.BlockDiagonalMask.from_seqlens(list(group_sizes) * batch, device=device)


def _xformers(q: Tensor, k: Tensor, v: Tensor, group_sizes, key_padding_mask) -> Tensor:
    batch, heads = q.shape[:2]
    if batch == 0:
        return v * 0.0
    xops = _load_xformers()
    bias = _xformers_bias(xops, group_sizes, batch, q.device)
    q, k, v = (rearrange(t, "b h n d -> 1 (b n) h d") for t in (q, k, v))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    return rearrange(out, "1 (b n) h d -> b h n d", b=batch)


#: What a backend name resolves to: ``kernel(q, k, v, group_sizes, key_padding_mask)``, with
#: validated inputs of the shapes of :func:`group_attention`; it checks nothing.
AttentionKernel = Callable[[Tensor, Tensor, Tensor, Sequence[int], Optional[Tensor]], Tensor]

_IMPLEMENTATIONS: dict[str, AttentionKernel] = {
    "reference": _reference,
    "sdpa": _sdpa,
    "fold": _fold,
    "loop": _loop,
    "padded_fold": _padded_fold,
    "xformers": _xformers,
}


# --------------------------------------------------------------------------- selection


@contextlib.contextmanager
def attention_backend(backend: str) -> Iterator[None]:
    """Force a backend for every group attention that was not given one explicitly.

    Contexts nest; the previous choice is restored on exit. ``attention_backend("auto")``
    restores automatic selection inside the block (ignoring the environment variable). The
    choice is process-global (like ``torch.backends`` flags), not per thread.

    Example::

        >>> import torch
        >>> layer = GroupMaskedTransformer(dim=16, depth=1, heads=2, groups=2)
        >>> with attention_backend("reference"):
        ...     y = layer(torch.randn(2, 6, 16))
        >>> y.shape
        torch.Size([2, 6, 16])
    """
    global _override
    check_choice("backend", backend, BACKENDS)
    previous = _override
    _override = backend
    try:
        yield
    finally:
        _override = previous


def _requested(backend: str) -> str:
    """Apply the precedence: explicit > context manager > environment variable > auto."""
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        return backend
    if _override is not None:
        return _override
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(f"{ENV_VAR}: expected one of {list(BACKENDS)}, got {env!r}")
        return env
    return "auto"


def _xformers_reasons(q: Tensor, group_sizes: Sequence[int], key_padding_mask) -> list[str]:
    reasons = []
    if q.device.type != "cuda":
        # Checked first: on a CPU-only machine xformers is never imported.
        reasons.append(f"xformers needs a CUDA tensor, got device {q.device.type}")
    if key_padding_mask is not None:
        reasons.append(
            "key_padding_mask is not supported with xformers: BlockDiagonalPaddedKeysMask only "
            "expresses padding at the end of each group and has no backward kernel; use fold or sdpa"
        )
    if q.dtype not in _XFORMERS_DTYPES:
        reasons.append(f"dtype={q.dtype} (xformers supports {list(_XFORMERS_DTYPES)})")
    if reasons:
        return reasons
    if _load_xformers() is None:
        return [f"xformers cannot be imported ({_xformers_cache['error']})"]
    return list(_xformers_kernel_reasons(q, group_sizes))


def _xformers_kernel_reasons(q: Tensor, group_sizes: Sequence[int]) -> tuple[str, ...]:
    """Ask xformers' own dispatcher whether a kernel exists (cached per input signature)."""
    key = (q.device, q.dtype, q.shape[1], q.shape[-1], max(group_sizes), q.requires_grad)
    if key in _xformers_support_cache:
        return _xformers_support_cache[key]
    xops = _load_xformers()
    reasons: tuple[str, ...] = ()
    try:
        from xformers.ops.fmha.common import Inputs  # noqa: PLC0415
        from xformers.ops.fmha.dispatch import _dispatch_fw  # noqa: PLC0415
    except Exception:  # private API moved: let the kernel call itself report problems
        Inputs = None
    if Inputs is not None:
        sample = torch.empty(1, sum(group_sizes), q.shape[1], q.shape[-1], device=q.device, dtype=q.dtype)
        inputs = Inputs(sample, sample, sample, attn_bias=_xformers_bias(xops, group_sizes, 1, q.device))
        try:
            _dispatch_fw(inputs, q.requires_grad)
        except NotImplementedError as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            reasons = ("no xformers kernel for this input: " + "; ".join(lines[-6:]),)
    _xformers_support_cache[key] = reasons
    return reasons


def backend_support(
    backend: str,
    q: Tensor,
    group_sizes: Sequence[int],
    key_padding_mask: Optional[Tensor] = None,
) -> list[str]:
    """Reasons why ``backend`` cannot serve this input; an empty list means it can.

    ``backend`` is a concrete name (not ``"auto"``). ``q`` only lends its device, dtype and
    shape ``(B, H, N, h)``. For ``"xformers"`` on CPU nothing of xformers is imported.

    Example::

        >>> q = torch.randn(2, 4, 6, 8)
        >>> backend_support("fold", q, [3, 3])
        []
        >>> backend_support("xformers", q, [3, 3])
        ['xformers needs a CUDA tensor, got device cpu']
    """
    check_choice("backend", backend, BACKENDS[1:])
    if backend == "xformers":
        return _xformers_reasons(q, group_sizes, key_padding_mask)
    if backend == "fold" and len(set(group_sizes)) != 1:
        return [f"fold needs equal group sizes, got {list(group_sizes)}"]
    return []


def select_backend(
    backend: str,
    q: Tensor,
    group_sizes: Sequence[int],
    key_padding_mask: Optional[Tensor] = None,
) -> str:
    """Resolve ``backend`` (with context manager and environment variable) to a concrete one.

    Raises:
        AttentionBackendError: the requested backend cannot serve the input (with the reasons).

    Example::

        >>> q = torch.randn(2, 4, 6, 8)
        >>> select_backend("auto", q, [3, 3]), select_backend("auto", q, [2, 4])
        ('fold', 'loop')
        >>> select_backend("auto", torch.randn(2, 4, 514, 8), [58] * 8 + [50])  # more than 8 groups
        'padded_fold'
    """
    requested = _requested(backend)
    if requested == "auto":
        for candidate in _AUTO_ORDER:
            if candidate == "loop" and len(group_sizes) > _LOOP_MAX_GROUPS:
                continue  # one kernel call per group: the Python overhead grows with G
            if candidate == "padded_fold" and (
                len(group_sizes) * max(group_sizes) ** 2 > _PADDED_FOLD_MAX_WORK * sum(group_sizes) ** 2
            ):
                continue  # the padding would cost more than masking the full square saves
            if not backend_support(candidate, q, group_sizes, key_padding_mask):
                return candidate
        return "sdpa"  # unreachable: sdpa serves every valid input
    reasons = backend_support(requested, q, group_sizes, key_padding_mask)
    if reasons:
        raise AttentionBackendError(requested, reasons)
    return requested


def resolve_kernel(
    backend: Union[str, AttentionKernel],
    q: Tensor,
    group_sizes: Sequence[int],
    key_padding_mask: Optional[Tensor] = None,
) -> AttentionKernel:
    """The kernel that computes group attention for this input: ``backend`` itself when it is a
    callable, else the implementation :func:`select_backend` picks.

    Example::

        >>> q = torch.randn(2, 4, 6, 8)
        >>> resolve_kernel("auto", q, [3, 3])(q, q, q, [3, 3], None).shape
        torch.Size([2, 4, 6, 8])
    """
    if callable(backend):
        return backend
    return _IMPLEMENTATIONS[select_backend(backend, q, group_sizes, key_padding_mask)]


def _check_inputs(q, k, v, group_sizes, key_padding_mask) -> list[int]:
    sizes: dict[str, int] = {}
    check_tensor("q", q, ("B", "H", "N", "h"), sizes, floating=True)
    check_tensor("k", k, ("B", "H", "N", "h"), sizes, floating=True)
    check_tensor("v", v, ("B", "H", "N", None), sizes, floating=True)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if key_padding_mask is not None:
        check_bool_mask("key_padding_mask", key_padding_mask, ("B", "N"), sizes)
    return check_group_sizes(group_sizes, sizes["N"])


def group_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group_sizes: Sequence[int],
    backend: str = "auto",
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Attention restricted to contiguous token groups (scale ``1 / sqrt(h)``).

    Args:
        q: queries ``(B, H, N, h)``.
        k: keys ``(B, H, N, h)``.
        v: values ``(B, H, N, h_v)``.
        group_sizes: sizes of the contiguous groups; positive, summing to N.
        backend: one of :data:`BACKENDS`; ``"auto"`` defers to the context manager, the
            environment variable, then automatic selection.
        key_padding_mask: ``(B, N)`` bool, True marks padding keys (never attended to). A query
            whose group has no unpadded key gets a zero output.

    Returns:
        ``(B, H, N, h_v)`` in the dtype of ``q``.

    Raises:
        AttentionBackendError: an explicitly chosen backend cannot serve the input.

    Example::

        >>> q = torch.randn(2, 4, 6, 8)
        >>> group_attention(q, q, q, [2, 4]).shape
        torch.Size([2, 4, 6, 8])
    """
    group_sizes = _check_inputs(q, k, v, group_sizes, key_padding_mask)
    return resolve_kernel(backend, q, group_sizes, key_padding_mask)(q, k, v, group_sizes, key_padding_mask)


# --------------------------------------------------------------------------- the module


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: float, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.heads = heads
        inner = heads * head_dim  # the attention's width; dim when head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.qkv = nn.Linear(dim, 3 * inner, **factory)
        self.proj = nn.Linear(inner, dim, **factory)
        self.norm2 = nn.LayerNorm(dim, **factory)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, **factory), nn.GELU(), nn.Linear(hidden, dim, **factory)
        )

    def forward(
        self, x: Tensor, kernel: AttentionKernel, group_sizes: Sequence[int], padding_mask: Optional[Tensor]
    ) -> Tensor:
        # The caller validated x and resolved the kernel once for all blocks.
        h = self.norm1(x)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self._qkv(h))
        attn = kernel(q, k, v, group_sizes, padding_mask)
        x = x + self.proj(rearrange(attn, "b h n d -> b n (h d)"))
        return x + self.mlp(self.norm2(x))

    def _qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k and v ``(B, N, H h)`` of normed tokens ``h`` (:meth:`_project`)."""
        return self._project(h, 0), self._project(h, 1), self._project(h, 2)

    def _project(self, h: Tensor, part: int) -> Tensor:
        """``h`` times row block ``part`` (0: q, 1: k, 2: v) of the one ``qkv`` weight: ``(..., H h)``.

        The weight's layout, and so state dicts, are one ``(3 H h, D)`` map; the products are
        separate because one product cut into views makes autograd stack the views' gradients and
        copy them back into the ``(B, N, 3 H h)`` layout in every layer, while separate products
        only add their input gradients. A train step at EPIC size ran 4-5% faster on the CPU
        (``benchmarks/notes/speed_experiments.py``).
        """
        inner = self.proj.in_features
        rows = slice(part * inner, (part + 1) * inner)
        return F.linear(h, self.qkv.weight[rows], self.qkv.bias[rows])

    def forward_first(self, x: Tensor, group_sizes: Sequence[int], padding_mask: Optional[Tensor]) -> Tensor:
        """This layer's output at the first token of every group only, ``(B, G, D)``.

        Every token still gives its key and value; only the G first tokens are queries, so the
        output projection, the MLP and the attention run on G tokens instead of N.
        """
        starts = [sum(group_sizes[:g]) for g in range(len(group_sizes))]
        h = self.norm1(x)
        q = rearrange(self._project(h[:, starts], 0), "b g (h d) -> b h g d", h=self.heads)
        k, v = (rearrange(self._project(h, part), "b n (h d) -> b h n d", h=self.heads) for part in (1, 2))
        attn = _first_query_attention(q, k, v, group_sizes, padding_mask)
        y = x[:, starts] + self.proj(rearrange(attn, "b h g d -> b g (h d)"))
        return y + self.mlp(self.norm2(y))


def _first_query_attention(q: Tensor, k: Tensor, v: Tensor, group_sizes: Sequence[int],
                           key_padding_mask: Optional[Tensor]) -> Tensor:
    """Group g's one query ``q[:, :, g]`` over the keys of group g: ``(B, H, G, h)``.

    G plain SDPA calls of one query each (the work is G rows of attention, whatever the backend);
    a group made only of padding gives zero, as in every backend.
    """
    sizes = list(group_sizes)
    keys, values = torch.split(k, sizes, dim=2), torch.split(v, sizes, dim=2)
    pads = torch.split(key_padding_mask, sizes, dim=1) if key_padding_mask is not None else [None] * len(sizes)
    outs = []
    for g, (kg, vg, pad) in enumerate(zip(keys, values, pads)):
        qg = q[:, :, g : g + 1]
        if pad is None:
            outs.append(F.scaled_dot_product_attention(qg, kg, vg))
            continue
        keep = ~pad[:, None, None, :]  # (B, 1, 1, n_g)
        empty = ~keep.any(dim=-1, keepdim=True)
        outs.append(F.scaled_dot_product_attention(qg, kg, vg, attn_mask=keep | empty).masked_fill(empty, 0.0))
    return torch.cat(outs, dim=2)


class _Queries(NamedTuple):
    """What backend selection reads of the queries (device, dtype, shape, grad), before they exist."""

    device: torch.device
    dtype: torch.dtype
    shape: tuple[int, ...]
    requires_grad: bool


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the blocks' linear layers give for ``x``: autocast's when it is on."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class GroupMaskedTransformer(nn.Module):
    """Pre-norm transformer whose attention is block-diagonal over contiguous token groups.

    The attention backend is resolved as far as possible at construction: the requested name is
    validated and stored in the plain attribute ``backend``, which a test may flip (for
    instance to ``"reference"``) to compare paths; with fixed ``group_sizes`` a backend that can
    never serve them (``fold`` with unequal groups) is refused at once. What depends on the input
    (device, dtype, padding) is decided once per call, by :func:`select_backend`, and every
    layer then calls the chosen kernel directly (xformers' validate, dispatch, apply).

    ``backend`` may also be an :data:`AttentionKernel`, a callable
    ``kernel(q, k, v, group_sizes, key_padding_mask)`` used as is by every layer (timm's
    ``Block(attn_layer=...)``): a benchmark passes the released code's attention this way.

    ``forward(x, first_of_group=True)`` returns only the first token of every group,
    ``(B, G, D)`` (the readout tokens of :class:`~umilayers.model.UnseenModalityModel` and of the
    baselines). The last layer then computes only those G queries (every token still gives its
    key and value): exact, and the last layer's output projection, MLP and attention run on G
    tokens instead of N (about 5% of a training step at the paper's EPIC size). That layer's
    attention of one query per group is plain SDPA whatever the backend. The fast path is the
    plain attribute ``first_queries_only`` (True); a test flips it to compare with the full last
    layer.

    Args:
        dim: token width D.
        depth: number of layers.
        heads: attention heads H (must divide ``dim`` unless ``head_dim`` is given).
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        groups: number of equal contiguous groups (N must be divisible by it); default 1.
        group_sizes: explicit group sizes instead of ``groups``.
        backend: attention backend, one of :data:`BACKENDS`, or an :data:`AttentionKernel`.
        head_dim: width h of each head (x-transformers' ``dim_head``); the queries, keys and
            values are ``H * h`` wide, mapped back to ``dim`` by the output projection. Default
            ``dim // heads`` (then ``H * h = dim``); the authors' released code uses 64 with 8
            heads at ``dim`` 256.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - x: ``(B, N, D)``
        - padding_mask: ``(B, N)`` bool, True = padding (padded keys are never attended to)
        - output: ``(B, N, D)``; with ``first_of_group=True`` ``(B, G, D)``

    Example::

        >>> import torch
        >>> layer = GroupMaskedTransformer(dim=32, depth=2, heads=4, groups=2)
        >>> layer(torch.randn(3, 10, 32)).shape
        torch.Size([3, 10, 32])
        >>> layer(torch.randn(3, 10, 32), first_of_group=True).shape  # tokens 0 and 5
        torch.Size([3, 2, 32])
        >>> layer.backend = "reference"  # flip to the oracle
        >>> layer(torch.randn(3, 10, 32)).shape
        torch.Size([3, 10, 32])
        >>> wide = GroupMaskedTransformer(dim=32, depth=1, heads=3, head_dim=16, groups=2)
        >>> wide.blocks[0].qkv.weight.shape  # 3 x (3 heads x 16) queries, keys and values
        torch.Size([144, 32])
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 2.0,
        groups: Optional[int] = None,
        group_sizes: Optional[Sequence[int]] = None,
        backend: Union[str, AttentionKernel] = "auto",
        head_dim: Optional[int] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("depth", depth), ("heads", heads)):
            check_positive_int(name, value)
        head_dim = check_head_dim(heads, "dim", dim, head_dim)
        check_number("mlp_ratio", mlp_ratio, strict=True)
        if groups is not None and group_sizes is not None:
            raise ValueError("give either groups or group_sizes, not both")
        if groups is not None:
            check_positive_int("groups", groups)
        if not callable(backend):
            check_choice("backend", backend, BACKENDS)
        self.group_sizes = check_group_sizes(group_sizes) if group_sizes is not None else None
        self.groups = None if self.group_sizes is not None else (groups or 1)
        if backend == "fold" and self.group_sizes is not None and len(set(self.group_sizes)) > 1:
            raise AttentionBackendError("fold", [f"fold needs equal group sizes, got {self.group_sizes}"])
        if backend == "xformers" and device is not None and torch.device(device).type != "cuda":
            raise AttentionBackendError("xformers", [f"xformers needs a CUDA device, got {device}"])
        self.backend = backend
        self.dim = dim
        self.heads = heads
        self.head_dim = head_dim
        self.blocks = nn.ModuleList(
            _Block(dim, heads, head_dim, mlp_ratio, device=device, dtype=dtype) for _ in range(depth)
        )
        # Fast path of first_of_group=True: the last layer computes only the groups' first queries.
        self.first_queries_only = True

    def resolve_group_sizes(self, n: int) -> list[int]:
        """The group sizes used for a sequence of ``n`` tokens."""
        if self.group_sizes is not None:
            if sum(self.group_sizes) != n:
                raise ValueError(
                    f"x: group_sizes {self.group_sizes} sum to {sum(self.group_sizes)}, "
                    f"but x has N={n} tokens"
                )
            return self.group_sizes
        if n % self.groups:
            raise ValueError(f"x: N={n} tokens cannot be split into groups={self.groups} equal groups")
        return [n // self.groups] * self.groups

    def kernel(self, x: Tensor, group_sizes: Sequence[int], padding_mask: Optional[Tensor] = None) -> AttentionKernel:
        """The attention kernel every layer uses for ``x`` (see :func:`resolve_kernel`).

        Selection reads only the queries' device, dtype, shape ``(B, H, N, h)`` and whether they
        need a gradient, all known from ``x`` before the first layer computes them.
        """
        if callable(self.backend):
            return self.backend
        batch, n, _ = x.shape
        grad = torch.is_grad_enabled() and (x.requires_grad or self.blocks[0].qkv.weight.requires_grad)
        queries = _Queries(x.device, _compute_dtype(x), (batch, self.heads, n, self.head_dim), grad)
        return resolve_kernel(self.backend, queries, group_sizes, padding_mask)  # type: ignore[arg-type]

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, *, first_of_group: bool = False) -> Tensor:
        sizes: dict[str, int] = {}
        check_tensor("x", x, ("B", "N", self.dim), sizes, floating=True)
        if padding_mask is not None:
            check_bool_mask("padding_mask", padding_mask, ("B", "N"), sizes)
        group_sizes = self.resolve_group_sizes(x.shape[1])
        kernel = self.kernel(x, group_sizes, padding_mask)
        fast = first_of_group and self.first_queries_only
        for block in self.blocks[:-1] if fast else self.blocks:
            x = block(x, kernel, group_sizes, padding_mask)
        if fast:
            return self.blocks[-1].forward_first(x, group_sizes, padding_mask)
        if first_of_group:
            return x[:, [sum(group_sizes[:g]) for g in range(len(group_sizes))]]
        return x

    def extra_repr(self) -> str:
        groups = f"group_sizes={self.group_sizes}" if self.group_sizes else f"groups={self.groups}"
        backend = repr(self.backend) if isinstance(self.backend, str) else getattr(self.backend, "__name__", "kernel")
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, {groups}, backend={backend}"
