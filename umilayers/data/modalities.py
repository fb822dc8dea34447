"""Collate modality-incomplete samples into the sub-batch layout the layers expect.

A sample of a modality-incomplete data set has some of the modalities and not others. Your
``Dataset`` returns it as a mapping ``{modality: tensor}`` holding only the modalities the sample
has (a key that is absent or maps to ``None`` is a missing modality), alone or as the first
element of a tuple: ``(modalities, target)``, ``(modalities, target, index)``, ...

:func:`collate_modalities` turns a list of such items into a :class:`ModalityBatch` in the layout
of ``docs/contracts.md``, the one :class:`~umilayers.fusion.CommonSpaceSum`,
:class:`~umilayers.projection.FeatureProjection` and
:class:`~umilayers.model.UnseenModalityModel` take:

- ``inputs[m]``: ``(B_m, *shape_m)``, the rows of the ``B_m`` samples that have ``m``, in batch
  order (never a zero or noise stand-in for a missing modality, so nothing is computed for it);
- ``padding_masks[m]``: ``(B_m, k_m)`` bool, True = padding, when the samples' first axes (their
  token counts ``k_m``) differ and were padded to the longest; ``None`` when nothing is padded;
- ``present[m]``: ``(B,)`` bool, ``present[m].sum() == B_m``.

The other elements of a tuple item (targets, sample ids) are collated by
``torch.utils.data.default_collate``, so the batch mirrors the item:
``(modalities, target, index) -> (ModalityBatch, (B,) targets, (B,) ids)``.

Shape letters: ``B`` batch, ``B_m`` rows that have modality m, ``k_m`` its tokens (the first
axis of a sample's tensor), ``d_m`` its feature size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import default_collate

__all__ = ["ModalityBatch", "collate_modalities"]

Item = Union[Mapping[str, Optional[Tensor]], Sequence[Any]]


@dataclass
class ModalityBatch:
    """A batch of modality-incomplete samples in the sub-batch layout (``docs/contracts.md``).

    Attributes:
        inputs: modality -> ``(B_m, *shape_m)``, the rows of the samples that have it, in batch
            order. Only modalities that at least one row has; keys in sorted order.
        padding_masks: modality -> ``(B_m, k_m)`` bool (True = padding) or ``None`` when no row
            of that modality is padded; one key per key of ``inputs``.
        present: modality -> ``(B,)`` bool; ``present[m].sum() == inputs[m].shape[0]``. May hold
            all-False masks for modalities no row has (see ``modalities`` of
            :func:`collate_modalities`).

    Shape:
        - inputs[m]: ``(B_m, k_m, d_m)`` for token inputs, ``(B_m, *shape_m)`` in general
        - padding_masks[m]: ``(B_m, k_m)``
        - present[m]: ``(B,)``

    Example::

        >>> import torch
        >>> items = [{"rgb": torch.ones(3, 2)}, {"audio": torch.ones(4, 2)},
        ...          {"rgb": torch.ones(1, 2), "audio": torch.ones(2, 2)}]
        >>> batch = collate_modalities(items)
        >>> batch.present["rgb"].tolist(), batch.inputs["rgb"].shape
        ([True, False, True], torch.Size([2, 3, 2]))
        >>> batch.padding_masks["rgb"].tolist()
        [[False, False, False], [False, True, True]]
        >>> [sorted(sample) for sample in batch.unbatch()]
        [['rgb'], ['audio'], ['audio', 'rgb']]
        >>> batch.select(["audio"]).present
        Traceback (most recent call last):
        ...
        ValueError: select: 1 of 3 row(s) have none of ['audio']: rows [0]
        (keep batch.rows(batch.has_any(['audio'])) first)
    """

    inputs: dict[str, Tensor]
    padding_masks: dict[str, Optional[Tensor]]
    present: dict[str, Tensor]

    @property
    def size(self) -> int:
        """The batch size ``B``."""
        return int(next(iter(self.present.values())).shape[0])

    @property
    def modalities(self) -> list[str]:
        """The modalities at least one row has, sorted."""
        return list(self.inputs)

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> "ModalityBatch":
        masks = {m: None if t is None else fn(t) for m, t in self.padding_masks.items()}
        return ModalityBatch({m: fn(t) for m, t in self.inputs.items()}, masks,
                             {m: fn(t) for m, t in self.present.items()})

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> "ModalityBatch":
        """A copy with every tensor on ``device``."""
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "ModalityBatch":
        """A copy in pinned memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._apply(lambda t: t.pin_memory())

    def has_any(self, modalities: Iterable[str]) -> Tensor:
        """``(B,)`` bool: the rows that have at least one of ``modalities``."""
        keep = torch.zeros(self.size, dtype=torch.bool, device=_device(self.present))
        for m in modalities:
            if m in self.present:
                keep |= self.present[m].to(keep.device)
        return keep

    def select(self, modalities: Iterable[str]) -> "ModalityBatch":
        """The same rows with only ``modalities`` (e.g. to test with a modality subset).

        Names the batch does not hold are absent from every row. Every row must keep at least
        one modality: drop the others first with :meth:`rows` and :meth:`has_any`.

        Raises:
            ValueError: a row would be left without any modality (the rows are named).
        """
        names = sorted(set(modalities))
        lacking = ~self.has_any(names)
        if bool(lacking.any()):
            rows = lacking.nonzero().flatten().tolist()
            shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
            raise ValueError(
                f"select: {len(rows)} of {self.size} row(s) have none of {names}: rows [{shown}] "
                f"(keep batch.rows(batch.has_any({names})) first)"
            )
        return ModalityBatch({m: t for m, t in self.inputs.items() if m in names},
                             {m: t for m, t in self.padding_masks.items() if m in names},
                             {m: t for m, t in self.present.items() if m in names})

    def rows(self, index: Tensor) -> "ModalityBatch":
        """The rows ``index`` (a ``(B,)`` bool mask or int positions, in that order).

        Modalities none of the chosen rows has leave ``inputs`` and keep an all-False
        ``present``. Padding is kept as it is (a chosen row may end in padding only).
        """
        if not isinstance(index, Tensor) or index.dim() != 1:
            raise TypeError(f"index: expected a 1-d bool mask or int tensor, got {index!r}")
        device = _device(self.present)
        if index.dtype == torch.bool:
            if index.shape[0] != self.size:
                raise ValueError(f"index: expected a ({self.size},) bool mask, got shape {tuple(index.shape)}")
            index = index.to(device).nonzero().flatten()
        elif index.is_floating_point() or index.is_complex():
            raise TypeError(f"index: expected a bool or integer tensor, got dtype {index.dtype}")
        index = index.to(device, torch.long)
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < self.size):
            raise IndexError(f"index: positions must lie in [0, {self.size}), got {index.tolist()}")
        inputs, masks, present = {}, {}, {}
        for m, mask in self.present.items():
            present[m] = mask[index]
            if m not in self.inputs or not bool(present[m].any()):
                continue
            # Position of each batch row inside m's sub-batch (valid where the row has m).
            slot = torch.cumsum(mask.long(), 0) - 1
            take = slot[index][present[m]].to(self.inputs[m].device)
            inputs[m] = self.inputs[m][take]
            pad = self.padding_masks.get(m)
            masks[m] = None if pad is None else pad[take.to(pad.device)]
        return ModalityBatch(inputs, masks, present)

    def unbatch(self) -> list[dict[str, Tensor]]:
        """The samples again: one ``{modality: tensor}`` per row, padding removed.

        The inverse of :func:`collate_modalities` on its first element: for items without
        ``None`` values, ``collate_modalities(items).unbatch() == items`` tensor for tensor.
        """
        samples: list[dict[str, Tensor]] = [{} for _ in range(self.size)]
        for m, x in self.inputs.items():
            rows = self.present[m].nonzero().flatten().tolist()
            pad = self.padding_masks.get(m)
            for j, row in enumerate(rows):
                samples[row][m] = x[j] if pad is None else x[j][~pad[j].to(x.device)]
        return samples


def _device(tensors: Mapping[str, Tensor]) -> torch.device:
    return next(iter(tensors.values())).device


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _stack(name: str, rows: list[tuple[int, Tensor]], pad: bool, pad_value: float):
    """Stack one modality's rows; pad the first axis when the token counts differ."""
    first = rows[0][1]
    for i, t in rows:
        if t.dtype != first.dtype or t.dim() != first.dim():
            raise ValueError(
                f"items[{i}][{name!r}]: expected a {first.dim()}-d {first.dtype} tensor as "
                f"items[{rows[0][0]}][{name!r}], got {t.dim()}-d {t.dtype} shape {_shape(t)}"
            )
        if t.dim() > 0 and t.shape[0] == 0:
            raise ValueError(
                f"items[{i}][{name!r}]: has 0 tokens (shape {_shape(t)}); leave a modality the "
                "sample lacks out of the item (or set it to None) instead"
            )
    shapes = {_shape(t) for _, t in rows}
    if len(shapes) == 1:
        return torch.stack([t for _, t in rows]), None
    if first.dim() == 0 or len({s[1:] for s in shapes}) > 1:
        raise ValueError(
            f"items[*][{name!r}]: rows must share every axis but the first (tokens k_m), got "
            f"shapes {sorted(shapes)}"
        )
    if not pad:
        raise ValueError(
            f"items[*][{name!r}]: token counts differ ({sorted({s[0] for s in shapes})}) and "
            "pad=False; pass pad=True to pad them to the longest with a padding mask"
        )
    lengths = torch.tensor([t.shape[0] for _, t in rows], device=first.device)
    padded = pad_sequence([t for _, t in rows], batch_first=True, padding_value=pad_value)
    mask = torch.arange(padded.shape[1], device=first.device)[None, :] >= lengths[:, None]
    return padded, mask


def _modalities_of(items: Sequence[Any]) -> tuple[list[Mapping[str, Optional[Tensor]]], Optional[list]]:
    """Split items into their modality mappings and the other tuple elements (None: bare maps)."""
    if isinstance(items[0], Mapping):
        bad = [i for i, item in enumerate(items) if not isinstance(item, Mapping)]
        if bad:
            raise TypeError(f"items[{bad[0]}]: expected a mapping modality -> tensor as items[0], "
                            f"got {type(items[bad[0]]).__name__}")
        return list(items), None
    width = len(items[0]) if isinstance(items[0], (tuple, list)) else 0
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != width or width == 0 \
                or not isinstance(item[0], Mapping):
            raise TypeError(
                f"items[{i}]: expected a mapping modality -> tensor, or a tuple (modalities, ...) "
                f"of {width or 'at least 1'} elements whose first is that mapping as items[0], "
                f"got {type(item).__name__}"
            )
    return [item[0] for item in items], [[item[j] for item in items] for j in range(1, width)]


def collate_modalities(
    items: Sequence[Item],
    *,
    modalities: Optional[Sequence[str]] = None,
    pad: bool = True,
    pad_value: float = 0.0,
) -> Union[ModalityBatch, tuple[Any, ...]]:
    """Collate modality-incomplete samples into a :class:`ModalityBatch` (a ``collate_fn``).

    Use it as ``DataLoader(dataset, collate_fn=collate_modalities)``, or bind the options with
    ``functools.partial``. Each item is a mapping ``{modality: tensor}`` of the modalities the
    sample has (absent key or ``None`` = missing), or a tuple whose first element is that
    mapping; the other elements are collated by ``torch.utils.data.default_collate`` and the
    result mirrors the item: ``(ModalityBatch, *collated)``.

    A modality's rows are stacked; when their first axis (the tokens, ``k_m``) differs and
    ``pad``, they are padded to the longest with ``pad_value`` and ``padding_masks[m]`` marks
    the padding. All other axes, the dtype and the number of axes must agree.

    Args:
        items: the samples of the batch (at least one; each with at least one modality).
        modalities: the modalities every batch reports in ``present`` (all-False where no row
            has it), so that batches have the same keys; an item with another modality is an
            error. Default: the modalities the items have.
        pad: pad differing token counts (``False``: they are an error).
        pad_value: the value written into padding (never read by the layers).

    Returns:
        A :class:`ModalityBatch`, or ``(ModalityBatch, *others)`` for tuple items.

    Raises:
        ValueError: no items; a sample without any modality; an unknown modality (with
            ``modalities``); rows of a modality that differ in dtype, rank or a non-token axis,
            or in token count with ``pad=False``; a tensor with 0 tokens. Each message names
            the item and the modality.
        TypeError: an item that is neither a mapping nor a tuple starting with one, tuples of
            different lengths, a value that is not a tensor.

    Example::

        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> data = [({"image": torch.randn(3, 8, 8)}, 0),                  # image only
        ...         ({"audio": torch.randn(5, 16)}, 1),                    # audio only, 5 tokens
        ...         ({"image": torch.randn(3, 8, 8), "audio": torch.randn(2, 16)}, 2)]  # both
        >>> batch, target = next(iter(DataLoader(data, batch_size=3, collate_fn=collate_modalities)))
        >>> batch.inputs["image"].shape, batch.present["image"].tolist()
        (torch.Size([2, 3, 8, 8]), [True, False, True])
        >>> batch.inputs["audio"].shape, batch.padding_masks["audio"].sum(dim=1).tolist()
        (torch.Size([2, 5, 16]), [0, 3])
        >>> batch.padding_masks["image"] is None, target.tolist()
        (True, [0, 1, 2])
    """
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or len(items) == 0:
        raise ValueError(f"items: expected a non-empty sequence of samples, got {items!r:.80}")
    maps, others = _modalities_of(items)
    known = None if modalities is None else sorted(set(modalities))
    rows: dict[str, list[tuple[int, Tensor]]] = {}
    for i, sample in enumerate(maps):
        have = [m for m in sorted(sample) if sample[m] is not None]
        if not have:
            raise ValueError(f"items[{i}]: has no modality (every key absent or None); a sample "
                             "needs at least one")
        for m in have:
            if not isinstance(m, str):
                raise TypeError(f"items[{i}]: modality names must be str, got {m!r}")
            if known is not None and m not in known:
                raise ValueError(f"items[{i}]: unknown modality {m!r}; expected one of {known}")
            value = sample[m]
            if not isinstance(value, Tensor):
                raise TypeError(f"items[{i}][{m!r}]: expected a torch.Tensor, got {type(value).__name__}")
            rows.setdefault(m, []).append((i, value))
    inputs, masks, present = {}, {}, {}
    for m in sorted(set(rows) | set(known or ())):
        present[m] = torch.zeros(len(maps), dtype=torch.bool)
        if m in rows:
            present[m][[i for i, _ in rows[m]]] = True
            inputs[m], masks[m] = _stack(m, rows[m], pad, pad_value)
    batch = ModalityBatch(inputs, masks, present)
    if others is None:
        return batch
    return (batch, *(default_collate(column) for column in others))
