"""MSR-VTT text-video retrieval with the Collaborative Experts (CE) features.

What this module reads, confirmed against the CE code (albanie/collaborative-experts:
``data_loader/MSRVTT_dataset.py``, ``base/base_dataset.py``, ``configs/base_config.json``,
``configs/data_loader_msrvtt.json``, ``model/text_embedding_models.json``):

- the feature root is ``<data>/MSRVTT/high-quality/structured-symlinks`` (CE's
  ``root_feat_folder``); ``--data`` may name it or the ``MSRVTT`` folder above it;
- split lists, one video id per line: ``train_list_jsfusion.txt`` / ``val_list_jsfusion.txt``
  (the 1k-A split: 9,000 / 1,000 videos) and ``train_list_full.txt`` /
  ``val_list_full.txt`` / ``test_list_full.txt`` (the "full" split: 6,513 / 497 / 2,990);
  ``jsfusion_val_caption_idx.pkl`` maps each 1k-A test video to the caption evaluated;
- one pickle per expert, a dict ``video_id -> array`` of shape ``(d,)`` or ``(T, d)``; a video
  without the modality holds a float NaN (CE's ``has_missing_values``: ``isinstance(x, float)
  and np.isnan(x)``). Here a NaN value, an array with NaN entries or a missing key all mean
  *missing*, never zero;
- text features ``aggregated_text_feats/<name>.pkl`` (``w2v`` = word2vec, 300-d; ``openai``
  is ``w2v_MSRVTT_openAIGPT.pickle``, 768-d): ``video_id -> list`` with one ``(T_words, d)``
  array per caption (19 or 20 per training video);
- ``raw-captions.pkl``: ``video_id -> list`` of captions, each a list of word tokens.

The MMT-style release (``mmt_feats/features.<name>.pkl``, same dict structure) is read too,
through :data:`MMT_FEATURE_FILES`.

Zhang et al. name seven MSR-VTT modalities (RGB, audio, OCR, speech, object, scene, face).
Their mapping to CE experts is this library's reading, overridable per modality: ``rgb`` is the
clip-level RGB video expert (CE ``r2p1d.r2p1d-ig65m.0``; MMT ``s3d``), ``object`` the
frame-level ImageNet expert (CE ``imagenet.senet154.0``; MMT ``rgb_agg``), ``scene`` the
Places365 DenseNet-161 expert.
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

__all__ = [
    "MSRVTT_MODALITIES",
    "TRAIN_GROUPS",
    "CE_FEATURE_FILES",
    "MMT_FEATURE_FILES",
    "CE_TEXT_FILES",
    "MAX_TOKENS",
    "MSRVTTDataError",
    "MSRVTTData",
    "MSRVTTSplits",
    "as_token_array",
    "resolve_root",
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
#: Text feature files by CE name (``aggregated_text_feats/<name>.pkl`` except ``openai``).
CE_TEXT_FILES: dict[str, str] = {
    "w2v": "aggregated_text_feats/w2v.pkl",
    "openai": "aggregated_text_feats/w2v_MSRVTT_openAIGPT.pickle",
}
#: Token caps (CE ``data_loader_msrvtt.json`` ``max_tokens``); other modalities: 32.
MAX_TOKENS: dict[str, int] = {"text": 37, "ocr": 49, "audio": 29, "speech": 32}
_DEFAULT_MAX_TOKENS = 32
_SPLIT_FILES = {
    "jsfusion": {"train": "train_list_jsfusion.txt", "test": "val_list_jsfusion.txt"},
    "full": {"train": "train_list_full.txt", "val": "val_list_full.txt",
             "test": "test_list_full.txt"},
}


class MSRVTTDataError(ValueError):
    """A feature, caption or split file is missing, inconsistent or lacks a video.

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


def resolve_root(data: str | os.PathLike) -> Path:
    """The folder holding the split lists: ``data`` itself or its CE feature root."""
    data = Path(data)
    for cand in (data, data / "high-quality" / "structured-symlinks"):
        if any((cand / name).is_file() for files in _SPLIT_FILES.values() for name in files.values()):
            return cand
    raise MSRVTTDataError(
        f"data: no split list (train_list_jsfusion.txt, train_list_full.txt, ...) in {data} "
        f"or {data / 'high-quality' / 'structured-symlinks'}"
    )


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
    """Everything read from a CE / MMT release.

    Attributes:
        root: the feature root.
        layout: ``"ce"`` or ``"mmt"``.
        features: modality -> (video -> ``(T, d)`` float32, or None when missing).
        feature_files: modality -> the pickle it came from.
        dims: modality -> feature size ``d``.
        text: video -> list of ``(T_words, d_text)`` arrays, one per caption.
        text_file: the text-feature pickle.
        raw_captions: video -> list of captions (lists of words), or None if absent.
        lists: ``"train"``, ``"test"`` (and ``"val"`` for the full split) -> video ids.
        test_caption: video -> caption index evaluated (1k-A), or None.

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

    def available(self, video: str) -> frozenset[str]:
        """The modalities ``video`` really has."""
        return frozenset(m for m, feats in self.features.items() if feats.get(video) is not None)


def load_msrvtt(
    data: str | os.PathLike,
    *,
    split: str = "jsfusion",
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
        data: the ``MSRVTT`` folder or its ``high-quality/structured-symlinks`` feature root.
        split: ``"jsfusion"`` (1k-A) or ``"full"``.
        layout: ``"ce"``, ``"mmt"`` or ``"auto"`` (CE if its pickles exist, else MMT).
        text_feat: ``"w2v"`` or ``"openai"`` (see :data:`CE_TEXT_FILES`); ignored if
            ``text_file`` is given.
        text_file: text-feature pickle, relative to the feature root.
        modality_files: modality -> pickle path relative to the root, overriding the layout.
        modalities: the modalities to read.
        skip_missing: drop (and report) listed videos that lack captions or every modality,
            instead of raising.

    Raises:
        MSRVTTDataError: a file is missing, a listed video has no caption features (or no
            modality at all), or a video's feature size differs from the rest of its file;
            the message names the file and the video.
    """
    if split not in _SPLIT_FILES:
        raise ValueError(f"split: expected one of {sorted(_SPLIT_FILES)}, got {split!r}")
    if layout not in ("auto", "ce", "mmt"):
        raise ValueError(f"layout: expected 'auto', 'ce' or 'mmt', got {layout!r}")
    root = resolve_root(data)
    lists = {part: _read_list(root / name) for part, name in _SPLIT_FILES[split].items()}
    layout = _detect_layout(root) if layout == "auto" else layout
    paths = _modality_paths(root, layout, modality_files or {})
    paths = {m: paths[m] for m in modalities}
    for m, p in paths.items():
        if not p.is_file():
            raise MSRVTTDataError(f"{m}: feature file {p} does not exist ({layout} layout)")

    if text_file is None:
        if text_feat not in CE_TEXT_FILES:
            text_file = f"aggregated_text_feats/{text_feat}.pkl"
        else:
            text_file = CE_TEXT_FILES[text_feat]
    text_path = root / text_file
    if not text_path.is_file():
        raise MSRVTTDataError(f"text features: {text_path} does not exist")
    text_raw = _load_pickle(text_path)
    raw_path = root / "raw-captions.pkl"
    raw_captions = _load_pickle(raw_path) if raw_path.is_file() else None
    if raw_captions is None:
        log(f"note: {raw_path} not found; rows will carry no caption strings")
    cap_idx_path = root / "jsfusion_val_caption_idx.pkl"
    test_caption = _load_pickle(cap_idx_path) if split == "jsfusion" and cap_idx_path.is_file() else None

    listed = [v for part in lists.values() for v in part]
    dropped: dict[str, str] = {}

    def bad(video: str, msg: str) -> None:
        if not skip_missing:
            raise MSRVTTDataError(f"{msg} (use --skip-missing to drop such videos)")
        dropped.setdefault(video, msg)

    text: dict[str, list[np.ndarray]] = {}
    text_dim = None
    for v in listed:
        caps = text_raw.get(v) if isinstance(text_raw, Mapping) else None
        if caps is None:
            bad(v, f"{text_path}: no caption features for video {v!r} listed in the split lists")
            continue
        caps = list(caps) if isinstance(caps, (list, tuple)) else [caps]
        arrays = [as_token_array(c) for c in caps]
        arrays = [a for a in arrays if a is not None]
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
        if raw_captions is not None and v not in raw_captions:
            bad(v, f"{raw_path}: no raw captions for video {v!r} listed in the split lists")

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
    for m, n in missing_counts.items():
        log(f"{m}: missing for {n} of {len(listed)} listed videos ({paths[m].name})")
    data_obj = MSRVTTData(
        root, layout, features, paths, dims, text, text_path, raw_captions, lists, test_caption
    )
    data_obj.dropped = dropped  # type: ignore[attr-defined]
    return data_obj


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
    """Videos per split, each split's modalities and role, and the caption rows.

    Attributes:
        videos: split -> video ids (one row per (video, caption) in ``rows``).
        modalities: split -> modalities the split carries.
        roles: split -> ``"train"``, ``"val"`` or ``"test"``.
        rows: split -> list of ``(video, caption_index)``, the store's row order.
        dropped: training videos eligible for no group.

    Example::

        >>> s = MSRVTTSplits({"test": ["v"]}, {"test": ("rgb",)}, {"test": "test"},
        ...                  {"test": [("v", 0)]})
        >>> s.rows["test"]
        [('v', 0)]
    """

    videos: dict[str, list[str]]
    modalities: dict[str, tuple[str, ...]]
    roles: dict[str, str]
    rows: dict[str, list[tuple[str, int]]]
    dropped: list[str] = field(default_factory=list)


def split_msrvtt(
    data: MSRVTTData,
    *,
    seed: int = 0,
    val_size: int = 500,
    train_captions: int = 1,
    min_fraction: float = 0.75,
) -> MSRVTTSplits:
    """Build the paper's splits from a loaded release.

    Training videos (the ``train`` list, minus a seeded ``val_size`` held out when the split
    has no val list, as 1k-A has not) go to the two Table 1 groups
    (:func:`assign_training_groups`); val and test carry every modality (a video lacking one
    has it marked missing). Each training video gives ``train_captions`` rows (its first
    captions); val/test videos one row: the 1k-A caption index when
    ``jsfusion_val_caption_idx.pkl`` is present, else caption 0.
    """
    if train_captions < 1:
        raise ValueError(f"train_captions: expected at least 1, got {train_captions}")
    train = list(data.lists["train"])
    if "val" in data.lists:
        val = list(data.lists["val"])
    else:
        if not 0 < val_size < len(train):
            raise ValueError(f"val_size: expected 1 .. {len(train) - 1} videos, got {val_size}")
        pick = set(np.random.default_rng(seed).choice(len(train), val_size, replace=False).tolist())
        val = [v for i, v in enumerate(train) if i in pick]
        train = [v for i, v in enumerate(train) if i not in pick]
    test = list(data.lists["test"])
    all_mods = tuple(m for m in MSRVTT_MODALITIES if m in data.features)
    groups = {n: tuple(m for m in mods if m in data.features) for n, mods in TRAIN_GROUPS.items()}
    assigned, dropped = assign_training_groups(
        train, {v: data.available(v) for v in train}, groups=groups,
        min_fraction=min_fraction, seed=seed,
    )
    videos = dict(assigned)
    videos["val"] = val
    videos["test"] = test
    modalities = dict(groups)
    modalities["val"] = all_mods
    modalities["test"] = all_mods
    roles = {n: "train" for n in assigned} | {"val": "val", "test": "test"}

    def eval_caption(v: str) -> int:
        if data.test_caption is not None and v in data.test_caption:
            return min(int(data.test_caption[v]), len(data.text[v]) - 1)
        return 0

    rows = {}
    for name, vids in videos.items():
        if roles[name] == "train":
            rows[name] = [(v, c) for v in vids for c in range(min(train_captions, len(data.text[v])))]
        else:
            rows[name] = [(v, eval_caption(v)) for v in vids]
    return MSRVTTSplits(videos, modalities, roles, rows, dropped)


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


def split_arrays(
    data: MSRVTTData, splits: MSRVTTSplits, *, max_tokens: Optional[Mapping[str, int]] = None
) -> dict[str, dict[str, Any]]:
    """The arrays of every split, as written to the store.

    Returns:
        split -> a dict with ``"features"`` (``{m: (N, k_m, d_m)}``), ``"lengths"``
        (``{m: (N,)}``), ``"text"`` (``(N, t, d)``) and ``"text_lengths"`` (``(N,)``); a
        missing modality has length 0 and zero features.
    """
    caps = dict(MAX_TOKENS) | dict(max_tokens or {})
    all_videos = [v for vids in splits.videos.values() for v in vids]
    tokens = {
        m: _token_count(data, m, all_videos, caps.get(m, _DEFAULT_MAX_TOKENS)) for m in data.features
    }
    text_tokens = max(1, min(caps["text"], max(a.shape[0] for caps_ in data.text.values() for a in caps_)))
    text_dim = next(iter(data.text.values()))[0].shape[1]
    out = {}
    for name, rows in splits.rows.items():
        feats, lengths = {}, {}
        for m in splits.modalities[name]:
            feats[m], lengths[m] = _pad([data.features[m][v] for v, _ in rows], tokens[m], data.dims[m])
        text, text_len = _pad([data.text[v][c] for v, c in rows], text_tokens, text_dim)
        out[name] = {"features": feats, "lengths": lengths, "text": text, "text_lengths": text_len}
    return out


def build_msrvtt_store(
    data_dir: str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    split: str = "jsfusion",
    layout: str = "auto",
    text_feat: str = "w2v",
    text_file: Optional[str] = None,
    modality_files: Optional[Mapping[str, str]] = None,
    embed_dim: int = 256,
    seed: int = 0,
    val_size: int = 500,
    train_captions: int = 1,
    min_fraction: float = 0.75,
    max_tokens: Optional[Mapping[str, int]] = None,
    missing: str = "lengths0",
    skip_missing: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Read a CE / MMT release and write the paper's retrieval FeatureStore.

    The store has task ``retrieval`` with joint embedding size ``embed_dim``; its text is the
    caption word features. Each split lists its modalities; a video of a split that lacks one
    of them has that modality's length 0 (missing, not zero-filled input). Also writes
    ``store_path/msrvtt_rows.json``: per split, each row's video id, caption index and caption
    text, plus the group assignment and dropped videos.

    Returns:
        The summary written to ``msrvtt_rows.json`` (without the per-row lists).
    """
    from umilayers.data.store import FeatureStore

    store_path = Path(store_path)
    data = load_msrvtt(
        data_dir, split=split, layout=layout, text_feat=text_feat, text_file=text_file,
        modality_files=modality_files, skip_missing=skip_missing, log=log,
    )
    splits = split_msrvtt(
        data, seed=seed, val_size=val_size, train_captions=train_captions, min_fraction=min_fraction
    )
    if splits.dropped:
        log(f"{len(splits.dropped)} training video(s) fit neither modality group and were left out")
    if missing not in ("lengths0", "complete"):
        raise ValueError(f"missing: expected 'lengths0' or 'complete', got {missing!r}")
    incomplete: dict[str, int] = {}
    if missing == "complete":
        for name, rows in splits.rows.items():
            keep = [r for r in rows if set(splits.modalities[name]) <= data.available(r[0])]
            incomplete[name] = len(rows) - len(keep)
            splits.rows[name] = keep
            if not keep:
                raise MSRVTTDataError(
                    f"split {name!r}: no video has all of {list(splits.modalities[name])} "
                    f"(missing='complete')"
                )
        log("missing='complete': left out rows lacking a modality of their split: "
            + ", ".join(f"{n} {k}" for n, k in incomplete.items()))
    arrays = split_arrays(data, splits, max_tokens=max_tokens)
    first = next(iter(arrays.values()))
    modalities = {}
    for a in arrays.values():
        for m, f in a["features"].items():
            modalities[m] = (int(f.shape[1]), int(f.shape[2]))
    text_shape = (int(first["text"].shape[1]), int(first["text"].shape[2]))
    store = FeatureStore.create(
        store_path, "retrieval", embed_dim, modalities=modalities, text=text_shape,
        overwrite=overwrite,
    )
    for name, a in arrays.items():
        store.write_split(
            name, splits.roles[name], a["features"], a["text"], lengths=a["lengths"],
            target_lengths=a["text_lengths"],
        )

    def caption_text(v: str, c: int) -> Optional[str]:
        if data.raw_captions is None:
            return None
        caps = data.raw_captions.get(v) or []
        if c >= len(caps):
            return None
        cap = caps[c]
        return " ".join(cap) if isinstance(cap, (list, tuple)) else str(cap)

    summary = {
        "data": str(data.root),
        "layout": data.layout,
        "split": split,
        "feature_files": {m: str(p) for m, p in data.feature_files.items()},
        "text_file": str(data.text_file),
        "seed": seed,
        "splits": {
            name: {
                "role": splits.roles[name],
                "modalities": list(splits.modalities[name]),
                "videos": len(splits.videos[name]),
                "rows": len(splits.rows[name]),
                "missing": {
                    m: int((arrays[name]["lengths"][m] == 0).sum()) for m in splits.modalities[name]
                },
            }
            for name in splits.rows
        },
        "left_out_training_videos": len(splits.dropped),
        "missing_policy": missing,
        "left_out_incomplete_rows": incomplete,
        "dropped_videos": dict(getattr(data, "dropped", {})),
    }
    rows_json = dict(summary)
    rows_json["rows"] = {
        name: [[v, c, caption_text(v, c)] for v, c in rows] for name, rows in splits.rows.items()
    }
    rows_json["left_out_training_video_ids"] = splits.dropped
    atomic_write_text(store_path / "msrvtt_rows.json", json.dumps(rows_json, indent=1))
    return summary
