"""Losses of the method: the feature alignment loss (Eq. 1) and the per-task losses of Eq. 3.

The training objective of the paper is ``L = lambda * L_align + L_supervised + alpha * L_pseudo``
(Eq. 3). This module gives each term as a pure function plus a thin ``nn.Module``:

- :func:`alignment_loss` / :class:`AlignmentLoss`: squared Euclidean distance between each
  sample's mean projected feature and a learnable token (the class's token, or the nearest one).
- :func:`classification_loss` (cross-entropy) and :func:`classification_pseudo_loss`
  (``KL(pseudo || softmax(logits))``: the batch mean, or the mean over every element as the
  authors' released code computes it, :data:`PSEUDO_REDUCTIONS`);
- :func:`regression_loss` and :func:`regression_pseudo_loss` (mean squared error, "L2");
- :func:`triplet_loss`: max-margin ranking over a ``(B, B)`` similarity matrix, both directions,
  positives on the diagonal (as Collaborative Experts' ``MaxMarginRankingLoss`` with
  ``fix_norm=True``);
- :func:`similarity_distillation_loss`: KL between a teacher's and a student's row-wise softmax
  over ``(B, B)`` video-to-caption similarities (the retrieval pseudo-label loss of the recipe,
  which does not need the two embedding spaces to be the same);
- :class:`TaskLoss` dispatches supervised and pseudo losses per task for the model.

Every function checks its inputs at the boundary (types, shapes) and raises a
``ValueError``/``TypeError`` naming the argument; with ``check_values=True`` it also checks what
needs the values (label ranges, NaN/inf, negative probabilities), which reads them back to the
host (a pipeline stall on a GPU, so off by default: the training recipe checks its data once,
in the FeatureStore). The models check their batch once, in their own ``loss``, and then call
the unchecked paths (:meth:`TaskLoss.supervised_checked`, :meth:`TaskLoss.pseudo_checked`,
:meth:`AlignmentLoss.forward_checked`). An empty batch (``B = 0``) gives a zero that is still connected to the
inputs' graph, so ``backward()`` works and adds zero gradients.

Shape letters: ``B`` batch, ``K`` tokens, ``D`` width, ``C`` classes or outputs, ``E`` embedding
size.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umilayers._validation import (
    check_choice,
    check_finite,
    check_labels,
    check_number,
    check_positive_int,
    check_tensor,
)

__all__ = [
    "ASSIGNMENTS",
    "ALIGN_REDUCTIONS",
    "PSEUDO_REDUCTIONS",
    "TASKS",
    "alignment_loss",
    "assign_tokens",
    "AlignmentLoss",
    "classification_loss",
    "classification_pseudo_loss",
    "regression_loss",
    "regression_pseudo_loss",
    "triplet_loss",
    "cosine_similarity_matrix",
    "similarity_distillation_loss",
    "distillation_checked",
    "TaskLoss",
]

#: Token assignments of :class:`AlignmentLoss`.
ASSIGNMENTS = ("label", "nearest")
#: Reductions of :func:`alignment_loss` over a batch: the mean of the squared distances (Eq. 1),
#: their sum, or their mean over the rows and the ``D`` features (the authors' released code).
ALIGN_REDUCTIONS = ("mean", "sum", "elementwise_mean")
#: Reductions of :func:`classification_pseudo_loss`: the mean over the batch of each sample's KL,
#: or the mean over every element of ``(B, C)`` (the authors' released code:
#: ``KLDivLoss(reduce=False)`` then a mean, the scale its ``alpha = 3000`` was set for on
#: EPIC-Kitchens).
PSEUDO_REDUCTIONS = ("batchmean", "elementwise_mean")
#: Tasks served by :class:`TaskLoss`.
TASKS = ("classification", "regression", "retrieval")


def _acc(t: Tensor) -> Tensor:
    """``t`` in its accumulation dtype: float16/bfloat16 go to float32, float64 stays."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _zero_like_graph(*tensors: Tensor) -> Tensor:
    """A zero connected to every tensor's graph (for empty batches)."""
    return sum(_acc(t.sum() * 0.0) for t in tensors)  # type: ignore[return-value]


def _check_finite(check_values: bool, **tensors: Tensor) -> None:
    if check_values:
        for name, t in tensors.items():
            check_finite(name, t)


def _check_features(features: Tensor, tokens: Tensor, check_values: bool) -> None:
    """Check ``features`` ``(B, K, D)`` or ``(B, D)`` against ``tokens`` ``(n_u, D)``."""
    check_tensor("tokens", tokens, ("n_u", "D"), floating=True)
    sizes = {"D": int(tokens.shape[1])}
    check_tensor("features", features, None, floating=True)
    if features.dim() == 3:
        check_tensor("features", features, ("B", "K", "D"), sizes)
    else:
        check_tensor("features", features, ("B", "D"), sizes)
    _check_finite(check_values, features=features, tokens=tokens)


def _mean_feature(features: Tensor) -> Tensor:
    """The per-sample mean ``(B, D)`` of ``(B, K, D)`` features (a ``(B, D)`` input is that), see _acc."""
    return _acc(features).mean(1) if features.dim() == 3 else _acc(features)


def assign_tokens(features: Tensor, tokens: Tensor, *, check_values: bool = False) -> Tensor:
    """Index of the nearest token (squared Euclidean distance) for each sample's mean feature.

    Args:
        features: ``(B, K, D)`` projected features, or ``(B, D)`` means.
        tokens: ``(n_u, D)`` alignment tokens.
        check_values: also refuse NaN/inf (reads the values back to the host).

    Returns:
        ``(B,)`` int64 indices into ``tokens``; ties go to the lowest index.

    Shape:
        - features: ``(B, K, D)`` or ``(B, D)``
        - tokens: ``(n_u, D)``
        - output: ``(B,)``
    """
    _check_features(features, tokens, check_values)
    with torch.no_grad():
        return _nearest(_mean_feature(features), _acc(tokens))


def _nearest(mean: Tensor, tokens: Tensor) -> Tensor:
    # ||x - u||^2 = ||x||^2 - 2 x.u + ||u||^2; ||x||^2 is constant per row, so drop it.
    scores = tokens.pow(2).sum(-1)[None, :] - 2.0 * mean @ tokens.t()
    return scores.argmin(dim=1)


def alignment_loss(
    features: Tensor,
    tokens: Tensor,
    labels: Optional[Tensor] = None,
    assign: str = "label",
    *,
    reduction: str = "mean",
    check_values: bool = False,
) -> Tensor:
    """Feature alignment loss (Eq. 1): squared distance of each mean feature to its token.

    For each sample the projected features are averaged over the ``K`` tokens (a ``(B, D)``
    input is taken to be that mean already); the loss is the squared Euclidean distance between
    this mean and the sample's token, averaged over the batch (``reduction="mean"``, Eq. 1),
    summed (``"sum"``), or averaged over the batch and the ``D`` features
    (``"elementwise_mean"``: the squared distance divided by ``D``, the authors' released code's
    ``mean((u - x) ** 2, dim=-1)``). The token is ``tokens[labels]``
    for ``assign="label"`` (classification, one token per class) or the nearest token for
    ``assign="nearest"`` (the choice is not differentiated; the distance to the chosen token is).
    Computed in float32 for float16/bfloat16/float32 inputs (float64 stays float64).

    Args:
        features: ``(B, K, D)`` projected features of one modality, or ``(B, D)`` means.
        tokens: ``(n_u, D)`` alignment tokens.
        labels: ``(B,)`` integer class labels in ``[0, n_u)``; required for ``"label"``.
        assign: ``"label"`` or ``"nearest"``.
        reduction: ``"mean"``, ``"sum"`` or ``"elementwise_mean"`` (:data:`ALIGN_REDUCTIONS`).
        check_values: also refuse NaN/inf and labels out of range (reads values back to the host).

    Returns:
        A scalar. For ``B = 0`` a zero connected to the graph of both inputs.

    Raises:
        ValueError: wrong shapes (naming the argument), ``assign="label"`` without labels; with
            ``check_values``, NaN/inf in ``features`` or ``tokens`` and labels out of ``[0, n_u)``.

    Shape:
        - features: ``(B, K, D)`` or ``(B, D)``
        - tokens: ``(n_u, D)``
        - labels: ``(B,)``
        - output: ``()``
    """
    check_choice("assign", assign, ASSIGNMENTS)
    check_choice("reduction", reduction, ALIGN_REDUCTIONS)
    _check_features(features, tokens, check_values)
    if assign == "label":
        if labels is None:
            raise ValueError('labels: required when assign="label", got None')
        check_labels("labels", labels, int(features.shape[0]), int(tokens.shape[0]), "one token per class",
                     check_values=check_values)
    return _alignment(features, tokens, labels if assign == "label" else None, reduction)


def _alignment(features: Tensor, tokens: Tensor, labels: Optional[Tensor], reduction: str) -> Tensor:
    """:func:`alignment_loss` of checked arguments (``labels`` None: the nearest token)."""
    mean = _mean_feature(features)
    if labels is not None:
        index = labels.to(device=tokens.device, dtype=torch.long)
    else:
        with torch.no_grad():
            index = _nearest(mean.detach(), _acc(tokens.detach()).to(mean.dtype))
    if mean.shape[0] == 0:
        return _zero_like_graph(features, tokens)
    target = _acc(tokens).to(mean.dtype)[index]
    distances = (mean - target).pow(2).sum(-1)  # (B,) squared Euclidean distances
    if reduction == "sum":
        return distances.sum()
    if reduction == "elementwise_mean":
        return distances.mean() / mean.shape[-1]
    return distances.mean()


class AlignmentLoss(nn.Module):
    """Learnable alignment tokens and the feature alignment loss of Eq. 1.

    Holds ``num_tokens`` tokens ``u`` of width ``dim``, initialised from ``N(0, 0.02^2)`` (the
    small-normal init timm uses for learned tokens: tokens start near the origin, close to the
    mean of freshly projected features, so the loss starts small and does not dominate Eq. 3).
    The model calls it once per modality present and sums the results.

    Args:
        num_tokens: ``n_u``; one per class for ``assign="label"`` (3,806 for EPIC-Kitchens),
            a free number for ``"nearest"`` (128 in the paper's robot and MSR-VTT settings).
        dim: ``D``, the width of the projected features.
        assign: ``"label"`` (the class's token) or ``"nearest"`` (nearest token).
        device: factory keyword for the tokens.
        dtype: factory keyword for the tokens.

    Shape:
        - features: ``(B, K, D)`` or ``(B, D)`` (already averaged over ``K``)
        - labels: ``(B,)`` integer, only for ``assign="label"``
        - output: ``()`` (float32; float64 for float64 inputs)

    Example::

        >>> import torch
        >>> loss_fn = AlignmentLoss(num_tokens=10, dim=8)
        >>> features = torch.randn(4, 16, 8, requires_grad=True)
        >>> loss = loss_fn(features, labels=torch.tensor([0, 3, 3, 9]))
        >>> loss.shape, bool(loss > 0)
        (torch.Size([]), True)
        >>> loss.backward()
        >>> loss_fn.tokens.grad.shape
        torch.Size([10, 8])
        >>> nearest = AlignmentLoss(num_tokens=5, dim=8, assign="nearest")
        >>> nearest.assign(features).shape
        torch.Size([4])
    """

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        assign: str = "label",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_tokens", num_tokens)
        check_positive_int("dim", dim)
        check_choice("assign", assign, ASSIGNMENTS)
        self.num_tokens = num_tokens
        self.dim = dim
        self.assignment = assign
        self.tokens = nn.Parameter(torch.empty(num_tokens, dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the tokens from ``N(0, 0.02^2)``."""
        nn.init.normal_(self.tokens, std=0.02)

    def assign(self, features: Tensor) -> Tensor:
        """Index of each sample's nearest token (squared Euclidean distance), ``(B,)`` int64."""
        return assign_tokens(features, self.tokens)

    def forward(self, features: Tensor, labels: Optional[Tensor] = None, *, reduction: str = "mean",
                check_values: bool = False) -> Tensor:
        """Alignment loss of ``features`` to the tokens (see :func:`alignment_loss`).

        Shape:
            - features: ``(B, K, D)`` or ``(B, D)``
            - labels: ``(B,)``
            - output: ``()``
        """
        return alignment_loss(features, self.tokens, labels, assign=self.assignment, reduction=reduction,
                              check_values=check_values)

    def forward_checked(self, features: Tensor, labels: Optional[Tensor], reduction: str) -> Tensor:
        """:meth:`forward` without any check, for callers that checked the arguments already
        (``labels``: ``(B,)`` in ``[0, n_u)`` for ``assign="label"``)."""
        return _alignment(features, self.tokens, labels if self.assignment == "label" else None, reduction)

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}, dim={self.dim}, assign={self.assignment!r}"


# ----------------------------------------------------------------------------- task losses


def _check_logits(name: str, logits: Tensor, sizes: dict, check_values: bool) -> None:
    check_tensor(name, logits, ("B", "C"), sizes, floating=True)
    _check_finite(check_values, **{name: logits})


def classification_loss(logits: Tensor, labels: Tensor, *, label_smoothing: float = 0.0,
                        check_values: bool = False) -> Tensor:
    """Cross-entropy of ``logits`` against integer ``labels`` (mean over the batch).

    ``label_smoothing`` ``eps``: the true class keeps ``1 - eps`` and the other ``C - 1`` classes
    share ``eps`` (the authors' released ``LabelSmoothLoss``, ``eps = 0.1`` on EPIC-Kitchens);
    that is torch's ``label_smoothing=eps * C / (C - 1)``, which spreads over all ``C`` classes.
    ``check_values=True`` also refuses NaN/inf logits and labels outside ``[0, C)``.

    Shape:
        - logits: ``(B, C)``
        - labels: ``(B,)`` integer in ``[0, C)``
        - output: ``()``
    """
    sizes: dict = {}
    _check_logits("logits", logits, sizes, check_values)
    check_labels("labels", labels, sizes["B"], sizes["C"], "class indices", check_values=check_values)
    return _cross_entropy(logits, labels, label_smoothing)


def _cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    if logits.shape[0] == 0:
        return _zero_like_graph(logits)
    classes = logits.shape[-1]
    smoothing = label_smoothing * classes / max(classes - 1, 1)
    return F.cross_entropy(_acc(logits), labels.to(logits.device, torch.long), label_smoothing=smoothing)


def classification_pseudo_loss(logits: Tensor, pseudo_probs: Tensor, *, reduction: str = "batchmean",
                               check_values: bool = False) -> Tensor:
    """``KL(pseudo || softmax(logits))``: each sample's KL averaged over the batch, or the mean
    over every element.

    The paper's pseudo-label loss for classification. ``reduction="batchmean"`` (the default
    here) is the KL divergence of each sample, summed over the ``C`` classes, averaged over the
    batch. ``"elementwise_mean"`` divides that by ``C`` as well: the mean over all ``B x C``
    terms ``p log(p / q)``, which is what the authors' released code computes
    (``KLDivLoss(reduce=False)``, a mean per modality times its row count, divided by the
    batch) and the scale its weight ``alpha = 3000`` was chosen for on EPIC-Kitchens (3,806
    classes): ``elementwise_mean`` with weight ``alpha`` is ``batchmean`` with ``alpha / C``.
    :class:`~umilayers.model.UnseenModalityModel` takes the choice as ``pseudo_reduction``.

    ``pseudo_probs`` are the averaged unimodal softmax outputs of
    :class:`umilayers.PseudoLabelBank`; they must be non-negative but need not sum exactly to 1
    (a float16 bank rounds them; see its error bound). Zero entries contribute zero
    (``0 log 0 = 0``). ``check_values=True`` refuses NaN/inf and negative entries.

    Shape:
        - logits: ``(B, C)``
        - pseudo_probs: ``(B, C)``
        - output: ``()``
    """
    check_choice("reduction", reduction, PSEUDO_REDUCTIONS)
    sizes: dict = {}
    _check_logits("logits", logits, sizes, check_values)
    check_tensor("pseudo_probs", pseudo_probs, ("B", "C"), sizes, floating=True)
    _check_finite(check_values, pseudo_probs=pseudo_probs)
    if check_values and pseudo_probs.numel() and float(pseudo_probs.min()) < 0:
        raise ValueError(
            f"pseudo_probs: expected probabilities >= 0, got min {float(pseudo_probs.min()):.4g}"
        )
    return _kl(logits, pseudo_probs, reduction)


def _kl(logits: Tensor, pseudo_probs: Tensor, reduction: str) -> Tensor:
    if logits.shape[0] == 0:
        return _zero_like_graph(logits, pseudo_probs)
    log_q = F.log_softmax(_acc(logits), dim=-1)
    kl = F.kl_div(log_q, pseudo_probs.to(logits.device, log_q.dtype), reduction="batchmean")
    return kl / logits.shape[1] if reduction == "elementwise_mean" else kl


def _mse(pred: Tensor, target_name: str, target: Tensor, check_values: bool) -> Tensor:
    sizes: dict = {}
    check_tensor("pred", pred, ("B", "C"), sizes, floating=True)
    check_tensor(target_name, target, ("B", "C"), sizes, floating=True)
    _check_finite(check_values, pred=pred, **{target_name: target})
    return _squared_error(pred, target)


def _squared_error(pred: Tensor, target: Tensor) -> Tensor:
    if pred.shape[0] == 0:
        return _zero_like_graph(pred, target)
    pred = _acc(pred)
    return F.mse_loss(pred, target.to(pred.device, pred.dtype))


def regression_loss(pred: Tensor, target: Tensor, *, check_values: bool = False) -> Tensor:
    """Mean squared error (the paper's "L2" loss), averaged over every element.

    ``check_values=True`` also refuses NaN/inf.

    Shape:
        - pred: ``(B, C)``
        - target: ``(B, C)``
        - output: ``()``
    """
    return _mse(pred, "target", target, check_values)


def regression_pseudo_loss(pred: Tensor, pseudo_target: Tensor, *, check_values: bool = False) -> Tensor:
    """Mean squared error against averaged unimodal predictions (same as :func:`regression_loss`).

    Shape:
        - pred: ``(B, C)``
        - pseudo_target: ``(B, C)``
        - output: ``()``
    """
    return _mse(pred, "pseudo_target", pseudo_target, check_values)


def triplet_loss(sim: Tensor, margin: float = 0.2, *, check_values: bool = False) -> Tensor:
    """Bidirectional max-margin ranking loss over a batch similarity matrix.

    ``sim[i, j]`` is the similarity of query ``i`` (say a caption) and item ``j`` (a video);
    matching pairs lie on the diagonal. Every off-diagonal entry is a negative in both
    directions::

        loss = mean over i != j of  relu(margin - sim[i, i] + sim[i, j])   (row: i -> videos)
                               and  relu(margin - sim[i, i] + sim[j, i])   (column: i -> texts)

    i.e. the mean of ``2 B (B - 1)`` hinge terms, as Collaborative Experts'
    ``MaxMarginRankingLoss(fix_norm=True)``. With ``B <= 1`` there is no negative and the loss
    is a zero connected to the graph. ``check_values=True`` also refuses NaN/inf.

    Shape:
        - sim: ``(B, B)``
        - output: ``()``
    """
    check_tensor("sim", sim, ("B", "B"), floating=True)
    _check_finite(check_values, sim=sim)
    check_number("margin", margin)
    return _triplet(sim, margin)


def _triplet(sim: Tensor, margin: float) -> Tensor:
    n = int(sim.shape[0])
    if n <= 1:
        return _zero_like_graph(sim)
    sim = _acc(sim)
    positive = sim.diagonal()
    # Flat indices of the off-diagonal entries in row-major order (k + k // n + 1 skips each
    # diagonal entry): an integer index needs no host read, where a boolean mask would.
    off = torch.arange(n * (n - 1), device=sim.device)
    off = off + off // n + 1
    rows = F.relu(margin - positive[:, None] + sim)  # query i against every item j
    cols = F.relu(margin - positive[None, :] + sim)  # item j against every query i
    return (rows.flatten()[off].sum() + cols.flatten()[off].sum()) / (2 * n * (n - 1))


def cosine_similarity_matrix(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """``(B, B)`` cosine similarities ``sim[i, j] = cos(a[i], b[j])``.

    Shape:
        - a: ``(B, E)``
        - b: ``(B, E)``
        - output: ``(B, B)`` (float32, or float64 for float64 inputs)
    """
    sizes: dict = {}
    check_tensor("a", a, ("B", "E"), sizes, floating=True)
    check_tensor("b", b, ("B", "E"), sizes, floating=True)
    return _cosine(a, b, eps)


def _cosine(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a = F.normalize(_acc(a), dim=-1, eps=eps)
    b = F.normalize(_acc(b), dim=-1, eps=eps).to(a.dtype)
    return a @ b.t()


def similarity_distillation_loss(
    pred: Tensor, text: Tensor, teacher_similarity: Tensor, temperature: float = 0.1, *, check_values: bool = False
) -> Tensor:
    """Relational distillation for retrieval: match a teacher's ranking of the batch's captions.

    For each video ``i`` the teacher gives ``teacher_similarity[i, j]``, its cosine similarity
    between video ``i`` and caption ``j`` measured in the teacher's own embedding space (for the
    recipe: a unimodal model's video embedding against that same unimodal model's caption
    embeddings). The student's similarity is ``cos(pred[i], text[j])`` in its own space. The loss
    is the batch mean of ``KL(softmax(teacher[i] / T) || softmax(student[i] / T))`` over the
    captions ``j``. Only similarities are compared, never embeddings, so the teacher and student
    spaces need not be the same (each unimodal model has its own text encoder).

    Args:
        pred: ``(B, E)`` video embeddings of the student branch.
        text: ``(B, E)`` the student's caption embeddings of the same batch.
        teacher_similarity: ``(B, B)`` teacher cosine similarities, video row ``i``, caption column ``j``.
        temperature: softmax temperature ``T > 0`` applied to both sides.
        check_values: also refuse NaN/inf (reads the values back to the host).

    Shape:
        - pred: ``(B, E)``
        - text: ``(B, E)``
        - teacher_similarity: ``(B, B)``
        - output: ``()``

    Example::

        >>> import torch
        >>> video, text = torch.randn(4, 8), torch.randn(4, 8)
        >>> teacher = cosine_similarity_matrix(video, text)
        >>> float(similarity_distillation_loss(video, text, teacher)) < 1e-6  # same ranking
        True
    """
    sizes: dict = {}
    check_tensor("pred", pred, ("B", "E"), sizes, floating=True)
    check_tensor("text", text, ("B", "E"), sizes, floating=True)
    check_tensor("teacher_similarity", teacher_similarity, ("B", "B"), sizes, floating=True)
    _check_finite(check_values, pred=pred, text=text, teacher_similarity=teacher_similarity)
    check_number("temperature", temperature, strict=True)
    return distillation_checked(pred, text, teacher_similarity, temperature)


def distillation_checked(pred: Tensor, text: Tensor, teacher_similarity: Tensor, temperature: float) -> Tensor:
    """:func:`similarity_distillation_loss` without any check, for callers that checked already."""
    if pred.shape[0] == 0:
        return _zero_like_graph(pred, text, teacher_similarity)
    student = _cosine(_acc(pred), _acc(text)) / temperature
    teacher = _acc(teacher_similarity).to(student.dtype) / temperature
    log_q = F.log_softmax(student, dim=-1)
    log_p = F.log_softmax(teacher, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


class TaskLoss(nn.Module):
    """Supervised and pseudo-label losses of Eq. 3 for one task.

    ============== =============================== ==========================================
    task           ``supervised(pred, target)``    ``pseudo(pred, pseudo_target)``
    ============== =============================== ==========================================
    classification CE(logits, labels), with        KL(pseudo_probs || softmax(logits)), mean
                   ``label_smoothing``
                                                   over every element or over the batch
                                                   (``pseudo_reduction``)
    regression     MSE(pred, target)               MSE(pred, pseudo_target)
    retrieval      triplet(cos(text, video))       triplet(cos(pseudo_target, pred))
    ============== =============================== ==========================================

    Retrieval: ``pred`` is the ``(B, E)`` video embedding of a branch and ``target`` the
    ``(B, E)`` text embedding of its caption; the similarity matrix is the cosine similarity
    ``sim[i, j] = cos(target[i], pred[j])`` (text i against video j) and the loss is
    :func:`triplet_loss`. The pseudo loss here is the paper's (Sec. 3.3): the same triplet
    between the pseudo branch's embeddings and the pseudo-label embeddings (the averaged,
    L2-normalised unimodal video embeddings of the bank): each sample's embedding must be closer
    to its own pseudo-label than to the other samples' pseudo-labels, by ``margin``.
    :class:`~umilayers.model.UnseenModalityModel` uses it with ``retrieval_pseudo="paper"``; its
    default, ``"relational"``, is :func:`similarity_distillation_loss` instead, which compares
    similarities only (each unimodal model's embeddings live in a space of its own).

    Args:
        task: ``"classification"``, ``"regression"`` or ``"retrieval"``.
        margin: the triplet margin (retrieval only).
        pseudo_reduction: reduction of the classification pseudo loss
            (:func:`classification_pseudo_loss`: ``"batchmean"`` or ``"elementwise_mean"``).
        label_smoothing: of the classification cross-entropy (:func:`classification_loss`).

    Shape:
        - pred: ``(B, C)`` logits / values, or ``(B, E)`` embeddings
        - target: ``(B,)`` integer labels (classification) or ``(B, C)`` / ``(B, E)``
        - pseudo_target: ``(B, C)`` or ``(B, E)``
        - output: ``()``

    Example::

        >>> import torch
        >>> loss = TaskLoss("classification")
        >>> logits = torch.randn(4, 5)
        >>> float(loss.supervised(logits, torch.tensor([0, 1, 2, 4]))) > 0
        True
        >>> probs = torch.softmax(logits, dim=-1)
        >>> abs(float(loss.pseudo(logits, probs))) < 1e-6  # KL of a distribution to itself
        True
        >>> TaskLoss("retrieval", margin=0.1).supervised(torch.randn(3, 8), torch.randn(3, 8)).shape
        torch.Size([])
    """

    def __init__(self, task: str, margin: float = 0.2, pseudo_reduction: str = "batchmean",
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        check_choice("task", task, TASKS)
        check_number("margin", margin)
        check_choice("pseudo_reduction", pseudo_reduction, PSEUDO_REDUCTIONS)
        check_number("label_smoothing", label_smoothing)
        self.task = task
        self.margin = float(margin)
        self.pseudo_reduction = pseudo_reduction
        self.label_smoothing = float(label_smoothing)

    def supervised(self, pred: Tensor, target: Tensor, *, check_values: bool = False) -> Tensor:
        """Loss of a branch's output against the ground truth (see the class table)."""
        if self.task == "classification":
            return classification_loss(pred, target, label_smoothing=self.label_smoothing,
                                       check_values=check_values)
        if self.task == "regression":
            return regression_loss(pred, target, check_values=check_values)
        self._check_embeddings("pred", pred, "target", target, check_values)
        return self.supervised_checked(pred, target)

    def pseudo(self, pred: Tensor, pseudo_target: Tensor, *, check_values: bool = False) -> Tensor:
        """Loss of the pseudo branch's output against pseudo-labels (see the class table)."""
        if self.task == "classification":
            return classification_pseudo_loss(pred, pseudo_target, reduction=self.pseudo_reduction,
                                              check_values=check_values)
        if self.task == "regression":
            return regression_pseudo_loss(pred, pseudo_target, check_values=check_values)
        self._check_embeddings("pred", pred, "pseudo_target", pseudo_target, check_values)
        return self.pseudo_checked(pred, pseudo_target)

    def supervised_checked(self, pred: Tensor, target: Tensor) -> Tensor:
        """:meth:`supervised` without any check, for callers that checked the arguments already."""
        if self.task == "classification":
            return _cross_entropy(pred, target, self.label_smoothing)
        if self.task == "regression":
            return _squared_error(pred, target)
        return _triplet(_cosine(target, pred), self.margin)

    def pseudo_checked(self, pred: Tensor, pseudo_target: Tensor) -> Tensor:
        """:meth:`pseudo` without any check, for callers that checked the arguments already."""
        if self.task == "classification":
            return _kl(pred, pseudo_target, self.pseudo_reduction)
        if self.task == "regression":
            return _squared_error(pred, pseudo_target)
        return _triplet(_cosine(pseudo_target, pred), self.margin)

    @staticmethod
    def _check_embeddings(pred_name: str, pred: Tensor, target_name: str, target: Tensor, check_values: bool) -> None:
        sizes: dict = {}
        check_tensor(pred_name, pred, ("B", "E"), sizes, floating=True)
        check_tensor(target_name, target, ("B", "E"), sizes, floating=True)
        _check_finite(check_values, **{pred_name: pred, target_name: target})

    def forward(self, pred: Tensor, target: Tensor, *, check_values: bool = False) -> Tensor:
        """Same as :meth:`supervised`.

        Shape:
            - pred: ``(B, C)`` or ``(B, E)``
            - target: ``(B,)``, ``(B, C)`` or ``(B, E)``
            - output: ``()``
        """
        return self.supervised(pred, target, check_values=check_values)

    def extra_repr(self) -> str:
        extra = {
            "retrieval": f", margin={self.margin}",
            "classification": f", pseudo_reduction={self.pseudo_reduction!r}",
        }
        return f"task={self.task!r}" + extra.get(self.task, "")
