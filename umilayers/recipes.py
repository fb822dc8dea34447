"""The two-stage training recipe of the paper: unimodal models -> pseudo-labels -> multimodal model.

:func:`fit` trains one method on a :class:`~umilayers.data.FeatureStore` and writes a run
directory; :func:`evaluate` reloads the best model of a run and scores it on a split, with all
or only some modalities. ``umilayers fit`` / ``umilayers evaluate`` (:mod:`umilayers.cli`) are
thin wrappers with the same options.

Stages
------
1. **Unimodal** (``umi`` and ``pooled`` with pseudo-labels on): for each modality, a unimodal
   model (mean-pooled tokens, linear head) is trained on the training samples that have it for
   ``unimodal_epochs`` epochs; after each of the last ``pseudo_window`` epochs it predicts on
   all of them and the predictions go into a :class:`~umilayers.pseudo_labels.PseudoLabelBank`,
   saved to ``DIR/pseudo_labels/`` at the end of the stage. For retrieval each unimodal model
   also embeds every training caption with its own text encoder (``text_embeddings.pt``), and
   the pseudo-labels of stage 2 are ``(B, B)`` video-to-caption similarities averaged over the
   sample's modalities, each measured in one unimodal space (see ``_Run.pseudo_targets``).
2. **Multimodal**: the method is trained for ``epochs`` epochs on batches mixed from all
   training splits; after each epoch it is scored on the val splits (top-1, ``-mae`` or
   ``-mean_rank``) and the best epoch is kept; that model is finally scored on the test splits.

Run directory
-------------
``config.json`` (the :class:`FitConfig`, store path, task), ``checkpoint.pt`` (everything needed
to continue, rewritten atomically after every epoch), ``log.jsonl`` (one JSON object per epoch
and stage), ``model.pt`` (the best model), ``metrics.json`` and ``test_predictions.npy`` (rows
of the test splits in store order: class probabilities, values or video embeddings).

Determinism and resume
----------------------
Every epoch's sample order comes from a generator seeded by ``(seed, stage, epoch)``, and the
global torch/numpy/python generators are re-seeded from ``(seed, stage, epoch, rank)`` at the
start of each epoch, so an epoch's computation does not depend on what ran before it in the
process. A run killed at any point and continued with ``resume=True`` restarts after the last
completed epoch and, on the same hardware and software, reaches bit-identical final metrics.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umilayers._checkpoint import capture_rng_state, derive_seed, restore_rng_state
from umilayers._io import append_jsonl, atomic_numpy_save, atomic_torch_save, atomic_write_json, read_json
from umilayers._distributed import (
    DistContext,
    GlobalBatchSampler,
    all_gather_rows,
    all_reduce_sum,
    process_group,
    setup,
    shard_rows,
    teardown,
)

__all__ = ["METHODS", "FitConfig", "RunExistsError", "fit", "evaluate", "metric_score", "process_group"]

METHODS = ("umi", "late-fusion", "vanilla", "pooled", "unimodal")
CHECKPOINT_VERSION = 1
RUN_FILES = (
    "config.json",
    "checkpoint.pt",
    "log.jsonl",
    "model.pt",
    "metrics.json",
    "test_predictions.npy",
    "pseudo_labels",
)

PathLike = Union[str, "os.PathLike[str]"]

# Seconds to sleep after each training step: lets the kill -9 test interrupt a run mid-epoch.
_STEP_DELAY = float(os.environ.get("UMILAYERS_STEP_DELAY", "0") or 0)


class RunExistsError(FileExistsError):
    """The run directory already holds a run and neither ``resume`` nor ``overwrite`` was given."""


# ============================================================================ configuration


@dataclass
class FitConfig:
    """Every option of :func:`fit` (and ``umilayers fit``), saved in ``config.json`` and checkpoints.

    Model sizes default to the paper's (``D = 256``, 6 layers and 8 heads in both
    transformers, ``lambda = 1e-3``); ``tokens`` defaults to the paper's robot / MSR-VTT
    ``k* = 16`` (EPIC-Kitchens used 512) and ``pseudo_weight`` to their ``alpha = 1``
    (EPIC-Kitchens used 3000). Optimisation (AdamW, cosine decay) is this library's choice.

    Args:
        method: one of :data:`METHODS`.
        seed: seeds model initialisation, sample order and dropout.
        epochs: epochs of the multimodal stage.
        unimodal_epochs: epochs of each unimodal model (stage 1).
        pseudo_window: last epochs of stage 1 whose predictions are averaged (``e``).
        dim: common width ``D``.
        tokens: common slots ``k*`` (``K``).
        depth: layers of both transformers (unless one of the next two is set).
        projection_depth: layers inside each ``FeatureProjection`` (default ``depth``).
        fusion_depth: layers of the fusion transformer (default ``depth``).
        heads: attention heads.
        branches: prediction branches (1 = the single-branch ablation).
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        batch_size: global batch size (split over processes under ``torchrun``).
        warmup_epochs: linear warm-up before the cosine decay.
        grad_clip: clip the gradient norm to this (0 = off).
        align_weight: ``lambda`` of Eq. 3.
        pseudo_weight: ``alpha`` of Eq. 3.
        align_tokens: alignment tokens ``n_u`` (default: one per class, or 128).
        no_align: ablation: no alignment loss.
        no_pseudo: ablation: no pseudo-label branch (skips stage 1).
        modality: the modality of ``method="unimodal"``.
        unimodal_predictor: the unimodal models' predictor (stage 1, the late-fusion members and
            ``method="unimodal"``): ``"linear"`` (the paper's: mean-pooled tokens, linear head)
            or ``"transformer"`` (a ``depth``-layer transformer over the tokens with a readout
            token, see :class:`~umilayers.baselines.UnimodalModel`); it sees token-level
            structure that mean pooling destroys, which gives better pseudo-labels and a
            stronger late-fusion baseline.
        amp: bf16 autocast (CUDA and CPU).
        compile: ``torch.compile`` the model.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        num_workers: DataLoader worker processes.
        quiet: no progress bars.

    Example::

        >>> cfg = FitConfig(method="umi", dim=16, depth=1, heads=2, tokens=4)
        >>> FitConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> cfg.model_depths()
        (1, 1)
    """

    method: str = "umi"
    seed: int = 0
    epochs: int = 30
    unimodal_epochs: int = 20
    pseudo_window: int = 10
    dim: int = 256
    tokens: int = 16
    depth: int = 6
    projection_depth: Optional[int] = None
    fusion_depth: Optional[int] = None
    heads: int = 8
    branches: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 64
    warmup_epochs: int = 0
    grad_clip: float = 1.0
    align_weight: float = 1e-3
    pseudo_weight: float = 1.0
    align_tokens: Optional[int] = None
    no_align: bool = False
    no_pseudo: bool = False
    modality: Optional[str] = None
    unimodal_predictor: str = "linear"
    amp: bool = False
    compile: bool = False
    device: str = "auto"
    num_workers: int = 0
    quiet: bool = False

    #: Options that change how a run executes but not what it computes (free to differ on resume).
    RUNTIME_FIELDS = ("device", "num_workers", "quiet")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FitConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"FitConfig: unknown options {unknown}; expected a subset of {sorted(names)}")
        return cls(**data)

    def model_depths(self) -> tuple[int, int]:
        """``(projection_depth, fusion_depth)`` with ``depth`` filling the unset ones."""
        projection = self.depth if self.projection_depth is None else self.projection_depth
        fusion = self.depth if self.fusion_depth is None else self.fusion_depth
        return projection, fusion

    def validate(self) -> None:
        """Check every option's type and range (before anything is read or trained)."""
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {list(METHODS)}, got {self.method!r}")
        positive = ("epochs", "dim", "tokens", "heads", "branches", "batch_size")
        non_negative = ("seed", "unimodal_epochs", "pseudo_window", "depth", "warmup_epochs", "num_workers")
        for name in positive + non_negative:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
            if value < (1 if name in positive else 0):
                raise ValueError(f"{name}: expected an int >= {1 if name in positive else 0}, got {value}")
        for name in ("projection_depth", "fusion_depth", "align_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}: expected an int >= 0 or None, got {value!r}")
        for name in ("lr", "weight_decay", "grad_clip", "align_weight", "pseudo_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected a positive learning rate, got {self.lr}")
        if self.dim % self.heads:
            raise ValueError(f"heads: must divide dim={self.dim}, got heads={self.heads}")
        if self.unimodal_predictor not in ("linear", "transformer"):
            raise ValueError(f"unimodal_predictor: expected 'linear' or 'transformer', "
                             f"got {self.unimodal_predictor!r}")
        if self.method == "unimodal" and not self.modality:
            raise ValueError("modality: method 'unimodal' needs the modality to train on (--modality NAME)")
        if self.method != "unimodal" and self.modality:
            raise ValueError(f"modality: only used by method 'unimodal', got modality={self.modality!r} "
                             f"with method {self.method!r}")
        if self.uses_pseudo_labels:
            if self.unimodal_epochs < 1:
                raise ValueError("unimodal_epochs: pseudo-labels need at least one unimodal epoch "
                                 "(or pass no_pseudo / --no-pseudo)")
            if not 1 <= self.pseudo_window <= self.unimodal_epochs:
                raise ValueError(f"pseudo_window: expected 1 <= pseudo_window <= unimodal_epochs="
                                 f"{self.unimodal_epochs}, got {self.pseudo_window}")

    @property
    def uses_pseudo_labels(self) -> bool:
        """Whether stage 1 runs: ``umi`` / ``pooled`` without ``no_pseudo``."""
        return self.method in ("umi", "pooled") and not self.no_pseudo

    def result_fields(self) -> dict[str, Any]:
        """The options that determine the result (all but :attr:`RUNTIME_FIELDS`)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}


# ============================================================================ store and model


def _open_store(store: Any):
    from umilayers.data import FeatureStore

    if isinstance(store, FeatureStore):
        store.validate(deep=True)
        return store
    return FeatureStore(store, deep=True)


def _open_shallow(path: str):
    from umilayers.data import FeatureStore

    return FeatureStore(path)


def _check_compatible(cfg: FitConfig, store) -> None:
    """Method/task/store checks that do not need any data."""
    if not store.splits_with_role("train"):
        raise ValueError(f"{store.path}: the store has no split with role 'train'")
    for role in ("val", "test"):
        if not store.splits_with_role(role):
            raise ValueError(f"{store.path}: the store has no split with role {role!r} "
                             f"(fit selects the best epoch on val and reports test)")
    if cfg.method == "unimodal":
        if cfg.modality not in store.modalities:
            raise ValueError(f"modality: {cfg.modality!r} is not a modality of the store "
                             f"(modalities: {sorted(store.modalities)})")
        for role in ("train", "val", "test"):
            if not any(cfg.modality in store.splits[s].modalities for s in store.splits_with_role(role)):
                raise ValueError(f"modality: no {role} split of the store has {cfg.modality!r}")
    if cfg.tokens % cfg.branches:
        raise ValueError(f"branches: must divide tokens={cfg.tokens}, got {cfg.branches}")
    if store.task == "classification" and cfg.align_tokens not in (None, store.num_outputs):
        raise ValueError(f"align_tokens: classification uses one token per class "
                         f"({store.num_outputs}), got {cfg.align_tokens}")


def _modality_dims(store, only: Optional[Iterable[str]] = None) -> dict[str, int]:
    names = sorted(store.modalities) if only is None else sorted(only)
    return {m: int(store.modalities[m][1]) for m in names}


def _model_kwargs(cfg: FitConfig, store, method: str, modality: Optional[str] = None) -> dict[str, Any]:
    """Keyword arguments of :func:`umilayers.baselines.build_model` for ``method`` on ``store``."""
    projection_depth, fusion_depth = cfg.model_depths()
    kwargs: dict[str, Any] = {
        "modality_dims": _modality_dims(store),
        "num_outputs": int(store.num_outputs),
        "task": store.task,
        "text_dim": int(store.text[1]) if store.text is not None else None,
        "dim": cfg.dim,
        "heads": cfg.heads,
        "num_tokens": cfg.tokens, "projection_depth": projection_depth, "fusion_depth": max(1, fusion_depth),
        "branches": cfg.branches, "align_weight": cfg.align_weight, "pseudo_weight": cfg.pseudo_weight,
        "use_alignment": not cfg.no_align, "use_pseudo": cfg.uses_pseudo_labels or method not in ("umi", "pooled"),
        "num_align_tokens": cfg.align_tokens,
        "modality_tokens": {m: int(k) for m, (k, _) in store.modalities.items()},
        "modality": modality, "predictor": cfg.unimodal_predictor,
    }
    return kwargs


def _build_model(method: str, kwargs: Mapping[str, Any]) -> nn.Module:
    from umilayers.baselines import build_model

    return build_model(method, **kwargs)


# ============================================================================ data


def _restricted_collate(items: Sequence[Mapping[str, Any]], keep: Optional[tuple[str, ...]] = None):
    """``collate`` after dropping the modalities not in ``keep`` from every item."""
    from umilayers.data import collate

    if keep is not None:
        items = [{**item, "inputs": {m: v for m, v in item["inputs"].items() if m in keep},
                  "lengths": {m: v for m, v in item["lengths"].items() if m in keep}} for item in items]
    return collate(items)


class _Collate:
    """Picklable collate (DataLoader workers) that keeps only some modalities."""

    def __init__(self, keep: Optional[Iterable[str]] = None) -> None:
        self.keep = None if keep is None else tuple(sorted(keep))

    def __call__(self, items):
        return _restricted_collate(items, self.keep)


def _splits(store, role: str, keep: Optional[Iterable[str]] = None) -> list[str]:
    """Splits of ``role`` (or the one split named ``role``) that have any modality in ``keep``."""
    names = [role] if role in store.splits else store.splits_with_role(role)
    if not names:
        raise ValueError(f"split: {role!r} is neither a split nor a role of the store "
                         f"(splits: {list(store.splits)})")
    if keep is not None:
        names = [s for s in names if set(store.splits[s].modalities) & set(keep)]
    return names


def _concat(store, names: Sequence[str]):
    from torch.utils.data import ConcatDataset

    return ConcatDataset([store.dataset(s) for s in names])


def _loader(dataset, batch_sampler, keep, cfg: FitConfig, ctx: DistContext):
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=_Collate(keep),
        num_workers=cfg.num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
    )


class _RowSampler:
    """Rows of this rank's contiguous shard, in order, in batches (evaluation)."""

    def __init__(self, rows: range, batch_size: int) -> None:
        self.rows = list(rows)
        self.batch_size = batch_size

    def __iter__(self):
        for i in range(0, len(self.rows), self.batch_size):
            yield self.rows[i : i + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)


# ============================================================================ training pieces


class _TrainStep(nn.Module):
    """Forward + loss in one module, so that DDP sees every parameter the loss uses."""

    def __init__(self, model: nn.Module, forward: Optional[Callable] = None) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_forward", model if forward is None else forward)  # a compiled view, not a child

    def forward(self, inputs, padding_masks, present, targets, pseudo_targets, text_padding_mask):
        output = self._forward(inputs, padding_masks, present)
        kwargs = {"text_padding_mask": text_padding_mask} if text_padding_mask is not None else {}
        terms = self.model.loss(output, targets, pseudo_targets, **kwargs)
        return terms.total, terms.align, terms.supervised, terms.pseudo


def _autocast(cfg: FitConfig, ctx: DistContext):
    if not cfg.amp:
        return nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)


def _cosine_schedule(optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _Phase:
    """One model being trained: model, optimiser, schedule, DDP/compile wrappers."""

    def __init__(self, model: nn.Module, cfg: FitConfig, ctx: DistContext, steps_per_epoch: int, epochs: int):
        self.model = model.to(ctx.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = _cosine_schedule(self.optimizer, steps_per_epoch * epochs, steps_per_epoch * cfg.warmup_epochs)
        forward = torch.compile(self.model, dynamic=True) if cfg.compile else None
        step: nn.Module = _TrainStep(self.model, forward)
        if ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            step = DDP(step, device_ids=ids, find_unused_parameters=True)
        self.step = step
        self.forward = self.model if forward is None else forward

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _progress(total: int, desc: str, cfg: FitConfig, ctx: DistContext):
    enabled = ctx.is_main and not cfg.quiet and sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional ("umilayers[train]")
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _train_epoch(
    phase: _Phase,
    dataset,
    keep,
    pseudo: Optional[Callable[[Any], Tensor]],
    cfg: FitConfig,
    ctx: DistContext,
    tag: Any,
    epoch: int,
    desc: str,
) -> dict[str, float]:
    """One epoch over ``dataset``; returns the sample-weighted mean of each loss term."""
    sampler = GlobalBatchSampler(len(dataset), cfg.batch_size, cfg.seed, ctx.rank, ctx.world_size, tag=tag)
    sampler.set_epoch(epoch)
    scales = sampler.loss_scales()
    loader = _loader(dataset, sampler, keep, cfg, ctx)
    phase.step.train()
    sums = np.zeros(5)  # total, align, supervised, pseudo (each * rows), rows
    bar = _progress(len(sampler), desc, cfg, ctx)
    for batch, scale in zip(loader, scales):
        batch = batch.to(ctx.device, non_blocking=True)
        targets = pseudo(batch) if pseudo is not None else None
        with _autocast(cfg, ctx):
            terms = phase.step(batch.inputs, batch.padding_masks, batch.present, batch.targets,
                               targets, batch.text_padding_mask)
        # DDP averages gradients over ranks; scaling by world * n_rank / n_global makes the
        # result the gradient of the global batch's mean loss (exact for per-sample means).
        (terms[0].float() * scale).backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(phase.model.parameters(), cfg.grad_clip)
        phase.optimizer.step()
        phase.scheduler.step()
        phase.optimizer.zero_grad(set_to_none=True)
        rows = float(len(batch.indices)) if scale else 0.0
        values = [float(t.detach()) for t in terms]
        sums[:4] += np.array(values) * rows
        sums[4] += rows
        if _STEP_DELAY:
            time.sleep(_STEP_DELAY)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{values[0]:.4f}")
    if bar is not None:
        bar.close()
    total = all_reduce_sum(sums.tolist(), ctx)
    count = max(total[4], 1.0)
    return {name: total[i] / count for i, name in enumerate(("loss", "align", "supervised", "pseudo"))}


# ============================================================================ prediction and metrics


@torch.no_grad()
def _predict(model: nn.Module, forward: Callable, store, names: Sequence[str], keep, cfg: FitConfig,
             ctx: DistContext) -> dict[str, Tensor]:
    """Predictions (and retrieval text embeddings, targets and ids) on the rows of ``names``,
    in split order then row order; each rank predicts a contiguous shard, then all are gathered."""
    dataset = _concat(store, names)
    rows = shard_rows(len(dataset), ctx.rank, ctx.world_size)
    loader = _loader(dataset, _RowSampler(rows, cfg.batch_size), keep, cfg, ctx)
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {"prediction": [], "targets": [], "indices": []}
    if store.task == "retrieval":
        parts["text"] = []
    for batch in loader:
        batch = batch.to(ctx.device, non_blocking=True)
        with _autocast(cfg, ctx):
            out = forward(batch.inputs, batch.padding_masks, batch.present)
            if store.task == "retrieval":
                parts["text"].append(model.encode_text(batch.targets, batch.text_padding_mask).float())
        parts["prediction"].append(out.prediction.float())
        if store.task != "retrieval":
            parts["targets"].append(batch.targets)
        parts["indices"].append(batch.indices)
    model.train(was_training)
    result = {}
    for key, values in parts.items():
        if key == "targets" and store.task == "retrieval":
            continue
        local = torch.cat(values) if values else _empty_like_rows(key, store, ctx)
        result[key] = all_gather_rows(local, ctx).cpu()
    return result


@torch.no_grad()
def _encode_captions(model: nn.Module, store, names: Sequence[str], cfg: FitConfig,
                     ctx: DistContext) -> dict[str, Tensor]:
    """``model.encode_text`` of every caption of ``names`` (whatever modalities the rows have),
    with their indices; sharded over the ranks and gathered like :func:`_predict`."""
    dataset = _concat(store, names)
    rows = shard_rows(len(dataset), ctx.rank, ctx.world_size)
    loader = _loader(dataset, _RowSampler(rows, cfg.batch_size), (), cfg, ctx)
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {"text": [], "indices": []}
    for batch in loader:
        batch = batch.to(ctx.device, non_blocking=True)
        with _autocast(cfg, ctx):
            parts["text"].append(model.encode_text(batch.targets, batch.text_padding_mask).float())
        parts["indices"].append(batch.indices)
    model.train(was_training)
    return {key: all_gather_rows(torch.cat(values) if values else _empty_like_rows(key, store, ctx), ctx).cpu()
            for key, values in parts.items()}


def _empty_like_rows(key: str, store, ctx: DistContext) -> Tensor:
    # A rank with no rows (more ranks than rows) still takes part in the gather.
    width = int(store.num_outputs)
    if key == "indices":
        return torch.zeros(0, dtype=torch.long, device=ctx.device)
    if key == "targets":
        if store.task == "classification":
            return torch.zeros(0, dtype=torch.long, device=ctx.device)
        return torch.zeros(0, width, device=ctx.device)
    return torch.zeros(0, width, device=ctx.device)


def _metrics(task: str, predicted: Mapping[str, Tensor]) -> dict[str, Any]:
    from umilayers import metrics

    count = int(predicted["prediction"].shape[0])
    if task == "classification":
        return {"top1": metrics.top1(predicted["prediction"], predicted["targets"]), "num_samples": count}
    if task == "regression":
        return {"mae": metrics.mae(predicted["prediction"], predicted["targets"]), "num_samples": count}
    sim = predicted["text"].double() @ predicted["prediction"].double().t()
    out = metrics.retrieval_metrics(sim)
    return {"mean_rank": out["mean_rank"], "t2v": out["t2v"], "v2t": out["v2t"], "num_samples": count}


def metric_score(task: str, result: Mapping[str, Any]) -> float:
    """The model-selection score of a metrics dict (higher is better): top-1, ``-mae`` or
    ``-mean_rank``."""
    if task == "classification":
        return float(result["top1"])
    if task == "regression":
        return -float(result["mae"])
    return -float(result["mean_rank"])


# ============================================================================ the run directory


def _prepare_run_dir(out: Path, cfg: FitConfig, store, resume: bool, overwrite: bool) -> Optional[dict]:
    """Check the directory against ``resume``/``overwrite``; return the checkpoint to resume
    from (or None). Called on rank 0 only."""
    if resume and overwrite:
        raise ValueError("resume and overwrite: pass at most one of them")
    finished = (out / "metrics.json").is_file()
    started = (out / "checkpoint.pt").is_file() or (out / "config.json").is_file()
    if overwrite:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        started = finished = False
    elif not resume and (finished or started):
        what = "a finished run (metrics.json)" if finished else "an unfinished run (checkpoint.pt)"
        raise RunExistsError(f"{out}: already holds {what}; pass --resume to continue it or "
                             f"--overwrite to start again (resume=True / overwrite=True)")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = None
    if resume and (out / "config.json").is_file():
        saved = read_json(out / "config.json")
        previous = FitConfig.from_dict(saved["config"]).result_fields()
        differences = {k: (previous[k], v) for k, v in cfg.result_fields().items() if previous.get(k) != v}
        if differences:
            listed = ", ".join(f"{k}: run has {a!r}, given {b!r}" for k, (a, b) in differences.items())
            raise ValueError(f"{out}: cannot resume with different options ({listed})")
        if (out / "checkpoint.pt").is_file():
            checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
            if checkpoint.get("version") != CHECKPOINT_VERSION:
                raise ValueError(f"{out / 'checkpoint.pt'}: unknown checkpoint version {checkpoint.get('version')!r}")
    if not (out / "config.json").is_file():
        from umilayers import __version__

        atomic_write_json(out / "config.json", {
            "config": cfg.to_dict(), "store": str(Path(store.path).resolve()), "task": store.task,
            "umilayers": __version__,
        })
    return checkpoint


def _on_main(ctx: DistContext, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and share its result; an error on rank 0 is raised on every rank."""
    if not ctx.distributed:
        return fn()
    import torch.distributed as dist

    payload: list[Any] = [None]
    error: Optional[BaseException] = None
    if ctx.is_main:
        try:
            payload[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - re-raised below on every rank
            error = err
            payload[0] = ("error", f"{type(err).__name__}: {err}")
    dist.broadcast_object_list(payload, src=0)
    status, value = payload[0]
    if status == "error":
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


# ============================================================================ fit


def fit(store: Any, method: str, out: PathLike, *, resume: bool = False, overwrite: bool = False,
        config: Optional[FitConfig] = None, **options: Any) -> dict[str, Any]:
    """Train ``method`` on a FeatureStore and write the run directory ``out``.

    Args:
        store: a store directory or an open :class:`~umilayers.data.FeatureStore`.
        method: ``"umi"``, ``"late-fusion"``, ``"vanilla"``, ``"pooled"`` or ``"unimodal"``.
        out: the run directory (created).
        resume: continue the run in ``out`` from its last complete checkpoint.
        overwrite: delete a previous run in ``out`` first.
        config: a :class:`FitConfig` to start from (``method`` and ``options`` override it).
        **options: any :class:`FitConfig` field (``epochs=2, dim=16, ...``).

    Returns:
        The metrics written to ``out/metrics.json``:
        ``{"method", "task", "seed", "val": {...}, "test": {...}}``.

    Raises:
        StoreError: the store is invalid (checked, deeply, before any training).
        RunExistsError: ``out`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        ValueError: bad options or options that do not fit the store.
    """
    base = config.to_dict() if config is not None else {}
    cfg = FitConfig.from_dict({**base, **options, "method": method})
    cfg.validate()
    ctx = setup(cfg.device)
    try:
        # The deep check (every feature scanned for NaN/inf) runs once, on rank 0.
        path = _on_main(ctx, lambda: str(_open_store(store).path))
        store_obj = store if not isinstance(store, (str, os.PathLike)) else _open_shallow(path)
        _check_compatible(cfg, store_obj)
        out_path = Path(out)
        checkpoint = _on_main(ctx, lambda: _prepare_run_dir(out_path, cfg, store_obj, resume, overwrite))
        if ctx.distributed and not ctx.is_main and resume and (out_path / "checkpoint.pt").is_file():
            checkpoint = torch.load(out_path / "checkpoint.pt", map_location="cpu", weights_only=False)
        if resume and (out_path / "metrics.json").is_file():
            return read_json(out_path / "metrics.json")
        return _Run(cfg, store_obj, out_path, ctx, checkpoint).run()
    finally:
        teardown(ctx)


class _Run:
    """The state of one :func:`fit` call."""

    def __init__(self, cfg: FitConfig, store, out: Path, ctx: DistContext, checkpoint: Optional[dict]):
        self.cfg = cfg
        self.store = store
        self.out = out
        self.ctx = ctx
        self.checkpoint = checkpoint or {}
        self.keep = (cfg.modality,) if cfg.method == "unimodal" else None
        self.bank = None
        self.text_embeddings: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ bookkeeping
    def log(self, record: dict) -> None:
        if self.ctx.is_main:
            append_jsonl(self.out / "log.jsonl", {**record, "time": round(time.time(), 3)})

    def save_checkpoint(self, state: dict) -> None:
        if self.ctx.is_main:
            atomic_torch_save(self.out / "checkpoint.pt", {
                "version": CHECKPOINT_VERSION, "config": self.cfg.to_dict(), "rng": capture_rng_state(), **state,
            })
        self.ctx.barrier()

    def seed_epoch(self, *tag: Any) -> None:
        seed = derive_seed(self.cfg.seed, *tag, self.ctx.rank)
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))
        import random

        random.seed(seed)

    def init_model(self, method: str, kwargs: Mapping[str, Any], *tag: Any) -> nn.Module:
        torch.manual_seed(derive_seed(self.cfg.seed, "init", method, *tag))  # the same on every rank
        return _build_model(method, kwargs)

    # ------------------------------------------------------------------ main
    def run(self) -> dict[str, Any]:
        if self.checkpoint:
            restore_rng_state(self.checkpoint["rng"])  # then re-seeded per epoch anyway
            self.log({"event": "resume", "stage": self.checkpoint.get("stage"),
                      "epoch": self.checkpoint.get("epoch")})
        if self.cfg.uses_pseudo_labels:
            self.stage_unimodal()
        return self.stage_multimodal()

    # ------------------------------------------------------------------ stage 1
    def train_modalities(self) -> list[str]:
        return sorted({m for s in self.store.splits_with_role("train") for m in self.store.splits[s].modalities})

    def stage_unimodal(self) -> None:
        from umilayers.pseudo_labels import PseudoLabelBank

        cfg, store = self.cfg, self.store
        ck = self.checkpoint
        if ck.get("stage") == 2 or ck.get("stage1_done"):
            self.load_bank()
            return
        modalities = self.train_modalities()
        self.bank = PseudoLabelBank(store.num_train, int(store.num_outputs), modalities,
                                    window=cfg.pseudo_window, total_epochs=cfg.unimodal_epochs,
                                    dtype=torch.float32)
        self.done: list[str] = []
        current = None
        if ck.get("stage") == 1:
            self.bank.load_state_dict(ck["bank"])
            self.done = list(ck["modalities_done"])
            self.text_embeddings = dict(ck["text_embeddings"])
            current = ck["current"]
        for m in modalities:
            if m not in self.done:
                self.train_unimodal(m, current if current and current["modality"] == m else None)
                self.done.append(m)
        bank_dir = self.out / "pseudo_labels"
        if self.ctx.is_main:
            self.bank.save(bank_dir)  # every file atomic, bank.json last
            if store.task == "retrieval":
                atomic_torch_save(bank_dir / "text_embeddings.pt", self.text_embeddings)
        self.save_checkpoint({"stage": 1, "stage1_done": True})
        self.log({"stage": "unimodal", "event": "pseudo_labels_saved", "path": str(bank_dir)})

    def load_bank(self) -> None:
        from umilayers.pseudo_labels import PseudoLabelBank

        bank_dir = self.out / "pseudo_labels"
        self.bank = PseudoLabelBank.load(bank_dir)
        if self.store.task == "retrieval":
            self.text_embeddings = torch.load(bank_dir / "text_embeddings.pt", map_location="cpu")

    def train_unimodal(self, modality: str, resume_state: Optional[dict]) -> None:
        cfg, store, ctx = self.cfg, self.store, self.ctx
        names = _splits(store, "train", [modality])
        dataset = _concat(store, names)
        model = self.init_model("unimodal", _model_kwargs(cfg, store, "unimodal", modality), modality)
        steps = math.ceil(len(dataset) / cfg.batch_size)
        phase = _Phase(model, cfg, ctx, steps, cfg.unimodal_epochs)
        start = 0
        if resume_state is not None:
            phase.load(resume_state["phase"])
            start = resume_state["epoch"] + 1
        keep = (modality,)
        for epoch in range(start, cfg.unimodal_epochs):
            self.seed_epoch("unimodal", modality, epoch)
            losses = _train_epoch(phase, dataset, keep, None, cfg, ctx, ("unimodal", modality), epoch,
                                  f"unimodal {modality} {epoch + 1}/{cfg.unimodal_epochs}")
            record = {"stage": "unimodal", "modality": modality, "epoch": epoch, **losses}
            if epoch >= cfg.unimodal_epochs - cfg.pseudo_window:
                # Every rank predicts its shard; the gathered predictions update every rank's
                # bank identically.
                predicted = _predict(phase.model, phase.forward, store, names, keep, cfg, ctx)
                self.bank.update(modality, predicted["indices"], predicted["prediction"], epoch)
                record["pseudo_labels"] = int(predicted["indices"].numel())
                if store.task == "retrieval" and epoch == cfg.unimodal_epochs - 1:
                    # This unimodal model's embedding of EVERY train caption (also of rows without
                    # the modality): the teacher similarities of the pseudo loss compare a video
                    # with all the captions of a batch, in this model's own space.
                    encoded = _encode_captions(phase.model, store, _splits(store, "train"), cfg, ctx)
                    table = torch.zeros(store.num_train, int(store.num_outputs))
                    table[encoded["indices"]] = encoded["text"]
                    self.text_embeddings[modality] = table
            self.save_checkpoint({
                "stage": 1, "modalities_done": list(self.done), "bank": self.bank.state_dict(),
                "text_embeddings": self.text_embeddings,
                "current": {"modality": modality, "epoch": epoch, "phase": phase.state()},
            })
            self.log(record)

    def pseudo_targets(self, batch) -> Tensor:
        """The batch's pseudo-labels.

        Classification and regression: ``(B, C)`` from the bank (the paper's
        closest-to-ground-truth rule). Retrieval: ``(B, B)`` teacher similarities, row ``i``
        the mean over the modalities ``m`` present in sample ``i`` of ``cos(p_i^m, t_j^m)``,
        with ``p_i^m`` the bank's averaged video embedding of unimodal model ``m`` and ``t_j^m``
        that same model's embedding of caption ``j``. Each cosine is measured in one unimodal
        space and only similarities reach the loss
        (:func:`~umilayers.losses.similarity_distillation_loss`), so the multimodal model is
        never pulled towards embeddings of spaces foreign to its own text encoder, and the
        teachers of several modalities can be averaged (their embeddings could not: each
        unimodal model has its own text encoder). The average, like late fusion, was chosen over
        the closest-to-ground-truth modality on the val split (docs/accuracy.rst).
        """
        present = {m: v.cpu() for m, v in batch.present.items()}
        indices = batch.indices.cpu()
        if self.store.task != "retrieval":
            return self.bank.targets(indices, present, batch.targets.cpu(), device=self.ctx.device)
        total = torch.zeros(len(indices), len(indices))
        count = torch.zeros(len(indices))
        for m, mask in present.items():
            rows = mask.nonzero().flatten()
            if rows.numel() == 0:
                continue
            values = self.bank.targets(indices[rows], {m: torch.ones(rows.numel(), dtype=torch.bool)})
            captions = self.text_embeddings[m][indices]  # (B, E): every caption of the batch
            total[rows] += F.normalize(values, dim=-1) @ F.normalize(captions, dim=-1).T  # (rows, B)
            count[rows] += 1
        return (total / count.clamp_min(1)[:, None]).to(self.ctx.device)

    # ------------------------------------------------------------------ stage 2
    def stage_multimodal(self) -> dict[str, Any]:
        cfg, store, ctx = self.cfg, self.store, self.ctx
        train_names = _splits(store, "train", self.keep)
        dataset = _concat(store, train_names)
        model = self.init_model(cfg.method, _model_kwargs(cfg, store, cfg.method, cfg.modality))
        steps = math.ceil(len(dataset) / cfg.batch_size)
        phase = _Phase(model, cfg, ctx, steps, cfg.epochs)
        val_names = _splits(store, "val", self.keep)
        start, best = 0, {"epoch": -1, "score": -float("inf"), "val": None, "model": None}
        ck = self.checkpoint
        if ck.get("stage") == 2:
            phase.load(ck["phase"])
            start = ck["epoch"] + 1
            best = ck["best"]
        pseudo = self.pseudo_targets if cfg.uses_pseudo_labels else None
        for epoch in range(start, cfg.epochs):
            self.seed_epoch("multimodal", epoch)
            losses = _train_epoch(phase, dataset, self.keep, pseudo, cfg, ctx, "multimodal", epoch,
                                  f"{cfg.method} {epoch + 1}/{cfg.epochs}")
            val = _metrics(store.task, _predict(phase.model, phase.forward, store, val_names, self.keep, cfg, ctx))
            score = metric_score(store.task, val)
            if score > best["score"]:
                best = {"epoch": epoch, "score": score, "val": val,
                        "model": copy.deepcopy({k: v.detach().cpu() for k, v in phase.model.state_dict().items()})}
            self.save_checkpoint({"stage": 2, "epoch": epoch, "phase": phase.state(), "best": best})
            self.log({"stage": "multimodal", "epoch": epoch, **losses, "val": val, "score": score,
                      "best_epoch": best["epoch"], "lr": phase.scheduler.get_last_lr()[0]})
        return self.finish(phase, best)

    def finish(self, phase: _Phase, best: dict) -> dict[str, Any]:
        from umilayers.baselines import model_spec

        cfg, store, ctx = self.cfg, self.store, self.ctx
        phase.model.load_state_dict(best["model"])
        test_names = _splits(store, "test", self.keep)
        predicted = _predict(phase.model, phase.forward, store, test_names, self.keep, cfg, ctx)
        test = _metrics(store.task, predicted)
        result = {"method": cfg.method, "task": store.task, "seed": cfg.seed,
                  "val": best["val"], "test": test, "best_epoch": best["epoch"],
                  "test_splits": test_names, "world_size": ctx.world_size}
        if cfg.modality:
            result["modality"] = cfg.modality
        if ctx.is_main:
            atomic_torch_save(self.out / "model.pt", {"spec": model_spec(phase.model), "state_dict": best["model"],
                                                      "epoch": best["epoch"], "config": cfg.to_dict()})
            atomic_numpy_save(self.out / "test_predictions.npy", predicted["prediction"].numpy())
            atomic_write_json(self.out / "metrics.json", result)
        self.log({"stage": "test", "best_epoch": best["epoch"], "test": test})
        ctx.barrier()
        return result


# ============================================================================ evaluate


def evaluate(run_dir: PathLike, store: Any = None, split: str = "test",
             modalities: Optional[Sequence[str]] = None, *, device: str = "auto",
             batch_size: Optional[int] = None, num_workers: int = 0) -> dict[str, Any]:
    """Score the best model of a finished run on a split, optionally with only some modalities.

    Args:
        run_dir: a directory written by :func:`fit`.
        store: the store (default: the one the run was trained on).
        split: a split name, or a role (``"val"``/``"test"``: all splits with that role).
        modalities: keep only these modalities as inputs (samples with none are left out); the
            paper's Figure 3 evaluates every non-empty subset.
        device: where to run.
        batch_size: evaluation batch size (default: the run's).
        num_workers: DataLoader workers.

    Returns:
        The metrics (as in ``metrics.json``'s ``"test"``) plus ``"split"`` and ``"modalities"``.
    """
    run = Path(run_dir)
    if not (run / "model.pt").is_file():
        raise FileNotFoundError(f"{run / 'model.pt'}: missing; is {run} a finished umilayers run?")
    saved = read_json(run / "config.json")
    cfg = FitConfig.from_dict(saved["config"])
    cfg.device, cfg.num_workers, cfg.quiet = device, num_workers, True
    if batch_size is not None:
        cfg.batch_size = batch_size
    store_obj = _open_store(store if store is not None else saved["store"])
    checkpoint = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    spec = checkpoint["spec"]
    config = spec["config"]
    model_modalities = sorted(config["modality_dims"]) if "modality_dims" in config else [config["modality"]]
    keep = model_modalities if modalities is None else sorted(modalities)
    unknown = sorted(set(keep) - set(model_modalities))
    if unknown or not keep:
        raise ValueError(f"modalities: expected a non-empty subset of the model's {model_modalities}, got {list(keep)}")
    ctx = setup(device)
    try:
        from umilayers.baselines import model_from_spec

        model = model_from_spec(spec)
        model.load_state_dict(checkpoint["state_dict"])
        model.to(ctx.device)
        names = _splits(store_obj, split, keep)
        if not names:
            raise ValueError(f"split {split!r}: no split has any of the modalities {keep}")
        result = _metrics(store_obj.task, _predict(model, model, store_obj, names, tuple(keep), cfg, ctx))
    finally:
        teardown(ctx)
    return {**result, "split": split, "splits": names, "modalities": keep}
