"""The two-stage training recipe of the paper: unimodal models -> pseudo-labels -> multimodal model.

:func:`fit` trains one method on a :class:`~umilayers.data.FeatureStore` and writes a run
directory; :func:`evaluate` reloads the best model of a run and scores it on a split, with all
or only some modalities. ``umilayers fit`` / ``umilayers evaluate`` (:mod:`umilayers.cli`) are
thin wrappers with the same options.

Stages
------
1. **Unimodal** (``umi`` and ``pooled`` with pseudo-labels on): for each modality, a unimodal model
   (mean-pooled tokens, linear head) is trained on the training samples that have it (the rows of
   the splits with the modality, less the rows that lack it) for ``unimodal_epochs`` epochs; after
   each of the last ``pseudo_window`` epochs (by default ``min(10, unimodal_epochs)``) it predicts
   on all of them and the predictions go into a :class:`~umilayers.pseudo_labels.PseudoLabelBank`,
   saved to ``DIR/pseudo_labels/`` at the end of the stage; a sample's pseudo-labels then come from
   the modalities it has. For retrieval each unimodal model also embeds every caption of every
   training row with its own text encoder (``text_embeddings.pt``, ``(N, K, E)`` float16 per
   modality), and the pseudo-labels of stage 2 are either ``(B, B)`` video-to-caption similarities
   averaged over the sample's modalities, each measured in one unimodal space
   (``retrieval_pseudo="relational"``, :func:`retrieval_pseudo_targets`), or the paper's ``(B, E)``
   averaged video embedding of the modality closest to the caption (``"paper"``,
   :func:`retrieval_paper_targets`).
2. **Multimodal**: the method is trained for ``epochs`` epochs on batches mixed from all
   training splits (a retrieval row with several captions carries one, drawn per epoch); after
   each epoch it is scored on the val splits (every caption of a row) (top-1, ``-mae`` or
   ``-mean_rank``) and the best epoch is kept; that model is finally scored on the test splits.

Run directory
-------------
``config.json`` (the :class:`~umilayers.train.config.FitConfig`, store path, task),
``checkpoint.pt`` (everything needed to continue, rewritten atomically after every epoch),
``log.jsonl`` (one JSON object per epoch and stage), ``model.pt`` (the best model),
``metrics.json`` and ``test_predictions.npy`` (rows of the test splits in store order: class
probabilities, values or video embeddings).

Epochs are numbered from 1 in everything written to be read: ``log.jsonl`` (``epoch``,
``best_epoch``), ``metrics.json`` (``best_epoch``), ``model.pt`` (``epoch``), the
:class:`~umilayers.train.loop.FitEvent` s and the progress lines (``quiet`` off: one line per
epoch on stderr, with the stage, the epoch, its loss, the val metric, the time elapsed and an
estimate of what remains, the same on a terminal and in a log file). ``checkpoint.pt`` keeps
its own counters.

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
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Sized, Union, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from umilayers._io import (
    append_jsonl,
    atomic_numpy_save,
    atomic_torch_save,
    atomic_write_json,
    read_json,
    remove_entries,
)
from umilayers._progress import Heartbeat
from umilayers._validation import InvalidArgument, OutputExistsError
from umilayers._version import __version__
from umilayers.baselines import build_model, model_from_spec, model_spec
from umilayers.data import Batch, FeatureStore, StoreError
from umilayers.model import TaskModel
from umilayers.pseudo_labels import PseudoLabelBank, closest_to_truth
from umilayers.train.checkpoint import capture_rng_state, derive_seed, restore_rng_state
from umilayers.train.config import FitConfig, RuntimeConfig
from umilayers.train.distributed import DistContext, setup, teardown
from umilayers.train.loop import (
    Callback,
    FitEvent,
    Phase,
    compute_metrics,
    encode_captions,
    metric_score,
    predict,
    splits,
    train_epoch,
    train_set,
)

__all__ = ["RunExistsError", "fit", "evaluate", "model_for_store", "retrieval_pseudo_targets",
           "retrieval_paper_targets", "CHECKPOINT_VERSION", "RUN_FILES"]

#: Version of ``checkpoint.pt``; a resume refuses any other (3: caption tables ``(N, K, E)``).
CHECKPOINT_VERSION = 3
#: What a run directory holds: name -> what it is.
RUN_FILES = {
    "metrics.json": "val and test metrics of the best model",
    "model.pt": "the best model (its epoch chosen on val)",
    "test_predictions.npy": "the best model's test outputs, one row per test sample in store order",
    "config.json": "every option of the run, its store and task",
    "log.jsonl": "one line per epoch: losses, val metrics, time, torch threads",
    "checkpoint.pt": "the state after the last epoch (what resume continues from)",
    "pseudo_labels": "stage 1's pseudo-labels (PseudoLabelBank)",
}

PathLike = Union[str, "os.PathLike[str]"]


class RunExistsError(OutputExistsError):
    """The run directory already holds a run and neither ``resume`` nor ``overwrite`` was given.

    An :class:`~umilayers._validation.InvalidArgument` of ``out`` (the command line names
    ``--out``, ``--resume`` and ``--overwrite``) and a ``FileExistsError``.
    """


# ============================================================================ store and model


def _open_store(store: Union[PathLike, FeatureStore]) -> FeatureStore:
    """The store, deeply validated (every feature scanned for NaN/inf: the data's one check)."""
    if isinstance(store, FeatureStore):
        store.validate(deep=True)
        return store
    return FeatureStore(store, deep=True)


def _check_compatible(cfg: FitConfig, store: FeatureStore) -> None:
    """Method/task/store checks that do not need any data."""
    if not store.splits_with_role("train"):
        raise StoreError(f"{store.path}: the store has no split with role 'train'")
    for role in ("val", "test"):
        if not store.splits_with_role(role):
            raise StoreError(f"{store.path}: the store has no split with role {role!r} "
                             f"(fit selects the best epoch on val and reports test)")
    if cfg.method == "unimodal":
        if cfg.modality not in store.modalities:
            raise InvalidArgument("modality", f"{cfg.modality!r} is not a modality of the store "
                                              f"(modalities: {sorted(store.modalities)})")
        for role in ("train", "val", "test"):
            if not any(cfg.modality in store.splits[s].modalities for s in store.splits_with_role(role)):
                raise InvalidArgument("modality", f"no {role} split of the store has {cfg.modality!r}")
    if cfg.train.pair_same_label and store.task != "classification":
        raise InvalidArgument("pair_same_label", f"pairs rows of the same class: classification only, the store's "
                                                 f"task is {store.task!r}")
    num_align_tokens = cfg.model.num_align_tokens
    if store.task == "classification" and num_align_tokens not in (None, store.num_outputs):
        raise InvalidArgument("num_align_tokens", f"classification uses one token per class "
                                                  f"({store.num_outputs}), got {num_align_tokens}")


def model_for_store(cfg: FitConfig, store: FeatureStore, method: Optional[str] = None,
                    modality: Optional[str] = None) -> TaskModel:
    """A fresh model of ``method`` (default: ``cfg``'s) for ``store``'s modalities, outputs and task,
    with ``cfg``'s hyper-parameters (stage 1 asks for ``method="unimodal"`` and a ``modality``)."""
    if method is None:
        method, modality = cfg.method, modality or cfg.modality
    subsets = None
    if cfg.subset_ensemble and method in ("umi", "pooled"):
        subsets = sorted({store.splits[s].modalities for s in store.splits_with_role("train")})
    return build_model(
        method,
        {m: int(d) for m, (_, d) in sorted(store.modalities.items())},
        int(store.num_outputs),
        store.task,
        config=cfg.model,
        text_dim=int(store.text[1]) if store.text is not None else None,
        modality_tokens={m: int(k) for m, (k, _) in store.modalities.items()},
        modality=modality,
        predictor=cfg.predictor,
        ensemble_subsets=subsets,
    )


# ============================================================================ the run directory


def _prepare_run_dir(out: Path, cfg: FitConfig, store: FeatureStore, resume: bool,
                     overwrite: bool) -> Optional[dict]:
    """Check the directory against ``resume``/``overwrite``; return the checkpoint to resume
    from (or None). Called on rank 0 only."""
    if resume and overwrite:
        raise InvalidArgument("resume", "pass at most one of {resume} and {overwrite}", refs=("resume", "overwrite"))
    finished = (out / "metrics.json").is_file()
    started = (out / "checkpoint.pt").is_file() or (out / "config.json").is_file()
    if overwrite:
        remove_entries(out, RUN_FILES)
        started = finished = False
    elif not resume and (finished or started):
        what = "a finished run (metrics.json)" if finished else "an unfinished run (checkpoint.pt)"
        raise RunExistsError("out", f"{out} already holds {what}; pass {{resume}} to continue it or "
                                    f"{{overwrite}} to start again", refs=("resume", "overwrite"))
    elif resume and not (out / "config.json").is_file():
        raise InvalidArgument("resume", f"{out} holds no run to continue (no config.json); leave out {{resume}} to "
                                        f"start one", refs=("resume",))
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = None
    if resume and (out / "config.json").is_file():
        saved = read_json(out / "config.json")
        previous = FitConfig.from_dict(saved["config"]).result_options()
        differences = {k: (previous[k], v) for k, v in cfg.result_options().items() if previous.get(k) != v}
        if differences:
            listed = ", ".join(f"{{{k}}}: run has {a!r}, given {b!r}" for k, (a, b) in differences.items())
            raise InvalidArgument("resume", f"{out}: cannot resume with different options ({listed})",
                                  refs=tuple(differences))
        if (out / "checkpoint.pt").is_file():
            checkpoint = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
            if checkpoint.get("version") != CHECKPOINT_VERSION:
                raise InvalidArgument("resume", f"{out / 'checkpoint.pt'}: checkpoint version "
                                                f"{checkpoint.get('version')!r}, this umilayers resumes version "
                                                f"{CHECKPOINT_VERSION}; pass {{overwrite}} to start again",
                                      refs=("overwrite",))
    if not (out / "config.json").is_file():
        atomic_write_json(out / "config.json", {
            "config": cfg.to_dict(), "store": str(Path(store.path).resolve()), "task": store.task,
            "umilayers": __version__,
        })
    return checkpoint


def _check_out(out: Path, store: Path) -> None:
    """Refuse a run folder that is the store or inside it, and a store inside a folder that
    ``overwrite`` deletes. A store elsewhere inside the run folder is left alone: only the run's
    own files (:data:`RUN_FILES`) are ever written or deleted there."""
    out, store = out.resolve(), store.resolve()
    if out == store or store in out.parents:
        raise InvalidArgument("out", f"the run would be written into the store {store}; write it to a folder "
                                     f"outside the store (e.g. runs/NAME)")
    for name in RUN_FILES:
        if (out / name) == store or (out / name) in store.parents:
            raise InvalidArgument("out", f"the store {store} is inside {out / name}, which the run writes; choose "
                                         f"another run folder")


def _on_main(ctx: DistContext, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and share its result; an error on rank 0 is raised on every rank."""
    if not ctx.distributed:
        return fn()
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


def fit(store: Union[PathLike, FeatureStore], method: Optional[str] = None, out: Optional[PathLike] = None, *,
        config: Optional[FitConfig] = None, resume: bool = False, overwrite: bool = False,
        callback: Optional[Callback] = None, **options: Any) -> dict[str, Any]:
    """Train ``method`` on a FeatureStore and write the run directory ``out``.

    Args:
        store: a store directory or an open :class:`~umilayers.data.FeatureStore`.
        method: ``"umi"``, ``"late-fusion"``, ``"vanilla"``, ``"pooled"`` or ``"unimodal"``
            (default: ``config``'s).
        out: the run directory (created).
        config: a :class:`~umilayers.train.config.FitConfig` to start from (``method`` and
            ``options`` override it).
        resume: continue the run in ``out`` from its last complete checkpoint.
        overwrite: delete a previous run in ``out`` first.
        callback: called with a :class:`~umilayers.train.loop.FitEvent` after every step,
            epoch and checkpoint, on every process.
        **options: any option of :class:`~umilayers.train.config.FitConfig`'s concerns, by name
            (``epochs=2, num_tokens=8, device="cpu", ...``).

    Returns:
        The metrics written to ``out/metrics.json``:
        ``{"method", "task", "seed", "val": {...}, "test": {...}}``.

    Raises:
        StoreError: the store is invalid (checked, deeply, before any training).
        RunExistsError: ``out`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        InvalidArgument: a bad option, or one that does not fit the store (naming it); ``out``
            inside the store; ``resume`` without a run in ``out``.
    """
    if out is None:
        raise TypeError("fit: missing the run directory `out`")
    if method is not None:
        options["method"] = method
    cfg = FitConfig.from_options(config, **options)
    _check_out(Path(out), Path(store.path if isinstance(store, FeatureStore) else store))
    ctx = setup(cfg.runtime.device)
    try:
        # The deep check (every feature scanned for NaN/inf) runs once, on rank 0.
        path = _on_main(ctx, lambda: str(_open_store(store).path))
        store_obj = store if isinstance(store, FeatureStore) else FeatureStore(path)
        _check_compatible(cfg, store_obj)
        out_path = Path(out)
        checkpoint = _on_main(ctx, lambda: _prepare_run_dir(out_path, cfg, store_obj, resume, overwrite))
        if ctx.distributed and not ctx.is_main and resume and (out_path / "checkpoint.pt").is_file():
            checkpoint = torch.load(out_path / "checkpoint.pt", map_location="cpu", weights_only=False)
        if resume and (out_path / "metrics.json").is_file():
            return read_json(out_path / "metrics.json")
        return _Run(cfg, store_obj, out_path, ctx, checkpoint, callback).run()
    finally:
        teardown(ctx)


def _slots(indices: Tensor, caption_slots: Optional[Tensor]) -> Tensor:
    return torch.zeros_like(indices) if caption_slots is None else caption_slots


def retrieval_pseudo_targets(bank: PseudoLabelBank, text_embeddings: Mapping[str, Tensor], indices: Tensor,
                             present: Mapping[str, Tensor], caption_slots: Optional[Tensor] = None) -> Tensor:
    """Retrieval pseudo-labels of a batch (``retrieval_pseudo="relational"``): ``(B, B)`` teacher
    similarities.

    Row ``i`` is the mean over the modalities ``m`` present in sample ``i`` of
    ``cos(p_i^m, t_j^m)``, with ``p_i^m`` the bank's averaged video embedding of unimodal model
    ``m`` and ``t_j^m`` that same model's embedding of the caption row ``j`` carries
    (``text_embeddings[m][indices[j], caption_slots[j]]``, a ``(N, K, E)`` table over every
    training caption). Each cosine is measured in one unimodal space and only similarities
    reach the loss (:func:`~umilayers.losses.similarity_distillation_loss`), so the multimodal
    model is never pulled towards embeddings of spaces foreign to its own text encoder, and the
    teachers of several modalities can be averaged (their embeddings could not: each unimodal
    model has its own text encoder). The average, like late fusion, was chosen over the
    closest-to-ground-truth modality on the val split (docs/accuracy.rst).

    Shape:
        - indices, caption_slots: ``(B,)`` training-sample ids and caption slots (default 0);
          present[m]: ``(B,)`` bool
        - output: ``(B, B)`` (on the CPU, where the bank is)
    """
    slots = _slots(indices, caption_slots)
    total = torch.zeros(len(indices), len(indices))
    count = torch.zeros(len(indices))
    for m, mask in present.items():
        rows = mask.nonzero().flatten()
        if rows.numel() == 0:
            continue
        values = bank.targets(indices[rows], {m: torch.ones(rows.numel(), dtype=torch.bool)})
        captions = text_embeddings[m][indices, slots].float()  # (B, E): every caption of the batch
        total[rows] += F.normalize(values, dim=-1) @ F.normalize(captions, dim=-1).T  # (rows, B)
        count[rows] += 1
    return total / count.clamp_min(1)[:, None]


def retrieval_paper_targets(bank: PseudoLabelBank, text_embeddings: Mapping[str, Tensor], indices: Tensor,
                            present: Mapping[str, Tensor], caption_slots: Optional[Tensor] = None) -> Tensor:
    """Retrieval pseudo-labels of a batch as the paper defines them (``retrieval_pseudo="paper"``,
    Sec. 3.3): ``(B, E)`` video embeddings.

    For each sample, among the modalities it has, the bank's averaged video embedding ``p_i^m``
    of the modality whose cosine with the ground truth is highest
    (:func:`~umilayers.pseudo_labels.closest_to_truth`). The ground truth of modality ``m`` is
    the sample's caption embedded by unimodal model ``m``'s own text encoder
    (``text_embeddings[m][i, slot]``): each unimodal model has its own embedding space, and only
    there is the comparison meaningful. Ties go to the first modality in sorted order. The
    multimodal model learns from it with the triplet loss of :meth:`TaskLoss.pseudo
    <umilayers.losses.TaskLoss.pseudo>`.

    Shape:
        - indices, caption_slots: ``(B,)``; present[m]: ``(B,)`` bool
        - output: ``(B, E)`` L2-normalised (on the CPU)
    """
    slots = _slots(indices, caption_slots)
    names = sorted(present)
    available = torch.stack([present[m] for m in names])  # (M, B)
    width = next(iter(text_embeddings.values())).shape[-1]
    candidates = torch.zeros(len(names), len(indices), width)
    truth = torch.zeros(len(names), len(indices), width)  # each modality's own caption embedding
    for i, (m, rows) in enumerate(zip(names, available)):
        if bool(rows.any()):
            values = bank.targets(indices[rows], {m: torch.ones(int(rows.sum()), dtype=torch.bool)})
            candidates[i, rows] = F.normalize(values, dim=-1)
            truth[i, rows] = text_embeddings[m][indices[rows], slots[rows]].float()
    return closest_to_truth(candidates, available, truth)


class _Run:
    """The state of one :func:`fit` call."""

    def __init__(self, cfg: FitConfig, store: FeatureStore, out: Path, ctx: DistContext,
                 checkpoint: Optional[dict], callback: Optional[Callback]) -> None:
        self.cfg = cfg
        self.store = store
        self.out = out
        self.ctx = ctx
        self.checkpoint = checkpoint or {}
        self.callback = callback
        self.keep: Optional[tuple[str, ...]] = (cfg.modality,) if cfg.method == "unimodal" and cfg.modality else None
        self.bank: Optional[PseudoLabelBank] = None
        self.text_embeddings: dict[str, Tensor] = {}
        self.done: list[str] = []
        self.heartbeat: Optional[Heartbeat] = None
        self.last_tick = 0.0

    # ------------------------------------------------------------------ bookkeeping
    def tell(self, kind: str, stage: str, epoch: int, **details: Any) -> None:
        """Call the callback; ``epoch`` counts from 0 here, from 1 in the event (as in the files)."""
        if self.callback is not None:
            self.callback(FitEvent(kind, stage, epoch + 1, **details))

    def say(self, line: str) -> None:
        """A progress line on stderr (rank 0, unless ``quiet``)."""
        if self.ctx.is_main and not self.cfg.runtime.quiet:
            print(line, file=sys.stderr, flush=True)

    def epochs_done(self, stage1: int) -> int:
        """Epochs of both stages done before this process (``stage1``: how many stage 1 has)."""
        ck, per_model = self.checkpoint, self.cfg.train.unimodal_epochs
        if ck.get("stage") == 2:
            return stage1 + ck["epoch"] + 1
        if ck.get("stage1_done"):
            return stage1
        if ck.get("stage") == 1:
            return len(ck["modalities_done"]) * per_model + (ck["current"]["epoch"] + 1 if ck.get("current") else 0)
        return 0

    def start_progress(self) -> None:
        """The run's first line, and the :class:`~umilayers._progress.Heartbeat` of its epochs."""
        cfg = self.cfg
        models = len(self.train_modalities()) if cfg.uses_pseudo_labels else 0
        stage1 = models * cfg.train.unimodal_epochs
        done = self.epochs_done(stage1)
        self.heartbeat = Heartbeat(["unimodal"] * stage1 + ["multimodal"] * cfg.train.epochs, start=done)
        self.last_tick = time.perf_counter()
        plan = (f"stage 1: {models} unimodal model(s) x {cfg.train.unimodal_epochs} epochs, then "
                if models else "") + f"{cfg.train.epochs} epochs of {cfg.method}"
        resumed = f", resuming after epoch {done} of {len(self.heartbeat.plan)}" if self.checkpoint else ""
        self.say(f"fit {cfg.method} on {self.store.path} -> {self.out}: {plan}; one line per epoch{resumed}")

    def epoch_line(self, kind: str, what: str) -> None:
        """One progress line for an epoch just finished (logged and checkpointed)."""
        now = time.perf_counter()
        assert self.heartbeat is not None  # start_progress runs before the first epoch
        line = self.heartbeat.tick(kind, now - self.last_tick, what)
        self.last_tick = now
        self.say(line)

    def log(self, record: dict) -> None:
        if self.ctx.is_main:
            # The thread count can change a result's last bits, and may differ on resume.
            append_jsonl(self.out / "log.jsonl", {**record, "time": round(time.time(), 3),
                                                  "threads": torch.get_num_threads()})

    def end_epoch(self, stage: str, epoch: int, record: dict, state: dict, modality: Optional[str] = None) -> None:
        """Checkpoint, then log: a record in log.jsonl always has its checkpoint."""
        self.save_checkpoint(state)
        self.tell("checkpoint", stage, epoch, modality=modality)
        self.log(record)
        self.tell("epoch", stage, epoch, modality=modality, record=record)

    def save_checkpoint(self, state: dict) -> None:
        if self.ctx.is_main:
            atomic_torch_save(self.out / "checkpoint.pt", {
                "version": CHECKPOINT_VERSION, "config": self.cfg.to_dict(), "rng": capture_rng_state(), **state,
            })
        self.ctx.barrier()

    def seed_epoch(self, *tag: Any) -> None:
        seed = derive_seed(self.cfg.train.seed, *tag, self.ctx.rank)
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))
        random.seed(seed)

    def init_model(self, method: str, modality: Optional[str], *tag: Any) -> TaskModel:
        torch.manual_seed(derive_seed(self.cfg.train.seed, "init", method, *tag))  # the same on every rank
        return model_for_store(self.cfg, self.store, method, modality)

    def on_step(self, stage: str, epoch: int, modality: Optional[str] = None) -> Optional[Callable]:
        if self.callback is None:
            return None
        return lambda step, batch, pseudo: self.tell("step", stage, epoch, modality=modality, step=step,
                                                     batch=batch, pseudo_targets=pseudo)

    # ------------------------------------------------------------------ main
    def run(self) -> dict[str, Any]:
        if self.checkpoint:
            restore_rng_state(self.checkpoint["rng"])  # then re-seeded per epoch anyway
            self.log({"event": "resume", "stage": self.checkpoint.get("stage"),
                      "epoch": self.checkpoint.get("epoch", -1) + 1})  # the last epoch done (0: none)
        self.start_progress()
        if self.cfg.uses_pseudo_labels:
            self.stage_unimodal()
        return self.stage_multimodal()

    # ------------------------------------------------------------------ stage 1
    def train_modalities(self) -> list[str]:
        return sorted({m for s in self.store.splits_with_role("train") for m in self.store.splits[s].modalities})

    def stage_unimodal(self) -> None:
        cfg, store = self.cfg, self.store
        ck = self.checkpoint
        if ck.get("stage") == 2 or ck.get("stage1_done"):
            self.load_bank()
            return
        modalities = self.train_modalities()
        self.bank = PseudoLabelBank(store.num_train, int(store.num_outputs), modalities,
                                    window=cfg.train.window(), total_epochs=cfg.train.unimodal_epochs,
                                    dtype=torch.float32)
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
        self.tell("checkpoint", "unimodal", cfg.train.unimodal_epochs - 1)
        self.log({"stage": "unimodal", "event": "pseudo_labels_saved", "path": str(bank_dir)})

    def load_bank(self) -> None:
        bank_dir = self.out / "pseudo_labels"
        self.bank = PseudoLabelBank.load(bank_dir)
        if self.store.task == "retrieval":
            self.text_embeddings = torch.load(bank_dir / "text_embeddings.pt", map_location="cpu")

    def train_unimodal(self, modality: str, resume_state: Optional[dict]) -> None:
        """Train the unimodal model of ``modality`` and record its predictions in the bank."""
        cfg, store, ctx = self.cfg, self.store, self.ctx
        epochs, window = cfg.train.unimodal_epochs, cfg.train.window()
        assert self.bank is not None
        names = splits(store, "train", [modality])
        keep = (modality,)
        dataset: Dataset = train_set(store, names, keep, cfg)  # only the rows that have the modality
        tag: tuple[Any, ...] = (modality,)
        model = self.init_model("unimodal", modality, *tag)
        steps = math.ceil(len(cast(Sized, dataset)) / cfg.train.batch_size)
        phase = Phase(model, cfg, ctx, steps, epochs)
        start = 0
        if resume_state is not None:
            phase.load(resume_state["phase"])
            start = resume_state["epoch"] + 1
        for epoch in range(start, epochs):
            self.seed_epoch("unimodal", *tag, epoch)
            losses = train_epoch(phase, dataset, keep, None, cfg, ctx, ("unimodal", *tag), epoch,
                                 self.on_step("unimodal", epoch, modality))
            record = {"stage": "unimodal", "modality": modality, "epoch": epoch + 1, **losses}
            if epoch >= epochs - window:
                # Every rank predicts its shard; the gathered predictions update every rank's
                # bank identically.
                predicted = predict(phase.model, phase.forward, store, names, keep, cfg, ctx, texts=False)
                self.bank.update(modality, predicted["indices"], predicted["prediction"], epoch)
                record["pseudo_labels"] = int(predicted["indices"].numel())
                if store.task == "retrieval" and epoch == epochs - 1:
                    # This unimodal model's embedding of EVERY train caption, every slot (also of
                    # rows without the modality): the teacher similarities of the pseudo loss
                    # compare a video with all the captions of a batch, in this model's own space.
                    # float16: 7 modalities x 6,513 videos x 20 captions x 256 is 0.47 GB.
                    encoded = encode_captions(phase.model, store, splits(store, "train"), cfg, ctx)
                    table = torch.zeros(store.num_train, *encoded["text"].shape[1:], dtype=torch.float16)
                    table[encoded["indices"]] = encoded["text"].half()
                    self.text_embeddings[modality] = table
            self.end_epoch("unimodal", epoch, record, {
                "stage": 1, "modalities_done": list(self.done), "bank": self.bank.state_dict(),
                "text_embeddings": self.text_embeddings,
                "current": {"modality": modality, "epoch": epoch, "phase": phase.state()},
            }, modality)
            self.epoch_line("unimodal", f"unimodal {'/'.join(map(str, tag))} epoch {epoch + 1}/{epochs}: "
                                        f"loss {losses['loss']:.4f}")

    def pseudo_targets(self, batch: Batch) -> Tensor:
        """The batch's pseudo-labels, from the batch on the CPU (where the bank is).

        Classification and regression: ``(B, C)`` from the bank (the paper's
        closest-to-ground-truth rule). Retrieval: ``(B, B)`` teacher similarities
        (:func:`retrieval_pseudo_targets`) or the paper's ``(B, E)`` embeddings
        (:func:`retrieval_paper_targets`), for the caption each row carries.
        """
        assert self.bank is not None
        if self.store.task != "retrieval":
            return self.bank.targets(batch.indices, batch.present, batch.targets)
        rule = retrieval_paper_targets if self.cfg.model.retrieval_pseudo == "paper" else retrieval_pseudo_targets
        return rule(self.bank, self.text_embeddings, batch.indices, batch.present, batch.caption_slots)

    # ------------------------------------------------------------------ stage 2
    def stage_multimodal(self) -> dict[str, Any]:
        cfg, store, ctx = self.cfg, self.store, self.ctx
        epochs = cfg.train.epochs
        train_names = splits(store, "train", self.keep)
        dataset = train_set(store, train_names, self.keep, cfg)
        model = self.init_model(cfg.method, cfg.modality)
        steps = math.ceil(len(cast(Sized, dataset)) / cfg.train.batch_size)
        phase = Phase(model, cfg, ctx, steps, epochs)
        val_names = splits(store, "val", self.keep)
        start = 0
        best: dict[str, Any] = {"epoch": -1, "score": -float("inf"), "val": None, "model": None}
        ck = self.checkpoint
        if ck.get("stage") == 2:
            phase.load(ck["phase"])
            start = ck["epoch"] + 1
            best = ck["best"]
        pseudo = self.pseudo_targets if cfg.uses_pseudo_labels else None
        for epoch in range(start, epochs):
            self.seed_epoch("multimodal", epoch)
            losses = train_epoch(phase, dataset, self.keep, pseudo, cfg, ctx, "multimodal", epoch,
                                 self.on_step("multimodal", epoch))
            val = compute_metrics(store.task, predict(phase.model, phase.forward, store, val_names, self.keep,
                                                      cfg, ctx))
            score = metric_score(store.task, val)
            if score > best["score"]:
                best = {"epoch": epoch, "score": score, "val": val,
                        "model": copy.deepcopy({k: v.detach().cpu() for k, v in phase.model.state_dict().items()})}
            record = {"stage": "multimodal", "epoch": epoch + 1, **losses, "val": val, "score": score,
                      "best_epoch": best["epoch"] + 1, "lr": phase.scheduler.get_last_lr()[0]}
            self.end_epoch("multimodal", epoch, record, {"stage": 2, "epoch": epoch, "phase": phase.state(),
                                                         "best": best})
            metric = next(k for k in ("top1", "mae", "mean_rank") if k in val)
            self.epoch_line("multimodal", f"{cfg.method} epoch {epoch + 1}/{epochs}: loss {losses['loss']:.4f}, val "
                                          f"{metric} {val[metric]:.4f}" + (" (best)" if best["epoch"] == epoch else ""))
        return self.finish(phase, best)

    def finish(self, phase: Phase, best: dict) -> dict[str, Any]:
        cfg, store, ctx = self.cfg, self.store, self.ctx
        phase.model.load_state_dict(best["model"])
        test_names = splits(store, "test", self.keep)
        predicted = predict(phase.model, phase.forward, store, test_names, self.keep, cfg, ctx)
        test = compute_metrics(store.task, predicted)
        result = {"method": cfg.method, "task": store.task, "seed": cfg.train.seed,
                  "val": best["val"], "test": test, "best_epoch": best["epoch"] + 1,
                  "test_splits": test_names, "world_size": ctx.world_size}
        if cfg.modality:
            result["modality"] = cfg.modality
        if ctx.is_main:
            atomic_torch_save(self.out / "model.pt", {"spec": model_spec(phase.model), "state_dict": best["model"],
                                                      "epoch": best["epoch"] + 1, "config": cfg.to_dict()})
            atomic_numpy_save(self.out / "test_predictions.npy", predicted["prediction"].numpy())
            atomic_write_json(self.out / "metrics.json", result)
        self.log({"stage": "test", "best_epoch": best["epoch"] + 1, "test": test})
        ctx.barrier()
        return result


# ============================================================================ evaluate


def evaluate(run_dir: PathLike, store: Union[PathLike, FeatureStore, None] = None, split: str = "test",
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
    if not (run / "model.pt").is_file() or not (run / "config.json").is_file():
        missing = "model.pt" if not (run / "model.pt").is_file() else "config.json"
        raise InvalidArgument("run_dir", f"{run / missing}: missing; is {run} a finished umilayers run?")
    saved = read_json(run / "config.json")
    cfg = FitConfig.from_dict(saved["config"])
    cfg = cfg.replace(runtime=RuntimeConfig(device=device, num_workers=num_workers, quiet=True))
    if batch_size is not None:
        cfg = cfg.replace(train=cfg.train.replace(batch_size=batch_size))
    store_obj = _open_store(store if store is not None else saved["store"])
    checkpoint = torch.load(run / "model.pt", map_location="cpu", weights_only=False)
    spec = checkpoint["spec"]
    config = spec["config"]
    model_modalities = sorted(config["modality_dims"]) if "modality_dims" in config else [config["modality"]]
    keep = model_modalities if modalities is None else sorted(modalities)
    unknown = sorted(set(keep) - set(model_modalities))
    if unknown or not keep:
        raise InvalidArgument("modalities", f"expected a non-empty subset of the model's {model_modalities}, "
                                            f"got {list(keep)}")
    names = splits(store_obj, split, keep)
    if not names:
        raise InvalidArgument("split", f"{split!r}: no split has any of the modalities {keep}")
    ctx = setup(device)
    try:
        model = model_from_spec(spec)
        model.load_state_dict(checkpoint["state_dict"])
        model.to(ctx.device)
        result = compute_metrics(store_obj.task, predict(model, model, store_obj, names, tuple(keep), cfg, ctx))
    finally:
        teardown(ctx)
    return {**result, "split": split, "splits": names, "modalities": keep}
