"""Baselines of the paper (Table 4), with the forward/loss interface of :class:`UnseenModalityModel`.

Every model here takes the sub-batch layout of ``docs/contracts.md`` (``inputs[m]`` holds the
rows that have m, ``present[m]`` says which) and returns a :class:`~umilayers.model.UMIOutput`
with one branch; they derive from :class:`~umilayers.model.TaskModel`, so
``loss(output, targets, pseudo_targets=None, *, text_padding_mask=None)`` returns a
:class:`~umilayers.model.LossOutput` (``align`` and ``pseudo`` are 0: no baseline uses them, and
``pseudo_targets`` must be None — check ``model.needs_pseudo_labels``). So one training recipe
serves them all; :func:`build_model` maps the recipe's method names (:data:`METHODS`) to modules,
with the hyper-parameters of a :class:`~umilayers.model.ModelConfig`.

Shape letters: ``B`` batch, ``B_m`` rows that have modality m, ``k_m`` its tokens, ``d_m`` its
feature size, ``D`` width, ``C`` outputs, ``t`` caption tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umilayers._config import Config, option
from umilayers._validation import check_bool_mask, check_choice, check_positive_int
from umilayers.attention import GroupMaskedTransformer
from umilayers.fusion import sub_batch_rows
from umilayers.losses import TASKS, TaskLoss
from umilayers.model import (
    LossOutput,
    ModelConfig,
    TaskModel,
    TextEncoder,
    UMIOutput,
    UnseenModalityModel,
    _check_modality_dims,
    _check_modality_tokens,
    _check_text_dim,
    check_batch,
    combine_branches,
    masked_mean,
    supervised_only,
)
from umilayers.projection import POSITIONS, add_positions, position_table

__all__ = [
    "METHODS",
    "PREDICTORS",
    "UnimodalConfig",
    "LateFusionConfig",
    "VanillaConfig",
    "UnimodalModel",
    "LateFusion",
    "VanillaTransformer",
    "build_model",
    "model_spec",
    "model_from_spec",
]

#: The recipe's methods, each a model :func:`build_model` makes.
METHODS = ("umi", "late-fusion", "vanilla", "pooled", "unimodal")
#: Predictors of the unimodal models: mean-pooled tokens and a linear head (the paper's), a
#: transformer over the tokens (the recipe's default), an MLP on the flattened tokens (a plain
#: baseline that sees every token at its position).
PREDICTORS = ("linear", "transformer", "mlp")


def _mlp(in_width: int, hidden: int, depth: int, out_width: int, factory: Mapping[str, Any]) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden`` (GELU), then a linear output."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_width if i == 0 else hidden, hidden, **factory), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(hidden, out_width, **factory))


# --------------------------------------------------------------------------------------------
# Configs: each baseline's constructor arguments, one field each (checked once, when built)


def _check_predictor(predictor: str, positions: Optional[str], max_tokens: Mapping[str, Optional[int]]) -> None:
    """What a unimodal predictor needs: an MLP its input length, learned positions their tables'
    (the head width is the transformer's own check)."""
    for m, tokens in max_tokens.items():
        if tokens is not None:
            check_positive_int(m, tokens)
        elif predictor == "mlp":
            raise ValueError(f"{m}: required with predictor='mlp' (the MLP's input is that many tokens wide)")
        elif predictor == "transformer" and positions == "learned":
            raise ValueError(f"{m}: required with positions='learned' (the position table's length)")


@dataclass(frozen=True)
class UnimodalConfig(Config):
    """The arguments of :class:`UnimodalModel` (see there).

    Example::

        >>> UnimodalConfig("rgb", 12, 5, predictor="mlp")
        Traceback (most recent call last):
        ...
        ValueError: max_tokens: required with predictor='mlp' (the MLP's input is that many tokens wide)
    """

    modality: str
    in_dim: int
    num_outputs: int
    task: str = option("classification", choices=TASKS)
    predictor: str = option(PREDICTORS[0], choices=PREDICTORS)
    dim: int = option(ModelConfig.dim, minimum=1)
    depth: int = option(2, minimum=1)
    heads: int = option(ModelConfig.heads, minimum=1)
    text_dim: Optional[int] = option(None, minimum=1)
    margin: float = option(ModelConfig.margin, minimum=0)
    head_dim: Optional[int] = option(ModelConfig.head_dim, minimum=1)
    max_tokens: Optional[int] = option(None, minimum=1)
    positions: Optional[str] = option(None, choices=POSITIONS[1:])

    def check(self) -> None:
        if not isinstance(self.modality, str) or not self.modality:
            raise ValueError(f"modality: expected a non-empty name, got {self.modality!r}")
        check_positive_int("in_dim", self.in_dim)
        check_positive_int("num_outputs", self.num_outputs)
        _check_text_dim(self.task, self.text_dim, required=False)
        _check_predictor(self.predictor, self.positions, {"max_tokens": self.max_tokens})


@dataclass(frozen=True)
class LateFusionConfig(Config):
    """The arguments of :class:`LateFusion` (see there).

    Example::

        >>> LateFusionConfig({"rgb": 12, "audio": 6}, 5, predictor="mlp", modality_tokens={"rgb": 7})
        Traceback (most recent call last):
        ...
        ValueError: modality_tokens: no length for modalities ['audio'] (expected one for each of ['audio', 'rgb'])
    """

    modality_dims: Mapping[str, int]
    num_outputs: int
    task: str = option("classification", choices=TASKS)
    predictor: str = option(PREDICTORS[0], choices=PREDICTORS)
    dim: int = option(ModelConfig.dim, minimum=1)
    depth: int = option(2, minimum=1)
    heads: int = option(ModelConfig.heads, minimum=1)
    text_dim: Optional[int] = option(None, minimum=1)
    margin: float = option(ModelConfig.margin, minimum=0)
    head_dim: Optional[int] = option(ModelConfig.head_dim, minimum=1)
    modality_tokens: Optional[Mapping[str, int]] = None
    positions: Optional[str] = option(None, choices=POSITIONS[1:])

    def check(self) -> None:
        object.__setattr__(self, "modality_dims", _check_modality_dims(self.modality_dims))
        check_positive_int("num_outputs", self.num_outputs)
        _check_text_dim(self.task, self.text_dim)
        tokens = _check_modality_tokens(self.modality_tokens, self.modality_dims)
        object.__setattr__(self, "modality_tokens", tokens)
        _check_predictor(self.predictor, self.positions,
                         {f"modality_tokens[{m!r}]": (tokens or {}).get(m) for m in self.modality_dims})


@dataclass(frozen=True)
class VanillaConfig(Config):
    """The arguments of :class:`VanillaTransformer` (see there).

    Example::

        >>> VanillaConfig({"rgb": 12, "audio": 6}, 5, missing_tokens=3).lengths()
        {'audio': 3, 'rgb': 3}
    """

    modality_dims: Mapping[str, int]
    num_outputs: int
    task: str = option("classification", choices=TASKS)
    dim: int = option(ModelConfig.dim, minimum=1)
    depth: int = option(ModelConfig.fusion_depth, minimum=1)
    heads: int = option(ModelConfig.heads, minimum=1)
    missing_tokens: Union[int, Mapping[str, int]] = 1
    mlp_ratio: float = option(ModelConfig.mlp_ratio, minimum=0, strict=True)
    text_dim: Optional[int] = option(None, minimum=1)
    margin: float = option(ModelConfig.margin, minimum=0)
    head_dim: Optional[int] = option(ModelConfig.head_dim, minimum=1)
    positions: Optional[str] = option(None, choices=POSITIONS[1:])

    def check(self) -> None:
        object.__setattr__(self, "modality_dims", _check_modality_dims(self.modality_dims))
        check_positive_int("num_outputs", self.num_outputs)
        _check_text_dim(self.task, self.text_dim)
        if isinstance(self.missing_tokens, Mapping):
            missing = _check_modality_tokens(self.missing_tokens, self.modality_dims, name="missing_tokens")
            object.__setattr__(self, "missing_tokens", missing)
        else:
            check_positive_int("missing_tokens", self.missing_tokens)
            if self.positions == "learned":
                raise ValueError("missing_tokens: learned positions need each modality's most tokens (a mapping), "
                                 f"got {self.missing_tokens!r}")

    def lengths(self) -> dict[str, int]:
        """The learned sequence's length standing in for each missing modality."""
        if isinstance(self.missing_tokens, Mapping):
            return dict(self.missing_tokens)
        return {m: self.missing_tokens for m in self.modality_dims}


class _SupervisedOnly(TaskModel):
    """Baselines whose loss is the supervised loss of their one branch."""

    def loss_terms(
        self, output: UMIOutput, targets: Tensor, pseudo_targets: Optional[Tensor], text_padding_mask: Optional[Tensor]
    ) -> LossOutput:
        """Supervised loss only (CE / MSE / triplet) of the one branch."""
        text_emb = self.text_embeddings(targets, text_padding_mask)
        return supervised_only(self.supervised_loss(output.branch_outputs[:, 0], targets, text_emb))


class UnimodalModel(_SupervisedOnly):
    """One modality's tokens to a prediction: the unimodal baseline and stage 1 of the recipe.

    ``predictor="linear"`` (the paper's unimodal baseline): masked mean pool over the tokens,
    then ``Linear(d_m, C)``. ``predictor="transformer"``: ``Linear(d_m, D)``, a readout token,
    ``depth`` transformer layers over the tokens (padding masked), ``LayerNorm + Linear(D, C)``
    on the readout; it sees token-level structure that mean pooling destroys, so it usually gives
    better pseudo-labels at a higher cost. ``predictor="mlp"`` (a plain baseline): the tokens,
    padding zeroed and padded to ``max_tokens``, flattened, then ``depth`` hidden layers of width
    ``2 D`` (GELU) and a linear output; it sees every token at its position.

    Every row of a batch must have the modality (select the rows with ``present[modality]``
    first); other modalities in ``inputs`` are ignored. Retrieval outputs are L2-normalised
    embeddings; with ``text_dim`` the model also has a :class:`~umilayers.model.TextEncoder`
    and :meth:`loss` works (without it, only embeddings: what :class:`LateFusion` uses).

    Args:
        modality: the modality's name.
        in_dim: its feature size ``d_m``.
        num_outputs: classes, regression targets, or embedding size ``E``.
        task: ``"classification"``, ``"regression"`` or ``"retrieval"``.
        predictor: ``"linear"``, ``"transformer"`` or ``"mlp"`` (needs ``max_tokens``).
        dim: width ``D`` of the transformer predictor (``2 D``: the MLP's hidden width).
        depth: its layers.
        heads: its attention heads.
        head_dim: the width of each head (default ``dim // heads``).
        text_dim: caption feature size (retrieval).
        margin: triplet margin (retrieval).
        max_tokens: the most tokens an input may have (the MLP's input is ``max_tokens * d_m``
            wide; the learned position table's length).
        positions: not in the paper: token positions of the transformer predictor, None
            (default) or ``"learned"`` (needs ``max_tokens``)
            (:func:`~umilayers.projection.add_positions`); the other predictors ignore it.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - inputs[modality]: ``(B, k_m, d_m)``; padding_masks[modality]: ``(B, k_m)``
        - output: :class:`~umilayers.model.UMIOutput` with prediction ``(B, C)``,
          branch_outputs ``(B, 1, C)``, modality_outputs[modality] ``(B, C)``

    Example::

        >>> import torch
        >>> model = UnimodalModel("rgb", in_dim=12, num_outputs=5)
        >>> out = model({"rgb": torch.randn(3, 7, 12)})
        >>> out.prediction.shape, out.branch_outputs.shape
        (torch.Size([3, 5]), torch.Size([3, 1, 5]))
        >>> model.loss(out, torch.tensor([0, 1, 4])).total.backward()
    """

    config_class = UnimodalConfig

    def __init__(self, *args: Any, device=None, dtype=None, **kwargs: Any) -> None:
        super().__init__()
        cfg = self.config = UnimodalConfig(*args, **kwargs)
        factory = {"device": device, "dtype": dtype}
        self.modality, self.in_dim, self.num_outputs = cfg.modality, cfg.in_dim, cfg.num_outputs
        self.modality_dims = {cfg.modality: cfg.in_dim}
        self.task, self.predictor, self.text_dim = cfg.task, cfg.predictor, cfg.text_dim
        # pooled / flattened tokens: no positions
        self.max_tokens, self.positions = cfg.max_tokens, cfg.positions if cfg.predictor == "transformer" else None
        self.head: nn.Module
        if cfg.predictor == "linear":
            self.head = nn.Linear(cfg.in_dim, cfg.num_outputs, **factory)
        elif cfg.predictor == "mlp":
            assert cfg.max_tokens is not None, "UnimodalConfig checks it"
            self.head = _mlp(cfg.max_tokens * cfg.in_dim, 2 * cfg.dim, cfg.depth, cfg.num_outputs, factory)
        else:
            self.embed = nn.Linear(cfg.in_dim, cfg.dim, **factory)
            self.pos_embed = position_table(self.positions, cfg.max_tokens, cfg.dim, **factory)
            self.readout = nn.Parameter(torch.zeros(1, 1, cfg.dim, **factory))
            nn.init.trunc_normal_(self.readout, std=0.02)
            self.transformer = GroupMaskedTransformer(cfg.dim, cfg.depth, cfg.heads, groups=1, head_dim=cfg.head_dim,
                                                      **factory)
            self.head = nn.Sequential(nn.LayerNorm(cfg.dim, **factory), nn.Linear(cfg.dim, cfg.num_outputs, **factory))
        self.text_encoder = TextEncoder(cfg.text_dim, cfg.num_outputs, **factory) if cfg.text_dim is not None else None
        self.task_loss = TaskLoss(cfg.task, cfg.margin)

    def extra_repr(self) -> str:
        return f"modality={self.modality!r}, task={self.task!r}, predictor={self.predictor!r}"

    def predict(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """``(B, k_m, d_m)`` tokens -> ``(B, C)`` outputs (normalised embeddings for retrieval); no checks."""
        if self.predictor == "linear":
            out = self.head(masked_mean(x, padding_mask))
        elif self.predictor == "mlp":
            assert self.max_tokens is not None
            if padding_mask is not None:
                x = x.masked_fill(padding_mask[..., None], 0.0)
            out = self.head(F.pad(x, (0, 0, 0, self.max_tokens - x.shape[1])).flatten(1))
        else:
            if padding_mask is not None:
                x = x.masked_fill(padding_mask[..., None], 0.0)
            h = add_positions(self.embed(x), self.positions, self.pos_embed)
            h = torch.cat([self.readout.expand(h.shape[0], -1, -1), h], dim=1)
            mask = None
            if padding_mask is not None:
                mask = F.pad(padding_mask, (1, 0), value=False)
            out = self.head(self.transformer(h, padding_mask=mask, first_of_group=True)[:, 0])
        return F.normalize(out, dim=-1) if self.task == "retrieval" else out

    def check_inputs(
        self, inputs: Any, padding_masks: Any, present: Any, check_values: bool
    ) -> tuple[int, dict[str, Tensor]]:
        """Only this model's modality counts, and every row must have it (other modalities in
        ``inputs`` are ignored); ``check_values=True`` checks ``present`` says so (a host read)."""
        m = self.modality
        if not isinstance(inputs, Mapping) or m not in inputs:
            got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise ValueError(f"inputs: UnimodalModel({m!r}) needs modality {m!r}, got {got}")
        own_present = None
        if present is not None:
            if not isinstance(present, Mapping) or m not in present:
                raise ValueError(f"present: expected a mapping with a mask for {m!r}")
            own_present = {m: present[m]}
            check_bool_mask(f"present[{m!r}]", present[m], (None,))
            lacking = int((~present[m]).sum()) if check_values else 0
            if lacking:
                raise ValueError(
                    f"present[{m!r}]: UnimodalModel({m!r}) needs the modality on every row; {lacking} of "
                    f"{present[m].shape[0]} rows lack it (select the rows with present[{m!r}])"
                )
        own_masks = None
        if padding_masks is not None and padding_masks.get(m) is not None:
            own_masks = {m: padding_masks[m]}
        return check_batch({m: inputs[m]}, own_masks, own_present, {m: self.in_dim}, max_tokens=self.token_limits(),
                           check_values=check_values)

    def token_limits(self) -> dict[str, int]:
        """The MLP's input length or the learned position table's, where the predictor has one."""
        sized = self.predictor == "mlp" or self.positions == "learned"
        return {self.modality: self.max_tokens} if sized and self.max_tokens is not None else {}

    def forward_checked(self, inputs: Mapping[str, Tensor], padding_masks: Mapping[str, Optional[Tensor]],
                        present: Mapping[str, Tensor], batch: int, check_values: bool) -> UMIOutput:
        """The predictor on this model's modality: one branch."""
        m = self.modality
        out = self.predict(inputs[m], padding_masks.get(m))
        branch = out[:, None]
        return UMIOutput(
            prediction=combine_branches(self.task, branch),
            branch_outputs=branch,
            present=dict(present),
            modality_outputs={m: out},
        )


class LateFusion(TaskModel):
    """Late fusion: one :class:`UnimodalModel` per modality, predictions averaged per sample.

    Each member runs on (and is trained on) only the rows that have its modality; a sample's
    prediction is the average of its members' predictions over the modalities it has:
    class probabilities for classification (``branch_outputs`` then holds the log of the
    average, valid logits), values for regression, and for retrieval the L2-normalised mean of
    the members' embeddings. For retrieval the members share one
    :class:`~umilayers.model.TextEncoder`, so their embeddings live in one space. The loss is
    the mean over the modalities in the batch of each member's supervised loss on its rows.

    Args:
        modality_dims: modality name -> ``d_m``.
        num_outputs: classes, regression targets, or embedding size ``E``.
        task: ``"classification"``, ``"regression"`` or ``"retrieval"``.
        predictor: the members' predictor, ``"linear"``, ``"transformer"`` or ``"mlp"`` (needs
            ``modality_tokens``).
        dim: width of a transformer predictor.
        depth: its layers.
        heads: its heads.
        text_dim: caption feature size (retrieval, required there).
        margin: triplet margin (retrieval).
        head_dim: the width of each head of a transformer predictor (default ``dim // heads``).
        modality_tokens: modality -> the most tokens it has (the MLP members' input length, the
            learned position tables' length).
        positions: the transformer members' token positions (see :class:`UnimodalModel`).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - inputs[m]: ``(B_m, k_m, d_m)``; padding_masks[m]: ``(B_m, k_m)``; present[m]: ``(B,)``
        - output: prediction ``(B, C)``, branch_outputs ``(B, 1, C)``,
          modality_outputs[m] ``(B_m, C)``

    Example::

        >>> import torch
        >>> model = LateFusion({"rgb": 12, "audio": 6}, num_outputs=5)
        >>> present = {"rgb": torch.tensor([True, True, False]), "audio": torch.tensor([False, True, True])}
        >>> out = model({"rgb": torch.randn(2, 7, 12), "audio": torch.randn(2, 3, 6)}, present=present)
        >>> out.prediction.shape, torch.allclose(out.prediction.sum(-1), torch.ones(3))
        (torch.Size([3, 5]), True)
    """

    config_class = LateFusionConfig

    def __init__(self, *args: Any, device=None, dtype=None, **kwargs: Any) -> None:
        super().__init__()
        cfg = self.config = LateFusionConfig(*args, **kwargs)
        factory = {"device": device, "dtype": dtype}
        self.modality_dims, self.num_outputs, self.task, self.text_dim = (
            cfg.modality_dims, cfg.num_outputs, cfg.task, cfg.text_dim)
        tokens = cfg.modality_tokens or {}
        self.members = nn.ModuleDict({
            m: UnimodalModel(m, d, cfg.num_outputs, cfg.task, predictor=cfg.predictor, dim=cfg.dim, depth=cfg.depth,
                             heads=cfg.heads, margin=cfg.margin, head_dim=cfg.head_dim, max_tokens=tokens.get(m),
                             positions=cfg.positions, **factory)
            for m, d in cfg.modality_dims.items()
        })
        self.text_encoder = None
        if cfg.task == "retrieval":
            assert cfg.text_dim is not None, "the config requires it for retrieval"
            self.text_encoder = TextEncoder(cfg.text_dim, cfg.num_outputs, **factory)
        self.task_loss = TaskLoss(cfg.task, cfg.margin)

    def token_limits(self) -> dict[str, int]:
        """The members' limits (an MLP's input length, a learned position table's)."""
        return {m: limit for member in self.members.values()
                for m, limit in cast(UnimodalModel, member).token_limits().items()}

    def forward_checked(self, inputs: Mapping[str, Tensor], padding_masks: Mapping[str, Optional[Tensor]],
                        present: Mapping[str, Tensor], batch: int, check_values: bool) -> UMIOutput:
        """Average of the unimodal predictions over the modalities each sample has."""
        outputs = {
            m: cast(UnimodalModel, self.members[m]).predict(inputs[m], padding_masks.get(m))
            for m in present if inputs[m].shape[0] > 0
        }
        first = next(iter(outputs.values()))
        total = first.new_zeros(batch, self.num_outputs)
        count = first.new_zeros(batch, 1)
        for m, out in outputs.items():
            rows = sub_batch_rows(present[m], out.shape[0])[0]
            value = out.softmax(dim=-1) if self.task == "classification" else out
            total = total.index_add(0, rows, value)
            count = count.index_add(0, rows, torch.ones_like(out[:, :1]))
        mean = total / count
        if self.task == "classification":
            branch = mean.clamp_min(torch.finfo(mean.dtype).tiny).log()
            prediction = mean
        elif self.task == "retrieval":
            branch = prediction = F.normalize(mean, dim=-1)
        else:
            branch = prediction = mean
        return UMIOutput(prediction=prediction, branch_outputs=branch[:, None], present=dict(present),
                         modality_outputs=outputs)

    def loss_terms(
        self, output: UMIOutput, targets: Tensor, pseudo_targets: Optional[Tensor], text_padding_mask: Optional[Tensor]
    ) -> LossOutput:
        """Mean over modalities of each member's supervised loss on the rows having it."""
        text_emb = self.text_embeddings(targets, text_padding_mask)
        terms = []
        for m, out in output.modality_outputs.items():
            rows = sub_batch_rows(output.present[m], out.shape[0])[0]
            sub_text = text_emb[rows] if text_emb is not None else None
            terms.append(self.supervised_loss(out, targets[rows], sub_text))
        return supervised_only(torch.stack(terms).mean())


class VanillaTransformer(_SupervisedOnly):
    """Early-fusion transformer with learned tokens for missing modalities (Gabeur et al. style).

    Each modality's tokens are mapped by ``Linear(d_m, D)`` and get a learned modality
    embedding; a modality a sample lacks is replaced by a learned token sequence ``(n_m, D)``
    (``missing_tokens``, plus the same modality embedding). The sequences of every modality
    (sorted names) are concatenated after a readout token, with a padding mask where a
    modality's rows have fewer tokens than the longest; ``depth`` transformer layers
    (a :class:`~umilayers.attention.GroupMaskedTransformer` with one group) run over them, and
    ``LayerNorm + Linear(D, C)`` maps the readout to the output.

    Args:
        modality_dims: modality name -> ``d_m``.
        num_outputs: classes, regression targets, or embedding size ``E``.
        task: ``"classification"``, ``"regression"`` or ``"retrieval"``.
        dim: width ``D``.
        depth: transformer layers.
        heads: attention heads.
        missing_tokens: length of the learned sequence standing in for a missing modality;
            an int for all, or a mapping per modality (say, the store's token counts).
        mlp_ratio: MLP width relative to ``dim``.
        text_dim: caption feature size (retrieval, required there).
        margin: triplet margin (retrieval).
        head_dim: the width of each head (default ``dim // heads``).
        positions: not in the paper: token positions within each modality's sequence, None
            (default: only the modality embedding tells tokens apart), ``"learned"`` (one table
            per modality, as long as its ``missing_tokens``, which must then be a mapping: the
            store's token counts).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - inputs[m]: ``(B_m, k_m, d_m)``; padding_masks[m]: ``(B_m, k_m)``; present[m]: ``(B,)``
        - output: prediction ``(B, C)``, branch_outputs ``(B, 1, C)``

    Example::

        >>> import torch
        >>> model = VanillaTransformer({"rgb": 12, "audio": 6}, num_outputs=5, dim=16, depth=1,
        ...                            heads=2, missing_tokens={"rgb": 7, "audio": 3})
        >>> present = {"rgb": torch.tensor([True, False]), "audio": torch.tensor([False, True])}
        >>> out = model({"rgb": torch.randn(1, 7, 12), "audio": torch.randn(1, 3, 6)}, present=present)
        >>> out.prediction.shape
        torch.Size([2, 5])
    """

    config_class = VanillaConfig

    def __init__(self, *args: Any, device=None, dtype=None, **kwargs: Any) -> None:
        super().__init__()
        cfg = self.config = VanillaConfig(*args, **kwargs)
        factory = {"device": device, "dtype": dtype}
        dim, names, lengths = cfg.dim, list(cfg.modality_dims), cfg.lengths()
        self.modality_dims, self.num_outputs, self.task, self.text_dim = (
            cfg.modality_dims, cfg.num_outputs, cfg.task, cfg.text_dim)
        self.positions = cfg.positions
        self.max_tokens = lengths if cfg.positions == "learned" else None
        self.embed = nn.ModuleDict({m: nn.Linear(d, dim, **factory) for m, d in self.modality_dims.items()})
        self.modality_embed = nn.ParameterDict({m: nn.Parameter(torch.zeros(dim, **factory)) for m in names})
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.zeros(lengths[m], dim, **factory)) for m in names})
        self.pos_embed: Optional[nn.ParameterDict] = None
        if cfg.positions == "learned":
            self.pos_embed = nn.ParameterDict({m: position_table(cfg.positions, lengths[m], dim, **factory)
                                               for m in names})
        self.readout = nn.Parameter(torch.zeros(1, 1, dim, **factory))
        for p in [*self.modality_embed.values(), *self.missing.values(), self.readout]:
            nn.init.trunc_normal_(p, std=0.02)
        self.transformer = GroupMaskedTransformer(dim, cfg.depth, cfg.heads, cfg.mlp_ratio, groups=1,
                                                  head_dim=cfg.head_dim, **factory)
        self.head = nn.Sequential(nn.LayerNorm(dim, **factory), nn.Linear(dim, cfg.num_outputs, **factory))
        self.text_encoder = None
        if cfg.task == "retrieval":
            assert cfg.text_dim is not None, "the config requires it for retrieval"
            self.text_encoder = TextEncoder(cfg.text_dim, cfg.num_outputs, **factory)
        self.task_loss = TaskLoss(cfg.task, cfg.margin)

    def _modality_sequence(
        self, m: str, batch: int, x: Optional[Tensor], mask: Optional[Tensor], have: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(B, L_m, D)`` tokens and ``(B, L_m)`` padding: embedded rows where m is present, learned ones elsewhere."""
        missing = self.missing[m]
        rows_have, rows_miss = sub_batch_rows(have, 0 if x is None else x.shape[0])
        k_in = x.shape[1] if x is not None and rows_have.numel() else 0
        k_miss = missing.shape[0] if rows_miss.numel() else 0
        length = max(k_in, k_miss)
        tokens = missing.new_zeros(batch, length, missing.shape[1])
        padding = torch.ones(batch, length, dtype=torch.bool, device=missing.device)
        if k_in:
            assert x is not None, "k_in > 0 only with rows of m"
            if mask is not None:
                x = x.masked_fill(mask[..., None], 0.0)  # padding values are never read
            table = self.pos_embed[m] if self.pos_embed is not None else None
            h = F.pad(add_positions(self.embed[m](x), self.positions, table), (0, 0, 0, length - k_in))
            tokens = tokens.index_copy(0, rows_have, h)
            own = mask if mask is not None else torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            padding = padding.index_copy(0, rows_have, F.pad(own, (0, length - k_in), value=True))
        if k_miss:
            seq = F.pad(missing, (0, 0, 0, length - k_miss)).expand(rows_miss.numel(), -1, -1)
            tokens = tokens.index_copy(0, rows_miss, seq)
            fill = torch.arange(length, device=padding.device) >= k_miss
            padding = padding.index_copy(0, rows_miss, fill.expand(rows_miss.numel(), -1))
        return tokens + self.modality_embed[m], padding

    def token_limits(self) -> dict[str, int]:
        """The learned position tables' lengths (``positions="learned"``)."""
        return dict(self.max_tokens or {})

    def forward_checked(self, inputs: Mapping[str, Tensor], padding_masks: Mapping[str, Optional[Tensor]],
                        present: Mapping[str, Tensor], batch: int, check_values: bool) -> UMIOutput:
        """Fuse all modalities early; learned tokens stand in for the missing ones."""
        device = next(iter(present.values())).device
        sequences = [self.readout.expand(batch, -1, -1)]
        paddings = [torch.zeros(batch, 1, dtype=torch.bool, device=device)]
        for m in self.modality_dims:
            have = present.get(m, torch.zeros(batch, dtype=torch.bool, device=device))
            tokens, padding = self._modality_sequence(m, batch, inputs.get(m), padding_masks.get(m), have)
            sequences.append(tokens)
            paddings.append(padding)
        h = self.transformer(torch.cat(sequences, dim=1), padding_mask=torch.cat(paddings, dim=1), first_of_group=True)
        out = self.head(h[:, 0])
        if self.task == "retrieval":
            out = F.normalize(out, dim=-1)
        branch = out[:, None]
        return UMIOutput(prediction=combine_branches(self.task, branch), branch_outputs=branch, present=dict(present))


# --------------------------------------------------------------------------------------------
# Factory

_CLASSES: dict[str, type[TaskModel]] = {
    "UnseenModalityModel": UnseenModalityModel,
    "UnimodalModel": UnimodalModel,
    "LateFusion": LateFusion,
    "VanillaTransformer": VanillaTransformer,
}


def build_model(
    method: str,
    modality_dims: Mapping[str, int],
    num_outputs: int,
    task: str = "classification",
    *,
    config: Optional[ModelConfig] = None,
    text_dim: Optional[int] = None,
    modality_tokens: Optional[Mapping[str, int]] = None,
    modality: Optional[str] = None,
    predictor: str = PREDICTORS[0],
    ensemble_subsets: Optional[Sequence[Sequence[str]]] = None,
    device=None,
    dtype=None,
    **hyperparameters: Any,
) -> TaskModel:
    """Build the model of one of the recipe's methods (:data:`METHODS`).

    The hyper-parameters are a :class:`~umilayers.model.ModelConfig` (``config``, with any of its
    fields overridden by keyword: ``dim=16, fusion_depth=2, ...``); each model takes the ones it
    has:

    - ``"umi"``: :class:`~umilayers.model.UnseenModalityModel` with every field (and
      ``ensemble_subsets``, which only it takes).
    - ``"pooled"``: the same with ``projection="pooled"``.
    - ``"late-fusion"``: :class:`LateFusion` with ``predictor``; ``dim``, ``heads``, ``head_dim``,
      ``margin``, ``positions`` for a transformer predictor, and ``depth = projection_depth``
      (at least 1) for a transformer or MLP predictor; an MLP predictor and learned positions
      are sized by ``modality_tokens``.
    - ``"vanilla"``: :class:`VanillaTransformer` with ``dim``, ``heads``, ``head_dim``, ``mlp_ratio``,
      ``margin`` and ``depth = fusion_depth``; ``missing_tokens`` is ``modality_tokens`` (the
      store's token counts) when given.
    - ``"unimodal"``: :class:`UnimodalModel` of ``modality`` (optional when there is one),
      like a late-fusion member.

    Example::

        >>> model = build_model("vanilla", {"rgb": 12, "audio": 6}, num_outputs=5, dim=16, fusion_depth=1, heads=2)
        >>> type(model).__name__, model.needs_pseudo_labels
        ('VanillaTransformer', False)
        >>> spec = model_spec(model)
        >>> type(model_from_spec(spec)).__name__
        'VanillaTransformer'
    """
    check_choice("method", method, METHODS)
    hp = (config or ModelConfig()).replace(**hyperparameters)
    factory = {"device": device, "dtype": dtype}
    tokens = None if modality_tokens is None else dict(modality_tokens)
    if method in ("umi", "pooled"):
        projection = "pooled" if method == "pooled" else "feature"
        if method == "pooled":
            hp = hp.replace(positions=None)  # mean-pooled tokens: nothing to put positions on
        lengths = {"modality_tokens": tokens} if hp.positions == "learned" else {}
        return UnseenModalityModel(modality_dims, num_outputs, task, text_dim=text_dim, projection=projection,
                                   ensemble_subsets=ensemble_subsets, **lengths, **hp.to_dict(), **factory)
    if ensemble_subsets is not None:
        raise ValueError(f"ensemble_subsets: only methods 'umi' and 'pooled' take it, got method {method!r}")
    shared = {"dim": hp.dim, "heads": hp.heads, "head_dim": hp.head_dim, "margin": hp.margin, "text_dim": text_dim}
    if method == "vanilla":
        missing = {} if modality_tokens is None else {"missing_tokens": dict(modality_tokens)}
        return VanillaTransformer(modality_dims, num_outputs, task, depth=hp.fusion_depth, mlp_ratio=hp.mlp_ratio,
                                  positions=hp.positions, **missing, **shared, **factory)
    predictor_depth = {"depth": max(1, hp.projection_depth)} if predictor != "linear" else {}
    positions = hp.positions if predictor == "transformer" else None
    # the MLP's input width, the learned position tables' length
    sized = tokens is not None and (predictor == "mlp" or positions == "learned")
    if method == "late-fusion":
        tables = {"modality_tokens": tokens} if sized else {}
        return LateFusion(modality_dims, num_outputs, task, predictor, **predictor_depth, **tables, **shared,
                          positions=positions, **factory)
    if modality is None:
        if len(modality_dims) != 1:
            raise ValueError(f"modality: method 'unimodal' needs one of {sorted(modality_dims)}")
        modality = next(iter(modality_dims))
    if modality not in modality_dims:
        raise ValueError(f"modality: unknown modality {modality!r}; known {sorted(modality_dims)}")
    max_tokens = {"max_tokens": tokens[modality]} if sized and tokens is not None else {}
    return UnimodalModel(modality, modality_dims[modality], num_outputs, task, predictor,
                         **predictor_depth, **max_tokens, **shared, positions=positions, **factory)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable ``{"class": name, "config": constructor kwargs}`` (for checkpoints)."""
    name = type(model).__name__
    if name not in _CLASSES or not hasattr(model, "config_dict"):
        raise TypeError(f"model_spec: expected one of {sorted(_CLASSES)}, got {name}")
    return {"class": name, "config": cast(TaskModel, model).config_dict()}


def model_from_spec(spec: Mapping[str, Any], device=None, dtype=None) -> TaskModel:
    """Rebuild a model (fresh parameters) from :func:`model_spec`'s output."""
    name = spec.get("class") if isinstance(spec, Mapping) else None
    if name not in _CLASSES:
        raise ValueError(f"spec: 'class' must be one of {sorted(_CLASSES)}, got {name!r}")
    return _CLASSES[name](**spec["config"], device=device, dtype=dtype)
