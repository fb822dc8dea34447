"""Feature projection: tokens of one modality ``(B, k_m, d_m)`` -> the common space ``(B, K, D)``.

Shape letters: ``B`` batch, ``k_m`` tokens of the modality, ``d_m`` its feature size, ``K`` = k*
(output slots), ``D`` = d* (common width).

:class:`FeatureProjection` is the paper's learned projection (Sec. 4, "Feature Projection"): a few
transformer layers over the input tokens produce logits ``(B, k_m, K)``; a softmax turns them into
an attention matrix ``O``; the raw input features are reorganised to ``K`` tokens by
``F' = O^T F``; a linear layer maps ``d_m -> D``. Two readings of the softmax are offered (see
``docs/projection.rst``):

- ``normalize="inputs"`` (paper text, default): softmax over the ``k_m`` axis, every output slot
  is a convex combination of the input tokens (columns of ``O`` sum to 1);
- ``normalize="slots"`` (the authors' released code): softmax over the ``K`` axis, every input
  token spreads itself over the slots (rows of ``O`` sum to 1).

:class:`PooledProjection` is the paper's "alternative feature projection" ablation: a masked mean
pool over the tokens, then a linear layer, repeated or reshaped to ``(B, K, D)``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from umilayers._validation import (
    check_bool_mask,
    check_choice,
    check_head_dim,
    check_int,
    check_number,
    check_positive_int,
    check_tensor,
    format_indices,
)
from umilayers.attention import GroupMaskedTransformer

__all__ = [
    "FeatureProjection",
    "PooledProjection",
    "check_positions",
    "position_table",
    "add_positions",
    "NORMALIZE",
    "POSITIONS",
]

#: Accepted values of ``FeatureProjection(normalize=...)``.
NORMALIZE = ("inputs", "slots")
#: Accepted values of ``FeatureProjection(positions=...)``.
POSITIONS = (None, "learned")

ProjectionOutput = Union[Tensor, tuple[Tensor, Tensor]]


def check_positions(positions: Optional[str], max_tokens: Optional[int]) -> None:
    """Check a ``positions`` choice (:data:`POSITIONS`) and the ``max_tokens`` it needs."""
    check_choice("positions", positions, POSITIONS)
    if max_tokens is not None:
        check_positive_int("max_tokens", max_tokens)
    if positions == "learned" and max_tokens is None:
        raise ValueError("max_tokens: required with positions='learned', got None")


def position_table(positions: Optional[str], max_tokens: Optional[int], dim: int, device=None,
                   dtype=None) -> Optional[nn.Parameter]:
    """The learned position table ``(max_tokens, dim)`` (trunc-normal, std 0.02), or None."""
    if positions != "learned":
        return None
    assert max_tokens is not None, "learned positions need max_tokens (check_positions)"
    table = nn.Parameter(torch.zeros(max_tokens, dim, device=device, dtype=dtype))
    nn.init.trunc_normal_(table, std=0.02)
    return table


def add_positions(h: Tensor, positions: Optional[str], table: Optional[Tensor] = None) -> Tensor:
    """``h + positions`` for token embeddings ``(B, n, D)``: none, or a learned table's first
    ``n`` rows (``table`` ``(max_tokens, D)``; ``n <= max_tokens`` is the caller's check).

    Example::

        >>> h = torch.zeros(2, 3, 4)
        >>> bool((add_positions(h, None) == h).all()), add_positions(h, "learned", torch.ones(5, 4))[0, 2, 0].item()
        (True, 1.0)
    """
    if positions is None:
        return h
    assert table is not None, "learned positions need their table (position_table)"
    return h + table[: h.shape[1]].to(h.dtype)


def _check_inputs(
    x: Tensor, padding_mask: Optional[Tensor], in_dim: int, check_values: bool
) -> Optional[Tensor]:
    """Validate ``x`` and ``padding_mask``; return the mask, or None when nothing is padded.

    Raises ValueError when a sample has no valid token: ``k_m == 0``, or (with ``check_values``,
    which reads the mask back to the host) every token padding.
    """
    sizes: dict[str, int] = {}
    check_tensor("x", x, ("B", "k_m", in_dim), sizes, floating=True)
    batch, tokens = x.shape[0], x.shape[1]
    if padding_mask is not None:
        check_bool_mask("padding_mask", padding_mask, ("B", "k_m"), sizes)
        if padding_mask.device != x.device:
            raise ValueError(
                f"padding_mask: expected a mask on x's device {x.device}, got {padding_mask.device}"
            )
    if batch == 0:
        return padding_mask
    if tokens == 0:
        raise ValueError(f"x: expected at least one token per sample, got k_m=0 (shape {tuple(x.shape)})")
    if padding_mask is None or not check_values:
        return padding_mask
    empty = padding_mask.all(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten()
        raise ValueError(
            f"padding_mask: every token is padding in {len(rows)} row(s) {format_indices(rows)}; "
            "each sample needs at least one valid token (drop those rows instead)"
        )
    return padding_mask


class _TokenProjection(nn.Module):
    """What both projections share: one check of the tokens, padding zeroed, then :meth:`project`."""

    in_dim: int
    max_tokens: Optional[int] = None

    def forward(
        self,
        x: Tensor,
        padding_mask: Optional[Tensor] = None,
        return_weights: bool = False,
        *,
        check_values: bool = False,
    ) -> ProjectionOutput:
        """Project ``x`` to ``(B, K, D)``.

        Args:
            x: input tokens ``(B, k_m, d_m)``.
            padding_mask: ``(B, k_m)`` bool, True marks padding; every sample needs a valid token.
            return_weights: also return the weights of the input tokens in each slot: the
                attention matrix ``O`` (FeatureProjection) or the pooling weights (PooledProjection).
            check_values: also refuse rows whose tokens are all padding (reads the mask back to
                the host; the FeatureStore guarantees it for the training recipe's data).

        Returns:
            ``(B, K, D)``, or ``(output, weights)`` with weights of shape ``(B, k_m, K)``.

        Raises:
            ValueError: wrong shapes, more than ``max_tokens`` tokens, or (with ``check_values``)
                a sample whose tokens are all padding (the rows are named).

        Shape:
            - x: ``(B, k_m, d_m)``
            - padding_mask: ``(B, k_m)``
            - output: ``(B, K, D)``; weights ``(B, k_m, K)``
        """
        padding_mask = _check_inputs(x, padding_mask, self.in_dim, check_values)
        if self.max_tokens is not None and x.shape[1] > self.max_tokens:
            raise ValueError(
                f"x: expected at most max_tokens={self.max_tokens} tokens, got k_m={x.shape[1]}"
            )
        return self.forward_checked(x, padding_mask, return_weights)

    def forward_checked(
        self, x: Tensor, padding_mask: Optional[Tensor] = None, return_weights: bool = False
    ) -> ProjectionOutput:
        """:meth:`forward` without any check, for callers that checked ``x`` and ``padding_mask``
        already (:class:`~umilayers.model.UnseenModalityModel` checks its whole batch once)."""
        if padding_mask is not None:
            # Padding values are never read: NaN there must not reach attention or the sums.
            x = x.masked_fill(padding_mask[..., None], 0.0)
        out, weights = self.project(x, padding_mask, return_weights)
        if not return_weights:
            return out
        assert weights is not None, "project returns the weights when asked for them"
        return out, weights

    def project(
        self, x: Tensor, padding_mask: Optional[Tensor], return_weights: bool
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``(output, weights or None)`` of checked tokens whose padding is zero."""
        raise NotImplementedError


class FeatureProjection(_TokenProjection):
    """Learned projection of one modality's tokens to ``K`` tokens of width ``D`` (paper Sec. 4).

    ``logits = head(transformer(embed(x) [+ positions]))`` has shape ``(B, k_m, K)``; a softmax
    gives the attention matrix ``O``; the output is ``Linear_{d_m -> D}(O^T F)`` where ``F`` are
    the *raw* input features.

    ``normalize="inputs"`` (default, paper text): softmax over the ``k_m`` tokens, so every
    column of ``O`` sums to 1 and each output slot is a convex combination of the input tokens;
    the output's scale does not depend on ``k_m``.

    ``normalize="slots"`` (the authors' released code): softmax over the ``K`` slots, so every row
    of ``O`` sums to 1. Then ``O^T F`` *sums* over the inputs rather than averaging them: slot
    ``k`` receives ``sum_n O[n, k] F[n]`` and the slots together hold ``sum_n F[n]``, so the output
    grows with the number of valid tokens (about ``k_m / K`` times an average token when the
    weights are near uniform). This is kept as released; normalise the features or pick
    ``"inputs"`` when token counts vary a lot between samples.

    Padding tokens (``padding_mask`` True) get exactly zero weight in both modes, are never
    attended to by the transformer, and their feature values are never read (NaN in padding is
    harmless). Without positions, or with padding appended after the valid tokens, adding padding
    leaves the output unchanged (up to float rounding).

    Since ``(O^T F) W^T = O^T (F W^T)``, the linear map is applied before the reorganisation when
    that is cheaper (``in_dim > out_dim``); the result is the same up to rounding. The choice is
    stored in the plain attribute ``project_first`` (a test flips it to compare both paths).

    Args:
        in_dim: feature size ``d_m`` of the input tokens.
        out_dim: common width ``D`` (also the transformer's width).
        num_tokens: number of output slots ``K``.
        depth: transformer layers that compute the logits (0: logits straight from the embedding).
        heads: attention heads (must divide ``out_dim`` unless ``head_dim`` is given).
        normalize: ``"inputs"`` (softmax over tokens) or ``"slots"`` (softmax over slots).
        positions: ``None`` (default, any ``k_m``) or ``"learned"`` (a table of ``max_tokens``
            rows, as the authors' released code has).
        max_tokens: the most input tokens accepted; required for learned positions.
        mlp_ratio: MLP hidden width of the transformer relative to ``out_dim``.
        head_dim: width of each attention head of the transformer (default
            ``out_dim // heads``; see :class:`~umilayers.attention.GroupMaskedTransformer`).
        norms: the authors' released code's LayerNorms around both linear maps: ``embed`` becomes
            ``LayerNorm(d_m) -> Linear -> LayerNorm(D)``, and the reorganised features ``O^T F``
            pass a ``LayerNorm(d_m)`` before ``proj`` (the one after ``proj`` is the model's
            ``feature_norm``). Default off.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - x: ``(B, k_m, d_m)``
        - padding_mask: ``(B, k_m)`` bool, True = padding (optional)
        - output: ``(B, K, D)``; with ``return_weights=True`` also ``O`` of shape ``(B, k_m, K)``
          (float32 unless the parameters are float64)

    Example::

        >>> import torch
        >>> proj = FeatureProjection(in_dim=12, out_dim=16, num_tokens=4, depth=1, heads=2)
        >>> x = torch.randn(3, 7, 12)
        >>> mask = torch.zeros(3, 7, dtype=torch.bool)
        >>> mask[0, 5:] = True  # sample 0 has 5 tokens
        >>> out, weights = proj(x, padding_mask=mask, return_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([3, 4, 16]), torch.Size([3, 7, 4]))
        >>> torch.allclose(weights.sum(dim=1), torch.ones(3, 4))
        True
        >>> bool((weights[0, 5:] == 0).all())
        True
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 256,
        num_tokens: int = 512,
        depth: int = 6,
        heads: int = 8,
        normalize: str = "inputs",
        positions: Optional[str] = None,
        max_tokens: Optional[int] = None,
        mlp_ratio: float = 2.0,
        head_dim: Optional[int] = None,
        norms: bool = False,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        sizes = {"in_dim": in_dim, "out_dim": out_dim, "num_tokens": num_tokens, "heads": heads}
        for name, value in sizes.items():
            check_positive_int(name, value)
        check_int("depth", depth, 0)
        check_head_dim(heads, "out_dim", out_dim, head_dim)
        check_choice("normalize", normalize, NORMALIZE)
        check_positions(positions, max_tokens)
        check_number("mlp_ratio", mlp_ratio, strict=True)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.in_dim, self.out_dim, self.num_tokens = in_dim, out_dim, num_tokens
        self.normalize = normalize
        self.positions = positions
        self.max_tokens = max_tokens
        self.embed = nn.Linear(in_dim, out_dim, **factory)
        self.pos_embed = position_table(positions, max_tokens, out_dim, **factory)
        self.encoder: Optional[GroupMaskedTransformer] = None
        if depth > 0:
            self.encoder = GroupMaskedTransformer(out_dim, depth, heads, mlp_ratio, groups=1, head_dim=head_dim,
                                                  **factory)
        self.norm = nn.LayerNorm(out_dim, **factory)
        self.head = nn.Linear(out_dim, num_tokens, **factory)
        self.proj = nn.Linear(in_dim, out_dim, **factory)
        self.norms: Optional[nn.ModuleList] = None
        if norms:  # (tokens before embed, after embed, reorganised features before proj)
            self.norms = nn.ModuleList(nn.LayerNorm(d, **factory) for d in (in_dim, out_dim, in_dim))
        # Fast path chosen once: project d_m -> D before the reorganisation when d_m > D (and
        # no LayerNorm sits between the two).
        self.project_first = in_dim > out_dim and not norms

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_tokens={self.num_tokens}, "
            f"normalize={self.normalize!r}, positions={self.positions!r}, max_tokens={self.max_tokens}"
        )

    def logits(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Slot logits ``(B, k_m, K)`` of already validated, padding-zeroed inputs."""
        if self.norms is not None:
            h = self.norms[1](self.embed(self.norms[0](x)))
        else:
            h = self.embed(x)
        h = add_positions(h, self.positions, self.pos_embed)
        if self.encoder is not None:
            h = self.encoder(h, padding_mask=padding_mask)
        return self.head(self.norm(h))

    def weights(self, logits: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Attention matrix ``O`` ``(B, k_m, K)`` from logits, softmax in float32 (or float64).

        Padding rows are exactly zero; columns (``"inputs"``) or valid rows (``"slots"``) sum to 1.
        """
        work = torch.float64 if logits.dtype == torch.float64 else torch.float32
        logits = logits.to(work)
        if self.normalize == "inputs":
            if padding_mask is not None:
                logits = logits.masked_fill(padding_mask[..., None], float("-inf"))
            return torch.softmax(logits, dim=1)
        weights = torch.softmax(logits, dim=2)
        if padding_mask is not None:
            weights = weights.masked_fill(padding_mask[..., None], 0.0)
        return weights

    def project(
        self, x: Tensor, padding_mask: Optional[Tensor], return_weights: bool
    ) -> tuple[Tensor, Optional[Tensor]]:
        """``O^T F`` mapped to ``D``, and ``O`` (see the class docs)."""
        weights = self.weights(self.logits(x, padding_mask), padding_mask)
        o = weights.to(x.dtype)
        if self.project_first:
            features = torch.nn.functional.linear(x, self.proj.weight)
            out = torch.einsum("b n k, b n d -> b k d", o.to(features.dtype), features)
            out = out + self.proj.bias.to(out.dtype)
        else:
            out = torch.einsum("b n k, b n d -> b k d", o, x)
            out = self.proj(out if self.norms is None else self.norms[2](out))
        return out, weights


class PooledProjection(_TokenProjection):
    """The paper's "alternative feature projection" ablation: masked mean pool, then linear.

    The valid tokens are averaged (padding ignored), then mapped to the common space either by
    ``Linear(d_m -> D)`` repeated over the ``K`` slots (``mode="repeat"``) or by
    ``Linear(d_m -> K * D)`` reshaped to ``(K, D)`` (``mode="reshape"``). ``return_weights=True``
    returns the pooling weights in :class:`FeatureProjection`'s layout ``(B, k_m, K)`` (every
    column is ``1 / n_valid`` on the valid tokens, 0 on padding), so callers treat both alike.

    Args:
        in_dim: feature size ``d_m`` of the input tokens.
        out_dim: common width ``D``.
        num_tokens: number of output slots ``K``.
        mode: ``"repeat"`` or ``"reshape"``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - x: ``(B, k_m, d_m)``
        - padding_mask: ``(B, k_m)`` bool, True = padding (optional)
        - output: ``(B, K, D)``; with ``return_weights=True`` also ``(B, k_m, K)``

    Example::

        >>> import torch
        >>> pool = PooledProjection(in_dim=12, out_dim=16, num_tokens=4, mode="reshape")
        >>> pool(torch.randn(3, 7, 12)).shape
        torch.Size([3, 4, 16])
    """

    MODES = ("repeat", "reshape")

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 256,
        num_tokens: int = 512,
        mode: str = "repeat",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("num_tokens", num_tokens)):
            check_positive_int(name, value)
        check_choice("mode", mode, self.MODES)
        self.in_dim, self.out_dim, self.num_tokens, self.mode = in_dim, out_dim, num_tokens, mode
        width = out_dim if mode == "repeat" else num_tokens * out_dim
        self.proj = nn.Linear(in_dim, width, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_tokens={self.num_tokens}, "
            f"mode={self.mode!r}"
        )

    def project(
        self, x: Tensor, padding_mask: Optional[Tensor], return_weights: bool
    ) -> tuple[Tensor, Optional[Tensor]]:
        """The mean of the valid tokens mapped to ``(K, D)``, and the pooling weights."""
        batch, tokens = x.shape[0], x.shape[1]
        if padding_mask is None:
            pool = torch.full((batch, tokens), 1.0 / max(tokens, 1), device=x.device, dtype=x.dtype)
        else:
            valid = (~padding_mask).to(x.dtype)
            pool = valid / valid.sum(dim=1, keepdim=True).clamp_min(1)
        pooled = torch.einsum("b n, b n d -> b d", pool, x)
        y = self.proj(pooled)
        if self.mode == "repeat":
            out = repeat(y, "b d -> b k d", k=self.num_tokens)
        else:
            out = rearrange(y, "b (k d) -> b k d", k=self.num_tokens)
        return out, repeat(pool, "b n -> b n k", k=self.num_tokens) if return_weights else None
