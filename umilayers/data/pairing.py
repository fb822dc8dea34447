"""Same-label cross-modal pairing: training rows that hold modalities never seen together.

In the unseen-modality setting no training sample has every modality, so the fusion layers of
an early-fusion model (the common-space sum of :class:`~umilayers.model.UnseenModalityModel`,
the vanilla transformer) never see two modalities meet until test time.
:func:`pair_same_label` builds such rows from a classification batch: a row ``i`` is joined
with a row ``j`` of the **same class** whose modalities are disjoint from ``i``'s, taking each
modality from whichever of the two has it. If the modalities are conditionally independent
given the class, a joined row is distributed like a real sample with both; real data only
approximate that (two halves of two different shirts are not the two halves of one shirt).

This is not part of the paper; it is an option of the training recipe
(``TrainConfig.pair_same_label``, ``--pair-same-label``), off by default, classification only.

Shape letters: ``B`` batch, ``B_m`` rows having modality m, ``k_m``, ``d_m`` its tokens and
feature size, ``C`` classes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from umilayers.data.dataset import Batch
from umilayers.pseudo_labels import closest_to_truth

__all__ = ["pair_same_label"]


def _partners(targets: Tensor, present: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """For each row a random row of the same label with disjoint modalities, or -1 (none).

    ``present`` is ``(B, M)`` bool; ``targets`` ``(B,)``.
    """
    same = targets[:, None] == targets[None, :]
    overlap = (present.float() @ present.float().T) > 0  # shares a modality (also i with itself)
    allowed = same & ~overlap
    scores = torch.rand(allowed.shape, generator=generator, device=targets.device)
    scores = scores.masked_fill(~allowed, -1.0)
    best, index = scores.max(dim=1)
    return torch.where(best >= 0, index, torch.full_like(index, -1))


def pair_same_label(
    batch: Batch,
    fraction: float,
    pseudo_targets: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[Batch, Optional[Tensor]]:
    """Replace a ``fraction`` of a classification batch's rows by same-label joined rows.

    Each row ``i`` that has a partner (a row ``j`` with the same label and no modality in
    common) is, with probability ``fraction``, replaced by the row holding ``i``'s modalities
    and ``j``'s; ``j`` itself stays as it is. The joined row keeps ``i``'s index, split and
    label. Its pseudo-label is whichever of ``pseudo_targets[i]`` and ``pseudo_targets[j]`` is
    closer (cosine) to the one-hot label: the paper's rule for a sample with several
    modalities. Rows without a partner are kept.

    Args:
        batch: a collated classification batch (``targets`` ``(B,)`` int64).
        fraction: probability in ``[0, 1]`` that a row with a partner is replaced.
        pseudo_targets: ``(B, C)`` pseudo-labels of the batch's rows, or None.
        generator: random generator (default: torch's global one).

    Returns:
        The new batch (same ``B``) and its pseudo-labels (None when none were given).

    Shape:
        - pseudo_targets: ``(B, C)``

    Example::

        >>> import torch
        >>> from umilayers.data import collate
        >>> items = [{"index": i, "split_id": i % 2, "inputs": {("rgb", "audio")[i % 2]: torch.full((3, 2), float(i))},
        ...           "lengths": {}, "target": torch.tensor(i // 2)} for i in range(4)]
        >>> paired, _ = pair_same_label(collate(items), fraction=1.0)
        >>> paired.present["rgb"].tolist(), paired.present["audio"].tolist()
        ([True, True, True, True], [True, True, True, True])
        >>> paired.inputs["audio"][:, 0, 0].tolist(), paired.targets.tolist()
        ([1.0, 1.0, 3.0, 3.0], [0, 0, 1, 1])
    """
    if batch.targets.dim() != 1 or batch.targets.is_floating_point():
        raise ValueError(f"pair_same_label: classification batches only (targets (B,) int), "
                         f"got targets of shape {tuple(batch.targets.shape)} {batch.targets.dtype}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: expected a probability in [0, 1], got {fraction}")
    names = sorted(batch.present)
    device = batch.targets.device
    present = torch.stack([batch.present[m] for m in names], dim=1)  # (B, M)
    partner = _partners(batch.targets, present, generator)
    draw = torch.rand(partner.shape, generator=generator, device=device) < fraction
    partner = torch.where(draw, partner, torch.full_like(partner, -1))
    joined = partner >= 0
    if not bool(joined.any()):
        return batch, pseudo_targets
    inputs, masks, new_present = {}, {}, {}
    for col, m in enumerate(names):
        have = present[:, col]
        # Row r of the new batch takes modality m from itself, or else from its partner.
        source = torch.where(have, torch.arange(len(have), device=device), partner)
        take = have | (joined & have[partner.clamp_min(0)])
        source = source[take]
        rank = torch.cumsum(have.long(), 0) - 1  # position of each row in the old sub-batch
        inputs[m] = batch.inputs[m][rank[source]]
        old_mask = batch.padding_masks.get(m)
        masks[m] = None if old_mask is None else old_mask[rank[source]]
        new_present[m] = take
    pseudo = pseudo_targets
    if pseudo_targets is not None:  # the row's own pseudo-label, or its partner's if closer
        candidates = torch.stack([pseudo_targets, pseudo_targets[partner.clamp_min(0)]])
        pseudo = closest_to_truth(candidates, torch.stack([torch.ones_like(joined), joined]), batch.targets)
    return dataclasses.replace(batch, inputs=inputs, padding_masks=masks, present=new_present), pseudo
