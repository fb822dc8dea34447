"""Common-space fusion: sum the projected features of the modalities each sample has (paper Sec. 4).

Shape letters: ``B`` batch, ``B_m`` rows that have modality m, ``K`` = k* slots, ``D`` = d* width.

Sub-batch convention (see ``docs/contracts.md``): a modality's features may cover only the
samples that have it. With ``present[m]`` a ``(B,)`` bool mask, ``features[m]`` is either

- ``(present[m].sum(), K, D)``: the rows of the samples that have m, in batch order; they are
  scattered into the rows where ``present[m]`` is True; or
- ``(B, K, D)``: a full-batch tensor; rows where ``present[m]`` is False are ignored (not added,
  even if they hold NaN).

Without ``present``, every modality covers the whole batch. A sample with no modality at all is
an error (with ``check_values=True``, which reads the masks back to the host), never a silent
zero. :func:`fuse_rows` is the unchecked kernel for callers that validated the batch already
(:class:`~umilayers.model.UnseenModalityModel` checks its batch once, at its own boundary).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from umilayers._validation import Sizes, check_bool_mask, check_tensor, format_indices

__all__ = ["CommonSpaceSum", "common_space_sum", "fuse_rows", "modality_counts", "sub_batch_rows", "check_present"]

FusionOutput = Union[Tensor, tuple[Tensor, Tensor]]


def sub_batch_rows(present: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The rows that have a modality and the rows that lack it, as ``(B,)`` index tensors.

    ``count`` is ``present.sum()``, known from the sub-batch's shape (``inputs[m].shape[0]``), so
    nothing is read back to the host (``present.nonzero()`` would wait for the device). Both
    index sets are ascending: the first is the sub-batch's rows in batch order.

    Example::

        >>> import torch
        >>> sub_batch_rows(torch.tensor([False, True, False, True]), 2)
        (tensor([1, 3]), tensor([0, 2]))
    """
    order = torch.argsort(present.to(torch.int8), descending=True, stable=True)
    return order[:count], order[count:]


def _check_features(features: Mapping[str, Tensor]) -> list[str]:
    """Validate the feature tensors against each other; return the keys in sorted order."""
    if not isinstance(features, Mapping):
        raise TypeError(
            f"features: expected a mapping of modality name -> tensor, got {type(features).__name__}"
        )
    if len(features) == 0:
        raise ValueError("features: expected at least one modality, got an empty mapping")
    names = sorted(features)
    first = names[0]
    sizes = Sizes()  # a K or D mismatch names the tensor that set it
    for name in names:
        check_tensor(f"features[{name!r}]", features[name], (None, "K", "D"), sizes, floating=True)
    ref = features[first]
    for name in names[1:]:
        t = features[name]
        if t.dtype != ref.dtype:
            raise TypeError(
                f"features[{name!r}]: expected dtype {ref.dtype} (as features[{first!r}]), got {t.dtype}"
            )
        if t.device != ref.device:
            raise ValueError(
                f"features[{name!r}]: expected device {ref.device} (as features[{first!r}]), got {t.device}"
            )
    return names


def check_present(
    name: str, tensors: Mapping[str, Tensor], present: Any, *, full_batch: bool, check_values: bool
) -> tuple[int, dict[str, Tensor]]:
    """Check the ``(B,)`` masks of a sub-batch layout against the tensors they describe.

    ``present[m]`` says which rows of the batch have modality ``m``; ``tensors[m]`` (the argument
    called ``name``: ``features``, ``inputs``) holds the rows that have it, or all ``B`` rows when
    ``full_batch``. Every modality of ``tensors`` needs a mask, and all masks one length ``B``.
    ``check_values=True`` also checks, reading the masks back to the host, that each tensor has
    ``present[m].sum()`` rows (or ``B``), that a mask of a modality not in ``tensors`` is all
    False, and that every row has a modality.

    Returns:
        ``(B, masks)``: the masks of the modalities in ``tensors`` on their device.
    """
    names = sorted(tensors)
    if not isinstance(present, Mapping):
        raise TypeError(f"present: expected a mapping of modality name -> (B,) bool mask, got {type(present).__name__}")
    unmasked = [m for m in names if m not in present]
    if unmasked and set(present) - set(names):  # masks under other names: a name spelled two ways?
        raise ValueError(f"{name}: unknown modality {unmasked}: present has masks for {sorted(present)}, "
                         f"not for {'it' if len(unmasked) == 1 else 'them'}")
    if unmasked:
        raise ValueError(f"present: missing the mask of {unmasked} (every modality of {name} needs its (B,) "
                         f"mask; present has {sorted(present)})")
    sizes = Sizes()
    for m in sorted(present):
        check_bool_mask(f"present[{m!r}]", present[m], ("B",), sizes)
    batch = sizes["B"]
    masks = {m: present[m].to(tensors[names[0]].device) for m in names}
    if check_values:
        for m in sorted(present):
            if m not in tensors and bool(present[m].any()):
                raise ValueError(
                    f"present[{m!r}]: marks {int(present[m].sum())} row(s) as having {m!r}, but {name} has "
                    f"no {m!r} (give its rows or an all-False mask)"
                )
        for m in names:
            rows, marked = tensors[m].shape[0], int(masks[m].sum())
            if rows != marked and not (full_batch and rows == batch):
                either = f") or {batch} rows (the full batch)" if full_batch else f", the rows that have {m!r})"
                raise ValueError(f"{name}[{m!r}]: expected {marked} rows (present[{m!r}].sum(){either}, got {rows}")
        none = ~torch.stack([masks[m] for m in names]).any(dim=0)
        if bool(none.any()):
            raise ValueError(f"present: {int(none.sum())} row(s) have no modality at all: rows "
                             f"{format_indices(none.nonzero().flatten())} (modalities in {name}: {names})")
    return batch, masks


def modality_counts(
    present: Mapping[str, Tensor], modalities: Optional[list[str]] = None
) -> Tensor:
    """Number of modalities each sample has, ``(B,)`` int64.

    Args:
        present: modality name -> ``(B,)`` bool mask.
        modalities: count only these names (default: all of ``present``).

    Example::

        >>> import torch
        >>> modality_counts({"rgb": torch.tensor([True, False]), "audio": torch.tensor([True, True])})
        tensor([2, 1])
    """
    names = sorted(present if modalities is None else modalities)
    if not names:
        raise ValueError("present: expected at least one modality, got an empty mapping")
    sizes = Sizes()
    for name in names:
        check_bool_mask(f"present[{name!r}]", present[name], ("B",), sizes)
    device = present[names[0]].device
    return torch.stack([present[n].to(device) for n in names]).sum(dim=0)


def fuse_rows(features: Mapping[str, Tensor], present: Mapping[str, Tensor], batch_size: int) -> Tensor:
    """:func:`common_space_sum` without any check: the kernel for callers that validated already.

    ``features[m]`` holds the ``present[m].sum()`` rows that have m, or all ``batch_size`` rows
    (absent rows then ignored); every row has at least one modality. Modalities are summed in
    sorted order.

    Example::

        >>> import torch
        >>> present = {"rgb": torch.tensor([True, False]), "audio": torch.tensor([True, True])}
        >>> fuse_rows({"rgb": torch.ones(1, 2, 3), "audio": torch.ones(2, 2, 3)}, present, 2)[:, 0, 0]
        tensor([2., 1.])
    """
    out: Optional[Tensor] = None
    for name in sorted(features):
        t, mask = features[name], present[name]
        if t.shape[0] == batch_size:
            # Full-batch tensor: absent rows are dropped (where, not multiply, so NaN there is ignored).
            zero = torch.zeros((), dtype=t.dtype, device=t.device)
            contribution = torch.where(mask[:, None, None], t, zero)
            out = contribution if out is None else out + contribution
        else:
            base = out if out is not None else t.new_zeros((batch_size,) + tuple(t.shape[1:]))
            out = base.index_add(0, sub_batch_rows(mask, t.shape[0])[0], t)
    assert out is not None, "features: expected at least one modality"
    return out


def common_space_sum(
    features: Mapping[str, Tensor],
    present: Optional[Mapping[str, Tensor]] = None,
    return_count: bool = False,
    *,
    check_values: bool = False,
) -> FusionOutput:
    """Functional form of :class:`CommonSpaceSum` (same arguments, same result).

    Example::

        >>> import torch
        >>> out = common_space_sum({"rgb": torch.ones(2, 3, 4), "audio": torch.ones(2, 3, 4)})
        >>> out[0, 0]
        tensor([2., 2., 2., 2.])
    """
    names = _check_features(features)
    first = features[names[0]]
    if present is None:
        batch = first.shape[0]
        for name in names[1:]:
            rows = features[name].shape[0]
            if rows != batch:
                raise ValueError(
                    f"features[{name!r}]: expected {batch} rows (as features[{names[0]!r}]; without "
                    f"present every modality covers the full batch), got {rows}"
                )
        out = first
        for name in names[1:]:
            out = out + features[name]
        if return_count:
            return out, torch.full((batch,), len(names), dtype=torch.int64, device=first.device)
        return out

    batch, masks = check_present("features", features, present, full_batch=True, check_values=check_values)
    counts = torch.stack([masks[n] for n in names]).sum(dim=0)
    out = fuse_rows(features, masks, batch)
    return (out, counts) if return_count else out


class CommonSpaceSum(nn.Module):
    """Sum of the projected features of the modalities each sample has: ``F = sum_m F_m``.

    Modalities are summed in sorted key order, so the result does not depend on the mapping's
    order. Without ``present`` every tensor covers the full batch. With ``present``, a modality's
    tensor holds either exactly ``present[m].sum()`` rows (a sub-batch, scattered into the rows
    where the mask is True with a differentiable ``index_add``, no Python loop over rows) or the
    full ``B`` rows (absent rows then ignored). No parameters.

    Raises:
        ValueError: empty mapping; mismatched ``K``/``D``, devices or mask lengths; with
            ``check_values=True`` (which reads the masks back to the host) also row counts that
            match neither ``present[m].sum()`` nor ``B`` and rows without any modality (named).
        TypeError: non-tensor values, non-bool masks or mismatched dtypes.

    Shape:
        - features[m]: ``(B_m, K, D)`` with ``B_m = present[m].sum()`` or ``B``
        - present[m]: ``(B,)`` bool (optional)
        - output: ``(B, K, D)``; with ``return_count=True`` also ``(B,)`` int64, the number of
          modalities per row (divide by it for a mean)

    Example::

        >>> import torch
        >>> fuse = CommonSpaceSum()
        >>> present = {"rgb": torch.tensor([True, True, False]), "audio": torch.tensor([False, True, True])}
        >>> features = {"rgb": torch.ones(2, 4, 8), "audio": 10 * torch.ones(2, 4, 8)}
        >>> out, count = fuse(features, present, return_count=True)
        >>> out[:, 0, 0], count
        (tensor([ 1., 11., 10.]), tensor([1, 2, 1]))
    """

    def forward(
        self,
        features: Mapping[str, Tensor],
        present: Optional[Mapping[str, Tensor]] = None,
        return_count: bool = False,
        *,
        check_values: bool = False,
    ) -> FusionOutput:
        """Sum the modalities' features per sample.

        Args:
            features: modality name -> ``(B_m, K, D)`` projected features.
            present: modality name -> ``(B,)`` bool, True where the sample has the modality.
            return_count: also return the number of modalities per row.
            check_values: also check the masks against the features' rows (host reads).

        Shape:
            - features[m]: ``(B_m, K, D)``
            - present[m]: ``(B,)``
            - output: ``(B, K, D)``; count ``(B,)``
        """
        return common_space_sum(features, present, return_count, check_values=check_values)
