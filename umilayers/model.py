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
from typing import Any, ClassVar, Mapping, Optional, Sequence, cast

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from umilayers._config import Config, option
from umilayers._validation import (
    InvalidArgument,
    check_bool_mask,
    check_choice,
    check_finite,
    check_head_dim,
    check_labels,
    check_positive_int,
    check_tensor,
    format_indices,
)
from umilayers.attention import GroupMaskedTransformer
from umilayers.fusion import check_present, fuse_rows, sub_batch_rows
from umilayers.losses import PSEUDO_REDUCTIONS, TASKS, AlignmentLoss, TaskLoss, distillation_checked
from umilayers.projection import NORMALIZE, POSITIONS, FeatureProjection, PooledProjection

__all__ = [
    "ALIGN_MODALITY_REDUCTIONS",
    "PROJECTIONS",
    "RETRIEVAL_PSEUDO",
    "RETRIEVAL_PSEUDO_TEMPERATURE",
    "UMIOutput",
    "LossOutput",
    "ModelConfig",
    "UMIConfig",
    "TextEncoder",
    "TaskModel",
    "UnseenModalityModel",
    "check_batch",
    "combine_branches",
    "masked_mean",
    "supervised_only",
]

#: Projections of :class:`UnseenModalityModel`: ``"feature"`` (the paper's) or ``"pooled"`` (ablation).
PROJECTIONS = ("feature", "pooled")
#: Softmax temperature of the retrieval pseudo loss (on cosine similarities; fixed, not tuned).
RETRIEVAL_PSEUDO_TEMPERATURE = 0.1
#: How :class:`UnseenModalityModel` reduces the alignment loss over modalities and rows
#: (``align_reduction``): per modality the batch mean of the squared distance, averaged over the
#: modalities of the batch (this library's); summed over them (Eq. 1 of the paper as written); or
#: the mean over every (sample, modality) pair and the ``D`` features (the authors' released
#: code, the scale of its ``lambda = 0.001``).
ALIGN_MODALITY_REDUCTIONS = ("modality_mean", "modality_sum", "elementwise_mean")
#: Retrieval pseudo-labels (``retrieval_pseudo``): the unimodal teachers' video-to-caption
#: similarities, distilled (this library's); or the paper's (Sec. 3.3): the averaged unimodal
#: video embedding of the modality closest to the ground truth, with a triplet loss.
RETRIEVAL_PSEUDO = ("relational", "paper")


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


def check_batch(
    inputs: Any,
    padding_masks: Any,
    present: Any,
    modality_dims: Mapping[str, int],
    *,
    max_tokens: Optional[Mapping[str, int]] = None,
    check_values: bool = False,
) -> tuple[int, dict[str, Tensor]]:
    """Validate a batch in the sub-batch layout; return ``B`` and the present masks.

    Checks, before any work: ``inputs`` is a non-empty mapping of known modalities; each
    ``inputs[m]`` is ``(B_m, k_m, d_m)`` floating point with the model's ``d_m``, at least one
    token and at most ``max_tokens[m]`` (where the model has a limit); each padding mask is
    ``(B_m, k_m)`` bool on its input's device; each ``present[m]`` is ``(B,)`` bool. Without
    ``present`` every modality covers the whole batch.

    With ``check_values=True`` also what needs the masks' values (read back to the host, a
    pipeline stall on a GPU): no row's tokens are all padding; ``present[m].sum() == B_m``; a
    ``present`` entry for a modality not in ``inputs`` is all False; every row has at least one
    modality. The training recipe's batches hold these by construction (the FeatureStore checks
    its data once).

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
        >>> check_batch(inputs, None, present, {"rgb": 4}, check_values=True)
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
        x, limit = inputs[m], (max_tokens or {}).get(m)
        check_tensor(f"inputs[{m!r}]", x, ("B_m", "k_m", modality_dims[m]), {}, floating=True)
        if x.shape[0] and x.shape[1] == 0:
            raise ValueError(f"inputs[{m!r}]: expected at least one token per sample, got k_m=0 "
                             f"(shape {tuple(x.shape)})")
        if limit is not None and x.shape[1] > limit:
            raise ValueError(f"inputs[{m!r}]: expected at most max_tokens={limit} tokens, got k_m={x.shape[1]}")
    if padding_masks is not None:
        if not isinstance(padding_masks, Mapping):
            raise TypeError(f"padding_masks: expected a mapping or None, got {type(padding_masks).__name__}")
        extra = sorted(set(padding_masks) - set(inputs))
        if extra:
            raise ValueError(f"padding_masks: masks for modalities {extra} that are not in inputs {names}")
        for m in sorted(padding_masks):
            mask = padding_masks[m]
            if mask is not None:
                sizes = {"B_m": inputs[m].shape[0], "k_m": inputs[m].shape[1]}
                check_bool_mask(f"padding_masks[{m!r}]", mask, ("B_m", "k_m"), sizes)
                if mask.device != inputs[m].device:
                    raise ValueError(f"padding_masks[{m!r}]: expected a mask on the device of inputs[{m!r}], "
                                     f"{inputs[m].device}, got {mask.device}")
                empty = mask.all(dim=1) if check_values else None
                if empty is not None and bool(empty.any()):
                    rows = empty.nonzero().flatten()
                    raise ValueError(f"padding_masks[{m!r}]: every token is padding in {len(rows)} row(s) "
                                     f"{format_indices(rows)}; each sample needs at least one valid token "
                                     "(drop those rows instead)")
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
    if isinstance(present, Mapping):
        unknown = sorted(set(present) - set(modality_dims))
        if unknown:
            raise ValueError(f"present: unknown modality {unknown}; this model knows {known}")
    batch, masks = check_present("inputs", inputs, present, full_batch=False, check_values=check_values)
    if batch == 0:
        raise ValueError("present: the batch is empty (0 rows)")
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
class ModelConfig(Config):
    """The hyper-parameters of :class:`UnseenModalityModel`, one field per constructor argument.

    Each field's name is the constructor argument's, the key in checkpoints and ``config.json``,
    and the flag of ``umilayers fit`` (``--num-tokens``, ``--no-use-alignment``, ...); the
    constructor's defaults are these fields' defaults. The baselines take the ones they share
    (``dim``, ``heads``, ``head_dim``, ``mlp_ratio``, ``margin``; see
    :func:`~umilayers.baselines.build_model`).

    Defaults are the paper's robot / MSR-VTT settings (``D = 256``, ``k* = 16``, 6 layers and 8
    heads in both transformers, ``lambda = 1e-3``, ``alpha = 1``); EPIC-Kitchens used
    ``num_tokens=512`` and ``pseudo_weight=3000`` on the released code's scale of the KL term
    (``pseudo_reduction="elementwise_mean"``). ``align_reduction``, ``pseudo_reduction`` and
    ``retrieval_pseudo`` name the choices where the paper, the released code and this library
    differ (docs: Training, "The paper's settings"). The paper's ablation switches (Tables 2-3) are
    ``use_alignment``, ``use_pseudo`` and ``branches`` here, and the projection (a method of the
    recipe, ``"pooled"``).

    Example::

        >>> cfg = ModelConfig(dim=32, num_tokens=8, heads=4)
        >>> cfg.num_tokens, cfg.replace(use_alignment=False).use_alignment
        (8, False)
        >>> ModelConfig(dim=32, heads=3)
        Traceback (most recent call last):
        ...
        umilayers._validation.InvalidArgument: heads: must divide dim=32, got heads=3
    """

    dim: int = option(256, "common width D (the paper's d*)", minimum=1)
    num_tokens: int = option(16, "common slots K (the paper's k*: 512 on EPIC-Kitchens, 16 on robot and MSR-VTT); "
                                 "split equally among the branches", minimum=1)
    projection_depth: int = option(6, "transformer layers inside each FeatureProjection (0: slot logits straight "
                                      "from the token embedding); also the depth of a transformer unimodal predictor",
                                   minimum=0)
    fusion_depth: int = option(6, "layers of the fusion transformer (and of the vanilla baseline)", minimum=1)
    heads: int = option(8, "attention heads of every transformer (must divide dim unless head_dim is given)",
                        minimum=1)
    head_dim: Optional[int] = option(None, "attention width per head of every transformer (None: dim // heads); "
                                           "the authors' released code has 64, 8 heads x 64 = 512 at dim 256",
                                     minimum=1)
    mlp_ratio: float = option(2.0, "MLP width of the transformers relative to dim", minimum=0, strict=True)
    normalize: str = option("inputs", "FeatureProjection softmax axis: 'inputs' (the paper's text) or 'slots' "
                                      "(the authors' released code)", choices=NORMALIZE)
    branches: int = option(2, "prediction branches G (1: the single-branch ablation); must divide num_tokens",
                           minimum=1)
    use_alignment: bool = option(True, "the feature alignment loss (Eq. 1); off: the ablation without it")
    use_pseudo: bool = option(True, "the pseudo-label branch (needs the unimodal stage); off: every branch "
                                    "learns from the ground truth")
    align_weight: float = option(1e-3, "lambda of Eq. 3 (weight of the alignment loss)", minimum=0)
    pseudo_weight: float = option(1.0, "alpha of Eq. 3 (weight of the pseudo-label loss; 3000 on EPIC-Kitchens)",
                                  minimum=0)
    num_align_tokens: Optional[int] = option(None, "alignment tokens n_u (default: one per class for "
                                                   "classification, where it must be that, else 128)", minimum=1)
    margin: float = option(0.2, "triplet margin of the retrieval losses", minimum=0)
    align_reduction: str = option("modality_mean", "alignment loss over (sample, modality) pairs: 'modality_mean' "
                                                   "(per modality the batch mean of the squared distance, averaged "
                                                   "over the modalities), 'modality_sum' (Eq. 1 as written: summed) or "
                                                   "'elementwise_mean' (the released code: mean over the pairs and the "
                                                   "D features)", choices=ALIGN_MODALITY_REDUCTIONS)
    pseudo_reduction: str = option("batchmean", "classification pseudo loss (KL): 'batchmean' (each sample's KL, "
                                                "averaged) or 'elementwise_mean' over batch x classes (the released "
                                                "code: the scale of alpha = 3000 on EPIC-Kitchens, i.e. batchmean "
                                                "with alpha = 3000 / 3806)", choices=PSEUDO_REDUCTIONS)
    retrieval_pseudo: str = option("relational", "retrieval pseudo-labels: 'relational' (distil the unimodal "
                                                 "teachers' caption similarities) or 'paper' (the closest modality's "
                                                 "averaged video embedding, triplet loss; Sec. 3.3)",
                                   choices=RETRIEVAL_PSEUDO)
    positions: Optional[str] = option(None, "not in the paper: token positions in every model that reads tokens "
                                            "with attention (umi's feature projections, transformer unimodal "
                                            "models, the vanilla transformer): learned (one table per modality, "
                                            "the authors' released code)",
                                      choices=POSITIONS[1:])
    feature_norm: bool = option(False, "not in the paper: a LayerNorm per modality on its projected features "
                                       "before the common-space sum (the authors' released code has one)")
    projection_norms: bool = option(False, "not in the paper: the authors' released code's LayerNorms inside each "
                                           "FeatureProjection (around its token embedding, and on the reorganised "
                                           "features before the d_m -> D map)")
    label_smoothing: float = option(0.0, "not in the paper: label smoothing of the supervised cross-entropy (the true "
                                         "class keeps 1 - eps, the others share eps; the released code: 0.1)",
                                    minimum=0)

    def check(self) -> None:
        check_head_dim(self.heads, "dim", self.dim, self.head_dim)
        if self.label_smoothing >= 1:
            raise InvalidArgument("label_smoothing", f"expected a number in [0, 1), got {self.label_smoothing}")
        if self.num_tokens % self.branches:
            raise InvalidArgument(
                "branches",
                f"the {{num_tokens}}={self.num_tokens} slots are split into {{branches}} equal contiguous groups, "
                f"so {{branches}} must divide {{num_tokens}}; got {{branches}}={self.branches}",
                refs=("num_tokens", "branches"),
            )


@dataclass(frozen=True, kw_only=True)
class UMIConfig(ModelConfig):
    """Every constructor argument of :class:`UnseenModalityModel`: the :class:`ModelConfig`
    hyper-parameters plus what the data fixes (modalities and their sizes, outputs, task, caption
    size) and the projection. JSON-serialisable, for checkpoints.

    Example::

        >>> cfg = UMIConfig(modality_dims={"rgb": 64, "audio": 32}, num_outputs=10, dim=32, num_tokens=8)
        >>> cfg.num_align_tokens, cfg.align_assign
        (10, 'label')
        >>> UMIConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    modality_dims: Mapping[str, int]
    num_outputs: int
    task: str = "classification"
    text_dim: Optional[int] = None
    projection: str = "feature"
    modality_tokens: Optional[Mapping[str, int]] = None
    ensemble_subsets: Optional[Sequence[Sequence[str]]] = None

    def check(self) -> None:
        super().check()
        object.__setattr__(self, "modality_dims", _check_modality_dims(self.modality_dims))
        check_positive_int("num_outputs", self.num_outputs)
        check_choice("task", self.task, TASKS)
        check_choice("projection", self.projection, PROJECTIONS)
        if self.num_align_tokens is None:
            default = self.num_outputs if self.task == "classification" else 128
            object.__setattr__(self, "num_align_tokens", default)
        if self.task == "classification" and self.num_align_tokens != self.num_outputs:
            raise InvalidArgument(
                "num_align_tokens",
                f"classification aligns to one token per class, so it must equal num_outputs={self.num_outputs}; "
                f"got {self.num_align_tokens}",
            )
        _check_text_dim(self.task, self.text_dim)
        object.__setattr__(self, "modality_tokens", _check_modality_tokens(self.modality_tokens, self.modality_dims))
        if self.modality_tokens is None and self.positions == "learned" and self.projection == "feature":
            raise ValueError("modality_tokens: learned positions need each modality's most tokens, got None")
        if self.ensemble_subsets is not None:
            subsets = set()
            for subset in self.ensemble_subsets:
                names = sorted(subset) if not isinstance(subset, str) else []
                if not names or len(set(names)) != len(names) or any(m not in self.modality_dims for m in names):
                    raise ValueError(f"ensemble_subsets: expected non-empty sets of the modalities "
                                     f"{sorted(self.modality_dims)}, got {subset!r}")
                subsets.add(tuple(names))
            object.__setattr__(self, "ensemble_subsets", tuple(sorted(subsets)))

    @property
    def align_assign(self) -> str:
        """``"label"`` (the class's token) for classification, ``"nearest"`` otherwise."""
        return "label" if self.task == "classification" else "nearest"

    @property
    def hyperparameters(self) -> ModelConfig:
        """The :class:`ModelConfig` part (what ``umilayers fit`` takes as options)."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of every field."""
        out = super().to_dict()
        out["modality_dims"] = dict(self.modality_dims)
        return out


def _check_modality_dims(modality_dims: Any) -> dict[str, int]:
    """A non-empty mapping of modality names to feature sizes ``d_m``, returned in sorted key order."""
    if not isinstance(modality_dims, Mapping) or not modality_dims:
        raise ValueError(f"modality_dims: expected a non-empty mapping name -> d_m, got {modality_dims!r}")
    for m, d in modality_dims.items():
        if not isinstance(m, str) or not m:
            raise ValueError(f"modality_dims: modality names must be non-empty strings, got {m!r}")
        check_positive_int(f"modality_dims[{m!r}]", d)
    return {m: int(modality_dims[m]) for m in sorted(modality_dims)}


def _check_modality_tokens(tokens: Any, modality_dims: Mapping[str, int],
                           name: str = "modality_tokens") -> Optional[dict[str, int]]:
    """None, or the most tokens of every modality of ``modality_dims`` (sorted; others dropped)."""
    if tokens is None:
        return None
    if not isinstance(tokens, Mapping):
        raise ValueError(f"{name}: expected a mapping modality -> its most tokens, got {tokens!r}")
    absent = sorted(set(modality_dims) - set(tokens))
    if absent:
        raise ValueError(f"{name}: no length for modalities {absent} (expected one for each of "
                         f"{sorted(modality_dims)})")
    for m in sorted(modality_dims):
        check_positive_int(f"{name}[{m!r}]", tokens[m])
    return {m: int(tokens[m]) for m in sorted(modality_dims)}


def _check_text_dim(task: str, text_dim: Optional[int], required: bool = True) -> None:
    """``text_dim`` (the caption feature size) belongs to retrieval, where a text side needs it."""
    if text_dim is not None:
        if task != "retrieval":
            raise ValueError(f"text_dim: only used by task='retrieval', got text_dim={text_dim} for task={task!r}")
        check_positive_int("text_dim", text_dim)
    elif task == "retrieval" and required:
        raise ValueError("text_dim: required for task='retrieval' (the caption feature size)")


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
        return self.forward_checked(text, text_padding_mask)

    def forward_checked(self, text: Tensor, text_padding_mask: Optional[Tensor] = None) -> Tensor:
        """:meth:`forward` without any check, for callers that checked the captions already."""
        y = self.fc(masked_mean(text, text_padding_mask))
        y = y * torch.sigmoid(self.gate(y))
        return F.normalize(y, dim=-1)



# --------------------------------------------------------------------------------------------
# What every model of the package shares: task, text side, loss entry and its checks


def _check_targets(
    task: str, targets: Any, batch: int, num_outputs: int, text_dim: Optional[int], check_values: bool
) -> None:
    if task == "classification":
        check_labels("targets", targets, batch, num_outputs, "class labels", check_values=check_values)
    elif task == "regression":
        check_tensor("targets", targets, (batch, num_outputs), floating=True)
        if check_values:
            check_finite("targets", targets)
    else:
        check_tensor("targets", targets, (batch, "t", text_dim), floating=True)


def _check_pseudo(pseudo_targets: Any, shape: tuple[int, int], check_values: bool) -> None:
    check_tensor("pseudo_targets", pseudo_targets, shape, floating=True)
    if check_values:
        check_finite("pseudo_targets", pseudo_targets)


def combine_branches(task: str, branch_outputs: Tensor) -> Tensor:
    """``(B, G, C) -> (B, C)``: softmax average (classes), mean, or normalised mean (retrieval).

    Example::

        >>> combine_branches("regression", torch.tensor([[[1.0], [3.0]]]))
        tensor([[2.]])
    """
    if task == "classification":
        return branch_outputs.softmax(dim=-1).mean(dim=1)
    mean = branch_outputs.mean(dim=1)
    return F.normalize(mean, dim=-1) if task == "retrieval" else mean


class TaskModel(nn.Module):
    """What every model of the package shares: a task, an optional text side, and :meth:`loss`.

    :class:`UnseenModalityModel` and the baselines (:mod:`umilayers.baselines`) derive from it:
    one training recipe serves them all. A subclass names its :attr:`config_class` (a frozen
    :class:`~umilayers._config.Config` whose fields are its constructor's arguments); its
    constructor builds :attr:`config` from the arguments (checked there, once) and sets
    ``modality_dims``, ``task``, ``num_outputs``, ``text_dim``, ``text_encoder`` (a
    :class:`TextEncoder` or None) and ``task_loss`` (the :class:`~umilayers.losses.TaskLoss`,
    built once); it implements :meth:`forward_checked` and :meth:`loss_terms`. :meth:`forward`
    and :meth:`loss` check their arguments first, once (:func:`check_batch`), and then call the
    layers' unchecked paths.

    Example::

        >>> model = UnseenModalityModel({"rgb": 12}, num_outputs=5, dim=16, num_tokens=4,
        ...                             projection_depth=1, fusion_depth=1, heads=2, use_pseudo=False)
        >>> isinstance(model, TaskModel), model.needs_pseudo_labels
        (True, False)
    """

    modality_dims: Mapping[str, int]
    task: str
    num_outputs: int
    text_dim: Optional[int]
    text_encoder: Optional[TextEncoder]
    task_loss: TaskLoss

    def forward(
        self,
        inputs: Mapping[str, Tensor],
        padding_masks: Optional[Mapping[str, Optional[Tensor]]] = None,
        present: Optional[Mapping[str, Tensor]] = None,
        *,
        check_values: bool = False,
    ) -> UMIOutput:
        """Predict for whatever modalities each sample has.

        Args:
            inputs: modality -> ``(B_m, k_m, d_m)`` rows of the samples that have it.
            padding_masks: modality -> ``(B_m, k_m)`` bool, True = padding (optional).
            present: modality -> ``(B,)`` bool (optional; None = every modality on every row).
            check_values: also check what needs the masks' values (see :func:`check_batch`),
                which reads them back to the host.

        Shape:
            - inputs[m]: ``(B_m, k_m, d_m)``
            - padding_masks[m]: ``(B_m, k_m)``
            - present[m]: ``(B,)``
            - prediction: ``(B, C)``; branch_outputs: ``(B, G, C)`` (``G = 1`` for the
              baselines); modality_features[m] ``(B_m, K, D)`` and modality_outputs[m]
              ``(B_m, C)`` where the model has them
        """
        batch, masks = self.check_inputs(inputs, padding_masks, present, check_values)
        return self.forward_checked(inputs, padding_masks or {}, masks, batch, check_values)

    def check_inputs(
        self, inputs: Any, padding_masks: Any, present: Any, check_values: bool
    ) -> tuple[int, dict[str, Tensor]]:
        """:func:`check_batch` against this model's modalities: ``(B, present masks)``."""
        return check_batch(inputs, padding_masks, present, self.modality_dims, max_tokens=self.token_limits(),
                           check_values=check_values)

    def token_limits(self) -> dict[str, int]:
        """The most tokens each modality's input may have, where the model has a limit (a learned
        position table, an MLP over the flattened tokens); none by default."""
        return {}

    def forward_checked(self, inputs: Mapping[str, Tensor], padding_masks: Mapping[str, Optional[Tensor]],
                        present: Mapping[str, Tensor], batch: int, check_values: bool) -> UMIOutput:
        """:meth:`forward` on checked inputs (``present`` holds a mask per modality of ``inputs``)."""
        raise NotImplementedError

    #: The model's constructor arguments, checked once when the model is built: a frozen
    #: :class:`~umilayers._config.Config` whose fields are the arguments.
    config: Config
    #: The class of :attr:`config`.
    config_class: ClassVar[type[Config]]

    @classmethod
    def from_config(cls, config: Config | Mapping[str, Any], device=None, dtype=None) -> "TaskModel":
        """Build from a :attr:`config_class` instance or its ``to_dict()`` (unknown keys refused)."""
        if not isinstance(config, cls.config_class):
            # Anything but a config_class instance is read as its to_dict() (from_dict refuses the rest).
            config = cls.config_class.from_dict(cast(Mapping[str, Any], config))
        return cls(**config.to_dict(), device=device, dtype=dtype)

    def config_dict(self) -> dict[str, Any]:
        """Constructor arguments as a JSON-serialisable dict (``type(model)(**model.config_dict())``)."""
        return self.config.to_dict()

    @property
    def needs_pseudo_labels(self) -> bool:
        """Whether :meth:`loss` needs ``pseudo_targets`` (stage 1 of the recipe must run)."""
        return False

    def _pseudo_refusal(self) -> str:
        return f"{type(self).__name__} has no pseudo branch"

    def pseudo_target_shape(self, batch: int) -> tuple[int, int]:
        """Shape of :meth:`loss`'s ``pseudo_targets`` for a batch of ``batch`` rows: ``(B, C)``,
        or for retrieval the teachers' ``(B, B)`` video-to-caption similarities."""
        return (batch, batch) if self.task == "retrieval" else (batch, self.num_outputs)

    def encode_text(self, text: Tensor, text_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Caption token features ``(B, t, d_text)`` -> L2-normalised ``(B, E)`` (retrieval only)."""
        if self.text_encoder is None:
            raise RuntimeError(
                f"encode_text: this model has no text side (task={self.task!r}, text_dim={self.text_dim}); "
                "only a task='retrieval' model with a text_dim has one"
            )
        return self.text_encoder(text, text_padding_mask)

    def text_embeddings(self, targets: Tensor, text_padding_mask: Optional[Tensor]) -> Optional[Tensor]:
        """The checked captions' embeddings for retrieval (the targets the video side ranks), else None."""
        if self.task != "retrieval":
            return None
        assert self.text_encoder is not None, "a retrieval model has a text side"
        return self.text_encoder.forward_checked(targets, text_padding_mask)

    def supervised_loss(self, outputs: Tensor, targets: Tensor, text_emb: Optional[Tensor]) -> Tensor:
        """Ground-truth loss of one branch's ``(B, C)`` outputs (:meth:`TaskLoss.supervised
        <umilayers.losses.TaskLoss.supervised>`); for retrieval ranked against ``text_emb``."""
        if self.task == "retrieval":
            assert text_emb is not None, "retrieval ranks against the caption embeddings"
            return self.task_loss.supervised_checked(outputs, text_emb)
        return self.task_loss.supervised_checked(outputs, targets)

    def loss(
        self,
        output: UMIOutput,
        targets: Tensor,
        pseudo_targets: Optional[Tensor] = None,
        *,
        text_padding_mask: Optional[Tensor] = None,
        check_values: bool = False,
    ) -> LossOutput:
        """The training loss of this model's :meth:`forward` output (see the class's docs).

        Args:
            output: this model's :meth:`forward` output.
            targets: classification ``(B,)`` int64 labels; regression ``(B, C)``; retrieval the
                caption token features ``(B, t, d_text)``.
            pseudo_targets: pseudo-labels, required exactly when :attr:`needs_pseudo_labels`:
                ``(B, C)`` class probabilities or values from the
                :class:`~umilayers.pseudo_labels.PseudoLabelBank`; for retrieval ``(B, B)``
                teacher similarities ``cos(video_i, caption_j)``, or ``(B, E)`` pseudo-label
                embeddings with ``retrieval_pseudo="paper"`` (:meth:`pseudo_target_shape`).
            text_padding_mask: ``(B, t)`` bool for retrieval captions, True = padding.
            check_values: also check what needs the values (label range, NaN/inf), which reads
                them back to the host.

        Returns:
            :class:`LossOutput` with the total and the unweighted terms.
        """
        batch = output.branch_outputs.shape[0]
        if self.task == "retrieval" and self.text_encoder is None:
            raise RuntimeError(f"loss: this model has no text side to rank captions with (text_dim="
                               f"{self.text_dim}); build it with the captions' text_dim")
        _check_targets(self.task, targets, batch, self.num_outputs, self.text_dim, check_values)
        if text_padding_mask is not None:
            if self.task != "retrieval":
                raise ValueError(f"text_padding_mask: only used by task='retrieval', this model is {self.task!r}")
            check_bool_mask("text_padding_mask", text_padding_mask, (batch, targets.shape[1]))
        if self.needs_pseudo_labels:
            if pseudo_targets is None:
                raise ValueError("pseudo_targets: required when use_pseudo=True (the pseudo branch's targets)")
            _check_pseudo(pseudo_targets, self.pseudo_target_shape(batch), check_values)
        elif pseudo_targets is not None:
            raise ValueError(f"pseudo_targets: {self._pseudo_refusal()} and takes no pseudo-labels")
        return self.loss_terms(output, targets, pseudo_targets, text_padding_mask)

    def loss_terms(
        self, output: UMIOutput, targets: Tensor, pseudo_targets: Optional[Tensor], text_padding_mask: Optional[Tensor]
    ) -> LossOutput:
        """The terms of :meth:`loss` for checked arguments."""
        raise NotImplementedError


def supervised_only(supervised: Tensor) -> LossOutput:
    """A :class:`LossOutput` whose total is the supervised term (``align`` and ``pseudo`` are 0)."""
    zero = supervised.new_zeros(())
    return LossOutput(total=supervised, align=zero, supervised=supervised, pseudo=zero)


# --------------------------------------------------------------------------------------------
# The model


class UnseenModalityModel(TaskModel):
    """The paper's model: per-modality projection, common-space sum, dual-branch fusion, head.

    1. ``FeatureProjection`` per modality (``nn.ModuleDict``, sorted names) maps the ``B_m``
       rows that have the modality to ``(B_m, K, D)``; it never runs for an absent modality.
    2. ``CommonSpaceSum`` adds them per sample: ``(B, K, D)`` (its kernel
       :func:`~umilayers.fusion.fuse_rows`: the batch was checked once, at this model's boundary).
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
      it; the class's token for classification, the nearest token otherwise. ``align_reduction``
      says how the squared distances of the (sample, modality) pairs are reduced: by default per
      modality the batch mean, averaged over the modalities in the batch; ``"modality_sum"`` is
      Eq. 1 as the paper writes it (summed over the modalities), ``"elementwise_mean"`` the mean
      over the pairs and the ``D`` features, as the authors' released code computes it (the
      scale its ``lambda = 0.001`` was set for).
    - ``L_supervised``: on branch 0 against the ground truth (CE / MSE / triplet).
    - ``L_pseudo``: on branches 1..G-1 (mean) against the pseudo-labels: KL (by default each
      sample's KL averaged over the batch; ``pseudo_reduction="elementwise_mean"`` is the
      released code's mean over batch x classes, the scale of its ``alpha = 3000`` on
      EPIC-Kitchens), MSE, or for retrieval the distillation of the teachers' similarities
      (``retrieval_pseudo="relational"``) or the paper's triplet (``"paper"``).

    Ablation switches (the paper's Tables 2-3), fields of :class:`ModelConfig` but the last:

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
    video-text cosine similarity matrix; the pseudo loss the distillation of the teachers'
    ``(B, B)`` video-to-caption similarities
    (:func:`~umilayers.losses.similarity_distillation_loss`, ``retrieval_pseudo="relational"``)
    or, with ``retrieval_pseudo="paper"``, the triplet between the pseudo branch's video
    embeddings and ``(B, E)`` pseudo-label embeddings (:meth:`TaskLoss.pseudo
    <umilayers.losses.TaskLoss.pseudo>`).

    ``forward`` and :meth:`loss` check types and shapes; ``check_values=True`` adds what needs the
    values (masks against rows, label ranges, NaN/inf), which reads them back to the host.

    Args:
        modality_dims: modality name -> feature size ``d_m``.
        num_outputs: classes, regression targets, or embedding size ``E``.
        task: ``"classification"``, ``"regression"`` or ``"retrieval"``.
        dim: common width ``D``.
        num_tokens: common slots ``K`` (divisible by ``branches``).
        projection_depth: transformer layers inside each ``FeatureProjection``.
        fusion_depth: layers of the fusion ``GroupMaskedTransformer`` (at least 1).
        heads: attention heads of both transformers.
        head_dim: width of each head (default ``dim // heads``).
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
        align_reduction: how ``L_align`` reduces over (sample, modality) pairs
            (:data:`ALIGN_MODALITY_REDUCTIONS`).
        pseudo_reduction: reduction of the classification pseudo loss
            (:func:`~umilayers.losses.classification_pseudo_loss`).
        retrieval_pseudo: retrieval pseudo-labels and loss, ``"relational"`` or ``"paper"``.
        positions: not in the paper: token positions inside each ``FeatureProjection``: None
            (default, any ``k_m``), ``"learned"`` (a table per modality, as the authors' released
            code; needs ``modality_tokens``). The pooled projection mean-pools
            the tokens and has none.
        modality_tokens: modality -> the most tokens it has (the learned tables' length).
        feature_norm: not in the paper: a ``LayerNorm(D)`` per modality on its projected
            features before the sum (the authors' released code normalises each modality's
            reorganised features this way); default off.
        projection_norms: not in the paper: the released code's LayerNorms inside each
            ``FeatureProjection`` (its ``norms``); default off.
        label_smoothing: not in the paper: of the supervised cross-entropy (the released code:
            0.1; :func:`~umilayers.losses.classification_loss`); default 0.
        ensemble_subsets: not in the paper: modality subsets (say, the training splits' modality
            sets); in eval mode a row gets the average of its fused prediction and of the model's
            predictions from each listed subset that it has a strict superset of (inputs like
            those training saw; the sum of an unseen combination is not). Training is unchanged;
            ``branch_outputs`` stay the fused ones. Default None (off).
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

    config: UMIConfig
    config_class = UMIConfig

    def __init__(
        self,
        modality_dims: Mapping[str, int],
        num_outputs: int,
        task: str = "classification",
        *,
        device=None,
        dtype=None,
        **options: Any,
    ) -> None:
        super().__init__()
        # The fields of UMIConfig are the arguments: one spelling, one default, one check each.
        cfg = UMIConfig(modality_dims=modality_dims, num_outputs=num_outputs, task=task, **options)
        self.config = cfg
        self.modality_dims, self.task, self.num_outputs, self.text_dim = (
            cfg.modality_dims, cfg.task, cfg.num_outputs, cfg.text_dim)
        factory = {"device": device, "dtype": dtype}
        dim, tokens = cfg.dim, cfg.num_tokens
        self.projections = nn.ModuleDict()
        for m, d_m in cfg.modality_dims.items():
            if cfg.projection == "feature":
                self.projections[m] = FeatureProjection(
                    d_m, out_dim=dim, num_tokens=tokens, depth=cfg.projection_depth, heads=cfg.heads,
                    normalize=cfg.normalize, mlp_ratio=cfg.mlp_ratio, head_dim=cfg.head_dim,
                    positions=cfg.positions, max_tokens=(cfg.modality_tokens or {}).get(m), norms=cfg.projection_norms,
                    **factory,
                )
            else:
                self.projections[m] = PooledProjection(d_m, out_dim=dim, num_tokens=tokens, **factory)
        self.feature_norms: Optional[nn.ModuleDict] = None
        if cfg.feature_norm:
            self.feature_norms = nn.ModuleDict({m: nn.LayerNorm(dim, **factory) for m in cfg.modality_dims})
        self.positions = nn.Parameter(torch.zeros(tokens, dim, **factory))
        self.readout = nn.Parameter(torch.zeros(cfg.branches, dim, **factory))
        nn.init.trunc_normal_(self.positions, std=0.02)
        nn.init.trunc_normal_(self.readout, std=0.02)
        self.transformer = GroupMaskedTransformer(dim, cfg.fusion_depth, cfg.heads, cfg.mlp_ratio,
                                                  groups=cfg.branches, head_dim=cfg.head_dim, **factory)
        self.head = nn.Sequential(nn.LayerNorm(dim, **factory), nn.Linear(dim, cfg.num_outputs, **factory))
        self.alignment: Optional[AlignmentLoss] = None
        if cfg.use_alignment:
            assert cfg.num_align_tokens is not None, "UMIConfig.check fills in its default"
            self.alignment = AlignmentLoss(cfg.num_align_tokens, dim, assign=cfg.align_assign, **factory)
        self.text_encoder: Optional[TextEncoder] = None
        if cfg.task == "retrieval":
            assert cfg.text_dim is not None, "UMIConfig.check requires it for retrieval"
            self.text_encoder = TextEncoder(cfg.text_dim, cfg.num_outputs, **factory)
        self.task_loss = TaskLoss(cfg.task, cfg.margin, pseudo_reduction=cfg.pseudo_reduction,
                                  label_smoothing=cfg.label_smoothing)

    @property
    def modalities(self) -> list[str]:
        return list(self.config.modality_dims)

    @property
    def needs_pseudo_labels(self) -> bool:
        """Whether :meth:`loss` needs ``pseudo_targets`` (stage 1 of the recipe must run)."""
        return self.config.use_pseudo

    def _pseudo_refusal(self) -> str:
        return "this model has use_pseudo=False"

    def token_limits(self) -> dict[str, int]:
        """The learned position tables' lengths (``positions="learned"``)."""
        limits = {m: self._projection(m).max_tokens for m in self.projections}
        return {m: n for m, n in limits.items() if n is not None}

    def _projection(self, modality: str) -> FeatureProjection | PooledProjection:
        """The projection of ``modality`` (the ``projections`` dict holds one of these)."""
        return cast("FeatureProjection | PooledProjection", self.projections[modality])

    def pseudo_target_shape(self, batch: int) -> tuple[int, int]:
        """``(B, C)``; for retrieval ``(B, B)`` teacher similarities (``"relational"``) or
        ``(B, E)`` pseudo-label embeddings (``"paper"``)."""
        if self.task == "retrieval" and self.config.retrieval_pseudo == "relational":
            return (batch, batch)
        return (batch, self.num_outputs)

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

    def forward_checked(self, inputs: Mapping[str, Tensor], padding_masks: Mapping[str, Optional[Tensor]],
                        present: Mapping[str, Tensor], batch: int, check_values: bool) -> UMIOutput:
        """Projections of the rows that have each modality, their sum, the branches, the head."""
        features = {
            # Without return_weights a projection returns its output alone.
            m: cast(Tensor, self._projection(m).forward_checked(inputs[m], padding_masks.get(m)))
            for m in present
            if inputs[m].shape[0] > 0
        }
        if self.feature_norms is not None:
            features = {m: self.feature_norms[m](f) for m, f in features.items()}
        branch_outputs = self.fused_branches(features, present, batch)
        prediction = combine_branches(self.config.task, branch_outputs)
        if self.config.ensemble_subsets and not self.training and len(features) > 1:
            prediction = self.ensemble_with_subsets(prediction, features, present)
        return UMIOutput(
            prediction=prediction,
            branch_outputs=branch_outputs,
            modality_features=features,
            present=dict(present),
        )

    def fused_branches(self, features: Mapping[str, Tensor], present: Mapping[str, Tensor], batch: int) -> Tensor:
        """Common-space sum of the rows' features, branch tokens, fusion transformer, head: ``(B, G, C)``."""
        fused = fuse_rows(features, present, batch)
        # Only the readouts are read: the last layer computes their queries alone (exact).
        readouts = self.transformer(self.branch_tokens(fused), first_of_group=True)  # (B, G, D)
        branch_outputs = self.head(readouts)
        if self.config.task == "retrieval":
            branch_outputs = F.normalize(branch_outputs, dim=-1)
        return branch_outputs

    def ensemble_with_subsets(self, prediction: Tensor, features: Mapping[str, Tensor],
                              present: Mapping[str, Tensor]) -> Tensor:
        """Average ``prediction`` ``(B, C)`` with the predictions from each of ``ensemble_subsets``
        on the rows that have that subset and more (evaluation only: reads masks on the host)."""
        assert self.config.ensemble_subsets is not None
        total, count = prediction.clone(), torch.ones_like(prediction[:, :1])
        for subset in self.config.ensemble_subsets:
            if any(m not in features for m in subset):
                continue
            inside = torch.stack([present[m] for m in subset]).all(dim=0)
            others = [present[m] for m in features if m not in subset]
            selected = inside & torch.stack(others).any(dim=0) if others else torch.zeros_like(inside)
            rows = selected.nonzero().flatten()
            if rows.numel() == 0:
                continue
            part = {m: features[m][selected[present[m]]] for m in subset}  # the subset's rows of each sub-batch
            alone = self.fused_branches(part, {m: torch.ones_like(rows, dtype=torch.bool) for m in subset},
                                        rows.numel())
            total = total.index_add(0, rows, combine_branches(self.config.task, alone))
            count = count.index_add(0, rows, torch.ones_like(total[rows, :1]))
        mean = total / count
        return F.normalize(mean, dim=-1) if self.config.task == "retrieval" else mean

    def pseudo_loss(self, outputs: Tensor, pseudo_targets: Tensor, text_emb: Optional[Tensor]) -> Tensor:
        """Pseudo-label loss of one branch's outputs.

        Classification and regression: :meth:`TaskLoss.pseudo <umilayers.losses.TaskLoss.pseudo>`.
        Retrieval, ``"relational"``: :func:`~umilayers.losses.similarity_distillation_loss` of
        the branch's video embeddings against ``text_emb`` (this model's caption embeddings),
        with ``pseudo_targets`` the ``(B, B)`` similarities of the unimodal teachers, each in its
        own space; ``"paper"``: the triplet of :meth:`TaskLoss.pseudo
        <umilayers.losses.TaskLoss.pseudo>` against ``(B, E)`` pseudo-label embeddings.
        """
        if self.task == "retrieval" and self.config.retrieval_pseudo == "relational":
            assert text_emb is not None, "retrieval needs the caption embeddings"
            return distillation_checked(outputs, text_emb, pseudo_targets, RETRIEVAL_PSEUDO_TEMPERATURE)
        return self.task_loss.pseudo_checked(outputs, pseudo_targets)

    def loss_terms(
        self, output: UMIOutput, targets: Tensor, pseudo_targets: Optional[Tensor], text_padding_mask: Optional[Tensor]
    ) -> LossOutput:
        """Eq. 3: ``align_weight * L_align + L_supervised + pseudo_weight * L_pseudo``.

        ``L_supervised`` on branch 0 and ``L_pseudo`` averaged over branches 1.. (both on the one
        branch when ``branches=1``); without ``use_pseudo`` every branch learns from the ground
        truth.
        """
        cfg = self.config
        zero = output.branch_outputs.new_zeros(())
        align = self.alignment_loss(output, targets) if self.alignment is not None else zero
        text_emb = self.text_embeddings(targets, text_padding_mask)
        branches = output.branch_outputs
        if cfg.use_pseudo:
            assert pseudo_targets is not None
            supervised = self.supervised_loss(branches[:, 0], targets, text_emb)
            pseudo_branches = range(1, cfg.branches) if cfg.branches > 1 else [0]
            pseudo = torch.stack(
                [self.pseudo_loss(branches[:, g], pseudo_targets, text_emb) for g in pseudo_branches]
            ).mean()
        else:
            supervised = torch.stack(
                [self.supervised_loss(branches[:, g], targets, text_emb) for g in range(cfg.branches)]
            ).mean()
            pseudo = zero
        total = cfg.align_weight * align + supervised + cfg.pseudo_weight * pseudo
        return LossOutput(total=total, align=align, supervised=supervised, pseudo=pseudo)

    def alignment_loss(self, output: UMIOutput, targets: Tensor) -> Tensor:
        """``L_align`` over the modalities of the batch, each on its rows (``align_reduction``)."""
        if self.alignment is None:
            raise RuntimeError("alignment_loss: this model was built with use_alignment=False")
        reduction = self.config.align_reduction
        per_pair = "sum" if reduction == "elementwise_mean" else "mean"
        terms, pairs = [], 0
        for m, feats in output.modality_features.items():
            labels = None
            if self.config.task == "classification":
                labels = targets[sub_batch_rows(output.present[m], feats.shape[0])[0]]
            terms.append(self.alignment.forward_checked(feats, labels, per_pair))
            pairs += feats.shape[0]
        total = torch.stack(terms)
        if reduction == "elementwise_mean":  # the released code: a mean over pairs and features
            return total.sum() / max(pairs * self.config.dim, 1)
        return total.sum() if reduction == "modality_sum" else total.mean()
