"""Rehearsal of each ``--preset paper``: does it learn, at the benchmark's real shapes?

For each benchmark (EPIC-Kitchens, robot, MSR-VTT) this writes a synthetic FeatureStore with that
benchmark's real per-sample shapes, label space and split of modalities, then runs
:func:`umilayers.train.fit` with ``PRESETS["paper"][benchmark]`` unchanged except for what a
rehearsal must scale (:func:`scaled_options`): the number of samples (the store's size),
``epochs``, ``unimodal_epochs`` and ``pseudo_window`` (in the paper's ratio ``e / 20``), and
the EPIC learning-rate drop epoch (at the paper's ``70 / 120`` of the epochs). It reports

- the stage-1 loss of every unimodal model at its first and last epoch (``log.jsonl``);
- the pseudo-labels against uninformative ones (from ``run/pseudo_labels``): classification,
  their mean entropy against ``log C``; regression, their MAE against the training mean's;
  retrieval, the mean rank of a row's own caption among the training rows in each unimodal
  space (``text_embeddings.pt``) against a random ranking's;
- the stage-2 (best-epoch) val metric against chance: top-1 against always answering the most
  frequent training class (:func:`majority_chance`), MAE against predicting the training mean,
  mean rank against a random ranking's.

Goals (checked at every size but ``--quick``, exit status 1 when one is missed, naming it):
every unimodal model's loss falls by at least :data:`LOSS_FALL` of its first epoch's; the
pseudo-labels reach :data:`PSEUDO_GOAL` of uninformative; the val metric is far above chance
(:data:`VAL_GOAL`).

The stores (:func:`make_store`) reuse :mod:`umilayers.data.synthetic`'s token model (signal
tokens with a marker, noise, a mean-visible copy of the signal), with a stronger mean-visible
copy (:data:`MEAN_SIGNAL`) so that the paper's unimodal models (linear on mean-pooled tokens)
have something to learn, as fine-tuned extractors' features do. Labels need the modalities of
both training splits:

- **EPIC-Kitchens** (``train_rgb`` / ``train_audio``; RGB ``784 x 768``, audio ``144 x 768``
  with valid lengths, the shapes ``examples/epic_extract.py`` writes; 3,806 classes): class ``y``
  (numbered by frequency rank) has the RGB code ``y // 2`` and the audio code
  ``(y // 2 + y % 2) mod C/2``, the synthetic classification task's pairing: each code is shared
  by two classes of neighbouring frequency, so one modality alone reaches about half of what
  both reach. Class frequencies follow :data:`EPIC_TAIL`, ``p(r) ~ (r + r0)^-s``, fitted to the
  released ``EPIC_100_validation.csv`` mapped to ``epic_action_classes.csv`` (the snapshot's
  train annotations are not in it).
- **robot** (``train_image_depth`` / ``train_proprio_force``; image, depth ``4 x 128``, proprio
  ``2 x 128``, force ``4 x 256``; 4 outputs): the synthetic regression task: each modality has
  its own latent and explains a quarter of every output's variance.
- **MSR-VTT** (``train_rgb_audio_ocr_speech`` / ``train_rgb_object_scene_face``; the seven
  Collaborative Experts features at their dimensions, 20 captions of ``37 x 300`` word2vec
  tokens per video): the synthetic retrieval task's latent (a chunk per modality, every caption
  describes all of it plus its own nuisance).

Sizes: ``--quick`` (CI smoke test, goals reported, not checked: 25 s on the 2-core machine),
the default (CPU; EPIC 12 min a seed with one thread, 7 min with two, on the quiet 2-core
machine, about 10 GiB peak memory: the attention maps of 784 tokens at batch 96; robot 22 min and
MSR-VTT 13 min on the loaded machine, run as two processes at once) and ``--size gpu``
(``benchmarks/gpu.sh``; its sizes are estimates, not yet timed on a GPU). Writes
``results/rehearse[_quick|_gpu].json``.

Usage::

    python benchmarks/rehearse.py                     # every benchmark, default size
    python benchmarks/rehearse.py --quick             # CI smoke test (< 60 s)
    python benchmarks/rehearse.py --benchmarks epic --variants preset sgd:0.1 adamw:1e-4 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import numpy as np

from umilayers.data import FeatureStore
from umilayers.data.synthetic import SyntheticConfig, _Modality, _RegressionTask, _RetrievalTask
from umilayers.datasets.epic import SETTINGS as EPIC_SETTINGS
from umilayers.datasets.msrvtt import MAX_TOKENS as MSRVTT_MAX_TOKENS
from umilayers.datasets.msrvtt import TRAIN_GROUPS as MSRVTT_GROUPS
from umilayers.datasets.robot import TARGET_SIZE as ROBOT_OUTPUTS
from umilayers.datasets.robot import TRAIN_GROUPS as ROBOT_GROUPS
from umilayers.pseudo_labels import MAX_WINDOW
from umilayers.train.presets import BENCHMARKS, preset_options

#: ``(r0, s)`` of EPIC's class frequencies ``p(r) ~ (r + r0)^-s`` over the 3,806 ranks, fitted
#: to the 9,668 actions of the released ``EPIC_100_validation.csv`` (1,352 classes seen, 530
#: once; top class 2.3%, top 10 15.8%, top 100 55%): the fit gives 2.0%, 16.9% and 64%, and 1,266
#: classes seen (617 once) in 9,668 draws.
EPIC_TAIL = (35.5, 1.73)
EPIC_CLASSES = 3806
#: The mean-visible copy of the signal (``SyntheticConfig.mean_signal``; its default 0.1 hides
#: the signal from mean pooling on purpose, which the paper's linear unimodal models cannot read).
MEAN_SIGNAL = 5.0
#: Collaborative Experts' MSR-VTT feature sizes: r(2+1)d (rgb), SENet-154 (object), DenseNet-161
#: Places365 (scene), VGGish (audio), face, word2vec OCR and speech; captions word2vec.
MSRVTT_DIMS = {"rgb": 512, "object": 2048, "scene": 2208, "audio": 128, "face": 512, "ocr": 300, "speech": 300}
MSRVTT_CAPTIONS = 20
MSRVTT_EMBED = 256  # build_msrvtt_store's embed_dim

#: Goals: each unimodal model's last-epoch loss at most ``1 - LOSS_FALL`` of its first's.
LOSS_FALL = 0.1
#: Pseudo-labels at most this fraction of uninformative (entropy / log C, MAE / mean's MAE,
#: mean rank / random's). Regression's best is sqrt(3/4) = 0.87: a modality explains a quarter
#: of the variance (classification's is ln 2 / ln C = 0.08: two classes share a code).
PSEUDO_GOAL = {"classification": 0.8, "regression": 0.95, "retrieval": 0.8}
#: The val metric at least this far from chance: top-1 >= 3 x chance; MAE and mean rank
#: <= 0.8 x and 0.5 x chance.
VAL_GOAL = {"classification": 3.0, "regression": 0.8, "retrieval": 0.5}


@dataclass(frozen=True)
class Spec:
    """One benchmark's store: task, ``{modality: (tokens, dim)}``, training splits, outputs."""

    task: str
    shapes: Mapping[str, tuple[int, int]]
    train: Mapping[str, tuple[str, ...]]
    num_outputs: int
    padded: tuple[str, ...] = ()  # modalities with valid lengths (zero padding after them)
    text: Optional[tuple[int, int]] = None
    captions: int = 1


SPECS: dict[str, Spec] = {
    # examples/epic_extract.py's defaults: Swin-T on 32 frames at 224 px (16 x 7 x 7 = 784 tokens
    # of 768), AST on 128 frames (12 x 12 = 144 tokens of 768, fewer for a shorter clip).
    "epic": Spec("classification", {"rgb": (784, 768), "audio": (144, 768)},
                 {f"train_{m}": (m,) for m in EPIC_SETTINGS["rgb+audio"]}, EPIC_CLASSES, padded=("audio",)),
    # umilayers.datasets.robot's encoders at z_dim 128: image and depth 2 x 2 map positions,
    # proprio 2 tokens, force 4 time tokens of 2 z_dim.
    "robot": Spec("regression", {"image": (4, 128), "depth": (4, 128), "proprio": (2, 128), "force": (4, 256)},
                  dict(ROBOT_GROUPS), ROBOT_OUTPUTS),
    # CE's video-level experts are one token; audio, OCR and speech are token sequences up to
    # CE's caps (umilayers.datasets.msrvtt.MAX_TOKENS).
    "msrvtt": Spec("retrieval", {m: (MSRVTT_MAX_TOKENS.get(m, 1), d) for m, d in MSRVTT_DIMS.items()},
                   dict(MSRVTT_GROUPS), MSRVTT_EMBED, padded=("audio", "ocr", "speech"),
                   text=(MSRVTT_MAX_TOKENS["text"], 300), captions=MSRVTT_CAPTIONS),
}


@dataclass(frozen=True)
class Size:
    """Rows per training split and per val / test split, and the epochs of both stages."""

    train: int
    eval: int
    epochs: int
    unimodal_epochs: int


#: ``SIZES[size][benchmark]``. On a CPU one paper-size EPIC stage-2 step (batch 96: 48 RGB and
#: 48 audio rows) takes about a minute (2 threads, quiet 2-core machine), so the default size
#: gives EPIC 48 rows per training split, 6 stage-2 epochs of one step each, and 100 unimodal
#: epochs (a unimodal step, linear on mean-pooled tokens, takes a fraction of a second): with
#: 20, the pseudo-labels picked the right class on 90% of their rows but stayed flat (entropy
#: 0.99 of ``log C``), with 100 or 200 they reach 0.05.
SIZES: dict[str, dict[str, Size]] = {
    "quick": {"epic": Size(4, 4, 1, 2), "robot": Size(64, 32, 2, 2), "msrvtt": Size(16, 8, 1, 2)},
    "default": {"epic": Size(48, 48, 6, 100), "robot": Size(640, 256, 10, 10),
                "msrvtt": Size(512, 128, 6, 10)},
    "gpu": {"epic": Size(960, 480, 12, 20), "robot": Size(3200, 512, 20, 20), "msrvtt": Size(1600, 256, 20, 20)},
}


# ----------------------------------------------------------------------------- stores


def epic_frequencies(num_classes: int = EPIC_CLASSES, tail: tuple[float, float] = EPIC_TAIL) -> np.ndarray:
    """Class probabilities by frequency rank, ``p(r) ~ (r + r0)^-s`` (class ``r`` is rank ``r``)."""
    r0, s = tail
    p = (np.arange(1, num_classes + 1) + r0) ** -s
    return p / p.sum()


def single_modality_bound(p: np.ndarray) -> float:
    """The best top-1 from one modality of the pairing alone: the likelier class of each code."""
    half = len(p) // 2
    rgb = np.maximum(p[0::2], p[1::2]).sum()  # code a: classes 2a, 2a + 1
    audio = np.maximum(p[0::2], np.roll(p[1::2], 1)).sum()  # code b: classes 2b, 2b - 1 (mod C)
    assert len(p) == 2 * half
    return float(max(rgb, audio))


def _codes(rng: np.random.Generator, geometry: _Modality, count: int) -> np.ndarray:
    """``count`` unit code vectors in the modality's signal subspace (orthonormal when they fit)."""
    rank = geometry.basis.shape[1]
    if count <= rank:
        return geometry.basis[:, :count].T
    codes = rng.standard_normal((count, rank)) @ geometry.basis.T
    return codes / np.linalg.norm(codes, axis=1, keepdims=True)


class _PairedClasses:
    """The synthetic classification pairing (``a = y // 2``, ``b = (a + y % 2) mod C/2``) with
    classes drawn from ``frequencies`` instead of uniformly."""

    def __init__(self, rng: np.random.Generator, cfg: SyntheticConfig, geometry: Mapping[str, _Modality],
                 frequencies: np.ndarray) -> None:
        self.rng, self.cfg, self.p = rng, cfg, frequencies
        self.half = len(frequencies) // 2
        self.codes = {m: _codes(rng, g, self.half) for m, g in geometry.items()}

    def sample(self, n: int):
        y = self.rng.choice(len(self.p), size=n, p=self.p)
        a = y // 2
        b = (a + y % 2) % self.half
        amp = self.cfg.amplitude
        return {"rgb": amp * self.codes["rgb"][a], "audio": amp * self.codes["audio"][b]}, y.astype(np.int64), {}


def _captions(task: _RetrievalTask, z: np.ndarray, captions: int) -> tuple[np.ndarray, np.ndarray]:
    """``captions`` captions per video of latent ``z`` (``_RetrievalTask.sample``'s caption model,
    each caption with its own nuisance and noise): ``(n, K, t, d)`` float16, lengths ``(n, K)``."""
    cfg, rng = task.cfg, task.rng
    n, t, d = len(z), cfg.text_tokens, cfg.text_dim
    lengths = rng.integers(max(1, t // 2), t + 1, size=(n, captions)).astype(np.int64)
    text = np.empty((n, captions, t, d), dtype=np.float16)
    described = 2.0 * (z @ task.text_map)[:, None, :]
    for k in range(captions):
        nuisance = rng.standard_normal((n, task.latent))
        one = described + 2.0 * cfg.caption_nuisance * (nuisance @ task.nuisance_map)[:, None, :]
        one = one + cfg.caption_noise * rng.standard_normal((n, t, d))
        one *= (np.arange(t)[None, :] < lengths[:, k, None])[:, :, None]
        text[:, k] = one
    return text, lengths


class _MultiCaptionRetrieval(_RetrievalTask):
    def __init__(self, rng: np.random.Generator, cfg: SyntheticConfig, geometry: dict, captions: int) -> None:
        super().__init__(rng, cfg, geometry)
        self.captions = captions

    def sample(self, n: int):
        z = self.rng.standard_normal((n, self.latent))
        signals = self._signals(z)
        text, lengths = _captions(self, z, self.captions)
        return signals, text, {"target_lengths": lengths}


def make_store(benchmark: str, path: Path, size: Size, seed: int = 0, spec: Optional[Spec] = None) -> FeatureStore:
    """Write ``benchmark``'s rehearsal store at ``path`` (see the module docstring) and open it;
    ``spec`` replaces :data:`SPECS` ``[benchmark]`` (smaller shapes in tests)."""
    spec = spec or SPECS[benchmark]
    text = spec.text or (8, 32)
    cfg = SyntheticConfig(num_train=size.train, num_eval=size.eval, mean_signal=MEAN_SIGNAL, seed=seed,
                          text_tokens=text[0], text_dim=text[1])
    rng = np.random.default_rng(seed)
    rank = {"classification": None, "regression": cfg.latent_dim, "retrieval": None}[spec.task]
    geometry = {}
    for m, (tokens, dim) in sorted(spec.shapes.items()):
        r = rank or (min(EPIC_CLASSES // 2, dim - 1) if spec.task == "classification" else
                     min(4 if m == "rgb" else 2, dim - 1))  # retrieval: the synthetic task's chunks
        geometry[m] = _Modality(rng, tokens, dim, rank=r, noise=cfg.noise)
    if spec.task == "classification":
        sampler: Any = _PairedClasses(rng, cfg, geometry, epic_frequencies(spec.num_outputs))
    elif spec.task == "regression":
        sampler = _RegressionTask(rng, cfg, geometry)
    else:
        sampler = _MultiCaptionRetrieval(rng, cfg, geometry, spec.captions)
    store = FeatureStore.create(path, spec.task, spec.num_outputs, dict(spec.shapes), text=spec.text,
                                captions=spec.captions)
    everything = tuple(sorted(spec.shapes))
    layout = [(name, "train", mods, size.train) for name, mods in spec.train.items()]
    layout += [("val", "val", everything, size.eval), ("test", "test", everything, size.eval)]
    for name, role, mods, rows in layout:
        signals, targets, extra = sampler.sample(rows)
        features, lengths = {}, {}
        for m in mods:
            g = geometry[m]
            lens = g.lengths(rng, rows, m in spec.padded)
            # in chunks, stored as float16 like the extractors' features (EPIC: 1.2 MB a row)
            features[m] = np.concatenate([g.tokens_for(rng, signals[m][i:i + 64], lens[i:i + 64], cfg)
                                          .astype(np.float16) for i in range(0, rows, 64)])
            if m in spec.padded:
                lengths[m] = lens
        store.write_split(name, role, features, targets, lengths or None, **extra)
    return FeatureStore(path)


# ----------------------------------------------------------------------------- runs


def scaled_options(benchmark: str, size: Size, **overrides: Any) -> dict[str, Any]:
    """``PRESETS["paper"][benchmark]`` with the rehearsal's epochs (and nothing else changed):
    ``epochs``, ``unimodal_epochs``, ``pseudo_window`` (the paper's ``e`` out of the default 20
    unimodal epochs, at least 1, at most the bank's :data:`~umilayers.pseudo_labels.MAX_WINDOW`)
    and the EPIC drop epoch (70 of 120, at least 1)."""
    options = preset_options("paper", benchmark)
    window = options["pseudo_window"] / 20
    options.update(epochs=size.epochs, unimodal_epochs=size.unimodal_epochs,
                   pseudo_window=max(1, min(size.unimodal_epochs, MAX_WINDOW, round(window * size.unimodal_epochs))))
    if options.get("schedule") == "step":
        paper = preset_options("paper", benchmark)
        drops = [int(e) for e in paper["lr_drop_epochs"].split(",")]
        options["lr_drop_epochs"] = ",".join(str(max(1, round(e * size.epochs / paper["epochs"]))) for e in drops)
    options.update(overrides)
    return options


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def stage1_losses(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{modality: {"first": loss, "last": loss, "epochs": n}}`` from a run's log records."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("stage") == "unimodal" and "loss" in r and "modality" in r:
            entry = out.setdefault(r["modality"], {"losses": []})
            entry["losses"].append(float(r["loss"]))
    return {m: {"first": e["losses"][0], "last": e["losses"][-1], "epochs": len(e["losses"])} for m, e in out.items()}


def pseudo_quality(run: Path, store: FeatureStore) -> dict[str, Any]:
    """The stage-1 pseudo-labels against uninformative ones (module docstring), per modality."""
    import torch

    from umilayers.pseudo_labels import PseudoLabelBank

    bank = PseudoLabelBank.load(run / "pseudo_labels")
    train = list(store.splits_with_role("train"))
    truth = training_targets(store)
    per: dict[str, float] = {}
    agreement: dict[str, float] = {}  # classification: top-1 of the pseudo-labels on their rows
    if store.task == "retrieval":
        text = torch.load(run / "pseudo_labels" / "text_embeddings.pt", map_location="cpu")
    for m in sorted({m for s in train for m in store.splits[s].modalities}):
        rows = torch.nonzero(bank.stored(m)).flatten()
        if not len(rows):
            continue
        values = bank.targets(rows, {m: torch.ones(len(rows), dtype=torch.bool)}).double()
        if store.task == "classification":
            entropy = -(values.clamp_min(1e-12).log() * values).sum(1).mean().item()
            per[m] = entropy / math.log(store.num_outputs)
            y = torch.as_tensor(truth[rows.numpy()])
            agreement[m] = (values.argmax(1) == y).double().mean().item()
        elif store.task == "regression":
            y = torch.as_tensor(truth[rows.numpy()], dtype=torch.float64)
            mean_mae = (y - torch.as_tensor(truth, dtype=torch.float64).mean(0)).abs().mean().item()
            per[m] = (values - y).abs().mean().item() / mean_mae
        else:  # the rank of each row's first caption among the rows, in this modality's space
            captions = torch.nn.functional.normalize(text[m][rows, 0].double(), dim=-1)
            sims = captions @ torch.nn.functional.normalize(values, dim=-1).T  # (caption, video)
            own = sims.diagonal()[:, None]
            ranks = 1 + (sims > own).sum(1).double()
            per[m] = ranks.mean().item() / ((len(rows) + 1) / 2)
    return {"kind": {"classification": "entropy / log C", "regression": "MAE / training mean's MAE",
                     "retrieval": "own caption's mean rank / random's"}[store.task], "per_modality": per,
            **({"top1_on_train_rows": agreement} if agreement else {})}


def majority_chance(train: np.ndarray, split: np.ndarray) -> float:
    """Top-1 of always answering the training majority class: its share of ``split``, or of the
    training rows where that is larger (a few val rows of a long tail often hold none of it, and a
    chance of 0 would make a single hit "far above chance").

    Example::

        >>> majority_chance(np.array([3, 3, 1, 2]), np.array([0, 1, 2, 1]))
        0.5
    """
    majority = np.bincount(train).argmax()
    return float(max(np.mean(split == majority), np.mean(train == majority)))


def training_targets(store: FeatureStore) -> Optional[np.ndarray]:
    """The targets of every training row, in the bank's row order (None for retrieval: captions)."""
    if store.task == "retrieval":
        return None
    return np.concatenate([store.targets(s) for s in store.splits_with_role("train")])


def chance(store: FeatureStore, split: str = "val") -> dict[str, float]:
    """The val metric of an uninformed prediction (the module docstring's chance)."""
    train = training_targets(store)
    if store.task == "classification":
        return {"top1": majority_chance(train, store.targets(split))}
    if store.task == "regression":
        return {"mae": float(np.abs(store.targets(split) - train.mean(0)).mean())}
    # text-to-video: a random rank among n videos; video-to-text: the best of a video's K captions
    # among all n K (the expected minimum of K positions drawn from n K); mean_rank is their mean
    n, k = len(store.dataset(split)), store.max_captions
    return {"mean_rank": ((n + 1) / 2 + (n * k + 1) / (k + 1)) / 2}


class _Stage1Done(Exception):
    """Raised by :func:`_stop_at_stage2` to end a run once the pseudo-labels are saved."""


def _stop_at_stage2(event: Any) -> None:
    # stage 1's last checkpoint (no modality: after every unimodal model, the bank saved)
    if event.stage == "multimodal" or (event.kind == "checkpoint" and event.modality is None):
        raise _Stage1Done


def parse_variant(text: str) -> dict[str, Any]:
    """``preset`` -> ``{}``; ``OPTIMIZER:LR`` -> ``{"optimizer": ..., "lr": ...}``.

    Example::

        >>> parse_variant("adamw:1e-4")
        {'optimizer': 'adamw', 'lr': 0.0001}
    """
    if text == "preset":
        return {}
    optimizer, _, lr = text.partition(":")
    try:
        value = float(lr)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'preset' or OPTIMIZER:LR (e.g. sgd:0.1), got {text!r}") from None
    if optimizer not in ("adamw", "sgd") or value <= 0:
        raise argparse.ArgumentTypeError(f"expected 'preset' or OPTIMIZER:LR with optimizer adamw or sgd and "
                                         f"LR > 0, got {text!r}")
    return {"optimizer": optimizer, "lr": value}


def rehearse(benchmark: str, store: FeatureStore, size: Size, run: Path, seed: int = 0, stage1_only: bool = False,
             device: str = "cpu", **overrides: Any) -> dict[str, Any]:
    """Run the scaled preset on the rehearsal ``store`` (``stage1_only``: up to the saved
    pseudo-labels) and measure. Returns the row of the results."""
    from umilayers.train import fit

    started = time.perf_counter()
    options = scaled_options(benchmark, size, seed=seed, **overrides)
    try:
        result = fit(store, out=run, overwrite=True, device=device, quiet=True,
                     callback=_stop_at_stage2 if stage1_only else None, **options)
    except _Stage1Done:
        result = None
    records = read_log(run)
    metric = {"classification": "top1", "regression": "mae", "retrieval": "mean_rank"}[store.task]
    row = {
        "benchmark": benchmark, "task": store.task, "seed": seed,
        "samples": {s: len(store.dataset(s)) for s in store.splits},
        "scaled_options": {k: options[k] for k in ("epochs", "unimodal_epochs", "pseudo_window", "lr_drop_epochs")
                           if k in options},
        "optimizer": options["optimizer"], "lr": options["lr"],
        "stage1": stage1_losses(records),
        "pseudo": pseudo_quality(run, store),
        "metric": metric, "chance": chance(store),
        "variant": dict(overrides) or "preset", "fit_seconds": time.perf_counter() - started,
    }
    if result is not None:
        row.update(val={metric: result["val"][metric]}, best_epoch=result["best_epoch"],
                   val_per_epoch=[r["val"][metric] for r in records if r.get("stage") == "multimodal" and "val" in r])
    if store.task == "classification":
        row["single_modality_bound"] = single_modality_bound(epic_frequencies(store.num_outputs))
        # the ceiling at this size: no model names a class it never saw in training
        row["val_rows_of_training_classes"] = float(np.isin(store.targets("val"), training_targets(store)).mean())
    row["goals"] = goals(row)
    return row


def goals(row: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal of a row: ``{"met": bool or None (not checked), "why": text}``."""
    out = {}
    falls = {m: s["last"] <= (1 - LOSS_FALL) * s["first"] for m, s in row["stage1"].items()}
    out["stage1_loss_falls"] = {"met": bool(falls) and all(falls.values()), "why": ", ".join(
        f"{m} {s['first']:.4g} -> {s['last']:.4g}" for m, s in row["stage1"].items())
        + f" (goal: -{LOSS_FALL:.0%} or more)"}
    pseudo, limit = row["pseudo"]["per_modality"], PSEUDO_GOAL[row["task"]]
    out["pseudo_labels_informative"] = {
        "met": bool(pseudo) and all(v <= limit for v in pseudo.values()),
        "why": f"{row['pseudo']['kind']}: " + ", ".join(f"{m} {v:.3f}" for m, v in pseudo.items())
               + f" (goal <= {limit})"}
    metric, base, factor = row["metric"], row["chance"][row["metric"]], VAL_GOAL[row["task"]]
    goal = f"goal {'>=' if metric == 'top1' else '<='} {factor} x chance"
    if "val" not in row:
        out["val_far_above_chance"] = {"met": None, "why": f"stage 2 not run; chance {base:.4g} ({goal})"}
        return out
    val = row["val"][metric]
    met = val >= factor * base and val > base if metric == "top1" else val <= factor * base
    out["val_far_above_chance"] = {"met": bool(met), "why": f"val {metric} {val:.4g}, chance {base:.4g} ({goal})"}
    return out


# ----------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--benchmarks", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), metavar="NAME",
                   help=f"which presets to rehearse (default all: {' '.join(BENCHMARKS)})")
    p.add_argument("--quick", action="store_true", help="smoke size (CI, < 60 s); goals reported, not checked")
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="quick, default (CPU) or gpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED", help="training seeds (default 0)")
    p.add_argument("--variants", type=parse_variant, nargs="+", default=[{}], metavar="V",
                   help="'preset' (default) and/or OPTIMIZER:LR runs of the preset with that optimizer and "
                        "learning rate, on the same store and seeds (comparisons)")
    p.add_argument("--train-rows", type=int, default=None, metavar="N",
                   help="rows per training split instead of the size's (comparisons of stage 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--stage1-only", action="store_true",
                   help="stop each run once its pseudo-labels are saved (comparisons of stage 1 on a CPU)")
    p.add_argument("--keep", type=Path, default=None, help="keep the stores and run directories here")
    p.add_argument("--out", type=Path, default=_common.ROOT / "results")
    p.add_argument("--name", default=None, help="results/<name>.json (default rehearse[_quick|_gpu])")
    _common.add_threads_option(p)
    args = p.parse_args(argv)
    if args.quick and args.size not in (None, "quick"):
        p.error(f"--quick: contradicts --size {args.size}")
    size_name = "quick" if args.quick else (args.size or "default")
    threads = _common.set_threads(args.threads, args.device)
    if args.train_rows is not None and args.train_rows < 1:
        p.error(f"--train-rows: expected an int >= 1, got {args.train_rows}")
    name = args.name or ("rehearse" + ("" if size_name == "default" else f"_{size_name}"))
    started = time.perf_counter()
    info = _common.machine_info(args.device)
    rows, stores_s = [], {}
    with _common.run_root(args.keep, "umilayers-rehearse-") as root:
        for benchmark in args.benchmarks:
            size = SIZES[size_name][benchmark]
            if args.train_rows:
                size = replace(size, train=args.train_rows)
            began = time.perf_counter()
            store = make_store(benchmark, root / f"{benchmark}-store", size)
            stores_s[benchmark] = time.perf_counter() - began
            for i, variant in enumerate(args.variants):
                for seed in args.seeds:
                    row = rehearse(benchmark, store, size, root / f"{benchmark}-run-{i}-{seed}", seed=seed,
                                   stage1_only=args.stage1_only, device=args.device, **variant)
                    rows.append(row)
                    report(row)
    missed = [f"{r['benchmark']} {r['optimizer']} lr {r['lr']:g} seed {r['seed']}: {goal} ({g['why']})"
              for r in rows for goal, g in r["goals"].items() if g["met"] is False]
    checked = size_name != "quick"
    result = {
        "title": f"Rehearsal of --preset paper at the benchmarks' real shapes, size {size_name}",
        "command": " ".join(["python", "benchmarks/rehearse.py", *(argv if argv is not None else sys.argv[1:])]),
        "goals": {"loss_fall": LOSS_FALL, "pseudo": PSEUDO_GOAL, "val_vs_chance": VAL_GOAL},
        "config": {"size": size_name, "sizes": {b: vars(SIZES[size_name][b]) for b in args.benchmarks},
                   "train_rows": args.train_rows, "seeds": args.seeds, "variants": args.variants,
                   "stage1_only": args.stage1_only, "store_seconds": stores_s, "threads": threads,
                   "mean_signal": MEAN_SIGNAL, "epic_tail": EPIC_TAIL},
        "machine": info,
        "load_average_1min_after": _common.machine_info().get("load_average_1min"),
        "rows": rows,
        "goals_checked": checked,
        "missed": missed,
        "seconds": time.perf_counter() - started,
    }
    _common.write_results(args.out, name, result, None, result["seconds"])
    if missed:
        print(("MISSED" if checked else "not met (quick size, not checked)") + ":\n  " + "\n  ".join(missed))
    else:
        print("every goal met" + ("" if checked else " (quick size, not checked)"))
    return 1 if checked and missed else 0


def report(row: Mapping[str, Any]) -> None:
    print(f"{row['benchmark']} (seed {row['seed']}, {row['optimizer']} lr {row['lr']:g}, "
          f"{row['scaled_options']}; fit {row['fit_seconds']:.0f} s)")
    for goal, g in row["goals"].items():
        print(f"  {'MISS' if g['met'] is False else ('ok  ' if g['met'] else '--  ')} {goal}: {g['why']}")
    if "val_per_epoch" in row:
        print(f"  val {row['metric']} per epoch: {', '.join(f'{v:.4g}' for v in row['val_per_epoch'])}"
              + (f"; one modality alone reaches at most {row['single_modality_bound']:.3f}, and "
                 f"{row['val_rows_of_training_classes']:.3f} of the val rows have a class seen in training"
                 if "single_modality_bound" in row else ""))


if __name__ == "__main__":
    sys.exit(main())
