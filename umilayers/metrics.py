"""Evaluation metrics of the paper: top-1 accuracy, mean absolute error, retrieval ranks.

All scores are plain Python floats. Accuracies and recalls are **fractions in [0, 1]** (not
percent); ranks are **1-based** (rank 1 = the ground truth is the best-scored item).

Ties in retrieval are broken **pessimistically** by default: the rank of the ground-truth item is
the number of candidates whose similarity is greater than *or equal to* its own (itself
included), i.e. ``rank = 1 + #{strictly better} + #{other items tied with it}``. A model that
gives every item the same score therefore gets the worst rank, never a perfect one, and the
result does not depend on the order of the candidates. ``ties="average"`` is Collaborative
Experts' rule instead (``model/metric.py``: the mean position over the tied items,
``1 + #{strictly better} + #{others tied} / 2``).

Several captions per video (MSR-VTT: about 20) are scored as CE scores them: every caption is a
text-to-video query (``text_to_video`` names its video, :func:`caption_owners` builds it from
per-video caption counts), and video-to-text takes, for each video, the best rank among its
own captions.

Example::

    >>> import torch
    >>> top1(torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]]), torch.tensor([0, 1, 1]))
    0.6666666666666666
    >>> mae(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0]))
    1.5
    >>> m = retrieval_metrics(torch.eye(3))
    >>> m["t2v"]["r1"], m["t2v"]["median_rank"], m["mean_rank"]
    (1.0, 1.0, 1.0)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from umilayers._validation import check_labels

__all__ = ["TIES", "top1", "mae", "caption_owners", "retrieval_ranks", "retrieval_metrics", "rank_summary"]

TIES = ("pessimistic", "average")
"""Tie rules of the retrieval ranks: worst position among the tied items, or their mean (CE)."""

ArrayLike = Union[Tensor, np.ndarray, Sequence[Any]]


def _as_tensor(name: str, x: ArrayLike) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected a tensor or array, got {type(x).__name__}") from err


def top1(scores: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of rows whose highest score is the label (ties: the lowest class index wins).

    Args:
        scores: logits or probabilities.
        labels: integer class labels in ``[0, C)``.

    Shape:
        - scores: ``(N, C)``
        - labels: ``(N,)``
    """
    scores = _as_tensor("scores", scores)
    labels = _as_tensor("labels", labels)
    if scores.dim() != 2 or labels.dim() != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"top1: expected scores (N, C) and labels (N,), got scores {tuple(scores.shape)} "
            f"and labels {tuple(labels.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("top1: expected at least one row, got N=0")
    check_labels("labels", labels, scores.shape[0], scores.shape[1], "class labels")
    return float((scores.argmax(dim=1) == labels.long()).double().mean())


def mae(prediction: ArrayLike, target: ArrayLike) -> float:
    """Mean absolute error over every element.

    Shape:
        - prediction: any shape ``(N, ...)``
        - target: the same shape
    """
    prediction = _as_tensor("prediction", prediction)
    target = _as_tensor("target", target)
    if prediction.shape != target.shape:
        raise ValueError(
            f"mae: prediction and target must have the same shape, got {tuple(prediction.shape)} "
            f"and {tuple(target.shape)}"
        )
    if prediction.numel() == 0:
        raise ValueError("mae: expected at least one element, got an empty tensor")
    return float((prediction.double() - target.double()).abs().mean())


def caption_owners(counts: ArrayLike) -> Tensor:
    """The video of each caption when video ``i`` has ``counts[i]`` captions listed in video
    order: ``text_to_video`` for :func:`retrieval_metrics`.

    Shape:
        - counts: ``(N_video,)``
        - output: ``(counts.sum(),)`` int64

    Example::

        >>> caption_owners([2, 1, 3]).tolist()
        [0, 0, 1, 2, 2, 2]
    """
    counts = _as_tensor("counts", counts).long()
    if counts.dim() != 1 or bool((counts < 1).any()):
        raise ValueError(f"counts: expected (N_video,) positive caption counts, got {counts.tolist()}")
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def _tied_rank(at_least: Tensor, strictly: Tensor, ties: str) -> Tensor:
    """1-based rank from ``#{>= own score}`` (itself included) and ``#{> own score}``."""
    if ties == "pessimistic":
        return at_least.double()
    return (strictly + 1).double() + (at_least - strictly - 1).double() / 2


def retrieval_ranks(
    sim: ArrayLike, text_to_video: Optional[ArrayLike] = None, *, ties: str = "pessimistic"
) -> dict[str, Tensor]:
    """1-based ranks of the ground truth for text-to-video and video-to-text retrieval.

    Args:
        sim: ``sim[i, j]`` = similarity of text ``i`` to video ``j``.
        text_to_video: the ground-truth video of each text; default ``arange(N_text)`` (the
            diagonal, one caption per video, ``N_text == N_video``). With several captions per
            video, video-to-text uses the best-ranked of the video's captions.
        ties: ``"pessimistic"`` (int64 ranks) or ``"average"`` (CE's rule; float64 ranks, may
            be fractional).

    Returns:
        ``{"t2v": (N_text,), "v2t": (N_video,)}``.

    Shape:
        - sim: ``(N_text, N_video)``
        - text_to_video: ``(N_text,)``
    """
    if ties not in TIES:
        raise ValueError(f"ties: expected one of {list(TIES)}, got {ties!r}")
    sim = _as_tensor("sim", sim).double()
    if sim.dim() != 2 or sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"retrieval: expected a non-empty (N_text, N_video) matrix, got {tuple(sim.shape)}")
    if not bool(torch.isfinite(sim).all()):
        raise ValueError("retrieval: sim holds NaN/inf entries")
    num_text, num_video = sim.shape
    if text_to_video is None:
        if num_text != num_video:
            raise ValueError(
                f"retrieval: without text_to_video sim must be square, got {tuple(sim.shape)}"
            )
        gt = torch.arange(num_text)
    else:
        gt = _as_tensor("text_to_video", text_to_video).long()
        if gt.shape != (num_text,):
            raise ValueError(f"text_to_video: expected shape ({num_text},), got {tuple(gt.shape)}")
        if gt.min() < 0 or gt.max() >= num_video:
            raise ValueError(f"text_to_video: entries must be in [0, {num_video})")
        missing = torch.ones(num_video, dtype=torch.bool)
        missing[gt] = False
        if bool(missing.any()):
            raise ValueError(
                f"text_to_video: every video needs a caption; {int(missing.sum())} have none"
            )
    positive = sim[torch.arange(num_text), gt]  # (N_text,)
    t2v = _tied_rank((sim >= positive[:, None]).sum(dim=1), (sim > positive[:, None]).sum(dim=1), ties)
    # Rank of text i among all texts for its own video gt[i]: #{i' : sim[i', gt[i]] >= sim[i, gt[i]]}.
    column = sim.t()[gt]  # (N_text, N_text): row i = every text's score for video gt[i]
    own = _tied_rank((column >= positive[:, None]).sum(dim=1), (column > positive[:, None]).sum(dim=1), ties)
    v2t = torch.full((num_video,), float(num_text), dtype=torch.float64)
    v2t = v2t.scatter_reduce(0, gt, own, reduce="amin")
    if ties == "pessimistic":
        return {"t2v": t2v.long(), "v2t": v2t.long()}
    return {"t2v": t2v, "v2t": v2t}


def rank_summary(ranks: ArrayLike) -> dict[str, float]:
    """``r1``, ``r5``, ``r10`` (fractions), ``median_rank`` and ``mean_rank`` of 1-based ranks."""
    ranks = _as_tensor("ranks", ranks).double()
    return {
        "r1": float((ranks <= 1).double().mean()),
        "r5": float((ranks <= 5).double().mean()),
        "r10": float((ranks <= 10).double().mean()),
        "median_rank": float(np.median(ranks.numpy())),
        "mean_rank": float(ranks.mean()),
    }


def retrieval_metrics(
    sim: ArrayLike, text_to_video: Optional[ArrayLike] = None, *, ties: str = "pessimistic"
) -> dict[str, Any]:
    """Text-to-video and video-to-text recall and ranks, and the paper's MnR.

    Returns ``{"t2v": summary, "v2t": summary, "mean_rank": (t2v + v2t mean rank) / 2}`` where
    each summary is :func:`rank_summary` of :func:`retrieval_ranks` (see there for ``sim``,
    ``text_to_video`` and ``ties``). The median of an even count is the mean of the middle two.
    With ``text_to_video = caption_owners(counts)`` and ``ties="average"`` this is CE's
    evaluation over every caption (its ``t2v_metrics`` / ``v2t_metrics``).

    Shape:
        - sim: ``(N_text, N_video)``

    Example::

        >>> sim = torch.tensor([[0.9, 0.1], [0.2, 0.3], [0.5, 0.3]])  # captions 0, 1 -> video 0
        >>> m = retrieval_metrics(sim, caption_owners([2, 1]), ties="average")
        >>> m["t2v"]["mean_rank"], m["v2t"]["mean_rank"]  # t2v ranks 1, 2, 2; v2t 1, 1.5 (a tie)
        (1.6666666666666667, 1.25)
    """
    ranks = retrieval_ranks(sim, text_to_video, ties=ties)
    t2v, v2t = rank_summary(ranks["t2v"]), rank_summary(ranks["v2t"])
    return {"t2v": t2v, "v2t": v2t, "mean_rank": (t2v["mean_rank"] + v2t["mean_rank"]) / 2}
