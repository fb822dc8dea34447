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

from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from umilayers._validation import check_bool_mask, check_tensor, format_indices

__all__ = ["CommonSpaceSum", "common_space_sum", "fuse_rows", "modality_counts", "sub_batch_rows"]

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
    sizes: dict[str, int] = {}
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


def _check_present(
    features: Mapping[str, Tensor], present: Mapping[str, Tensor], names: list[str], check_values: bool
) -> tuple[int, dict[str, Tensor]]:
    """Validate ``present``; return the batch size and the masks of the featured modalities."""
    if not isinstance(present, Mapping):
        raise TypeError(
            "present: expected a mapping of modality name -> (B,) bool mask, "
            f"got {type(present).__name__}"
        )
    missing = [n for n in names if n not in present]
    if missing:
        raise ValueError(
            f"present: expected a mask for every modality in features {names}, missing {missing}"
        )
    sizes: dict[str, int] = {}
    for name in sorted(present):
        check_bool_mask(f"present[{name!r}]", present[name], ("B",), sizes)
    batch = sizes["B"]
    device = features[names[0]].device
    masks = {name: present[name].to(device) for name in names}
    if not check_values:
        return batch, masks
    for name in sorted(present):
        if name not in features and bool(present[name].any()):
            raise ValueError(
                f"present[{name!r}]: marks {int(present[name].sum())} row(s) as having {name!r}, "
                f"but features has no {name!r} (give its features or an all-False mask)"
            )
    for name in names:
        rows, marked = features[name].shape[0], int(masks[name].sum())
        if rows not in (marked, batch):
            raise ValueError(
                f"features[{name!r}]: expected {marked} rows (present[{name!r}].sum()) or {batch} "
                f"rows (the full batch), got {rows}"
            )
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
    sizes: dict[str, int] = {}
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

    batch, masks = _check_present(features, present, names, check_values)
    counts = torch.stack([masks[n] for n in names]).sum(dim=0)
    if check_values:
        absent = counts == 0
        if bool(absent.any()):
            raise ValueError(
                f"present: {int(absent.sum())} row(s) have no modality in features {names}: "
                f"rows {format_indices(absent.nonzero().flatten())}"
            )
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
