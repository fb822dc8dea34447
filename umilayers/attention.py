"""Group-masked attention: token i attends to token j only inside their contiguous group (Eq. 2).

The dual-branch prediction of the paper runs both branches in one pass; each branch's tokens
attend only to the tokens of the same branch. Here a sequence of ``N`` tokens is cut into
contiguous groups of sizes ``n_1 + ... + n_G = N`` and attention is block-diagonal over them.

Backends (see ``docs/attention.rst``):

- ``"fold"``: equal groups moved into the batch dimension, plain
  ``F.scaled_dot_product_attention`` without a mask (exact; ``1/G`` of the dense work; a view of
  the input, no copies). Every caller in this package has equal groups.
- ``"mask"``: ``F.scaled_dot_product_attention`` with one ``(N, N)`` boolean block mask (any
  group sizes; the dense ``N**2`` work; with key padding one ``(B, 1, N, N)`` mask).
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` with a ``BlockDiagonalMask`` in
  the packed layout ``(1, B * N, H, h)`` (any group sizes, ``sum(n_g**2)`` work); CUDA only, no
  key padding, imported on first use.
- ``"auto"``: ``fold`` for equal groups, ``mask`` otherwise. It never picks ``xformers``: no
  measurement shows it faster (see ``docs/attention.rst``).

The backend is a constructor argument of :class:`GroupMaskedTransformer`, chosen once there;
:func:`group_attention` is the same computation as a function of ``q, k, v``.

A query whose group holds no unpadded key attends to nothing: its output is exactly zero, and
no NaN reaches the gradients, in every backend.

Shape letters: ``B`` batch, ``N`` tokens, ``D`` width, ``H`` heads, ``G`` groups, ``h`` head size.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence, Union, cast

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
    "AttentionBackendError",
    "AttentionKernel",
    "group_attention",
    "block_mask",
    "check_group_sizes",
    "GroupMaskedTransformer",
]

#: Names accepted wherever a backend is chosen.
BACKENDS = ("auto", "fold", "mask", "xformers")
#: Floating dtypes xformers' kernels accept.
_XFORMERS_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: A backend as a function: ``kernel(q, k, v, group_sizes, key_padding_mask)`` on validated
#: ``(B, H, N, h)`` inputs (the shapes of :func:`group_attention`); it checks nothing.
AttentionKernel = Callable[[Tensor, Tensor, Tensor, Sequence[int], Optional[Tensor]], Tensor]


class AttentionBackendError(ValueError):
    """A requested attention backend cannot serve the input.

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


def block_mask(group_sizes: Sequence[int], device: Optional[torch.device] = None) -> Tensor:
    """Boolean ``(N, N)`` mask, True where token i may attend to token j (same group).

    It has exactly ``sum(n_g ** 2)`` True entries.

    Example::

        >>> block_mask([1, 2]).int()
        tensor([[1, 0, 0],
                [0, 1, 1],
                [0, 1, 1]], dtype=torch.int32)
    """
    sizes = check_group_sizes(group_sizes)
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return ids[:, None] == ids[None, :]


# --------------------------------------------------------------------------- the backends


def _mask(q: Tensor, k: Tensor, v: Tensor, group_sizes: Sequence[int], key_padding_mask: Optional[Tensor]) -> Tensor:
    allowed = block_mask(group_sizes, q.device)
    if key_padding_mask is None:  # groups are non-empty: no empty row, the (N, N) mask suffices
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    allowed = allowed[None, None] & ~key_padding_mask[:, None, None, :]  # (B, 1, N, N)
    # A softmax over a row with no allowed key is NaN, and NaN poisons the backward pass even when
    # the output is zeroed afterwards: such rows attend everywhere, then are multiplied by zero.
    empty = ~allowed.any(dim=-1, keepdim=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty).masked_fill(empty, 0.0)


def _fold(q: Tensor, k: Tensor, v: Tensor, group_sizes: Sequence[int], key_padding_mask: Optional[Tensor]) -> Tensor:
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


def _fold_heads(q: Tensor, k: Tensor, v: Tensor, groups: int, key_padding_mask: Optional[Tensor]) -> Tensor:
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


@functools.lru_cache(maxsize=None)
def _load_xformers() -> tuple[Any, str]:
    """``(xformers.ops, "")``, or ``(None, why)`` when it cannot be imported.

    Imported on first use only: xformers has no CPU kernels, and importing it prints warnings
    where its binary extension does not match torch.
    """
    try:
        import xformers.ops as xops  # noqa: PLC0415 (lazy on purpose)
    except Exception as err:  # ImportError, or a broken binary extension
        return None, f"{type(err).__name__}: {err}"
    return xops, ""


def _xformers(
    q: Tensor, k: Tensor, v: Tensor, group_sizes: Sequence[int], key_padding_mask: Optional[Tensor]
) -> Tensor:
    # One block per (row, group) of the packed (1, B N, H, h) sequence: a view for the module's
    # q, k, v, whose memory is (B, N, H, h), and the output goes back to (B, H, N, h) as a view.
    batch = q.shape[0]
    if batch == 0:  # no sequence to pack (BlockDiagonalMask needs one): nothing to compute
        return F.scaled_dot_product_attention(q, k, v)
    xops, _ = _load_xformers()
    bias = xops.fmha.BlockDiagonalMask.from_seqlens(list(group_sizes) * batch, device=q.device)
    q, k, v = (rearrange(t, "b h n d -> 1 (b n) h d") for t in (q, k, v))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias)
    return rearrange(out, "1 (b n) h d -> b h n d", b=batch)


_KERNELS: dict[str, AttentionKernel] = {"fold": _fold, "mask": _mask, "xformers": _xformers}


# --------------------------------------------------------------------------- choosing


def _choose(backend: str, group_sizes: Sequence[int]) -> str:
    """The concrete backend for ``backend`` at these group sizes (``"auto"``: fold or mask)."""
    equal = len(set(group_sizes)) == 1
    if backend == "auto":
        return "fold" if equal else "mask"
    if backend == "fold" and not equal:
        raise AttentionBackendError("fold", [f"fold needs equal group sizes, got {list(group_sizes)}"])
    return backend


def _check_xformers(device: torch.device, dtype: torch.dtype, key_padding_mask: Optional[Tensor]) -> None:
    """Raise :class:`AttentionBackendError` with every reason xformers cannot serve this input.

    On a CPU input nothing of xformers is imported.
    """
    reasons = []
    if device.type != "cuda":
        reasons.append(f"xformers needs a CUDA tensor, got device {device.type} (it has no CPU kernels)")
    if key_padding_mask is not None:
        reasons.append(
            "key_padding_mask is not supported with xformers: BlockDiagonalPaddedKeysMask only "
            "expresses padding at the end of each group and has no backward kernel; use fold or mask"
        )
    if dtype not in _XFORMERS_DTYPES:
        reasons.append(f"dtype={dtype} (xformers supports {list(_XFORMERS_DTYPES)})")
    if not reasons and _load_xformers()[0] is None:
        reasons.append(f"xformers cannot be imported ({_load_xformers()[1]})")
    if reasons:
        raise AttentionBackendError("xformers", reasons)


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, group_sizes: Any, key_padding_mask: Optional[Tensor]) -> list[int]:
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
        backend: one of :data:`BACKENDS` (``"auto"``: ``fold`` for equal groups, else ``mask``).
        key_padding_mask: ``(B, N)`` bool, True marks padding keys (never attended to). A query
            whose group has no unpadded key gets a zero output.

    Returns:
        ``(B, H, N, h_v)`` in the dtype of ``q``.

    Raises:
        AttentionBackendError: the chosen backend cannot serve the input (with every reason).

    Example::

        >>> q = torch.randn(2, 4, 6, 8)
        >>> group_attention(q, q, q, [2, 4]).shape
        torch.Size([2, 4, 6, 8])
    """
    group_sizes = _check_inputs(q, k, v, group_sizes, key_padding_mask)
    check_choice("backend", backend, BACKENDS)
    backend = _choose(backend, group_sizes)
    if backend == "xformers":
        _check_xformers(q.device, q.dtype, key_padding_mask)
    return _KERNELS[backend](q, k, v, group_sizes, key_padding_mask)


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



def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the blocks' linear layers give for ``x``: autocast's when it is on."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype




class GroupMaskedTransformer(nn.Module):
    """Pre-norm transformer whose attention is block-diagonal over contiguous token groups.

    The attention backend is chosen once, here: ``"auto"`` becomes ``"fold"`` for equal groups
    (``groups``, or equal ``group_sizes``) and ``"mask"`` otherwise; a backend that can never
    serve the groups (``fold`` with unequal ``group_sizes``, ``xformers`` on a CPU ``device``) is
    refused at once. The choice is the plain attribute ``backend`` (shown in the repr), and every
    layer calls its kernel directly. ``xformers`` is checked per call only for what depends on
    the input (a CUDA tensor, no key padding, its dtype), without importing xformers on a CPU.

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

    Raises:
        AttentionBackendError: ``backend`` can never serve these groups or this ``device``.

    Shape:
        - x: ``(B, N, D)``
        - padding_mask: ``(B, N)`` bool, True = padding (padded keys are never attended to)
        - output: ``(B, N, D)``; with ``first_of_group=True`` ``(B, G, D)``

    Example::

        >>> import torch
        >>> layer = GroupMaskedTransformer(dim=32, depth=2, heads=4, groups=2)
        >>> layer.backend  # "auto", chosen for two equal groups
        'fold'
        >>> layer(torch.randn(3, 10, 32)).shape
        torch.Size([3, 10, 32])
        >>> layer(torch.randn(3, 10, 32), first_of_group=True).shape  # tokens 0 and 5
        torch.Size([3, 2, 32])
        >>> GroupMaskedTransformer(dim=32, depth=1, heads=4, group_sizes=[3, 7]).backend
        'mask'
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
        self.group_sizes = check_group_sizes(group_sizes) if group_sizes is not None else None
        self.groups = None if self.group_sizes is not None else (groups or 1)
        if not callable(backend):
            check_choice("backend", backend, BACKENDS)
            backend = _choose(backend, self.group_sizes or [1])  # `groups` are equal by definition
            if backend == "xformers" and device is not None and torch.device(device).type != "cuda":
                raise AttentionBackendError("xformers", [f"xformers needs a CUDA device, got {device}"])
        self.backend: Union[str, AttentionKernel] = backend
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
        groups = self.groups
        assert groups is not None, "the constructor sets groups exactly when group_sizes is None"
        if n % groups:
            raise ValueError(f"x: N={n} tokens cannot be split into groups={groups} equal groups")
        return [n // groups] * groups

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None, *, first_of_group: bool = False) -> Tensor:
        sizes: dict[str, int] = {}
        check_tensor("x", x, ("B", "N", self.dim), sizes, floating=True)
        if padding_mask is not None:
            check_bool_mask("padding_mask", padding_mask, ("B", "N"), sizes)
        group_sizes = self.resolve_group_sizes(x.shape[1])
        if callable(self.backend):
            kernel = self.backend
        else:
            if self.backend == "xformers":
                _check_xformers(x.device, _compute_dtype(x), padding_mask)
            kernel = _KERNELS[self.backend]
        fast = first_of_group and self.first_queries_only
        for block in self.blocks[:-1] if fast else self.blocks:
            x = block(x, kernel, group_sizes, padding_mask)
        if fast:
            return cast(_Block, self.blocks[-1]).forward_first(x, group_sizes, padding_mask)
        if first_of_group:
            return x[:, [sum(group_sizes[:g]) for g in range(len(group_sizes))]]
        return x

    def extra_repr(self) -> str:
        groups = f"group_sizes={self.group_sizes}" if self.group_sizes else f"groups={self.groups}"
        backend = repr(self.backend) if isinstance(self.backend, str) else getattr(self.backend, "__name__", "kernel")
        return f"dim={self.dim}, heads={self.heads}, head_dim={self.head_dim}, {groups}, backend={backend}"
