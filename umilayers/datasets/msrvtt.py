"""MSR-VTT text-video retrieval with the Collaborative Experts (CE) features.

What this module reads, confirmed against the CE code (albanie/collaborative-experts:
``misc/datasets/msrvtt/tar_include.txt`` and ``tar_include_hq.txt`` (the two releases' file
lists), ``data_loader/MSRVTT_dataset.py``, ``base/base_dataset.py``, ``configs/base_config.json``,
``configs/data_loader_msrvtt.json``, ``model/text_embedding_models.json``, ``model/metric.py``):

- two releases, both under ``data/MSRVTT`` (what ``--data`` names): the CE release
  (``MSRVTT-experts.tar.gz``, BMVC 2019) in ``structured-symlinks/``, and the later
  high-quality release of TeachText in ``high-quality/structured-symlinks/`` (CE's current
  ``root_feat_folder``). ``--data`` may also name a feature root itself;
- split lists, one video id per line: ``train_list_full.txt`` / ``val_list_full.txt`` /
  ``test_list_full.txt`` (the "full" split of the MSR-VTT authors: 6,513 / 497 / 2,990 videos)
  and ``train_list_jsfusion.txt`` / ``val_list_jsfusion.txt`` (1k-A: 9,000 / 1,000);
  ``jsfusion_val_caption_idx.pkl`` maps each 1k-A test video to the one caption evaluated;
- one pickle per expert, a dict ``video_id -> array`` of shape ``(d,)`` or ``(T, d)``; a video
  without the modality holds a float NaN (CE's ``has_missing_values``: ``isinstance(x, float)
  and np.isnan(x)``). Here a NaN value, an array with NaN entries or a missing key all mean
  *missing*, never zero;
- text features per release by its own file names (:data:`TEXT_FILES`): the CE release ships
  ``aggregated_text_feats/w2v_MSRVTT.pickle`` (word2vec, 300-d) and
  ``w2v_MSRVTT_openAIGPT.pickle`` (768-d); the high-quality one ``aggregated_text_feats/w2v.pkl``,
  ``gpt2-xl.pkl``, ``gpt2-xl-finetune.pkl``. Each is ``video_id -> list`` with one
  ``(T_words, d)`` array per caption (19 or 20 per video);
- ``raw-captions.pkl``: ``video_id -> list`` of captions, each a list of word tokens.

The MMT-style release (``mmt_feats/features.<name>.pkl``, same dict structure) is read too,
through :data:`MMT_FEATURE_FILES`.

Zhang et al. name seven MSR-VTT modalities (RGB, audio, OCR, speech, object, scene, face), the
seven experts of CE's MSR-VTT model (CE: object, motion, scene, audio, speech, OCR, face). Their
"RGB" is CE's video-level motion expert (here ``r2p1d.r2p1d-ig65m.0``; ``i3d`` is the other
one the release ships), "object" CE's frame-level ImageNet expert (``imagenet.senet154.0``) and
"scene" the Places365 DenseNet-161 expert; each can be overridden (``modality_files``).

Splits (:func:`split_msrvtt`): the paper's protocol (Sec. 4) by default, training split A = the
training videos with audio, OCR and speech, split B = the rest; val / test = the videos of the
full split's val / test lists that have audio, OCR and speech too (split A's rule: it keeps the
share the paper keeps, see :func:`split_msrvtt`). Every caption of a video is kept (one
store row per video, up to 20 captions: the store's several-captions format).
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from umilayers._io import atomic_write_text
from umilayers._validation import InvalidArgument
from umilayers.data.store import FeatureStore, StoreError

__all__ = [
    "MSRVTT_MODALITIES",
    "TRAIN_GROUPS",
    "SPLIT_A_REQUIRES",
    "PROTOCOLS",
    "PAPER_SPLIT_SIZES",
    "FULL_SPLIT_SIZES",
    "RELEASES",
    "CE_FEATURE_FILES",
    "MMT_FEATURE_FILES",
    "TEXT_FILES",
    "MAX_TOKENS",
    "MSRVTTDataError",
    "MSRVTTData",
    "MSRVTTSplits",
    "as_token_array",
    "resolve_root",
    "text_file_for",
    "load_msrvtt",
    "assign_training_groups",
    "split_msrvtt",
    "split_arrays",
    "build_msrvtt_store",
]

MSRVTT_MODALITIES: tuple[str, ...] = ("rgb", "audio", "ocr", "speech", "object", "scene", "face")
#: The two training splits of Zhang et al.'s Table 1 and their modalities.
TRAIN_GROUPS: dict[str, tuple[str, ...]] = {
    "train_rgb_audio_ocr_speech": ("rgb", "audio", "ocr", "speech"),
    "train_rgb_object_scene_face": ("rgb", "object", "scene", "face"),
}
#: Split A of the paper's protocol: the training videos that have all of these; by default also
#: the rule of val and test (:func:`split_msrvtt`).
SPLIT_A_REQUIRES: tuple[str, ...] = ("audio", "ocr", "speech")
#: ``paper``: Zhang et al.'s rule (:func:`split_msrvtt`); ``balanced``: this library's earlier
#: rule, groups by coverage filled to equal halves (:func:`assign_training_groups`).
PROTOCOLS: tuple[str, ...] = ("paper", "balanced")
#: The split sizes Zhang et al. report (Sec. 4) for the full split.
PAPER_SPLIT_SIZES: dict[str, int] = {
    "train_rgb_audio_ocr_speech": 1702, "train_rgb_object_scene_face": 4811, "val": 127, "test": 765,
}
#: Videos listed in the full split's ``train`` / ``val`` / ``test`` lists.
FULL_SPLIT_SIZES: dict[str, int] = {"train": 6513, "val": 497, "test": 2990}
#: Feature root of each release under ``data/MSRVTT``.
RELEASES: dict[str, str] = {"ce": "structured-symlinks", "high-quality": "high-quality/structured-symlinks"}
#: CE layout: modality -> pickle path under the feature root (CE's ``visual_feat_paths`` for
#: the visual experts with the aggregation settings of ``configs/base_config.json``, and the
#: ``custom_paths`` of ``MSRVTT.dataset_paths`` for the others).
CE_FEATURE_FILES: dict[str, str] = {
    "rgb": "aggregated_r2p1d_30fps_256px_stride32_offset0_inner_stride1/r2p1d-ig65m-avg.pickle",
    "object": "aggregated_imagenet_25fps_256px_stride1_offset0/senet154-avg.pickle",
    "scene": "aggregated_scene_25fps_256px_stride1_offset0/densenet161-avg.pickle",
    "audio": "aggregated_audio_feats/Audio_MSRVTT_new.pickle",
    "face": "aggregated_face_feats/facefeats-avg.pickle",
    "ocr": "aggregated_ocr_feats/ocr-raw.pickle",
    "speech": "aggregated_speech/speech-w2v.pickle",
}
#: MMT layout: file under ``mmt_feats/`` -> modality.
MMT_FEATURE_FILES: dict[str, str] = {
    "features.s3d.pkl": "rgb",
    "features.rgb_agg.pkl": "object",
    "features.scene.pkl": "scene",
    "features.audio.pkl": "audio",
    "features.face_agg.pkl": "face",
    "features.ocr.pkl": "ocr",
    "features.speech.pkl": "speech",
}
#: Text features by name, per release (``tar_include.txt`` / ``tar_include_hq.txt``); any other
#: name is ``aggregated_text_feats/<name>.pkl`` (CE's ``common_text_feat_paths``).
TEXT_FILES: dict[str, dict[str, str]] = {
    "ce": {
        "w2v": "aggregated_text_feats/w2v_MSRVTT.pickle",
        "openai": "aggregated_text_feats/w2v_MSRVTT_openAIGPT.pickle",
    },
    "high-quality": {
        "w2v": "aggregated_text_feats/w2v.pkl",
        "openai": "aggregated_text_feats/w2v_MSRVTT_openAIGPT.pickle",
        "gpt2-xl": "aggregated_text_feats/gpt2-xl.pkl",
        "gpt2-xl-finetune": "aggregated_text_feats/gpt2-xl-finetune.pkl",
    },
}
#: Token caps (CE ``data_loader_msrvtt.json`` ``max_tokens``); other modalities: 32.
MAX_TOKENS: dict[str, int] = {"text": 37, "ocr": 49, "audio": 29, "speech": 32}
_DEFAULT_MAX_TOKENS = 32
_SPLIT_FILES = {
    "jsfusion": {"train": "train_list_jsfusion.txt", "test": "val_list_jsfusion.txt"},
    "full": {"train": "train_list_full.txt", "val": "val_list_full.txt",
             "test": "test_list_full.txt"},
}


class MSRVTTDataError(StoreError):
    """A feature, caption or split file is missing, inconsistent or lacks a video (a
    :class:`~umilayers.data.StoreError`: the command line shows it as one line).

    Example::

        >>> raise MSRVTTDataError("w2v.pkl: no captions for video 'video7'")
        Traceback (most recent call last):
        ...
        umilayers.datasets.msrvtt.MSRVTTDataError: w2v.pkl: no captions for video 'video7'
    """


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------


def _load_pickle(path: Path) -> Any:
    if path.suffix == ".npy":  # CE's memcache also reads dicts saved with np.save
        return np.load(path, allow_pickle=True).item()
    with open(path, "rb") as f:
        try:
            return pickle.load(f)
        except UnicodeDecodeError:  # a Python 2 pickle
            f.seek(0)
            return pickle.load(f, encoding="latin1")


def as_token_array(value: Any) -> Optional[np.ndarray]:
    """One video's feature as ``(T, d)`` float32 tokens, or None when it is missing.

    Missing: ``None``, a float NaN (CE's marker), an empty array, or any NaN entry.

    Example::

        >>> as_token_array(np.ones(4)).shape
        (1, 4)
        >>> as_token_array(float("nan")) is None
        True
        >>> as_token_array(np.ones((3, 5))).shape
        (3, 5)
    """
    if value is None:
        return None
    if isinstance(value, float):
        return None if np.isnan(value) else np.array([[value]], dtype=np.float32)
    arr = np.asarray(value, dtype=np.float32)
    if arr.size == 0 or np.isnan(arr).any():
        return None
    if arr.ndim == 1:
        return arr[None, :]
    return arr.reshape(-1, arr.shape[-1])


def _has_split_list(folder: Path) -> bool:
    return any((folder / name).is_file() for files in _SPLIT_FILES.values() for name in files.values())


def resolve_root(data: str | os.PathLike, release: str = "auto") -> tuple[Path, str]:
    """The feature root (the folder holding the split lists) and its release.

    ``data`` is ``data/MSRVTT`` (its ``structured-symlinks/`` is the CE release,
    ``high-quality/structured-symlinks/`` the high-quality one) or a feature root itself (a root
    inside a ``high-quality`` folder is that release, any other the CE release). With
    ``release="auto"`` the first found of ``data``, the CE root and the high-quality root wins.

    Example::

        >>> import tempfile
        >>> data = Path(tempfile.mkdtemp())
        >>> (data / "high-quality" / "structured-symlinks").mkdir(parents=True)
        >>> _ = (data / "high-quality" / "structured-symlinks" / "train_list_full.txt").write_text("video0\\n")
        >>> root, release = resolve_root(data)
        >>> root.relative_to(data).as_posix(), release
        ('high-quality/structured-symlinks', 'high-quality')
    """
    if release not in ("auto", *RELEASES):
        raise ValueError(f"release: expected 'auto' or one of {list(RELEASES)}, got {release!r}")
    data = Path(data)
    own = "high-quality" if data.parent.name == "high-quality" else "ce"
    candidates = [(data, own if release == "auto" else release)]
    candidates += [(data / folder, name) for name, folder in RELEASES.items()
                   if release in ("auto", name)]
    for folder, name in candidates:
        if _has_split_list(folder):
            return folder, name
    raise MSRVTTDataError(
        f"--data {data}: no split list (train_list_full.txt, train_list_jsfusion.txt, ...) in "
        + ", ".join(str(folder) for folder, _ in candidates)
    )


def text_file_for(release: str, text_feat: str) -> str:
    """The text-feature pickle of ``text_feat`` in ``release``, relative to its feature root.

    Example::

        >>> text_file_for("ce", "w2v"), text_file_for("high-quality", "w2v")
        ('aggregated_text_feats/w2v_MSRVTT.pickle', 'aggregated_text_feats/w2v.pkl')
    """
    return TEXT_FILES.get(release, {}).get(text_feat, f"aggregated_text_feats/{text_feat}.pkl")


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise MSRVTTDataError(f"split list {path} does not exist")
    rows = [r.strip() for r in path.read_text().splitlines()]
    rows = [r for r in rows if r]
    if len(set(rows)) != len(rows):
        raise MSRVTTDataError(f"{path}: lists a video more than once")
    return rows


def _modality_paths(root: Path, layout: str, overrides: Mapping[str, str]) -> dict[str, Path]:
    if layout == "ce":
        paths = {m: root / rel for m, rel in CE_FEATURE_FILES.items()}
    else:
        paths = {m: root / "mmt_feats" / f for f, m in MMT_FEATURE_FILES.items()}
    for m, rel in overrides.items():
        if m not in MSRVTT_MODALITIES:
            raise ValueError(f"modality_files: unknown modality {m!r}, expected one of {MSRVTT_MODALITIES}")
        paths[m] = root / rel
    return paths


def _detect_layout(root: Path) -> str:
    if any((root / rel).is_file() for rel in CE_FEATURE_FILES.values()):
        return "ce"
    if (root / "mmt_feats").is_dir():
        return "mmt"
    raise MSRVTTDataError(
        f"{root}: found neither CE feature pickles (e.g. {CE_FEATURE_FILES['audio']}) nor "
        f"an mmt_feats/ folder"
    )


@dataclass
class MSRVTTData:
    """Everything read from a CE / high-quality / MMT release.

    Attributes:
        root: the feature root.
        layout: ``"ce"`` or ``"mmt"`` (feature file names).
        features: modality -> (video -> ``(T, d)`` float32, or None when missing).
        feature_files: modality -> the pickle it came from.
        dims: modality -> feature size ``d``.
        text: video -> list of ``(T_words, d_text)`` arrays, one per caption.
        text_file: the text-feature pickle.
        raw_captions: video -> list of captions (lists of words), or None if absent.
        lists: ``"train"``, ``"test"`` (and ``"val"`` for the full split) -> video ids.
        test_caption: video -> caption index evaluated (1k-A), or None.
        release: ``"ce"`` or ``"high-quality"``.
        dropped: videos left out by ``skip_missing`` -> why.

    Example::

        >>> d = MSRVTTData(Path("."), "ce", {"rgb": {"v": np.ones((1, 2), np.float32)}},
        ...                {}, {"rgb": 2}, {"v": [np.ones((3, 4))]}, Path("t.pkl"), None,
        ...                {"train": ["v"], "test": []}, None)
        >>> d.available("v")
        frozenset({'rgb'})
    """

    root: Path
    layout: str
    features: dict[str, dict[str, Optional[np.ndarray]]]
    feature_files: dict[str, Path]
    dims: dict[str, int]
    text: dict[str, list[np.ndarray]]
    text_file: Path
    raw_captions: Optional[dict[str, list]]
    lists: dict[str, list[str]]
    test_caption: Optional[dict[str, int]]
    release: str = "ce"
    dropped: dict[str, str] = field(default_factory=dict)

    def available(self, video: str) -> frozenset[str]:
        """The modalities ``video`` really has."""
        return frozenset(m for m, feats in self.features.items() if feats.get(video) is not None)


def _read_captions(text_raw: Any, text_path: Path, listed: Sequence[str],
                   bad: Callable[[str, str], None], log: Callable[[str], None]) -> dict[str, list[np.ndarray]]:
    """Every listed video's caption features (all its usable captions), one size for all."""
    text: dict[str, list[np.ndarray]] = {}
    text_dim = None
    unusable = 0
    for v in listed:
        caps = text_raw.get(v) if isinstance(text_raw, Mapping) else None
        if caps is None:
            bad(v, f"{text_path}: no caption features for video {v!r} listed in the split lists")
            continue
        caps = list(caps) if isinstance(caps, (list, tuple)) else [caps]
        arrays = [a for a in (as_token_array(c) for c in caps) if a is not None]
        unusable += len(caps) - len(arrays)
        if not arrays:
            bad(v, f"{text_path}: video {v!r} has no usable caption (empty or NaN)")
            continue
        dim = {a.shape[1] for a in arrays}
        if text_dim is None:
            text_dim = next(iter(dim))
        if dim != {text_dim}:
            raise MSRVTTDataError(
                f"{text_path}: video {v!r} has caption features of size {sorted(dim)}, "
                f"other videos {text_dim}"
            )
        text[v] = arrays
    if unusable:
        log(f"{text_path.name}: left out {unusable} empty or NaN caption(s)")
    return text


def load_msrvtt(
    data: str | os.PathLike,
    *,
    split: str = "full",
    release: str = "auto",
    layout: str = "auto",
    text_feat: str = "w2v",
    text_file: Optional[str] = None,
    modality_files: Optional[Mapping[str, str]] = None,
    modalities: Sequence[str] = MSRVTT_MODALITIES,
    skip_missing: bool = False,
    log: Callable[[str], None] = print,
) -> MSRVTTData:
    """Read split lists, feature pickles, text features and raw captions.

    Args:
        data: ``data/MSRVTT`` or a feature root (see :func:`resolve_root`).
        split: ``"full"`` (6,513 / 497 / 2,990 videos, the paper's) or ``"jsfusion"`` (1k-A).
        release: ``"auto"``, ``"ce"`` or ``"high-quality"`` (see :data:`RELEASES`).
        layout: ``"ce"``, ``"mmt"`` or ``"auto"`` (CE if its pickles exist, else MMT).
        text_feat: a text-feature name of the release (:data:`TEXT_FILES`: ``w2v``, ``openai``,
            ...); ignored if ``text_file`` is given.
        text_file: text-feature pickle, relative to the feature root.
        modality_files: modality -> pickle path relative to the root, overriding the layout.
        modalities: the modalities to read.
        skip_missing: drop (and report) listed videos that lack captions or every modality,
            instead of raising.

    Raises:
        MSRVTTDataError: a file is missing (for 1k-A, ``jsfusion_val_caption_idx.pkl`` too), a
            listed video has no caption features (or no modality at all), or a video's feature
            size differs from the rest of its file; the message names the file and the video.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split: expected one of {sorted(_SPLIT_FILES)}, got {split!r}")
    if layout not in ("auto", "ce", "mmt"):
        raise ValueError(f"layout: expected 'auto', 'ce' or 'mmt', got {layout!r}")
    root, release = resolve_root(data, release)
    lists = {part: _read_list(root / name) for part, name in _SPLIT_FILES[split].items()}
    layout = _detect_layout(root) if layout == "auto" else layout
    paths = _modality_paths(root, layout, modality_files or {})
    paths = {m: paths[m] for m in modalities}
    absent = [f"{m}: {p}" for m, p in paths.items() if not p.is_file()]
    if absent:
        raise MSRVTTDataError(f"feature file(s) missing in the {release} release ({layout} layout): "
                              + "; ".join(absent) + " (--modality-file NAME=PATH points elsewhere)")
    text_path = root / (text_file if text_file is not None else text_file_for(release, text_feat))
    if not text_path.is_file():
        raise MSRVTTDataError(f"text features: {text_path} does not exist ({release} release, "
                              f"--text-feat {text_feat})")
    test_caption = None
    if split == "jsfusion":
        cap_idx_path = root / "jsfusion_val_caption_idx.pkl"
        if not cap_idx_path.is_file():
            raise MSRVTTDataError(f"{cap_idx_path} does not exist: the 1k-A split evaluates one "
                                  "given caption per test video (or use --split full)")
        test_caption = {k.decode() if isinstance(k, bytes) else str(k): int(v)
                        for k, v in _load_pickle(cap_idx_path).items()}
    raw_path = root / "raw-captions.pkl"
    raw_captions = _load_pickle(raw_path) if raw_path.is_file() else None
    if raw_captions is None:
        log(f"note: {raw_path} not found; rows will carry no caption strings")

    listed = [v for part in lists.values() for v in part]
    dropped: dict[str, str] = {}

    def bad(video: str, msg: str) -> None:
        if not skip_missing:
            raise MSRVTTDataError(f"{msg} (use --skip-missing to drop such videos)")
        dropped.setdefault(video, msg)

    text = _read_captions(_load_pickle(text_path), text_path, listed, bad, log)
    if raw_captions is not None:
        for v in text:
            if v not in raw_captions:
                bad(v, f"{raw_path}: no raw captions for video {v!r} listed in the split lists")
    if test_caption is not None:
        for v in lists["test"]:
            if v in text and not 0 <= test_caption.get(v, -1) < len(text[v]):
                raise MSRVTTDataError(f"{root / 'jsfusion_val_caption_idx.pkl'}: no valid caption index "
                                      f"for test video {v!r} ({len(text[v])} captions)")

    features: dict[str, dict[str, Optional[np.ndarray]]] = {}
    dims: dict[str, int] = {}
    missing_counts: dict[str, int] = {}
    for m, p in paths.items():
        raw = _load_pickle(p)
        if not isinstance(raw, Mapping):
            raise MSRVTTDataError(f"{p}: expected a dict video_id -> array, got {type(raw).__name__}")
        feats: dict[str, Optional[np.ndarray]] = {}
        for v in listed:
            arr = as_token_array(raw.get(v))
            if arr is not None:
                if m not in dims:
                    dims[m] = int(arr.shape[1])
                elif arr.shape[1] != dims[m]:
                    raise MSRVTTDataError(
                        f"{p}: video {v!r} has features of size {arr.shape[1]}, other videos {dims[m]}"
                    )
            feats[v] = arr
        missing_counts[m] = sum(a is None for a in feats.values())
        if m not in dims:
            raise MSRVTTDataError(f"{p}: no listed video has a usable {m} feature")
        features[m] = feats

    for v in listed:
        if v not in dropped and all(features[m][v] is None for m in features):
            bad(v, f"video {v!r} has none of the modalities {sorted(features)}")
    if dropped:
        log(f"skipped {len(dropped)} video(s) with missing captions or no modality")
        lists = {part: [v for v in vids if v not in dropped] for part, vids in lists.items()}
    log(f"MSR-VTT {release} release at {root}, {split} split: "
        + ", ".join(f"{part} {len(vids)}" for part, vids in lists.items()) + " videos")
    for m, n in missing_counts.items():
        log(f"{m}: missing for {n} of {len(listed)} listed videos ({paths[m].name})")
    return MSRVTTData(root, layout, features, paths, dims, text, text_path, raw_captions, lists,
                      test_caption, release, dropped)


# ----------------------------------------------------------------------------------------
# Splits (Zhang et al., Table 1)
# ----------------------------------------------------------------------------------------


def assign_training_groups(
    videos: Sequence[str],
    available: Mapping[str, Iterable[str]],
    *,
    groups: Mapping[str, Sequence[str]] = TRAIN_GROUPS,
    min_fraction: float = 0.75,
    seed: int = 0,
) -> tuple[dict[str, list[str]], list[str]]:
    """Assign training videos to the two modality groups by what they really have.

    Rule: a video's *coverage* of a group is the fraction of the group's modalities it has; it
    is eligible for a group when the coverage is at least ``min_fraction`` (3 of 4 by
    default). A video eligible for one group goes there; one eligible for none is dropped.
    Videos eligible for both are ordered by (coverage of the first group minus coverage of the
    second, descending; ties in a seeded random order) and fill the first group up to half of
    the assigned videos, the rest going to the second. The groups are disjoint.

    Returns:
        ``(group -> videos in input order, dropped videos)``.

    Example::

        >>> avail = {"a": {"rgb", "audio", "ocr"}, "b": {"rgb", "object", "scene"},
        ...          "c": {"rgb"}}
        >>> assign_training_groups(["a", "b", "c"], avail)
        ({'train_rgb_audio_ocr_speech': ['a'], 'train_rgb_object_scene_face': ['b']}, ['c'])
    """
    names = list(groups)
    if len(names) != 2:
        raise ValueError(f"groups: expected two groups, got {len(names)}")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"min_fraction: expected a fraction in (0, 1], got {min_fraction}")
    g0, g1 = (frozenset(groups[n]) for n in names)
    cover = {
        v: (len(g0 & set(available[v])) / len(g0), len(g1 & set(available[v])) / len(g1))
        for v in videos
    }
    tiebreak = {v: r for v, r in zip(videos, np.random.default_rng(seed).permutation(len(videos)))}
    out: dict[str, set[str]] = {n: set() for n in names}
    both, dropped = [], []
    for v in videos:
        e0, e1 = (c >= min_fraction for c in cover[v])
        if e0 and e1:
            both.append(v)
        elif e0:
            out[names[0]].add(v)
        elif e1:
            out[names[1]].add(v)
        else:
            dropped.append(v)
    both.sort(key=lambda v: (-(cover[v][0] - cover[v][1]), tiebreak[v]))
    total = len(videos) - len(dropped)
    want0 = max(0, (total + 1) // 2 - len(out[names[0]]))
    out[names[0]].update(both[:want0])
    out[names[1]].update(both[want0:])
    return {n: [v for v in videos if v in out[n]] for n in names}, dropped


@dataclass
class MSRVTTSplits:
    """Videos per split (one store row each), each split's modalities, role and captions.

    Attributes:
        videos: split -> video ids, the store's row order.
        modalities: split -> modalities the split carries.
        roles: split -> ``"train"``, ``"val"`` or ``"test"``.
        captions: split -> per video, the indices of the captions its row holds.
        protocol: ``"paper"`` or ``"balanced"``.
        dropped: training videos in no training split (balanced: eligible for no group; paper:
            a split-B video with none of B's modalities).
        left_out: val/test (paper protocol) -> videos of the list that lack a required modality.

    Example::

        >>> s = MSRVTTSplits({"test": ["v"]}, {"test": ("rgb",)}, {"test": "test"}, {"test": [(0, 1)]})
        >>> s.sizes()
        {'test': 1}
    """

    videos: dict[str, list[str]]
    modalities: dict[str, tuple[str, ...]]
    roles: dict[str, str]
    captions: dict[str, list[tuple[int, ...]]]
    protocol: str = "paper"
    dropped: list[str] = field(default_factory=list)
    left_out: dict[str, list[str]] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Videos per split."""
        return {name: len(videos) for name, videos in self.videos.items()}


def _paper_splits(
    data: MSRVTTData, eval_requires: Sequence[str]
) -> tuple[dict[str, list[str]], list[str], dict[str, list[str]]]:
    """Zhang et al.'s rule on the full split: split A has audio, OCR and speech, split B is the
    rest (minus videos with none of B's modalities); val/test keep the videos having
    ``eval_requires``."""
    if "val" not in data.lists:
        raise MSRVTTDataError("protocol 'paper' uses the full split (train_list_full.txt, val_list_full.txt, "
                              "test_list_full.txt): load the release with split='full' (--split full)")
    a_name, b_name = TRAIN_GROUPS
    b_modalities = set(TRAIN_GROUPS[b_name]) & set(data.features)
    videos: dict[str, list[str]] = {a_name: [], b_name: []}
    dropped = []
    for v in data.lists["train"]:
        have = data.available(v)
        if set(SPLIT_A_REQUIRES) <= have:
            videos[a_name].append(v)
        elif have & b_modalities:
            videos[b_name].append(v)
        else:
            dropped.append(v)
    left_out = {}
    for part in ("val", "test"):
        videos[part] = [v for v in data.lists[part] if set(eval_requires) <= data.available(v)]
        left_out[part] = [v for v in data.lists[part] if v not in set(videos[part])]
    return videos, dropped, left_out


def split_msrvtt(
    data: MSRVTTData,
    *,
    protocol: str = "paper",
    seed: int = 0,
    val_size: int = 500,
    max_train_captions: Optional[int] = None,
    min_fraction: float = 0.75,
    eval_requires: Optional[Sequence[str]] = None,
) -> MSRVTTSplits:
    """The training, val and test splits of a loaded release (Zhang et al., Sec. 4 and Table 1).

    ``protocol="paper"`` (full split only): split A (``train_rgb_audio_ocr_speech``, modalities
    rgb, audio, ocr, speech) = the training videos that have audio, OCR and speech; split B
    (``train_rgb_object_scene_face``: rgb, object, scene, face) = every other training video
    (one with none of B's modalities is dropped and counted); val and test = the videos of the
    val / test lists that have every modality of ``eval_requires`` (default
    :data:`SPLIT_A_REQUIRES`: audio, OCR and speech). The paper gives only the counts, 127 of
    497 val and 765 of 2,990 test videos (25.6 %), the share split A keeps of the training list
    (1,702 of 6,513, 26.1 %): split A's rule. Requiring all seven modalities
    (``eval_requires=MSRVTT_MODALITIES``) keeps a subset of those, so never more than split A's
    rule does. A row lacking one of its split's modalities (a val video without face) has it
    missing.

    ``protocol="balanced"`` (this library's earlier rule): training videos (minus a seeded
    ``val_size`` held out when the split has no val list, as 1k-A has not) go to the two groups
    by :func:`assign_training_groups`; val and test keep every video of their lists.

    Captions: a training row holds the video's captions (its first ``max_train_captions``; all
    by default); a val/test row holds every caption, except 1k-A's test rows which hold the one
    caption of ``jsfusion_val_caption_idx.pkl`` (as CE evaluates 1k-A).
    """
    if protocol not in PROTOCOLS:
        raise InvalidArgument("protocol", f"expected one of {list(PROTOCOLS)}, got {protocol!r}")
    if max_train_captions is not None and max_train_captions < 1:
        raise InvalidArgument("max_train_captions",
                              f"expected at least 1 (or None for all), got {max_train_captions}")
    all_mods = tuple(m for m in MSRVTT_MODALITIES if m in data.features)
    groups = {n: tuple(m for m in mods if m in data.features) for n, mods in TRAIN_GROUPS.items()}
    left_out: dict[str, list[str]] = {}
    if protocol == "paper":
        required = tuple(m for m in (eval_requires or SPLIT_A_REQUIRES) if m in data.features)
        videos, dropped, left_out = _paper_splits(data, required)
    else:
        train = list(data.lists["train"])
        if "val" in data.lists:
            val = list(data.lists["val"])
        else:
            if not 0 < val_size < len(train):
                raise InvalidArgument("val_size", f"expected 1 .. {len(train) - 1} videos, got {val_size}")
            pick = set(np.random.default_rng(seed).choice(len(train), val_size, replace=False).tolist())
            val = [v for i, v in enumerate(train) if i in pick]
            train = [v for i, v in enumerate(train) if i not in pick]
        assigned, dropped = assign_training_groups(
            train, {v: data.available(v) for v in train}, groups=groups,
            min_fraction=min_fraction, seed=seed,
        )
        videos = dict(assigned)
        videos["val"], videos["test"] = val, list(data.lists["test"])
    modalities = dict(groups) | {"val": all_mods, "test": all_mods}
    roles = {n: "train" for n in groups} | {"val": "val", "test": "test"}

    def row_captions(name: str, v: str) -> tuple[int, ...]:
        count = len(data.text[v])
        if roles[name] == "train":
            return tuple(range(min(count, max_train_captions or count)))
        if name == "test" and data.test_caption is not None:
            return (data.test_caption[v],)
        return tuple(range(count))

    captions = {name: [row_captions(name, v) for v in vids] for name, vids in videos.items()}
    return MSRVTTSplits(videos, modalities, roles, captions, protocol, dropped, left_out)


# ----------------------------------------------------------------------------------------
# Writing the store
# ----------------------------------------------------------------------------------------


def _pad(arrays: Sequence[Optional[np.ndarray]], tokens: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(arrays), tokens, dim), dtype=np.float32)
    lengths = np.zeros(len(arrays), dtype=np.int64)
    for i, a in enumerate(arrays):
        if a is None:
            continue
        k = min(tokens, a.shape[0])
        out[i, :k] = a[:k]
        lengths[i] = k
    return out, lengths


def _token_count(data: MSRVTTData, m: str, videos: Iterable[str], cap: int) -> int:
    longest = max((a.shape[0] for v in videos if (a := data.features[m].get(v)) is not None), default=1)
    return max(1, min(cap, longest))


def _caption_arrays(data: MSRVTTData, videos: Sequence[str], captions: Sequence[tuple[int, ...]],
                    slots: int, tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Caption features ``(N, slots, tokens, d)`` float16, token counts ``(N, slots)`` (0 in
    empty slots) and caption counts ``(N,)``."""
    dim = next(iter(data.text.values()))[0].shape[1]
    text = np.zeros((len(videos), slots, tokens, dim), dtype=np.float16)
    lengths = np.zeros((len(videos), slots), dtype=np.int64)
    for row, (v, chosen) in enumerate(zip(videos, captions)):
        for slot, c in enumerate(chosen):
            words = data.text[v][c][:tokens]
            text[row, slot, :len(words)] = words
            lengths[row, slot] = len(words)
    counts = np.array([len(chosen) for chosen in captions], dtype=np.int64)
    return text, lengths, counts


def split_arrays(
    data: MSRVTTData, splits: MSRVTTSplits, *, max_tokens: Optional[Mapping[str, int]] = None
) -> dict[str, dict[str, Any]]:
    """The arrays of every split, as written to the store.

    Returns:
        split -> a dict with ``"features"`` (``{m: (N, k_m, d_m)}``), ``"lengths"``
        (``{m: (N,)}``), ``"text"`` (``(N, K, t, d)`` float16: up to ``K`` captions per row,
        ``K`` the most any row of any split holds), ``"text_lengths"`` (``(N, K)``, 0 for empty
        slots) and ``"caption_counts"`` (``(N,)``); a missing modality has length 0 and zero
        features.
    """
    caps = dict(MAX_TOKENS) | dict(max_tokens or {})
    all_videos = [v for vids in splits.videos.values() for v in vids]
    tokens = {
        m: _token_count(data, m, all_videos, caps.get(m, _DEFAULT_MAX_TOKENS)) for m in data.features
    }
    used = [data.text[v][c] for name, vids in splits.videos.items()
            for v, chosen in zip(vids, splits.captions[name]) for c in chosen]
    text_tokens = max(1, min(caps["text"], max(a.shape[0] for a in used)))
    slots = max(len(chosen) for rows in splits.captions.values() for chosen in rows)
    out = {}
    for name, vids in splits.videos.items():
        feats, lengths = {}, {}
        for m in splits.modalities[name]:
            feats[m], lengths[m] = _pad([data.features[m][v] for v in vids], tokens[m], data.dims[m])
        text, text_len, counts = _caption_arrays(data, vids, splits.captions[name], slots, text_tokens)
        out[name] = {"features": feats, "lengths": lengths, "text": text, "text_lengths": text_len,
                     "caption_counts": counts}
    return out


def _caption_text(data: MSRVTTData, v: str, c: int) -> Optional[str]:
    if data.raw_captions is None:
        return None
    caps = data.raw_captions.get(v) or []
    if c >= len(caps):
        return None
    cap = caps[c]
    return " ".join(cap) if isinstance(cap, (list, tuple)) else str(cap)


def _eval_kept_line(splits: MSRVTTSplits, data: MSRVTTData, required: Sequence[str]) -> str:
    """How many listed val/test videos the paper's rule kept, next to the paper's counts."""
    parts = []
    for name in ("val", "test"):
        kept, listed = len(splits.videos[name]), len(data.lists[name])
        paper_kept, paper_listed = PAPER_SPLIT_SIZES[name], FULL_SPLIT_SIZES[name]
        parts.append(f"{name} kept {kept} of {listed} listed ({100 * kept / listed:.1f} %; paper: "
                     f"{paper_kept:,} of {paper_listed:,}, {100 * paper_kept / paper_listed:.1f} %)")
    return f"MSR-VTT val/test videos with {', '.join(required)}: " + "; ".join(parts)


def build_msrvtt_store(
    data_dir: str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    protocol: str = "paper",
    split: Optional[str] = None,
    release: str = "auto",
    layout: str = "auto",
    text_feat: str = "w2v",
    text_file: Optional[str] = None,
    modality_files: Optional[Mapping[str, str]] = None,
    embed_dim: int = 256,
    seed: int = 0,
    val_size: int = 500,
    max_train_captions: Optional[int] = None,
    min_fraction: float = 0.75,
    eval_requires: Optional[Sequence[str]] = None,
    max_tokens: Optional[Mapping[str, int]] = None,
    missing: str = "lengths0",
    skip_missing: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Read a CE / high-quality / MMT release and write the paper's retrieval FeatureStore.

    The store has task ``retrieval`` with joint embedding size ``embed_dim``; one row per video
    holding its captions' word features (up to ``K`` captions per row, the store's
    several-captions format). Splits by :func:`split_msrvtt` (``protocol``; ``split`` defaults to
    ``"full"`` for the paper's protocol, ``"jsfusion"`` for ``"balanced"``). A video of a split
    that lacks one of its modalities has that modality's length 0 (missing, not zero-filled
    input); ``missing="complete"`` leaves such rows out instead. Also writes
    ``store_path/msrvtt_rows.json``: the summary returned here plus, per split, each row's
    video, caption indices and caption texts.

    Returns:
        The summary: release, files, protocol, per-split sizes (``split_sizes``, and the paper's
        for comparison), captions, missing modalities and what was left out.
    """
    if protocol not in PROTOCOLS:
        raise InvalidArgument("protocol", f"expected one of {list(PROTOCOLS)}, got {protocol!r}")
    if missing not in ("lengths0", "complete"):
        raise InvalidArgument("missing", f"expected 'lengths0' or 'complete', got {missing!r}")
    unknown = sorted(set(eval_requires or ()) - set(MSRVTT_MODALITIES))
    if unknown:
        raise InvalidArgument("eval_requires",
                              f"unknown modality {unknown}, expected some of {list(MSRVTT_MODALITIES)}")
    if max_train_captions is not None and max_train_captions < 1:
        raise InvalidArgument("max_train_captions",
                              f"expected at least 1 (or None for all), got {max_train_captions}")
    split = split or ("full" if protocol == "paper" else "jsfusion")
    if protocol == "paper" and split != "full":
        raise MSRVTTDataError(f"protocol 'paper' uses the full split (6,513 / 497 / 2,990 videos), got "
                              f"split {split!r}: use --split full or --protocol balanced")
    store_path = Path(store_path)
    data = load_msrvtt(
        data_dir, split=split, release=release, layout=layout, text_feat=text_feat,
        text_file=text_file, modality_files=modality_files, skip_missing=skip_missing, log=log,
    )
    splits = split_msrvtt(data, protocol=protocol, seed=seed, val_size=val_size,
                          max_train_captions=max_train_captions, min_fraction=min_fraction,
                          eval_requires=eval_requires)
    if protocol == "paper":
        log(_eval_kept_line(splits, data, eval_requires or SPLIT_A_REQUIRES))
    if splits.dropped:
        log(f"{len(splits.dropped)} training video(s) fit no training split and were left out")
    incomplete: dict[str, int] = {}
    if missing == "complete":
        for name, vids in splits.videos.items():
            keep = [i for i, v in enumerate(vids) if set(splits.modalities[name]) <= data.available(v)]
            incomplete[name] = len(vids) - len(keep)
            splits.videos[name] = [vids[i] for i in keep]
            splits.captions[name] = [splits.captions[name][i] for i in keep]
        log("missing='complete': left out rows lacking a modality of their split: "
            + ", ".join(f"{n} {k}" for n, k in incomplete.items()))
    empty = [name for name, vids in splits.videos.items() if not vids]
    if empty:
        raise MSRVTTDataError(f"split(s) {empty} have no video (protocol {protocol!r}, missing={missing!r})")
    sizes = splits.sizes()
    log("MSR-VTT splits (videos): " + ", ".join(f"{n} {k}" for n, k in sizes.items())
        + (" (paper: " + ", ".join(f"{n} {k}" for n, k in PAPER_SPLIT_SIZES.items()) + ")"
           if protocol == "paper" else ""))
    arrays = split_arrays(data, splits, max_tokens=max_tokens)
    first = next(iter(arrays.values()))
    modalities = {}
    for a in arrays.values():
        for m, f in a["features"].items():
            modalities[m] = (int(f.shape[1]), int(f.shape[2]))
    slots = int(first["text"].shape[1])
    text_shape = (int(first["text"].shape[2]), int(first["text"].shape[3]))
    store = FeatureStore.create(
        store_path, "retrieval", embed_dim, modalities=modalities, text=text_shape,
        overwrite=overwrite, captions=slots,
    )
    for name, a in arrays.items():
        store.write_split(
            name, splits.roles[name], a["features"], a["text"] if slots > 1 else a["text"][:, 0],
            lengths=a["lengths"],
            target_lengths=a["text_lengths"] if slots > 1 else a["text_lengths"][:, 0],
            target_counts=a["caption_counts"] if slots > 1 else None,
        )

    summary = {
        "data": str(data.root),
        "release": data.release,
        "layout": data.layout,
        "split": split,
        "protocol": protocol,
        "feature_files": {m: str(p) for m, p in data.feature_files.items()},
        "text_file": str(data.text_file),
        "seed": seed,
        "eval_requires": list(eval_requires or SPLIT_A_REQUIRES) if protocol == "paper" else None,
        "split_sizes": sizes,
        "paper_split_sizes": dict(PAPER_SPLIT_SIZES) if protocol == "paper" else None,
        "splits": {
            name: {
                "role": splits.roles[name],
                "modalities": list(splits.modalities[name]),
                "videos": len(splits.videos[name]),
                "captions": int(arrays[name]["caption_counts"].sum()),
                "missing": {
                    m: int((arrays[name]["lengths"][m] == 0).sum()) for m in splits.modalities[name]
                },
            }
            for name in splits.videos
        },
        "max_captions_per_row": slots,
        "left_out_training_videos": len(splits.dropped),
        "left_out_eval_videos": {name: len(v) for name, v in splits.left_out.items()},
        "missing_policy": missing,
        "left_out_incomplete_rows": incomplete,
        "dropped_videos": dict(data.dropped),
    }
    rows_json = dict(summary)
    rows_json["rows"] = {
        name: [[v, list(chosen), [_caption_text(data, v, c) for c in chosen]]
               for v, chosen in zip(vids, splits.captions[name])]
        for name, vids in splits.videos.items()
    }
    rows_json["left_out_training_video_ids"] = splits.dropped
    rows_json["left_out_eval_video_ids"] = splits.left_out
    atomic_write_text(store_path / "msrvtt_rows.json", json.dumps(rows_json, indent=1))
    return summary
