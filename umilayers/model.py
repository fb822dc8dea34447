"""UnseenModalityModel: the five layers composed into the paper's dual-branch model (Sec. 4).

Shape letters: ``B`` batch, ``B_m`` rows that have modality m, ``k_m`` its tokens, ``d_m`` its
feature size, ``K`` = k* slots, ``D`` = d* width, ``G`` branches, ``C`` outputs (classes,
regression targets or the joint embedding size ``E``), ``t`` caption tokens.

Batch layout (``docs/contracts.md``): ``inputs[m]`` holds only the rows that have modality m, in
batch order, and ``present[m]`` ``(B,)`` says which rows those are. A modality's projection runs
on those ``B_m`` rows only (the authors' code runs every projection on every sample, feeding
noise for a missing modality and multiplying the result by zero).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from umilayers._validation import (
    check_bool_mask,
    check_choice,
    check_finite,
    check_positive_int,
    check_tensor,
)
from umilayers.attention import GroupMaskedTransformer
from umilayers.fusion import CommonSpaceSum
from umilayers.losses import AlignmentLoss, TaskLoss, similarity_distillation_loss
from umilayers.projection import FeatureProjection, PooledProjection

__all__ = [
    "TASKS",
    "PROJECTIONS",
    "UMIOutput",
    "LossOutput",
    "UMIConfig",
    "TextEncoder",
    "UnseenModalityModel",
    "check_batch",
    "masked_mean",
]

TASKS = ("classification", "regression", "retrieval")
PROJECTIONS = ("feature", "pooled")


@dataclass
class UMIOutput:
    """What every model of the package returns from ``forward``.

    Attributes:
        prediction: ``(B, C)``: class probabilities (softmax averaged over branches) for
            classification; the branch mean for regression; for retrieval the L2-normalised
            branch mean ``(B, E)``.
        branch_outputs: ``(B, G, C)`` logits / values / L2-normalised embeddings per branch
            (``G = 1`` for the baselines).
        modality_features: modality -> ``(B_m, K, D)`` projected features (the alignment loss
            reads them); empty for models without a common space.
        present: modality -> ``(B,)`` bool, the rows that had the modality.
        modality_outputs: modality -> ``(B_m, C)`` per-modality predictions on the rows having
            it (late fusion and unimodal models; empty for the others).

    Example::

        >>> import torch
        >>> out = UMIOutput(prediction=torch.zeros(2, 3), branch_outputs=torch.zeros(2, 1, 3))
        >>> out.branch_outputs.shape[1], out.modality_features
        (1, {})
    """

    prediction: Tensor
    branch_outputs: Tensor
    modality_features: dict[str, Tensor] = field(default_factory=dict)
    present: dict[str, Tensor] = field(default_factory=dict)
    modality_outputs: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class LossOutput:
    """Eq. 3 of the paper, total and terms: ``total = lambda * align + supervised + alpha * pseudo``.

    Every field is a scalar tensor holding the raw (unweighted) term; a disabled term is an
    exact 0.

    Example::

        >>> import torch
        >>> t = torch.tensor
        >>> LossOutput(total=t(2.5), align=t(0.0), supervised=t(2.0), pseudo=t(0.5)).total
        tensor(2.5000)
    """

    total: Tensor
    align: Tensor
    supervised: Tensor
    pseudo: Tensor


# --------------------------------------------------------------------------------------------
# Boundary checks shared with the baselines


def _rows(mask: Tensor, limit: int = 10) -> str:
    rows = mask.nonzero().flatten().tolist()
    return "[" + ", ".join(map(str, rows[:limit])) + (", ..." if len(rows) > limit else "") + "]"


def check_batch(
    inputs: Any,
    padding_masks: Any,
    present: Any,
    modality_dims: Mapping[str, int],
) -> tuple[int, dict[str, Tensor]]:
    """Validate a batch in the sub-batch layout; return ``B`` and the present masks.

    Checks, before any work: ``inputs`` is a non-empty mapping of known modalities; each
    ``inputs[m]`` is ``(B_m, k_m, d_m)`` floating point with the model's ``d_m``; each padding
    mask is ``(B_m, k_m)`` bool; each ``present[m]`` is ``(B,)`` bool with ``present[m].sum() ==
    B_m``; a ``present`` entry for a modality not in ``inputs`` is all False; every row has at
    least one modality. Without ``present`` every modality covers the whole batch.

    Returns:
        ``(B, masks)`` where ``masks[m]`` is the ``(B,)`` bool mask (on the input's device) of
        every modality in ``inputs``, in sorted order.

    Example::

        >>> import torch
        >>> inputs = {"rgb": torch.zeros(1, 3, 4), "audio": torch.zeros(1, 5, 2)}
        >>> present = {"rgb": torch.tensor([False, True]), "audio": torch.tensor([True, False])}
        >>> batch, masks = check_batch(inputs, None, present, {"rgb": 4, "audio": 2})
        >>> batch, masks["rgb"]
        (2, tensor([False,  True]))
        >>> check_batch(inputs, None, present, {"rgb": 4})
        Traceback (most recent call last):
        ...
        ValueError: inputs: unknown modality ['audio']; this model knows ['rgb']
    """
    known = sorted(modality_dims)
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs: expected a mapping of modality name -> tensor, got {type(inputs).__name__}")
    if len(inputs) == 0:
        raise ValueError(f"inputs: expected at least one of the modalities {known}, got an empty mapping")
    unknown = sorted(set(inputs) - set(modality_dims))
    if unknown:
        raise ValueError(f"inputs: unknown modality {unknown}; this model knows {known}")
    names = sorted(inputs)
    for m in names:
        check_tensor(f"inputs[{m!r}]", inputs[m], ("B_m", "k_m", modality_dims[m]), {}, floating=True)
    if padding_masks is not None:
        if not isinstance(padding_masks, Mapping):
            raise TypeError(f"padding_masks: expected a mapping or None, got {type(padding_masks).__name__}")
        extra = sorted(set(padding_masks) - set(inputs))
        if extra:
            raise ValueError(f"padding_masks: masks for modalities {extra} that are not in inputs {names}")
        for m in sorted(padding_masks):
            if padding_masks[m] is not None:
                sizes = {"B_m": inputs[m].shape[0], "k_m": inputs[m].shape[1]}
                check_bool_mask(f"padding_masks[{m!r}]", padding_masks[m], ("B_m", "k_m"), sizes)
    device = inputs[names[0]].device
    if present is None:
        batch = inputs[names[0]].shape[0]
        for m in names[1:]:
            if inputs[m].shape[0] != batch:
                raise ValueError(
                    f"inputs[{m!r}]: expected {batch} rows (as inputs[{names[0]!r}]; without present "
                    f"every modality covers the whole batch), got {inputs[m].shape[0]}"
                )
        if batch == 0:
            raise ValueError("inputs: the batch is empty (0 rows)")
        return batch, {m: torch.ones(batch, dtype=torch.bool, device=device) for m in names}
    if not isinstance(present, Mapping):
        raise TypeError(f"present: expected a mapping of modality name -> (B,) bool mask, got {type(present).__name__}")
    missing = [m for m in names if m not in present]
    if missing:
        raise ValueError(f"present: expected a mask for every modality in inputs {names}, missing {missing}")
    unknown = sorted(set(present) - set(modality_dims))
    if unknown:
        raise ValueError(f"present: unknown modality {unknown}; this model knows {known}")
    sizes: dict[str, int] = {}
    for m in sorted(present):
        check_bool_mask(f"present[{m!r}]", present[m], ("B",), sizes)
    batch = sizes["B"]
    if batch == 0:
        raise ValueError("present: the batch is empty (0 rows)")
    masks = {m: present[m].to(device) for m in names}
    for m in sorted(present):
        if m not in inputs and bool(present[m].any()):
            raise ValueError(
                f"present[{m!r}]: marks {int(present[m].sum())} row(s) as having {m!r}, but inputs has "
                f"no {m!r} (give its rows or an all-False mask)"
            )
    for m in names:
        marked, rows = int(masks[m].sum()), inputs[m].shape[0]
        if marked != rows:
            raise ValueError(
                f"inputs[{m!r}]: expected {marked} rows (present[{m!r}].sum(), the rows that have "
                f"{m!r}), got {rows}"
            )
    none = ~torch.stack([masks[m] for m in names]).any(dim=0)
    if bool(none.any()):
        raise ValueError(f"present: {int(none.sum())} row(s) have no modality at all: rows {_rows(none)}")
    return batch, masks


def masked_mean(x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
    """Mean over axis 1 of ``(B, n, d)`` ignoring padding (True); padding values are never read.

    Example::

        >>> import torch
        >>> x = torch.tensor([[[1.0], [3.0], [float("nan")]]])
        >>> masked_mean(x, torch.tensor([[False, False, True]]))
        tensor([[2.]])
    """
    if padding_mask is None:
        return x.mean(dim=1)
    valid = ~padding_mask
    x = x.masked_fill(padding_mask[..., None], 0.0)
    count = valid.sum(dim=1, keepdim=True).clamp_min(1).to(x.dtype)
    return x.sum(dim=1) / count


# --------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class UMIConfig:
    """Every hyper-parameter of :class:`UnseenModalityModel`, JSON-serialisable.

    The four ablation switches of the paper (Tables 2-3) are ``use_alignment`` (alignment loss),
    ``use_pseudo`` (pseudo-label branch; off = every branch supervised by ground truth),
    ``branches`` (1 = single branch) and ``projection`` (``"pooled"`` = mean-pool + linear
    instead of :class:`~umilayers.projection.FeatureProjection`). See :class:`UnseenModalityModel`
    for the meaning of the other fields.

    Example::

        >>> cfg = UMIConfig({"rgb": 64, "audio": 32}, num_outputs=10, dim=32, num_tokens=8)
        >>> cfg.num_align_tokens, cfg.align_assign
        (10, 'label')
        >>> UMIConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    modality_dims: Mapping[str, int]
    num_outputs: int
    task: str = "classification"
    dim: int = 256
    num_tokens: int = 512
    projection_depth: int = 6
    fusion_depth: int = 6
    heads: int = 8
    mlp_ratio: float = 2.0
    normalize: str = "inputs"
    # ablation switches
    branches: int = 2
    projection: str = "feature"
    use_alignment: bool = True
    use_pseudo: bool = True
    # loss
    align_weight: float = 1e-3
    pseudo_weight: float = 1.0
    num_align_tokens: Optional[int] = None
    margin: float = 0.2
    # retrieval
    text_dim: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.modality_dims, Mapping) or not self.modality_dims:
            raise ValueError(f"modality_dims: expected a non-empty mapping name -> d_m, got {self.modality_dims!r}")
        for m, d in self.modality_dims.items():
            if not isinstance(m, str) or not m:
                raise ValueError(f"modality_dims: modality names must be non-empty strings, got {m!r}")
            check_positive_int(f"modality_dims[{m!r}]", d)
        object.__setattr__(self, "modality_dims", {m: int(self.modality_dims[m]) for m in sorted(self.modality_dims)})
        for name in ("num_outputs", "dim", "num_tokens", "fusion_depth", "heads", "branches"):
            check_positive_int(name, getattr(self, name))
        depth = self.projection_depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"projection_depth: expected an int >= 0, got {depth!r}")
        check_choice("task", self.task, TASKS)
        check_choice("projection", self.projection, PROJECTIONS)
        if self.dim % self.heads:
            raise ValueError(f"heads: must divide dim={self.dim}, got heads={self.heads}")
        if self.num_tokens % self.branches:
            raise ValueError(
                f"branches: the num_tokens={self.num_tokens} slots are split into `branches` equal "
                f"contiguous groups, so branches must divide num_tokens; got branches={self.branches}"
            )
        for name in ("use_alignment", "use_pseudo"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("align_weight", "pseudo_weight", "margin", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
        if self.num_align_tokens is None:
            default = self.num_outputs if self.task == "classification" else 128
            object.__setattr__(self, "num_align_tokens", default)
        check_positive_int("num_align_tokens", self.num_align_tokens)
        if self.task == "classification" and self.num_align_tokens != self.num_outputs:
            raise ValueError(
                f"num_align_tokens: classification aligns to one token per class, so it must equal "
                f"num_outputs={self.num_outputs}; got {self.num_align_tokens}"
            )
        if self.task == "retrieval":
            if self.text_dim is None:
                raise ValueError("text_dim: required for task='retrieval' (the caption feature size)")
            check_positive_int("text_dim", self.text_dim)
        elif self.text_dim is not None:
            raise ValueError(
                f"text_dim: only used by task='retrieval', got text_dim={self.text_dim} for task={self.task!r}"
            )

    @property
    def align_assign(self) -> str:
        """``"label"`` (the class's token) for classification, ``"nearest"`` otherwise."""
        return "label" if self.task == "classification" else "nearest"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        out = dataclasses.asdict(self)
        out["modality_dims"] = dict(self.modality_dims)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UMIConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"UMIConfig: unknown keys {unknown}; expected a subset of {sorted(fields)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------
# Text side (retrieval)


class TextEncoder(nn.Module):
    """Caption token features to the joint embedding: masked mean pool, gated embedding unit.

    ``y = W1 mean(x)``, ``y = y * sigmoid(W2 y)`` (the gated embedding unit of Miech et al.'s
    Mixture-of-Embedding-Experts, also used by Collaborative Experts), then L2-normalised, so
    ``video @ text.T`` is a cosine similarity.

    Args:
        text_dim: caption feature size ``d_text``.
        out_dim: joint embedding size ``E``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - text: ``(B, t, d_text)``
        - text_padding_mask: ``(B, t)`` bool, True = padding (optional)
        - output: ``(B, E)``, unit L2 norm

    Example::

        >>> import torch
        >>> enc = TextEncoder(text_dim=12, out_dim=8)
        >>> emb = enc(torch.randn(3, 5, 12))
        >>> emb.shape, torch.allclose(emb.norm(dim=-1), torch.ones(3))
        (torch.Size([3, 8]), True)
    """

    def __init__(self, text_dim: int, out_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int("text_dim", text_dim)
        check_positive_int("out_dim", out_dim)
        factory = {"device": device, "dtype": dtype}
        self.text_dim, self.out_dim = text_dim, out_dim
        self.fc = nn.Linear(text_dim, out_dim, **factory)
        self.gate = nn.Linear(out_dim, out_dim, **factory)

    def forward(self, text: Tensor, text_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Embed captions.

        Shape:
            - text: ``(B, t, d_text)``
            - text_padding_mask: ``(B, t)``
            - output: ``(B, E)``
        """
        sizes: dict[str, int] = {}
        check_tensor("text", text, ("B", "t", self.text_dim), sizes, floating=True)
        if text_padding_mask is not None:
            check_bool_mask("text_padding_mask", text_padding_mask, ("B", "t"), sizes)
        y = self.fc(masked_mean(text, text_padding_mask))
        y = y * torch.sigmoid(self.gate(y))
        return F.normalize(y, dim=-1)


# --------------------------------------------------------------------------------------------
# Task losses shared by every model (supervised + pseudo), one place


def _check_targets(task: str, targets: Any, batch: int, num_outputs: int, text_dim: Optional[int]) -> None:
    if task == "classification":
        check_tensor("targets", targets, (batch,))
        if targets.dtype != torch.int64:
            raise TypeError(f"targets: expected int64 class labels, got dtype {targets.dtype}")
        if batch and (int(targets.min()) < 0 or int(targets.max()) >= num_outputs):
            raise ValueError(
                f"targets: class labels must lie in [0, {num_outputs}), got range "
                f"[{int(targets.min())}, {int(targets.max())}]"
            )
    elif task == "regression":
        check_tensor("targets", targets, (batch, num_outputs), floating=True)
        check_finite("targets", targets)
    else:
        check_tensor("targets", targets, (batch, "t", text_dim), floating=True)


#: Softmax temperature of the retrieval pseudo loss (on cosine similarities; fixed, not tuned).
RETRIEVAL_PSEUDO_TEMPERATURE = 0.1


def _check_pseudo(pseudo_targets: Any, batch: int, num_outputs: int, task: str = "classification") -> None:
    # Retrieval pseudo-labels are the teacher's (B, B) video-to-caption similarities.
    shape = (batch, batch) if task == "retrieval" else (batch, num_outputs)
    check_tensor("pseudo_targets", pseudo_targets, shape, floating=True)
    check_finite("pseudo_targets", pseudo_targets)


def supervised_term(task: str, outputs: Tensor, targets: Tensor, text_emb: Optional[Tensor], margin: float) -> Tensor:
    """Ground-truth loss of one branch (:meth:`TaskLoss.supervised <umilayers.losses.TaskLoss.supervised>`).

    For retrieval the branch's video embeddings are ranked against ``text_emb``, the caption
    embeddings of the batch; otherwise against ``targets``.
    """
    target = text_emb if task == "retrieval" else targets
    assert target is not None, "retrieval needs the caption embeddings"
    return TaskLoss(task, margin).supervised(outputs, target)


def pseudo_term(task: str, outputs: Tensor, pseudo_targets: Tensor, margin: float,
                text_emb: Optional[Tensor] = None) -> Tensor:
    """Pseudo-label loss of one branch.

    Classification and regression: :meth:`TaskLoss.pseudo <umilayers.losses.TaskLoss.pseudo>`.
    Retrieval: :func:`~umilayers.losses.similarity_distillation_loss` of the branch's video
    embeddings against ``text_emb`` (this model's caption embeddings), with ``pseudo_targets``
    the ``(B, B)`` similarities of the unimodal teachers, each in its own space.
    """
    if task == "retrieval":
        assert text_emb is not None, "retrieval needs the caption embeddings"
        return similarity_distillation_loss(outputs, text_emb, pseudo_targets, RETRIEVAL_PSEUDO_TEMPERATURE)
    return TaskLoss(task, margin).pseudo(outputs, pseudo_targets)


def combine_branches(task: str, branch_outputs: Tensor) -> Tensor:
    """``(B, G, C) -> (B, C)``: softmax average (classes), mean, or normalised mean (retrieval)."""
    if task == "classification":
        return branch_outputs.softmax(dim=-1).mean(dim=1)
    mean = branch_outputs.mean(dim=1)
    return F.normalize(mean, dim=-1) if task == "retrieval" else mean


# --------------------------------------------------------------------------------------------
# The model


class UnseenModalityModel(nn.Module):
    """The paper's model: per-modality projection, common-space sum, dual-branch fusion, head.

    1. ``FeatureProjection`` per modality (``nn.ModuleDict``, sorted names) maps the ``B_m``
       rows that have the modality to ``(B_m, K, D)``; it never runs for an absent modality.
    2. ``CommonSpaceSum`` adds them per sample: ``(B, K, D)``.
    3. Learned positions ``(K, D)`` are added; the ``K`` slots are split into ``G = branches``
       contiguous groups of ``K / G`` and each group is preceded by its own learned readout
       token, giving ``[r_0, slots_0, r_1, slots_1, ...]`` of length ``G (K / G + 1)``. One
       ``GroupMaskedTransformer(groups=G)`` runs every branch in one pass; equal groups take
       the exact fold path. Branch g's readout sees only its own slots.
    4. A shared head (``LayerNorm + Linear(D, C)``) maps each readout to logits
       (classification), values (regression) or an L2-normalised embedding (retrieval).

    Training objective (Eq. 3), :meth:`loss`:
    ``align_weight * L_align + L_supervised + pseudo_weight * L_pseudo``.

    - ``L_align``: one :class:`~umilayers.losses.AlignmentLoss` (``num_align_tokens`` learned
      tokens) applied to each modality's projected features (mean over K) on the rows that have
      it; the class's token for classification, the nearest token otherwise; averaged over the
      modalities in the batch.
    - ``L_supervised``: on branch 0 against the ground truth (CE / MSE / triplet).
    - ``L_pseudo``: on branches 1..G-1 (mean) against the pseudo-labels (KL / MSE / triplet).

    Ablation switches (the paper's Tables 2-3), all in :class:`UMIConfig`:

    - ``use_alignment=False``: no alignment loss and no alignment tokens.
    - ``use_pseudo=False``: no pseudo branch; every branch is supervised by the ground truth
      (mean over branches) and :meth:`loss` refuses ``pseudo_targets``.
    - ``branches=1``: one group with one readout; with ``use_pseudo`` both the supervised and
      the pseudo loss apply to that single readout.
    - ``projection="pooled"``: :class:`~umilayers.projection.PooledProjection` (mean-pool +
      linear) instead of ``FeatureProjection``.

    Retrieval: ``num_outputs`` is the joint embedding size ``E``; ``text_dim`` is required and
    :meth:`encode_text` maps caption token features ``(B, t, d_text)`` to ``(B, E)``. In
    :meth:`loss`, ``targets`` are the caption features and ``text_padding_mask`` their mask;
    the supervised loss is the triplet (max-margin ranking, both directions) over the batch's
    video-text cosine similarity matrix; the pseudo loss the triplet between branch embeddings
    and the pseudo embeddings.

    Args:
        modality_dims: modality name -> feature size ``d_m``.
        num_outputs: classes, regression targets, or embedding size ``E``.
        task: ``"classification"``, ``"regression"`` or ``"retrieval"``.
        dim: common width ``D``.
        num_tokens: common slots ``K`` (divisible by ``branches``).
        projection_depth: transformer layers inside each ``FeatureProjection``.
        fusion_depth: layers of the fusion ``GroupMaskedTransformer`` (at least 1).
        heads: attention heads of both transformers.
        branches: number of branches ``G``.
        normalize: ``FeatureProjection`` softmax axis, ``"inputs"`` or ``"slots"``.
        projection: ``"feature"`` or ``"pooled"``.
        align_weight: ``lambda`` of Eq. 3.
        pseudo_weight: ``alpha`` of Eq. 3.
        use_alignment: add the alignment loss.
        use_pseudo: supervise branches 1.. with pseudo-labels.
        num_align_tokens: alignment tokens; default ``num_outputs`` (classification, must
            equal it) or 128 (nearest assignment).
        text_dim: caption feature size (retrieval only, required there).
        mlp_ratio: MLP width of the transformers relative to ``dim``.
        margin: triplet margin (retrieval).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - inputs[m]: ``(B_m, k_m, d_m)``; padding_masks[m]: ``(B_m, k_m)``; present[m]: ``(B,)``
        - output: :class:`UMIOutput` with prediction ``(B, C)``, branch_outputs ``(B, G, C)``,
          modality_features[m] ``(B_m, K, D)``

    Example::

        >>> import torch
        >>> model = UnseenModalityModel({"rgb": 12, "audio": 6}, num_outputs=5, dim=16,
        ...                             num_tokens=4, projection_depth=1, fusion_depth=1, heads=2)
        >>> present = {"rgb": torch.tensor([True, True, False]), "audio": torch.tensor([False, True, True])}
        >>> inputs = {"rgb": torch.randn(2, 7, 12), "audio": torch.randn(2, 3, 6)}
        >>> out = model(inputs, present=present)
        >>> out.prediction.shape, out.branch_outputs.shape, out.modality_features["audio"].shape
        (torch.Size([3, 5]), torch.Size([3, 2, 5]), torch.Size([2, 4, 16]))
        >>> pseudo = torch.softmax(torch.randn(3, 5), dim=-1)
        >>> losses = model.loss(out, torch.tensor([0, 4, 2]), pseudo_targets=pseudo)
        >>> losses.total.backward()
    """

    def __init__(
        self,
        modality_dims: Mapping[str, int],
        num_outputs: int,
        task: str = "classification",
        dim: int = 256,
        num_tokens: int = 512,
        projection_depth: int = 6,
        fusion_depth: int = 6,
        heads: int = 8,
        branches: int = 2,
        normalize: str = "inputs",
        projection: str = "feature",
        align_weight: float = 1e-3,
        pseudo_weight: float = 1.0,
        use_alignment: bool = True,
        use_pseudo: bool = True,
        num_align_tokens: Optional[int] = None,
        text_dim: Optional[int] = None,
        mlp_ratio: float = 2.0,
        margin: float = 0.2,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        cfg = UMIConfig(
            modality_dims=modality_dims, num_outputs=num_outputs, task=task, dim=dim,
            num_tokens=num_tokens, projection_depth=projection_depth, fusion_depth=fusion_depth,
            heads=heads, mlp_ratio=mlp_ratio, normalize=normalize, branches=branches,
            projection=projection, use_alignment=use_alignment, use_pseudo=use_pseudo,
            align_weight=align_weight, pseudo_weight=pseudo_weight,
            num_align_tokens=num_align_tokens, margin=margin, text_dim=text_dim,
        )
        self.config = cfg
        factory = {"device": device, "dtype": dtype}
        self.projections = nn.ModuleDict()
        for m, d_m in cfg.modality_dims.items():
            if cfg.projection == "feature":
                self.projections[m] = FeatureProjection(
                    d_m, out_dim=dim, num_tokens=num_tokens, depth=projection_depth, heads=heads,
                    normalize=normalize, mlp_ratio=mlp_ratio, **factory,
                )
            else:
                self.projections[m] = PooledProjection(d_m, out_dim=dim, num_tokens=num_tokens, **factory)
        self.fusion = CommonSpaceSum()
        self.positions = nn.Parameter(torch.zeros(num_tokens, dim, **factory))
        self.readout = nn.Parameter(torch.zeros(branches, dim, **factory))
        nn.init.trunc_normal_(self.positions, std=0.02)
        nn.init.trunc_normal_(self.readout, std=0.02)
        self.transformer = GroupMaskedTransformer(dim, fusion_depth, heads, mlp_ratio, groups=branches, **factory)
        self.head = nn.Sequential(nn.LayerNorm(dim, **factory), nn.Linear(dim, num_outputs, **factory))
        self.alignment: Optional[AlignmentLoss] = None
        if use_alignment:
            self.alignment = AlignmentLoss(cfg.num_align_tokens, dim, assign=cfg.align_assign, **factory)
        self.text_encoder: Optional[TextEncoder] = None
        if task == "retrieval":
            self.text_encoder = TextEncoder(cfg.text_dim, num_outputs, **factory)

    @classmethod
    def from_config(cls, config: UMIConfig | Mapping[str, Any], device=None, dtype=None) -> "UnseenModalityModel":
        """Build from a :class:`UMIConfig` or its :meth:`~UMIConfig.to_dict`."""
        if not isinstance(config, UMIConfig):
            config = UMIConfig.from_dict(config)
        return cls(**config.to_dict(), device=device, dtype=dtype)

    def config_dict(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-serialisable dict (``cls(**model.config_dict())``)."""
        return self.config.to_dict()

    @property
    def task(self) -> str:
        return self.config.task

    @property
    def modalities(self) -> list[str]:
        return list(self.config.modality_dims)

    @property
    def needs_pseudo_labels(self) -> bool:
        """Whether :meth:`loss` needs ``pseudo_targets`` (stage 1 of the recipe must run)."""
        return self.config.use_pseudo

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"task={c.task!r}, num_outputs={c.num_outputs}, branches={c.branches}, "
            f"projection={c.projection!r}, use_alignment={c.use_alignment}, use_pseudo={c.use_pseudo}"
        )

    def branch_tokens(self, fused: Tensor) -> Tensor:
        """``(B, K, D)`` fused slots -> ``(B, G (K/G + 1), D)``: ``[r_0, slots_0, r_1, slots_1, ...]``."""
        g = self.config.branches
        slots = rearrange(fused + self.positions, "b (g n) d -> b g n d", g=g)
        readout = repeat(self.readout, "g d -> b g 1 d", b=fused.shape[0])
        return rearrange(torch.cat([readout, slots], dim=2), "b g n d -> b (g n) d")

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        padding_masks: Optional[Mapping[str, Optional[Tensor]]] = None,
        present: Optional[Mapping[str, Tensor]] = None,
    ) -> UMIOutput:
        """Predict for whatever modalities each sample has.

        Args:
            inputs: modality -> ``(B_m, k_m, d_m)`` rows of the samples that have it.
            padding_masks: modality -> ``(B_m, k_m)`` bool, True = padding (optional).
            present: modality -> ``(B,)`` bool (optional; None = every modality on every row).

        Shape:
            - inputs[m]: ``(B_m, k_m, d_m)``
            - padding_masks[m]: ``(B_m, k_m)``
            - present[m]: ``(B,)``
            - prediction: ``(B, C)``; branch_outputs: ``(B, G, C)``;
              modality_features[m]: ``(B_m, K, D)``
        """
        _, masks = check_batch(inputs, padding_masks, present, self.config.modality_dims)
        padding_masks = padding_masks or {}
        features = {
            m: self.projections[m](inputs[m], padding_mask=padding_masks.get(m))
            for m in masks
            if inputs[m].shape[0] > 0
        }
        fused = self.fusion(features, {m: masks[m] for m in features})
        tokens = self.transformer(self.branch_tokens(fused))
        g = self.config.branches
        readouts = rearrange(tokens, "b (g n) d -> b g n d", g=g)[:, :, 0]
        branch_outputs = self.head(readouts)
        if self.config.task == "retrieval":
            branch_outputs = F.normalize(branch_outputs, dim=-1)
        return UMIOutput(
            prediction=combine_branches(self.config.task, branch_outputs),
            branch_outputs=branch_outputs,
            modality_features=features,
            present=masks,
        )

    def encode_text(self, text: Tensor, text_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Caption token features ``(B, t, d_text)`` -> L2-normalised ``(B, E)`` (retrieval only)."""
        if self.text_encoder is None:
            raise RuntimeError(f"encode_text: only a task='retrieval' model has a text side, this one is {self.task!r}")
        return self.text_encoder(text, text_padding_mask)

    def loss(
        self,
        output: UMIOutput,
        targets: Tensor,
        pseudo_targets: Optional[Tensor] = None,
        *,
        text_padding_mask: Optional[Tensor] = None,
    ) -> LossOutput:
        """Eq. 3: ``align_weight * L_align + L_supervised + pseudo_weight * L_pseudo``.

        Args:
            output: this model's :meth:`forward` output.
            targets: classification ``(B,)`` int64 labels; regression ``(B, C)``; retrieval the
                caption token features ``(B, t, d_text)``.
            pseudo_targets: pseudo-labels, required exactly when ``use_pseudo``: ``(B, C)`` class
                probabilities or values from the :class:`~umilayers.pseudo_labels.PseudoLabelBank`;
                for retrieval ``(B, B)`` teacher similarities ``cos(video_i, caption_j)``, each
                row measured in its unimodal model's own space (see ``pseudo_term``).
            text_padding_mask: ``(B, t)`` bool for retrieval captions, True = padding.

        Returns:
            :class:`LossOutput` with the total and the unweighted terms.
        """
        cfg = self.config
        batch = output.branch_outputs.shape[0]
        _check_targets(cfg.task, targets, batch, cfg.num_outputs, cfg.text_dim)
        if text_padding_mask is not None:
            if cfg.task != "retrieval":
                raise ValueError(f"text_padding_mask: only used by task='retrieval', this model is {cfg.task!r}")
            check_bool_mask("text_padding_mask", text_padding_mask, (batch, targets.shape[1]))
        if cfg.use_pseudo:
            if pseudo_targets is None:
                raise ValueError("pseudo_targets: required when use_pseudo=True (the pseudo branch's targets)")
            _check_pseudo(pseudo_targets, batch, cfg.num_outputs, cfg.task)
        elif pseudo_targets is not None:
            raise ValueError("pseudo_targets: this model has use_pseudo=False and takes no pseudo-labels")

        zero = output.branch_outputs.new_zeros(())
        align = self.alignment_loss(output, targets) if self.alignment is not None else zero
        text_emb = self.encode_text(targets, text_padding_mask) if cfg.task == "retrieval" else None
        branches = output.branch_outputs
        if cfg.use_pseudo:
            supervised = supervised_term(cfg.task, branches[:, 0], targets, text_emb, cfg.margin)
            pseudo_branches = range(1, cfg.branches) if cfg.branches > 1 else [0]
            pseudo = torch.stack(
                [pseudo_term(cfg.task, branches[:, g], pseudo_targets, cfg.margin, text_emb) for g in pseudo_branches]
            ).mean()
        else:
            supervised = torch.stack(
                [supervised_term(cfg.task, branches[:, g], targets, text_emb, cfg.margin) for g in range(cfg.branches)]
            ).mean()
            pseudo = zero
        total = cfg.align_weight * align + supervised + cfg.pseudo_weight * pseudo
        return LossOutput(total=total, align=align, supervised=supervised, pseudo=pseudo)

    def alignment_loss(self, output: UMIOutput, targets: Tensor) -> Tensor:
        """``L_align``: per modality on its rows, averaged over the modalities in the batch."""
        if self.alignment is None:
            raise RuntimeError("alignment_loss: this model was built with use_alignment=False")
        terms = []
        for m, feats in output.modality_features.items():
            labels = targets[output.present[m]] if self.config.task == "classification" else None
            terms.append(self.alignment(feats, labels))
        return torch.stack(terms).mean()
