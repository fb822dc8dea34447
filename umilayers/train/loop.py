"""The pieces of a training run: loaders, one model being trained (:class:`Phase`), one
optimisation step, one epoch, prediction and metrics.

:func:`~umilayers.train.fit` (:mod:`umilayers.train.run`) strings them into the paper's two
stages. The per-step path reads no tensor value back to the host: the data were checked once,
where they entered (the FeatureStore), the model and the losses check only types and shapes, and
the loss terms of an epoch are summed on the device and read once at its end.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Sized, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from umilayers import metrics
from umilayers._validation import InvalidArgument
from umilayers.data import Batch, FeatureStore, collate, pair_same_label
from umilayers.data.dataset import set_epoch
from umilayers.data.store import ROLES
from umilayers.model import TaskModel, UMIOutput
from umilayers.train.config import FitConfig, TrainConfig, drop_epochs
from umilayers.train.distributed import (
    DistContext,
    GlobalBatchSampler,
    all_gather_rows,
    all_reduce_sum,
    shard_rows,
)

__all__ = [
    "FitEvent",
    "Callback",
    "KeepModalities",
    "RowSampler",
    "TrainStep",
    "Phase",
    "splits",
    "concat",
    "rows_having",
    "train_set",
    "eval_set",
    "make_loader",
    "autocast",
    "make_optimizer",
    "lr_schedule",
    "train_step",
    "train_epoch",
    "predict",
    "caption_embeddings",
    "encode_captions",
    "compute_metrics",
    "metric_score",
]


@dataclass(frozen=True)
class FitEvent:
    """What :func:`~umilayers.train.fit` tells its ``callback``, on every process.

    Attributes:
        kind: ``"step"`` (after each optimisation step), ``"epoch"`` (after an epoch's line in
            ``log.jsonl``) or ``"checkpoint"`` (after ``checkpoint.pt`` was written).
        stage: ``"unimodal"`` (stage 1) or ``"multimodal"``.
        epoch: the epoch, from 1 (as in ``log.jsonl``, ``metrics.json`` and the progress lines).
        modality: the modality of a stage-1 model, else None.
        step: the step within the epoch (``"step"`` events).
        batch: the step's batch, on the device (``"step"``).
        pseudo_targets: the step's pseudo-labels (``"step"``, when the method uses them).
        record: the epoch's ``log.jsonl`` record (``"epoch"``).

    Example::

        >>> FitEvent("checkpoint", "multimodal", epoch=2).kind
        'checkpoint'
    """

    kind: str
    stage: str
    epoch: int
    modality: Optional[str] = None
    step: Optional[int] = None
    batch: Optional[Batch] = None
    pseudo_targets: Optional[Tensor] = None
    record: Optional[Mapping[str, Any]] = None


#: ``callback(event)``; an exception raised by it stops the run (what a checkpoint holds stays).
Callback = Callable[[FitEvent], None]


# ============================================================================ data


class KeepModalities:
    """Collate that first drops the modalities not in ``keep`` from every item (picklable, for
    DataLoader workers). ``keep=None`` keeps them all.

    Example::

        >>> item = {"index": 0, "split_id": 0, "inputs": {"rgb": torch.ones(2, 3), "audio": torch.ones(1, 3)},
        ...         "lengths": {"rgb": 2, "audio": 1}, "target": torch.tensor(1)}
        >>> sorted(KeepModalities(["rgb"])([item]).inputs)
        ['rgb']
    """

    def __init__(self, keep: Optional[Iterable[str]] = None) -> None:
        self.keep = None if keep is None else tuple(sorted(keep))

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> Batch:
        if self.keep is not None:
            keep = self.keep
            items = [{**item, "inputs": {m: v for m, v in item["inputs"].items() if m in keep},
                      "lengths": {m: v for m, v in item["lengths"].items() if m in keep}} for item in items]
        return collate(items)


def splits(store: FeatureStore, role: str, keep: Optional[Iterable[str]] = None) -> list[str]:
    """Splits of ``role`` (or the one split named ``role``) that have any modality in ``keep``."""
    if role in store.splits:
        names = [role]
    elif role in ROLES:
        names = store.splits_with_role(role)
    else:
        names = []
    if not names:
        raise InvalidArgument("split", f"{role!r} is neither a split nor a role of the store {store.path} "
                                       f"(splits: {', '.join(store.splits)}; roles: {', '.join(ROLES)})")
    if keep is not None:
        names = [s for s in names if set(store.splits[s].modalities) & set(keep)]
    return names


def concat(store: FeatureStore, names: Sequence[str], *, caption: str = "first",
           caption_seed: int = 0) -> ConcatDataset:
    """The splits ``names`` of ``store`` as one dataset, in that order (``caption`` and
    ``caption_seed`` as in :meth:`FeatureStore.dataset <umilayers.data.FeatureStore.dataset>`)."""
    return ConcatDataset([store.dataset(s, caption=caption, caption_seed=caption_seed) for s in names])


def rows_having(store: FeatureStore, names: Sequence[str], keep: Optional[Iterable[str]]) -> Optional[list[int]]:
    """Positions, in :func:`concat` order, of the rows of ``names`` that have at least one
    modality of ``keep``; None when every row does (or ``keep`` is None).

    A split may hold rows lacking one of its modalities (length 0: the real MSR-VTT features);
    a unimodal model, or an evaluation with some modalities, leaves the rows without them out.
    """
    if keep is None:
        return None
    keep = tuple(keep)
    masks = [np.any([store.present(name, m) for m in keep], axis=0) if keep
             else np.zeros(store.splits[name].size, dtype=bool) for name in names]
    flat = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    return None if bool(flat.all()) else np.flatnonzero(flat).tolist()


def _restricted(dataset: ConcatDataset, rows: Optional[list[int]]) -> Dataset:
    return dataset if rows is None else Subset(dataset, rows)


def _several_captions(store: FeatureStore) -> bool:
    return store.task == "retrieval" and store.max_captions > 1


def train_set(store: FeatureStore, names: Sequence[str], keep: Optional[Iterable[str]], cfg: FitConfig) -> Dataset:
    """The training rows of ``names`` that have a modality of ``keep``; a retrieval store with
    several captions per row gives one drawn per row and epoch (``caption="random"``, seeded by
    the run's seed; :func:`train_epoch` sets the epoch)."""
    caption = "random" if _several_captions(store) else "first"
    dataset = concat(store, names, caption=caption, caption_seed=cfg.train.seed)
    return _restricted(dataset, rows_having(store, names, keep))


def eval_set(store: FeatureStore, names: Sequence[str], keep: Optional[Iterable[str]],
             captions: bool = True) -> Dataset:
    """The rows of ``names`` that have a modality of ``keep``, with every caption of a
    retrieval row (``caption="all"``) when the store has several and ``captions`` is on."""
    dataset = concat(store, names, caption="all" if captions and _several_captions(store) else "first")
    return _restricted(dataset, rows_having(store, names, keep))


def make_loader(dataset: Dataset, batch_sampler: Iterable[list[int]], keep: Optional[Iterable[str]],
                cfg: FitConfig, ctx: DistContext) -> DataLoader:
    """A DataLoader of :class:`~umilayers.data.Batch` es, modalities restricted to ``keep``."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=KeepModalities(keep),
        num_workers=cfg.runtime.num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
    )


class RowSampler:
    """Rows of this rank's contiguous shard, in order, in batches (evaluation).

    Example::

        >>> list(RowSampler(range(5), batch_size=2))
        [[0, 1], [2, 3], [4]]
    """

    def __init__(self, rows: range, batch_size: int) -> None:
        self.rows = list(rows)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for i in range(0, len(self.rows), self.batch_size):
            yield self.rows[i : i + self.batch_size]

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)


# ============================================================================ training pieces


class TrainStep(nn.Module):
    """Forward + loss in one module, so that DDP sees every parameter the loss uses.

    Returns the loss terms ``(total, align, supervised, pseudo)``.

    Example::

        >>> from umilayers.baselines import LateFusion
        >>> step = TrainStep(LateFusion({"rgb": 4}, num_outputs=3))
        >>> terms = step({"rgb": torch.randn(2, 5, 4)}, {}, None, torch.tensor([0, 2]), None, None)
        >>> [t.shape for t in terms]
        [torch.Size([]), torch.Size([]), torch.Size([]), torch.Size([])]
    """

    _forward: Callable[..., UMIOutput]

    def __init__(self, model: TaskModel, forward: Optional[Callable[..., UMIOutput]] = None) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_forward", model if forward is None else forward)  # a compiled view, not a child

    def forward(self, inputs: Mapping[str, Tensor], padding_masks: Mapping[str, Optional[Tensor]],
                present: Mapping[str, Tensor], targets: Tensor, pseudo_targets: Optional[Tensor],
                text_padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        output = self._forward(inputs, padding_masks, present)
        terms = self.model.loss(output, targets, pseudo_targets, text_padding_mask=text_padding_mask)
        return terms.total, terms.align, terms.supervised, terms.pseudo


def autocast(cfg: FitConfig, ctx: DistContext) -> AbstractContextManager:
    """bf16 autocast on the run's device when ``amp`` is on."""
    if not cfg.train.amp:
        return nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)


def make_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer`` over every parameter of ``model``: AdamW (decoupled weight decay) or
    SGD with ``momentum`` and L2 weight decay (the authors' released code: 0.9 and 5e-4)."""
    if train.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=train.peak_lr(), momentum=train.momentum,
                               weight_decay=train.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=train.peak_lr(), weight_decay=train.weight_decay)


def lr_schedule(optimizer: torch.optim.Optimizer, train: TrainConfig, steps_per_epoch: int,
                epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate factor of every step of a stage of ``epochs`` epochs.

    A linear warm-up over ``warmup_epochs``, then ``schedule``: cosine decay to 0 at the last
    step, ``step`` (times ``lr_drop_factor`` from the first step of each epoch of
    ``lr_drop_epochs`` on), or constant.

    Example::

        >>> model = nn.Linear(2, 2)
        >>> train = TrainConfig(lr=1e-4, schedule="step", lr_drop_epochs="2", warmup_epochs=0)
        >>> schedule = lr_schedule(make_optimizer(model, train), train, steps_per_epoch=3, epochs=4)
        >>> [round(schedule.lr_lambdas[0](step), 6) for step in range(0, 12, 3)]  # first step of each epoch
        [1.0, 1.0, 0.1, 0.1]
    """
    total, warmup = steps_per_epoch * epochs, steps_per_epoch * train.warmup_epochs
    drops = [epoch * steps_per_epoch for epoch in drop_epochs(train.lr_drop_epochs)]

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if train.schedule == "step":
            return train.lr_drop_factor ** sum(step >= at for at in drops)
        if train.schedule == "constant":
            return 1.0
        progress_ = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Phase:
    """One model being trained: model, optimiser, schedule, DDP/compile wrappers.

    Example::

        >>> from umilayers.baselines import LateFusion
        >>> phase = Phase(LateFusion({"rgb": 4}, num_outputs=3), FitConfig(), DistContext(), 10, 2)
        >>> type(phase.optimizer).__name__, phase.scheduler.get_last_lr()  # warm-up: 2e-3 / 10 steps
        ('AdamW', [0.0002])
    """

    def __init__(self, model: TaskModel, cfg: FitConfig, ctx: DistContext, steps_per_epoch: int,
                 epochs: int) -> None:
        train = cfg.train
        self.model = model.to(ctx.device)
        self.optimizer = make_optimizer(self.model, train)
        self.scheduler = lr_schedule(self.optimizer, train, steps_per_epoch, epochs)
        forward = torch.compile(self.model, dynamic=True) if train.compile else None
        step: nn.Module = TrainStep(self.model, forward)
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            step = DistributedDataParallel(step, device_ids=ids, find_unused_parameters=True)
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


def train_step(phase: Phase, batch: Batch, pseudo_targets: Optional[Tensor], scale: float,
               cfg: FitConfig, ctx: DistContext) -> Tensor:
    """One optimisation step on a batch already on the device.

    Returns:
        ``(4,)`` float64: the detached loss terms ``(total, align, supervised, pseudo)``, still
        on the device (nothing is read back to the host).
    """
    with autocast(cfg, ctx):
        terms = phase.step(batch.inputs, batch.padding_masks, batch.present, batch.targets,
                           pseudo_targets, batch.text_padding_mask)
    # DDP averages gradients over ranks; scaling by world * n_rank / n_global makes the
    # result the gradient of the global batch's mean loss (exact for per-sample means).
    (terms[0].float() * scale).backward()
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(phase.model.parameters(), cfg.train.grad_clip)
    phase.optimizer.step()
    phase.scheduler.step()
    phase.optimizer.zero_grad(set_to_none=True)
    return torch.stack([t.detach().double() for t in terms])


def train_epoch(
    phase: Phase,
    dataset: Dataset,
    keep: Optional[Iterable[str]],
    pseudo: Optional[Callable[[Batch], Tensor]],
    cfg: FitConfig,
    ctx: DistContext,
    tag: Any,
    epoch: int,
    on_step: Optional[Callable[[int, Batch, Optional[Tensor]], None]] = None,
) -> dict[str, float]:
    """One epoch over ``dataset``; returns the sample-weighted mean of each loss term.

    ``pseudo(batch)`` makes a batch's pseudo-labels from the batch still on the CPU (where the
    pseudo-label bank is); ``on_step(step, batch, pseudo_targets)`` runs after every step.
    """
    size = len(cast(Sized, dataset))  # the recipe's datasets are map-style: all sized
    sampler = GlobalBatchSampler(size, cfg.train.batch_size, cfg.train.seed, ctx.rank, ctx.world_size,
                                 tag=tag)
    sampler.set_epoch(epoch)
    set_epoch(dataset, epoch)  # the captions drawn this epoch (before the workers copy the dataset)
    scales = sampler.loss_scales()
    loader = make_loader(dataset, sampler, keep, cfg, ctx)
    phase.step.train()
    # total, align, supervised, pseudo (each * rows), rows: summed on the device, read once.
    sums = torch.zeros(5, dtype=torch.float64, device=ctx.device)
    for step, (batch, scale) in enumerate(zip(loader, scales)):
        pseudo_targets = pseudo(batch).to(ctx.device, non_blocking=True) if pseudo is not None else None
        batch = batch.to(ctx.device, non_blocking=True)
        if cfg.train.pair_same_label:
            batch, pseudo_targets = pair_same_label(batch, cfg.train.pair_same_label, pseudo_targets)
        terms = train_step(phase, batch, pseudo_targets, scale, cfg, ctx)
        rows = float(len(batch.indices)) if scale else 0.0
        sums[:4] += terms * rows
        sums[4] += rows
        if on_step is not None:
            on_step(step, batch, pseudo_targets)
    total = all_reduce_sum(sums.tolist(), ctx)
    count = max(total[4], 1.0)
    return {name: total[i] / count for i, name in enumerate(("loss", "align", "supervised", "pseudo"))}


# ============================================================================ prediction and metrics


def caption_embeddings(model: TaskModel, batch: Batch) -> tuple[Tensor, Tensor]:
    """``model.encode_text`` of every caption of a batch, ``(B, K, E)`` (zeros in the empty slots),
    and the captions of each row ``(B,)``.

    A batch of ``caption="all"`` items (``batch.caption_counts``) has ``(B, K, t, d)`` targets:
    only the valid slots are encoded and scattered back. Otherwise each row has one caption
    (``K = 1``).
    """
    if batch.caption_counts is None:
        text = model.encode_text(batch.targets, batch.text_padding_mask).float()
        return text[:, None], torch.ones(batch.size, dtype=torch.long, device=text.device)
    counts = batch.caption_counts
    valid = torch.arange(batch.targets.shape[1], device=counts.device)[None, :] < counts[:, None]  # (B, K)
    mask = batch.text_padding_mask[valid] if batch.text_padding_mask is not None else None
    encoded = model.encode_text(batch.targets[valid], mask).float()  # (valid slots, E)
    text = encoded.new_zeros(*valid.shape, encoded.shape[-1])
    text[valid] = encoded
    return text, counts


@torch.no_grad()
def predict(model: TaskModel, forward: Callable[..., UMIOutput], store: FeatureStore, names: Sequence[str],
            keep: Optional[Iterable[str]], cfg: FitConfig, ctx: DistContext, *,
            texts: bool = True, only: Optional[Sequence[int]] = None) -> dict[str, Tensor]:
    """Predictions on the rows of ``names`` that have a modality of ``keep`` (all rows when
    ``keep`` is None), or only the rows ``only`` of those (positions in that order), in split
    order then row order, with their ``indices`` and ``targets``; each rank predicts a
    contiguous shard, then all are gathered.

    Retrieval (with ``texts``): ``text`` ``(N, K, E)`` the embedding of every caption of each
    row (zeros past its count) and ``caption_counts`` ``(N,)``.
    """
    dataset = eval_set(store, names, keep, captions=texts)
    if only is not None:
        dataset = Subset(dataset, list(only))
    rows = shard_rows(len(cast(Sized, dataset)), ctx.rank, ctx.world_size)
    loader = make_loader(dataset, RowSampler(rows, cfg.train.batch_size), keep, cfg, ctx)
    was_training = model.training
    model.eval()
    retrieval_text = store.task == "retrieval" and texts
    parts: dict[str, list[Tensor]] = {"prediction": [], "indices": []}
    if store.task != "retrieval":
        parts["targets"] = []
    if retrieval_text:
        parts["text"], parts["caption_counts"] = [], []
    for batch in loader:
        batch = batch.to(ctx.device, non_blocking=True)
        with autocast(cfg, ctx):
            out = forward(batch.inputs, batch.padding_masks, batch.present)
            if retrieval_text:
                text, counts = caption_embeddings(model, batch)
                parts["text"].append(text)
                parts["caption_counts"].append(counts)
        parts["prediction"].append(out.prediction.float())
        if store.task != "retrieval":
            parts["targets"].append(batch.targets)
        parts["indices"].append(batch.indices)
    model.train(was_training)
    return _gather(parts, store, ctx)


@torch.no_grad()
def encode_captions(model: TaskModel, store: FeatureStore, names: Sequence[str], cfg: FitConfig,
                    ctx: DistContext) -> dict[str, Tensor]:
    """``model.encode_text`` of every caption of every row of ``names`` (whatever modalities the
    rows have): ``text`` ``(N, K, E)``, ``caption_counts`` and ``indices``; sharded over the
    ranks and gathered like :func:`predict`."""
    dataset = eval_set(store, names, None)
    rows = shard_rows(len(cast(Sized, dataset)), ctx.rank, ctx.world_size)
    loader = make_loader(dataset, RowSampler(rows, cfg.train.batch_size), (), cfg, ctx)
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {"text": [], "caption_counts": [], "indices": []}
    for batch in loader:
        batch = batch.to(ctx.device, non_blocking=True)
        with autocast(cfg, ctx):
            text, counts = caption_embeddings(model, batch)
        parts["text"].append(text)
        parts["caption_counts"].append(counts)
        parts["indices"].append(batch.indices)
    model.train(was_training)
    return _gather(parts, store, ctx)


def _empty_like_rows(key: str, store: FeatureStore, ctx: DistContext) -> Tensor:
    """A part with no rows, shaped like the rows of ``key`` (a rank with no rows, or an empty
    selection, still takes part in the gather)."""
    width = int(store.num_outputs)
    if key in ("indices", "caption_counts") or (key == "targets" and store.task == "classification"):
        return torch.zeros(0, dtype=torch.long, device=ctx.device)
    if key == "text":  # (N, K, E): every caption slot of a row (caption="all" pads to max_captions)
        return torch.zeros(0, store.max_captions if _several_captions(store) else 1, width, device=ctx.device)
    return torch.zeros(0, width, device=ctx.device)


def _gather(parts: Mapping[str, list[Tensor]], store: FeatureStore, ctx: DistContext) -> dict[str, Tensor]:
    """Concatenate each part over the batches, then over the ranks (rank order), on the CPU."""
    return {key: all_gather_rows(torch.cat(values) if values else _empty_like_rows(key, store, ctx), ctx).cpu()
            for key, values in parts.items()}


def compute_metrics(task: str, predicted: Mapping[str, Tensor]) -> dict[str, Any]:
    """The metrics of :func:`predict`'s output: top-1, MAE, or retrieval ranks both ways.

    Retrieval with several captions per video scores them as Collaborative Experts does: every
    caption is a text-to-video query, video-to-text takes each video's best-ranked caption, and
    tied similarities get the mean of their positions (``ties="average"``); with one caption per
    video the ranks are pessimistic (a tie counts against the model).
    """
    count = int(predicted["prediction"].shape[0])
    if task == "classification":
        return {"top1": metrics.top1(predicted["prediction"], predicted["targets"]), "num_samples": count}
    if task == "regression":
        return {"mae": metrics.mae(predicted["prediction"], predicted["targets"]), "num_samples": count}
    counts = predicted["caption_counts"]
    valid = torch.arange(predicted["text"].shape[1])[None, :] < counts[:, None]
    text = predicted["text"][valid]  # every caption, in row order
    sim = text.double() @ predicted["prediction"].double().t()
    # Several captions per video: CE's protocol, every caption a query, ties averaged (its rule).
    several = predicted["text"].shape[1] > 1
    out = metrics.retrieval_metrics(sim, metrics.caption_owners(counts) if several else None,
                                    ties="average" if several else "pessimistic")
    result = {"mean_rank": out["mean_rank"], "t2v": out["t2v"], "v2t": out["v2t"], "num_samples": count}
    if several:
        result["num_captions"] = int(counts.sum())
    return result


def metric_score(task: str, result: Mapping[str, Any]) -> float:
    """The model-selection score of a metrics dict (higher is better): top-1, ``-mae`` or
    ``-mean_rank``.

    Example::

        >>> metric_score("regression", {"mae": 0.5})
        -0.5
    """
    if task == "classification":
        return float(result["top1"])
    if task == "regression":
        return -float(result["mae"])
    return -float(result["mean_rank"])
