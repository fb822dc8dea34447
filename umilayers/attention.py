"""Group-masked attention: token i attends to token j only inside their contiguous group (Eq. 2).

Shape letters: ``B`` batch, ``N`` tokens, ``D`` width, ``H`` heads, ``G`` groups, ``h`` head size.

FIRST DRAFT: correct reference/sdpa/fold backends; backend selection, xformers, context manager
and environment variable still to be completed.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from umilayers._validation import check_bool_mask, check_positive_int, check_tensor

__all__ = ["group_attention", "block_mask", "GroupMaskedTransformer", "BACKENDS"]

BACKENDS = ("auto", "xformers", "fold", "sdpa", "reference")


def block_mask(group_sizes: Sequence[int], device: Optional[torch.device] = None) -> Tensor:
    """Boolean ``(N, N)`` mask, True where token i may attend to token j (same group)."""
    ids = torch.repeat_interleave(
        torch.arange(len(group_sizes), device=device), torch.tensor(group_sizes, device=device)
    )
    return ids[:, None] == ids[None, :]


def _key_mask(group_sizes: Sequence[int], key_padding_mask: Optional[Tensor], device) -> Tensor:
    """Allowed-entry mask ``(B or 1, 1, N, N)`` combining groups and key padding."""
    allowed = block_mask(group_sizes, device)[None, None]
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    return allowed


def _reference(q: Tensor, k: Tensor, v: Tensor, group_sizes, key_padding_mask) -> Tensor:
    allowed = _key_mask(group_sizes, key_padding_mask, q.device)
    scores = q.float() @ k.float().transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a fully padded row attends to nothing
    return (weights @ v.float()).to(q.dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, group_sizes, key_padding_mask) -> Tensor:
    allowed = _key_mask(group_sizes, key_padding_mask, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _fold(q: Tensor, k: Tensor, v: Tensor, group_sizes, key_padding_mask) -> Tensor:
    groups = len(group_sizes)
    fold = lambda t: rearrange(t, "b h (g n) d -> (b g) h n d", g=groups)  # noqa: E731
    mask = None
    if key_padding_mask is not None:
        mask = ~rearrange(key_padding_mask, "b (g n) -> (b g) 1 1 n", g=groups)
    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), attn_mask=mask)
    return rearrange(out, "(b g) h n d -> b h (g n) d", g=groups)


def group_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group_sizes: Sequence[int],
    backend: str = "auto",
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Attention restricted to contiguous token groups.

    Args:
        q, k, v: ``(B, H, N, h)``.
        group_sizes: sizes of the contiguous groups; they sum to N.
        backend: one of :data:`BACKENDS`.
        key_padding_mask: ``(B, N)`` bool, True marks padding keys (never attended to).

    Returns:
        ``(B, H, N, h)``.
    """
    if backend == "reference":
        return _reference(q, k, v, group_sizes, key_padding_mask)
    if backend == "fold" or (backend == "auto" and len(set(group_sizes)) == 1):
        return _fold(q, k, v, group_sizes, key_padding_mask)
    return _sdpa(q, k, v, group_sizes, key_padding_mask)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, **factory)
        self.qkv = nn.Linear(dim, 3 * dim, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.norm2 = nn.LayerNorm(dim, **factory)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, **factory), nn.GELU(), nn.Linear(hidden, dim, **factory)
        )

    def forward(self, x: Tensor, group_sizes, backend: str, padding_mask: Optional[Tensor]) -> Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        attn = group_attention(q, k, v, group_sizes, backend, padding_mask)
        x = x + self.proj(rearrange(attn, "b h n d -> b n (h d)"))
        return x + self.mlp(self.norm2(x))


class GroupMaskedTransformer(nn.Module):
    """Pre-norm transformer whose attention is block-diagonal over contiguous token groups.

    Args:
        dim: token width D.
        depth: number of layers.
        heads: attention heads H (must divide ``dim``).
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        groups: number of equal contiguous groups (N must be divisible by it).
        group_sizes: explicit group sizes instead of ``groups``.
        backend: attention backend, one of :data:`BACKENDS`.

    Shape:
        - x: ``(B, N, D)``
        - padding_mask: ``(B, N)`` bool, True = padding
        - output: ``(B, N, D)``

    Example::

        >>> import torch
        >>> layer = GroupMaskedTransformer(dim=32, depth=2, heads=4, groups=2)
        >>> layer(torch.randn(3, 10, 32)).shape
        torch.Size([3, 10, 32])
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 2.0,
        groups: Optional[int] = None,
        group_sizes: Optional[Sequence[int]] = None,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("depth", depth), ("heads", heads)):
            check_positive_int(name, value)
        if dim % heads:
            raise ValueError(f"heads: must divide dim={dim}, got heads={heads}")
        if groups is not None and group_sizes is not None:
            raise ValueError("give either groups or group_sizes, not both")
        self.groups = groups if group_sizes is None else None
        self.group_sizes = list(group_sizes) if group_sizes is not None else None
        if self.groups is None and self.group_sizes is None:
            self.groups = 1
        self.backend = backend
        self.blocks = nn.ModuleList(
            _Block(dim, heads, mlp_ratio, device=device, dtype=dtype) for _ in range(depth)
        )
        self.dim = dim

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

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        sizes: dict[str, int] = {}
        check_tensor("x", x, ("B", "N", self.dim), sizes, floating=True)
        if padding_mask is not None:
            check_bool_mask("padding_mask", padding_mask, ("B", "N"), sizes)
        group_sizes = self.resolve_group_sizes(x.shape[1])
        for block in self.blocks:
            x = block(x, group_sizes, self.backend, padding_mask)
        return x
