r"""Embedded synthetic benchmark: FeatureStores that mirror the paper's Table 1.

Three tasks, each trained on modality-incomplete splits and evaluated on all modalities together
(a combination never seen in training):

============== ================================================ ==================================
task           training splits (modalities)                     val / test
============== ================================================ ==================================
classification ``train_rgb`` (rgb) + ``train_audio`` (audio)    rgb, audio
regression     ``train_a`` (image, force) + ``train_b``         image, depth, proprio, force
               (depth, proprio)
retrieval      ``train_a`` (rgb, audio, ocr, speech) +          all seven, captions as text
               ``train_b`` (rgb, object, scene, face)
============== ================================================ ==================================

**The generative model.** Every modality ``m`` of a sample carries a *signal vector*
``s_m`` in ``R^{d_m}`` (defined per task below) and is written as ``k_m`` tokens of size ``d_m``:

1. ``L`` valid tokens (``L = k_m``, or drawn from ``[k_m/2, k_m]`` for the modalities with a
   ``lengths`` file; the rest is zero padding).
2. ``n = 2 * floor(rho * L / 2)`` of the valid tokens, at random positions, are *signal tokens*
   ``x_i = sigma_i * (a * e_m + s_m)`` with signs ``sigma_i = +-1``, exactly half of each.
   ``e_m`` is a fixed unit *marker* direction orthogonal to the signal subspace.
3. Every valid token gets Gaussian noise ``N(0, noise_m^2 I)`` plus a weak mean-visible copy
   ``beta * s_m`` of the signal.

Because the signs cancel, the mean over tokens is ``beta * s_m`` + noise: **mean pooling
destroys the token-level signal** and keeps only the weak ``beta`` part (``beta = 0`` makes
mean-pooled features carry no information at all). A model that looks at tokens can recover
``s_m`` exactly: the marker tells each signal token's sign, so attending to the tokens with a
positive marker component (what a softmax over input tokens in ``FeatureProjection`` can learn)
gives ``a * e_m + s_m``. Token order carries nothing (positions are random).

**Complementary information.** Each modality sees only part of the target:

- *classification* (``C`` classes, ``C`` even, default 10): rgb encodes ``a = y // 2``, audio
  encodes ``b = (y // 2 + y % 2) mod C/2``, each as one of ``C/2`` orthogonal code vectors
  (``s_m = amp * U_m[code]``). Each code is shared by exactly two classes, so one modality alone
  can reach at most 50% top-1, while ``(a, b)`` determines ``y``: both together can reach 100%.
  **Audio is the weak modality** (``noise_weak``), so its unimodal predictions are poorer.
- *regression* (``T`` outputs, default 4): each of the four modalities has its own latent
  ``g_m ~ N(0, I_r)`` and ``s_m = amp * B_m g_m``; the target is
  ``y = sum_m A_m g_m / 2 + N(0, 0.05^2)``, each modality explaining a quarter of its variance.
  A training split sees half of the latents; val/test see all of them. **Force is weak.**
- *retrieval*: a video has a latent ``z`` made of a 4-d chunk for rgb and a 2-d chunk for each
  of the six other modalities; ``s_m = amp * B_m z_m``. The caption (text) describes all of
  ``z`` and more: its ``L_t`` valid tokens are ``2 W z + 2 c V n + N(0, caption_noise^2 I)``
  with ``n ~ N(0, I_16)`` the caption's own content (``c = caption_nuisance``, default 1), all
  plainly mean-visible, so any text encoder works. The nuisance makes retrieval about as hard
  as MSR-VTT is for these methods (late fusion: mean rank around 10 of 400; without it every
  method but pooled reached about 2); ``caption_nuisance=0`` reproduces the first generator's
  stores exactly. Each training split sees 10 of the 16 latent dimensions; val/test see all.
  **Face is weak.** ``num_outputs`` is the joint embedding size to train.

All random choices come from ``numpy.random.default_rng(seed)``; the codebooks and loadings from
``seed`` too, so the same seed gives the same store. Generation takes well under a second for
the defaults.

Example::

    >>> import tempfile
    >>> store = make_synthetic_store("classification", tempfile.mkdtemp() + "/cls",
    ...                              num_train=40, num_eval=20)
    >>> [(s.name, s.role, s.modalities) for s in store.splits.values()]  # doctest: +NORMALIZE_WHITESPACE
    [('train_rgb', 'train', ('rgb',)), ('train_audio', 'train', ('audio',)),
     ('val', 'val', ('audio', 'rgb')), ('test', 'test', ('audio', 'rgb'))]
"""

from __future__ import annotations

import math
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from umilayers._validation import InvalidArgument, OutputExistsError, check_positive_int
from umilayers.data.store import FeatureStore

__all__ = ["SyntheticConfig", "make_synthetic_store", "LAYOUTS", "WEAK_MODALITY"]

#: Training splits of each task: ``{split: modalities}``; val and test hold every modality.
LAYOUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "classification": {"train_rgb": ("rgb",), "train_audio": ("audio",)},
    "regression": {"train_a": ("image", "force"), "train_b": ("depth", "proprio")},
    "retrieval": {
        "train_a": ("rgb", "audio", "ocr", "speech"),
        "train_b": ("rgb", "object", "scene", "face"),
    },
}
#: The much less discriminative modality of each task.
WEAK_MODALITY = {"classification": "audio", "regression": "force", "retrieval": "face"}
# Modalities stored with a lengths file (variable valid tokens, zero padding).
_PADDED = {"classification": ("audio",), "regression": ("force",), "retrieval": ("speech",)}
# "big" modalities get (tokens, dim), the others (tokens // 2, dim // 2).
_BIG = {"rgb", "image", "depth", "audio"}
_LATENT = {"rgb": 4}  # retrieval latent chunk sizes (others: 2)


@dataclass
class SyntheticConfig:
    """Sizes and signal strengths of the synthetic benchmark.

    Args:
        num_train: samples per training split.
        num_eval: samples in each of val and test.
        tokens: tokens of the large modalities (the small ones get half).
        dim: feature size of the large modalities (the small ones get half).
        num_classes: classification classes (even, at least 4).
        num_outputs: regression outputs ``T``.
        embed_dim: retrieval joint embedding size (the store's ``num_outputs``).
        text_tokens: retrieval caption tokens.
        text_dim: retrieval caption feature size.
        signal_fraction: ``rho``, fraction of valid tokens that are signal tokens.
        marker: ``a``, the marker's amplitude.
        amplitude: ``amp``, the signal's amplitude.
        mean_signal: ``beta``, the weak mean-visible copy of the signal (0 = none).
        noise: per-coordinate token noise of the normal modalities.
        noise_weak: token noise of the weak modality.
        latent_dim: regression latent size ``r`` per modality.
        caption_noise: retrieval: per-token noise of the captions.
        caption_nuisance: retrieval: amplitude of the caption-only content, relative to the
            part that describes the video (0 = every caption describes only its video).
        seed: seed of every random choice.

    Example::

        >>> SyntheticConfig(num_train=100).num_eval
        200
    """

    num_train: int = 600
    num_eval: int = 200
    tokens: int = 16
    dim: int = 32
    num_classes: int = 10
    num_outputs: int = 4
    embed_dim: int = 32
    text_tokens: int = 8
    text_dim: int = 32
    signal_fraction: float = 0.5
    marker: float = 3.0
    amplitude: float = 2.0
    mean_signal: float = 0.1
    noise: float = 1.0
    noise_weak: float = 2.0
    latent_dim: int = 3
    caption_noise: float = 0.5
    caption_nuisance: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_train", "num_eval", "tokens", "dim", "num_outputs", "embed_dim",
                     "text_tokens", "text_dim", "latent_dim"):
            check_positive_int(f"SyntheticConfig.{name}", getattr(self, name))
        if self.tokens < 4 or self.dim < 2 * max(self.num_classes // 2, self.latent_dim, 4) + 2:
            raise ValueError(
                f"SyntheticConfig: tokens >= 4 and dim >= 2 * max(num_classes/2, latent_dim, 4) + 2 "
                f"needed (small modalities get dim/2 with room for the codes and the marker), "
                f"got tokens={self.tokens}, dim={self.dim}"
            )
        if self.num_classes < 4 or self.num_classes % 2:
            raise ValueError(f"SyntheticConfig.num_classes: expected an even int >= 4, "
                             f"got {self.num_classes}")
        if not 0 < self.signal_fraction <= 1:
            raise ValueError(f"SyntheticConfig.signal_fraction: expected (0, 1], got {self.signal_fraction}")


def _shape(task: str, m: str, cfg: SyntheticConfig) -> tuple[int, int]:
    if m in _BIG:
        return cfg.tokens, cfg.dim
    return max(4, cfg.tokens // 2), cfg.dim // 2


class _Modality:
    """Fixed random geometry of one modality: marker direction and signal basis."""

    def __init__(self, rng: np.random.Generator, tokens: int, dim: int, rank: int, noise: float):
        basis, _ = np.linalg.qr(rng.standard_normal((dim, rank + 1)))
        self.tokens, self.dim, self.noise = tokens, dim, noise
        self.marker = basis[:, 0]
        self.basis = basis[:, 1:]  # (dim, rank) orthonormal, orthogonal to the marker

    def lengths(self, rng: np.random.Generator, n: int, padded: bool) -> np.ndarray:
        if not padded:
            return np.full(n, self.tokens, dtype=np.int64)
        return rng.integers(max(1, self.tokens // 2), self.tokens + 1, size=n).astype(np.int64)

    def tokens_for(self, rng: np.random.Generator, signal: np.ndarray, lengths: np.ndarray,
                   cfg: SyntheticConfig) -> np.ndarray:
        """Tokens ``(n, k, d)`` for signal vectors ``(n, d)`` (see the module docstring)."""
        n, k = len(signal), self.tokens
        valid = np.arange(k)[None, :] < lengths[:, None]  # (n, k)
        # A random order of the valid positions; the first n_sig of it are signal tokens, with
        # alternating signs (random positions, so the signs are random and exactly balanced).
        keys = np.where(valid, rng.random((n, k)), np.inf)
        rank = np.argsort(np.argsort(keys, axis=1), axis=1)
        num_signal = 2 * np.floor(cfg.signal_fraction * lengths / 2).astype(np.int64)
        num_signal = np.maximum(num_signal, 2)
        sign = np.where(rank < num_signal[:, None], np.where(rank % 2 == 0, 1.0, -1.0), 0.0)
        pattern = cfg.marker * self.marker[None, :] + signal  # (n, d)
        x = sign[:, :, None] * pattern[:, None, :]
        x += self.noise * rng.standard_normal((n, k, self.dim))
        x += cfg.mean_signal * signal[:, None, :]
        x *= valid[:, :, None]
        return x.astype(np.float32)


def _unit_codes(basis: np.ndarray, count: int) -> np.ndarray:
    return basis[:, :count].T  # (count, dim) orthonormal code vectors


def make_synthetic_store(
    task: str,
    path: Union[str, Path],
    num_train: Optional[int] = None,
    num_eval: Optional[int] = None,
    seed: Optional[int] = None,
    config: Optional[SyntheticConfig] = None,
    overwrite: bool = False,
    **overrides: Any,
) -> FeatureStore:
    """Write the synthetic store of ``task`` at ``path`` and return it (opened and validated).

    Args:
        task: ``"classification"``, ``"regression"`` or ``"retrieval"``.
        path: directory to create.
        num_train: samples per training split (overrides ``config``).
        num_eval: samples in each of val and test (overrides ``config``).
        seed: random seed (overrides ``config``).
        config: a :class:`SyntheticConfig`; default ``SyntheticConfig()``.
        overwrite: replace an existing store at ``path``.
        **overrides: any other :class:`SyntheticConfig` field.

    The store is written in a hidden folder next to ``path`` and renamed into place when
    complete: a failure leaves no half-made store.

    Raises:
        InvalidArgument: a bad ``task``, or a ``path`` that cannot be written: a non-empty
            folder without ``overwrite`` (:class:`~umilayers._validation.OutputExistsError`), a
            folder that is not a FeatureStore, a place where no folder can be made.
    """
    if task not in LAYOUTS:
        raise InvalidArgument("task", f"expected one of {list(LAYOUTS)}, got {task!r}")
    path = Path(path)
    staging = _staging_folder(path, overwrite)
    try:
        _write_synthetic_store(task, staging, num_train, num_eval, seed, config, overrides)
        if path.exists():  # checked by _staging_folder: empty, or a store to overwrite
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return FeatureStore(path)


def _staging_folder(path: Path, overwrite: bool) -> Path:
    """Refuse an output the store cannot go to (before any work); return an empty hidden folder
    next to it to write the store in."""
    if path.exists() and not path.is_dir():
        raise InvalidArgument("path", f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputExistsError("path", f"{path} exists and is not empty; pass {{overwrite}} to replace a "
                                            f"FeatureStore there, or choose another folder", refs=("overwrite",))
        if not (path / "store.json").is_file():
            raise InvalidArgument("path", f"{path} holds no store.json (not a FeatureStore): refusing to replace "
                                          f"it; choose another folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        staging.mkdir()  # with the user's umask (tempfile.mkdtemp would make it private)
        return staging
    except OSError as err:
        raise InvalidArgument("path", f"cannot create {path}: {err.strerror or err}") from None


def _write_synthetic_store(task: str, path: Path, num_train: Optional[int], num_eval: Optional[int],
                           seed: Optional[int], config: Optional[SyntheticConfig],
                           overrides: dict[str, Any]) -> None:
    cfg = config or SyntheticConfig()
    given = {"num_train": num_train, "num_eval": num_eval, "seed": seed, **overrides}
    cfg = replace(cfg, **{k: v for k, v in given.items() if v is not None})
    rng = np.random.default_rng(cfg.seed)
    layout = LAYOUTS[task]
    geometry = _geometry(task, cfg, rng)
    names = sorted(geometry)
    shapes = {m: (g.tokens, g.dim) for m, g in geometry.items()}
    num_outputs = {"classification": cfg.num_classes, "regression": cfg.num_outputs,
                   "retrieval": cfg.embed_dim}[task]
    text = (cfg.text_tokens, cfg.text_dim) if task == "retrieval" else None
    store = FeatureStore.create(path, task, num_outputs, shapes, text=text)
    samplers: dict[str, type[_ClassificationTask | _RegressionTask | _RetrievalTask]] = {
        "classification": _ClassificationTask, "regression": _RegressionTask, "retrieval": _RetrievalTask}
    sampler = samplers[task](rng, cfg, geometry)
    splits = [(name, "train", mods, cfg.num_train) for name, mods in layout.items()]
    splits += [("val", "val", tuple(names), cfg.num_eval), ("test", "test", tuple(names), cfg.num_eval)]
    for name, role, mods, size in splits:
        signals, targets, extra = sampler.sample(size)
        features, lengths = {}, {}
        for m in mods:
            lens = geometry[m].lengths(rng, size, m in _PADDED[task])
            features[m] = geometry[m].tokens_for(rng, signals[m], lens, cfg)
            if m in _PADDED[task]:
                lengths[m] = lens
        store.write_split(name, role, features, targets, lengths or None, **extra)


def _geometry(task: str, cfg: SyntheticConfig, rng: np.random.Generator) -> dict[str, _Modality]:
    """The fixed random geometry of every modality of ``task`` (the first draws of ``rng``)."""
    names = sorted({m for mods in LAYOUTS[task].values() for m in mods})
    rank = {"classification": cfg.num_classes // 2, "regression": cfg.latent_dim,
            "retrieval": 0}[task]
    return {
        m: _Modality(rng, *_shape(task, m, cfg), rank=rank or _LATENT.get(m, 2),
                     noise=cfg.noise_weak if m == WEAK_MODALITY[task] else cfg.noise)
        for m in names
    }


class _ClassificationTask:
    def __init__(self, rng: np.random.Generator, cfg: SyntheticConfig, geometry: dict) -> None:
        self.rng, self.cfg = rng, cfg
        self.half = cfg.num_classes // 2
        self.codes = {m: _unit_codes(g.basis, self.half) for m, g in geometry.items()}

    def sample(self, n: int):
        y = self.rng.integers(0, self.cfg.num_classes, size=n)
        a = y // 2
        b = (a + y % 2) % self.half
        amp = self.cfg.amplitude
        signals = {"rgb": amp * self.codes["rgb"][a], "audio": amp * self.codes["audio"][b]}
        return signals, y.astype(np.int64), {}


class _RegressionTask:
    def __init__(self, rng: np.random.Generator, cfg: SyntheticConfig, geometry: dict) -> None:
        self.rng, self.cfg, self.geometry = rng, cfg, geometry
        r, t = cfg.latent_dim, cfg.num_outputs
        # A_m: (T, r) with unit-norm rows, so each modality adds exactly 1/4 of every output's
        # variance (latents are standard normal).
        self.readout = {}
        for m in sorted(geometry):
            a = rng.standard_normal((t, r))
            self.readout[m] = a / np.linalg.norm(a, axis=1, keepdims=True)

    def sample(self, n: int):
        signals, y = {}, np.zeros((n, self.cfg.num_outputs))
        for m, g in self.geometry.items():
            latent = self.rng.standard_normal((n, self.cfg.latent_dim))
            signals[m] = self.cfg.amplitude * latent @ g.basis.T / math.sqrt(self.cfg.latent_dim)
            y += latent @ self.readout[m].T / 2.0
        y += 0.05 * self.rng.standard_normal(y.shape)
        return signals, y.astype(np.float32), {}


class _RetrievalTask:
    def __init__(self, rng: np.random.Generator, cfg: SyntheticConfig, geometry: dict) -> None:
        self.rng, self.cfg, self.geometry = rng, cfg, geometry
        self.chunks, start = {}, 0
        for m in sorted(geometry):
            size = _LATENT.get(m, 2)
            self.chunks[m] = slice(start, start + size)
            start += size
        self.latent = start
        self.text_map = rng.standard_normal((self.latent, cfg.text_dim)) / math.sqrt(self.latent)
        if cfg.caption_nuisance:  # drawn after text_map: a store without nuisance is unchanged
            self.nuisance_map = rng.standard_normal((self.latent, cfg.text_dim)) / math.sqrt(self.latent)

    def _signals(self, z: np.ndarray) -> dict[str, np.ndarray]:
        """Each modality's signal of the latents ``z``: its chunk of ``z`` through its basis."""
        signals = {}
        for m, g in self.geometry.items():
            chunk = z[:, self.chunks[m]]
            signals[m] = self.cfg.amplitude * chunk @ g.basis.T / math.sqrt(chunk.shape[1])
        return signals

    def sample(self, n: int):
        z = self.rng.standard_normal((n, self.latent))
        signals = self._signals(z)
        t, d = self.cfg.text_tokens, self.cfg.text_dim
        lengths = self.rng.integers(max(1, t // 2), t + 1, size=n).astype(np.int64)
        text = 2.0 * (z @ self.text_map)[:, None, :]
        if self.cfg.caption_nuisance:
            nuisance = self.rng.standard_normal((n, self.latent))  # what the caption says beyond the video
            text = text + 2.0 * self.cfg.caption_nuisance * (nuisance @ self.nuisance_map)[:, None, :]
        text = text + self.cfg.caption_noise * self.rng.standard_normal((n, t, d))
        text *= (np.arange(t)[None, :] < lengths[:, None])[:, :, None]
        return signals, text.astype(np.float32), {"target_lengths": lengths}
