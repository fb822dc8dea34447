"""EPIC-Kitchens-100: annotations, the paper's splits, feature extraction into a FeatureStore.

The pipeline a researcher holding the data runs (``examples/epic_extract.py`` is a thin CLI
over :func:`extract_epic`):

1. :func:`load_annotations` reads the official ``EPIC_100_train.csv`` (and
   ``EPIC_100_validation.csv`` when present) into :class:`EpicClip` rows.
2. :func:`build_splits` reads the paper's released split when it is given
   (:func:`read_released_splits`: ``EPIC_100_train_full_half1.csv`` ... with
   ``available_sound.csv``), or makes train / val / test splits of disjoint participants and
   cuts the training participants into one unimodal split per modality of the setting (Table 2
   of the paper: ``rgb+audio``, ``rgb+flow``, ``audio+flow``; and ``rgb+flow+audio``, the
   paper's "beyond two unimodal subsets"). Files of narration ids pin any other split.
3. :func:`action_vocabulary` numbers the actions: the released ``epic_action_classes.csv``
   (3,806 classes) when given, else every (verb_class, noun_class) pair of the annotations.
4. :func:`extract_epic` runs each modality's frozen backbone (video Swin-T for RGB, a ResNet with
   a 2T-channel stem for optical flow, AST on 128-bin log-mel filterbanks for audio), keeps the
   tokens, writes them in resumable shards, then assembles the FeatureStore. The paper's
   checkpoints (AST AudioSet, Video Swin / Omnivore Swin-T) load in their original key names
   (:mod:`umilayers.datasets.checkpoints`).

Backbones come from ``torchvision`` / ``timm`` / ``torchaudio``, imported only when extracting;
weights only from local files (nothing is ever downloaded).
"""

from __future__ import annotations

import ast
import csv
import functools
import json
import os
import re
import shutil
import tempfile
import wave
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence, Union, cast

import numpy as np
import torch
from torch import Tensor, nn

from umilayers._io import atomic_write, atomic_write_text
from umilayers._progress import progress as progress_bar
from umilayers._validation import InvalidArgument, MissingExtra, OutputExistsError
from umilayers.data.store import FeatureStore, StoreError
from umilayers.datasets.checkpoints import (
    ast_audio_vit,
    checkpoint_format,
    convert_ast_state_dict,
    convert_video_swin_state_dict,
    load_checkpoint,
    unwrap_state_dict,
)

if TYPE_CHECKING:  # timm is an optional extra, imported where a model is built
    from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "REQUIRED_COLUMNS",
    "MODALITIES",
    "SETTINGS",
    "ACTIONS_FILE",
    "EpicClip",
    "EpicDataError",
    "MissingInputError",
    "parse_timestamp",
    "read_annotations",
    "load_annotations",
    "ActionVocabulary",
    "EpicSplit",
    "EpicSplits",
    "build_splits",
    "read_split_files",
    "write_split_files",
    "RELEASED_SPLIT_FILES",
    "SOUND_FILE",
    "ACTION_CLASSES_FILE",
    "CLASS_FILES",
    "is_released_split",
    "read_released_splits",
    "read_class_keys",
    "read_action_classes",
    "action_vocabulary",
    "rgb_frame_indices",
    "flow_frame_indices",
    "audio_candidates",
    "clip_input_paths",
    "find_missing_inputs",
    "AUDIO_STATS",
    "AUDIO_CROPS",
    "RELEASED_PREPROCESSING",
    "EXTRACTION_FILE",
    "audio_crop_starts",
    "ExtractionConfig",
    "resolve_weights",
    "build_extractor",
    "extract_shards",
    "extract_epic",
    "verb_noun_accuracy",
]

PathLike = Union[str, os.PathLike]

REQUIRED_COLUMNS: tuple[str, ...] = (
    "narration_id", "participant_id", "video_id", "narration_timestamp", "start_timestamp",
    "stop_timestamp", "start_frame", "stop_frame", "narration", "verb", "verb_class", "noun",
    "noun_class", "all_nouns", "all_noun_classes",
)
"""Columns of ``EPIC_100_train.csv`` / ``EPIC_100_validation.csv`` this module reads."""

MODALITIES: tuple[str, ...] = ("rgb", "flow", "audio")

SETTINGS: dict[str, tuple[str, ...]] = {
    "rgb+audio": ("rgb", "audio"),
    "rgb+flow": ("rgb", "flow"),
    "audio+flow": ("audio", "flow"),
    "rgb+flow+audio": ("rgb", "flow", "audio"),
}
"""Modality settings: each modality has its own training split; val/test have all of them."""

ACTIONS_FILE = "epic_actions.json"
"""Written next to the FeatureStore's files: the action id -> (verb_class, noun_class) table."""

RELEASED_SPLIT_FILES: dict[str, str] = {
    "half1": "EPIC_100_train_full_half1.csv",
    "half2": "EPIC_100_train_full_half2.csv",
    "val": "EPIC_100_full_val.csv",
    "test": "EPIC_100_full_test.csv",
}
"""The paper's released split (``epic-annotations/`` of xiaobai1217/Unseen-Modality-Interaction):
narration ids, one a line, no header. ``half1`` is the first modality's training half (RGB in
``rgb+audio``), ``half2`` the second's (audio)."""

SOUND_FILE = "available_sound.csv"
"""Released with the split: the video ids that have an audio track, one a line. A clip of a
split that carries audio is kept only if its video is listed (as the released loaders do)."""

ACTION_CLASSES_FILE = "epic_action_classes.csv"
"""Released with the split: one action a line as ``verb_key,noun_key``; the line (from 0) is the
action id (3,806 actions)."""

CLASS_FILES: dict[str, str] = {"verb": "EPIC_100_verb_classes.csv", "noun": "EPIC_100_noun_classes.csv"}
"""The official class tables (columns ``id,key,instances,category``) mapping the keys of
:data:`ACTION_CLASSES_FILE` to class ids; read from the split folder, else the annotations."""


# --------------------------------------------------------------------------------------------
# Annotations
# --------------------------------------------------------------------------------------------

_TIMESTAMP = re.compile(r"^(\d+):(\d{1,2}):(\d{1,2}(?:\.\d+)?)$")


def parse_timestamp(text: str) -> float:
    """Seconds from an EPIC timestamp ``HH:MM:SS.ff`` (2 or 3 decimals occur in the files).

    Example::

        >>> parse_timestamp("00:01:02.53")
        62.53
    """
    match = _TIMESTAMP.match(text.strip())
    if match is None:
        raise ValueError(f"timestamp {text!r} is not HH:MM:SS.ff")
    hours, minutes, seconds = match.groups()
    return round(int(hours) * 3600 + int(minutes) * 60 + float(seconds), 6)


class EpicDataError(StoreError):
    """An annotation, split, wav or weights file, or an extraction option, does not fit what the
    EPIC-Kitchens adapter reads (a :class:`~umilayers.data.StoreError`: the command line shows it
    as one line). The message starts with the file or the flag.
    """


class _MissingFile(EpicDataError, FileNotFoundError):
    """:class:`EpicDataError` for a file that does not exist (also a ``FileNotFoundError``)."""


class MissingInputError(StoreError, FileNotFoundError):
    """An input file (frame, wav) of a clip does not exist; names the file(s) tried and the clip.

    ``path`` is one file, or the candidates tried in order (the audio layouts): ``path`` is
    then the first of them and ``tried`` all of them.

    Example::

        >>> err = MissingInputError("/data/P01/rgb_frames/P01_01/frame_0000000008.jpg", "P01_01_0")
        >>> err.narration_id
        'P01_01_0'
        >>> len(MissingInputError(["/a/P01_01_0.wav", "/a/P01_01.wav"], "P01_01_0", "audio").tried)
        2
    """

    def __init__(self, path: Union[PathLike, Sequence[PathLike]], narration_id: str,
                 modality: str = "") -> None:
        tried = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        self.tried = tuple(str(p) for p in tried)
        self.path = self.tried[0]
        self.narration_id = narration_id
        self.modality = modality
        kind = f"{modality} " if modality else ""
        where = (f"{self.path} does not exist" if len(self.tried) == 1
                 else "none of " + ", ".join(self.tried) + " exists")
        super().__init__(
            f"missing {kind}input for clip {narration_id}: {where} "
            "(--skip-missing drops such clips)"
        )

    def __reduce__(self):
        return type(self), (list(self.tried), self.narration_id, self.modality)


@dataclass(frozen=True)
class EpicClip:
    """One narration row of the EPIC-Kitchens-100 annotations (an action segment).

    Timestamps are in seconds; frames are the 1-based RGB frame numbers of the segment.

    Example::

        >>> clip = EpicClip("P01_01_0", "P01", "P01_01", 0.14, 3.37, 8, 202, 3, 3,
        ...                 narration="open door", verb="open", noun="door")
        >>> clip.participant_id, clip.stop_frame - clip.start_frame
        ('P01', 194)
    """

    narration_id: str
    participant_id: str
    video_id: str
    start_timestamp: float
    stop_timestamp: float
    start_frame: int
    stop_frame: int
    verb_class: int
    noun_class: int
    narration: str = ""
    verb: str = ""
    noun: str = ""
    all_noun_classes: tuple[int, ...] = ()


def _parse_list(text: str, path: Path, line: int, column: str) -> list:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise EpicDataError(f"{path}, line {line}: column {column} is not a list: {text!r}") from None
    if not isinstance(value, list):
        raise EpicDataError(f"{path}, line {line}: column {column} is not a list: {text!r}")
    return value


def read_annotations(path: PathLike) -> list[EpicClip]:
    """Read one official annotation CSV (``EPIC_100_train.csv`` or ``EPIC_100_validation.csv``).

    Extra columns (such as the ``uid`` some releases carry) are ignored.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a required column is missing (all missing columns are named), or a value
            does not parse (file and line are named).
    """
    path = Path(path)
    if not path.is_file():
        raise _MissingFile(f"annotation file {path} does not exist")
    clips = []
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise EpicDataError(
                f"{path}: missing column(s) {', '.join(missing)}; expected the EPIC-Kitchens-100 "
                f"columns {', '.join(REQUIRED_COLUMNS)}; found {', '.join(header) or 'no header'}"
            )
        for line, row in enumerate(reader, start=2):
            try:
                clips.append(EpicClip(
                    narration_id=row["narration_id"],
                    participant_id=row["participant_id"],
                    video_id=row["video_id"],
                    start_timestamp=parse_timestamp(row["start_timestamp"]),
                    stop_timestamp=parse_timestamp(row["stop_timestamp"]),
                    start_frame=int(row["start_frame"]),
                    stop_frame=int(row["stop_frame"]),
                    verb_class=int(row["verb_class"]),
                    noun_class=int(row["noun_class"]),
                    narration=row["narration"],
                    verb=row["verb"],
                    noun=row["noun"],
                    all_noun_classes=tuple(
                        int(v) for v in _parse_list(row["all_noun_classes"], path, line,
                                                    "all_noun_classes")
                    ),
                ))
            except (TypeError, ValueError) as err:
                if str(err).startswith(str(path)):
                    raise
                raise EpicDataError(f"{path}, line {line} ({row.get('narration_id')}): {err}") from None
    return clips


def load_annotations(directory: PathLike) -> list[EpicClip]:
    """All labelled clips of an annotation folder: ``EPIC_100_train.csv`` (required) and
    ``EPIC_100_validation.csv`` (if present), in file order; narration ids must be unique."""
    directory = Path(directory)
    train = directory / "EPIC_100_train.csv"
    if not train.is_file():
        raise _MissingFile(
            f"{train} does not exist; --annotations must be a clone of "
            "epic-kitchens/epic-kitchens-100-annotations (or a folder holding its CSVs)"
        )
    clips = read_annotations(train)
    validation = directory / "EPIC_100_validation.csv"
    if validation.is_file():
        clips += read_annotations(validation)
    seen: set[str] = set()
    for clip in clips:
        if clip.narration_id in seen:
            raise EpicDataError(f"{directory}: narration_id {clip.narration_id} appears twice")
        seen.add(clip.narration_id)
    return clips


class ActionVocabulary:
    """Contiguous action ids for (verb_class, noun_class) pairs.

    Built from the clips' pairs (deterministic: sorted pair order, independent of row order),
    or from the paper's ``epic_action_classes.csv`` in its own order
    (:func:`read_action_classes`, ``sort=False``). Keeps the verb and noun class of every action
    so that predictions can be scored per verb and noun.

    Args:
        pairs: (verb_class, noun_class) pairs.
        sort: number the distinct pairs in sorted order; with False, ``pairs`` are the actions
            in id order and must be unique.

    Example::

        >>> vocab = ActionVocabulary([(3, 3), (0, 2), (3, 3), (1, 2)])
        >>> vocab.num_actions, vocab.action_id(1, 2)
        (3, 1)
        >>> vocab.verb_noun(np.array([2, 0]))
        (array([3, 0]), array([3, 2]))
        >>> ActionVocabulary([(3, 3), (0, 2)], sort=False).action_id(3, 3)
        0
    """

    def __init__(self, pairs: Iterable[tuple[int, int]], *, sort: bool = True) -> None:
        listed = [(int(v), int(n)) for v, n in pairs]
        if sort:
            listed = sorted(set(listed))
        elif len(set(listed)) != len(listed):
            twice = next(p for i, p in enumerate(listed) if p in listed[:i])
            raise EpicDataError(f"action pairs must be unique; (verb_class, noun_class) {twice} appears twice")
        self.pairs: np.ndarray = np.array(listed, dtype=np.int64).reshape(-1, 2)
        self._ids = {pair: i for i, pair in enumerate(listed)}

    @classmethod
    def from_clips(cls, clips: Iterable[EpicClip]) -> "ActionVocabulary":
        return cls((c.verb_class, c.noun_class) for c in clips)

    @property
    def num_actions(self) -> int:
        return len(self.pairs)

    def action_id(self, verb_class: int, noun_class: int) -> int:
        try:
            return self._ids[(int(verb_class), int(noun_class))]
        except KeyError:
            raise KeyError(f"(verb_class={verb_class}, noun_class={noun_class}) is not in the "
                           f"vocabulary of {self.num_actions} actions") from None

    def targets(self, clips: Sequence[EpicClip]) -> np.ndarray:
        """Action ids of ``clips``, int64 ``(N,)``."""
        return np.array([self.action_id(c.verb_class, c.noun_class) for c in clips],
                        dtype=np.int64)

    def verb_noun(self, action_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map action ids ``(N,)`` back to their verb and noun classes (two ``(N,)`` arrays)."""
        action_ids = np.asarray(action_ids, dtype=np.int64)
        if action_ids.size and (action_ids.min() < 0 or action_ids.max() >= self.num_actions):
            raise ValueError(f"action ids must lie in [0, {self.num_actions}), got "
                             f"[{action_ids.min()}, {action_ids.max()}]")
        return self.pairs[action_ids, 0], self.pairs[action_ids, 1]

    def save(self, path: PathLike) -> None:
        """Write ``{"pairs": [[verb, noun], ...]}`` (index = action id), atomically."""
        atomic_write_text(Path(path), json.dumps({"pairs": self.pairs.tolist()}))

    @classmethod
    def load(cls, path: PathLike) -> "ActionVocabulary":
        """Read what :meth:`save` wrote (ids in the saved order)."""
        with open(path) as handle:
            pairs = json.load(handle)["pairs"]
        try:
            return cls(map(tuple, pairs), sort=False)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    def missing(self, clips: Iterable[EpicClip]) -> list[EpicClip]:
        """The clips whose (verb_class, noun_class) pair has no action id here."""
        return [c for c in clips if (c.verb_class, c.noun_class) not in self._ids]


def verb_noun_accuracy(
    predicted_actions: np.ndarray, true_actions: np.ndarray, vocab: ActionVocabulary
) -> dict[str, float]:
    """Top-1 action, verb and noun accuracy from predicted and true action ids ``(N,)``.

    A predicted action counts as a correct verb when its verb class matches the truth's (and
    likewise for nouns), as EPIC-Kitchens scores verb and noun from an action prediction.

    Example::

        >>> vocab = ActionVocabulary([(0, 0), (0, 1), (1, 1)])
        >>> verb_noun_accuracy(np.array([0, 2, 2]), np.array([1, 2, 0]), vocab)
        {'action_top1': 0.3333333333333333, 'verb_top1': 0.6666666666666666, 'noun_top1': 0.3333333333333333}
    """
    predicted_actions = np.asarray(predicted_actions)
    true_actions = np.asarray(true_actions)
    if predicted_actions.shape != true_actions.shape or predicted_actions.ndim != 1:
        raise ValueError(f"predicted_actions and true_actions must both be (N,), got "
                         f"{predicted_actions.shape} and {true_actions.shape}")
    pred_verb, pred_noun = vocab.verb_noun(predicted_actions)
    true_verb, true_noun = vocab.verb_noun(true_actions)
    return {
        "action_top1": float(np.mean(predicted_actions == true_actions)),
        "verb_top1": float(np.mean(pred_verb == true_verb)),
        "noun_top1": float(np.mean(pred_noun == true_noun)),
    }


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

@dataclass
class EpicSplit:
    """One split: its role in the FeatureStore, the modalities it holds, and its clips.

    Example::

        >>> split = EpicSplit("train_rgb", "train", ("rgb",), [])
        >>> split.participants
        []
    """

    name: str
    role: str
    modalities: tuple[str, ...]
    clips: list[EpicClip]

    @property
    def participants(self) -> list[str]:
        return sorted({c.participant_id for c in self.clips})


@dataclass
class EpicSplits:
    """The splits of one setting, in store order: the unimodal train splits, then val, test.

    Example::

        >>> clips = [EpicClip(f"P0{p}_01_{i}", f"P0{p}", f"P0{p}_01", 0.0, 1.0, 1, 60, i % 2, 0)
        ...          for p in range(1, 7) for i in range(3)]
        >>> splits = build_splits(clips, "rgb+audio", fractions=(4, 1, 1))
        >>> [(s.name, s.modalities, len(s.participants)) for s in splits.splits.values()]
        [('train_rgb', ('rgb',), 2), ('train_audio', ('audio',), 2), ('val', ('rgb', 'audio'), 1),
         ('test', ('rgb', 'audio'), 1)]
    """

    setting: str
    splits: dict[str, EpicSplit] = field(default_factory=dict)
    no_sound: dict[str, int] = field(default_factory=dict)
    """Clips left out of each split because their video has no sound (released split only)."""

    @property
    def modalities(self) -> tuple[str, ...]:
        return SETTINGS[self.setting]

    def summary(self) -> str:
        lines = [f"EPIC-Kitchens-100 splits, setting {self.setting}:"]
        for split in self.splits.values():
            lines.append(f"  {split.name:<12} role={split.role:<5} modalities={'+'.join(split.modalities):<15}"
                         f" clips={len(split.clips):<7} participants={','.join(split.participants)}")
        if self.no_sound:
            lines.append("  left out, video without sound (" + SOUND_FILE + "): "
                         + ", ".join(f"{n} {c}" for n, c in self.no_sound.items()))
        return "\n".join(lines)


def _split_layout(setting: str) -> list[tuple[str, str, tuple[str, ...]]]:
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    modalities = SETTINGS[setting]
    layout = [(f"train_{m}", "train", (m,)) for m in modalities]
    return layout + [("val", "val", modalities), ("test", "test", modalities)]


def build_splits(
    clips: Sequence[EpicClip],
    setting: str,
    *,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    split_dir: Optional[PathLike] = None,
) -> EpicSplits:
    """The paper's splits of ``clips`` for ``setting``.

    Participants (the kitchens, i.e. environments) are shuffled with ``seed`` and cut into
    train / val / test by ``fractions`` (relative weights over participants; at least one
    participant each). The training participants are then dealt to one unimodal split per
    modality, largest participant first to the split with the fewest clips so far, so that
    the unimodal splits share no participant and have about the same size.

    With ``split_dir``, the files there define the splits instead: the paper's released split
    as it is published (:data:`RELEASED_SPLIT_FILES`, read by :func:`read_released_splits`), or
    files ``<split>.txt`` of narration ids (:func:`read_split_files`).

    Raises:
        ValueError: unknown setting, bad fractions, or too few participants.
    """
    layout = _split_layout(setting)
    if split_dir is not None:
        if is_released_split(split_dir):
            return read_released_splits(clips, setting, split_dir)
        return read_split_files(clips, setting, split_dir)
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) <= 0:
        raise InvalidArgument("fractions", f"expected 3 positive weights (train, val, test), got {fractions}")
    by_participant: dict[str, list[EpicClip]] = {}
    for clip in clips:
        by_participant.setdefault(clip.participant_id, []).append(clip)
    participants = sorted(by_participant)
    num_train_splits = len(SETTINGS[setting])
    needed = num_train_splits + 2
    if len(participants) < needed:
        raise EpicDataError(f"setting {setting} needs at least {needed} participants (one per "
                            f"training split, one for val, one for test), the annotations have "
                            f"{len(participants)}")
    order = [participants[i] for i in np.random.default_rng(seed).permutation(len(participants))]
    total = sum(fractions)
    num_val = max(1, round(len(order) * fractions[1] / total))
    num_test = max(1, round(len(order) * fractions[2] / total))
    num_val = min(num_val, len(order) - num_train_splits - 1)
    num_test = min(num_test, len(order) - num_train_splits - num_val)
    val_p, test_p = order[:num_val], order[num_val:num_val + num_test]
    train_p = order[num_val + num_test:]

    groups: list[list[str]] = [[] for _ in range(num_train_splits)]
    sizes = [0] * num_train_splits
    for p in sorted(train_p, key=lambda p: -len(by_participant[p])):  # stable: keeps shuffle order
        target = min(range(num_train_splits), key=lambda g: (sizes[g], len(groups[g]), g))
        groups[target].append(p)
        sizes[target] += len(by_participant[p])

    members = {name: groups[i] for i, (name, _, _) in enumerate(layout[:num_train_splits])}
    members["val"], members["test"] = val_p, test_p
    result = EpicSplits(setting)
    for name, role, modalities in layout:
        chosen = set(members[name])
        result.splits[name] = EpicSplit(name, role, modalities,
                                        [c for c in clips if c.participant_id in chosen])
    return result


def read_split_files(clips: Sequence[EpicClip], setting: str, split_dir: PathLike) -> EpicSplits:
    """Splits pinned by files: ``<split_dir>/<split>.txt`` for every split of the setting
    (``train_<modality>.txt`` per modality, ``val.txt``, ``test.txt``), narration ids one a line
    (blank lines and ``#`` comments ignored). Clips keep the order of the file.

    Raises:
        FileNotFoundError: a split file is missing (all expected names are listed).
        ValueError: an id is unknown (file and line named) or listed in two splits.
    """
    layout = _split_layout(setting)
    split_dir = Path(split_dir)
    missing = [f"{name}.txt" for name, _, _ in layout if not (split_dir / f"{name}.txt").is_file()]
    if missing:
        raise _MissingFile(f"{split_dir}: missing split file(s) {', '.join(missing)}; setting "
                           f"{setting} needs {', '.join(n + '.txt' for n, _, _ in layout)}")
    by_id = {c.narration_id: c for c in clips}
    owner: dict[str, str] = {}
    result = EpicSplits(setting)
    for name, role, modalities in layout:
        path = split_dir / f"{name}.txt"
        chosen = []
        for line, text in enumerate(path.read_text().splitlines(), start=1):
            narration_id = text.split("#", 1)[0].strip()
            if not narration_id:
                continue
            if narration_id not in by_id:
                raise EpicDataError(f"{path}, line {line}: narration_id {narration_id} is not in the "
                                    "annotations")
            if narration_id in owner:
                raise EpicDataError(f"{path}, line {line}: narration_id {narration_id} is already in "
                                    f"split {owner[narration_id]}")
            owner[narration_id] = name
            chosen.append(by_id[narration_id])
        result.splits[name] = EpicSplit(name, role, modalities, chosen)
    return result


def is_released_split(split_dir: PathLike) -> bool:
    """Whether ``split_dir`` holds the paper's released split files (any of them)."""
    return any((Path(split_dir) / name).is_file() for name in RELEASED_SPLIT_FILES.values())


def _read_ids(path: Path) -> list[str]:
    """Non-empty lines of a one-column file (the released CSVs have no header)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        return [row[0].strip() for row in csv.reader(handle) if row and row[0].strip()]


def read_released_splits(clips: Sequence[EpicClip], setting: str, split_dir: PathLike) -> EpicSplits:
    """The paper's released split, read from the files as they are published.

    ``EPIC_100_train_full_half1.csv`` gives the first modality's training split and
    ``..._half2.csv`` the second's (``train_rgb`` / ``train_audio`` in ``rgb+audio``, the paper's
    setting; the other two-modality settings take the halves in their modality order);
    ``EPIC_100_full_val.csv`` and ``EPIC_100_full_test.csv`` give val and test. Clips come from
    both official annotation files (the released training halves include clips of
    ``EPIC_100_validation.csv``). In a split that carries audio, clips whose video is not in
    ``available_sound.csv`` are left out and counted in :attr:`EpicSplits.no_sound`, as the
    released data loaders do. Clips keep the files' order.

    Raises:
        FileNotFoundError: a released file is missing (all are named).
        ValueError: a setting with three modalities (the release has two training halves), or
            ids that are not in the annotations or are listed twice.
    """
    layout = _split_layout(setting)
    modalities = SETTINGS[setting]
    split_dir = Path(split_dir)
    if len(modalities) != 2:
        raise EpicDataError(f"--split-dir {split_dir}: the released split has two training halves "
                            f"({RELEASED_SPLIT_FILES['half1']}, {RELEASED_SPLIT_FILES['half2']}); "
                            f"setting {setting} needs {len(modalities)}: use train_<modality>.txt "
                            "files or the participant split")
    needed = list(RELEASED_SPLIT_FILES.values()) + ([SOUND_FILE] if "audio" in modalities else [])
    missing = [name for name in needed if not (split_dir / name).is_file()]
    if missing:
        raise _MissingFile(f"{split_dir}: missing released split file(s) {', '.join(missing)}")
    sources = dict(zip([name for name, _, _ in layout], RELEASED_SPLIT_FILES.values()))
    sound = set(_read_ids(split_dir / SOUND_FILE)) if "audio" in modalities else set()
    by_id = {c.narration_id: c for c in clips}
    owner: dict[str, str] = {}
    result = EpicSplits(setting)
    for name, role, split_modalities in layout:
        path = split_dir / sources[name]
        ids = _read_ids(path)
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise EpicDataError(f"{path}: {len(unknown)} narration id(s) are not in the annotations, "
                                f"first {unknown[:3]}; --annotations needs EPIC_100_train.csv and "
                                "EPIC_100_validation.csv (the released halves use both)")
        for narration_id in ids:
            if narration_id in owner:
                raise EpicDataError(f"{path}: narration_id {narration_id} is already in split "
                                    f"{owner[narration_id]}")
            owner[narration_id] = name
        chosen = [by_id[i] for i in ids]
        if "audio" in split_modalities:
            kept = [c for c in chosen if c.video_id in sound]
            result.no_sound[name] = len(chosen) - len(kept)
            chosen = kept
        result.splits[name] = EpicSplit(name, role, split_modalities, chosen)
    return result


def read_class_keys(path: PathLike) -> dict[str, int]:
    """``key -> id`` from an official class table (``EPIC_100_verb_classes.csv`` or
    ``EPIC_100_noun_classes.csv``: columns ``id,key,instances,category``)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not {"id", "key"} <= set(reader.fieldnames or []):
            raise EpicDataError(f"{path}: expected the columns id,key (,instances,category); found "
                                f"{', '.join(reader.fieldnames or []) or 'no header'}")
        return {row["key"]: int(row["id"]) for row in reader}


def read_action_classes(path: PathLike, verb_classes: PathLike, noun_classes: PathLike) -> ActionVocabulary:
    """The paper's action classes: ``epic_action_classes.csv`` (``verb_key,noun_key`` per line,
    the line number being the action id) mapped to class ids with the official class tables.

    Raises:
        ValueError: a key that the class tables do not know (file and line named), a line that
            is not two columns, or a pair listed twice.
    """
    path = Path(path)
    verbs, nouns = read_class_keys(verb_classes), read_class_keys(noun_classes)
    pairs = []
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if len(row) != 2:
                raise EpicDataError(f"{path}, line {line}: expected verb_key,noun_key, got {row}")
            verb, noun = row[0].strip(), row[1].strip()
            for kind, key, table, source in (("verb", verb, verbs, verb_classes),
                                             ("noun", noun, nouns, noun_classes)):
                if key not in table:
                    raise EpicDataError(f"{path}, line {line}: {kind} {key!r} is not a key of {source}")
            pairs.append((verbs[verb], nouns[noun]))
    try:
        return ActionVocabulary(pairs, sort=False)
    except ValueError as err:
        raise EpicDataError(f"{path}: {err}") from None


def action_vocabulary(clips: Sequence[EpicClip], split_dir: Optional[PathLike] = None,
                      annotations: Optional[PathLike] = None) -> ActionVocabulary:
    """The action ids of a run: the paper's 3,806 classes when ``split_dir`` holds
    ``epic_action_classes.csv`` (the class tables come from ``split_dir``, else from
    ``annotations``), else the sorted pairs of ``clips``."""
    if split_dir is None or not (Path(split_dir) / ACTION_CLASSES_FILE).is_file():
        return ActionVocabulary.from_clips(clips)
    folders = [Path(split_dir)] + ([Path(annotations)] if annotations is not None else [])
    tables = {}
    for kind, name in CLASS_FILES.items():
        found = next((f / name for f in folders if (f / name).is_file()), None)
        if found is None:
            raise _MissingFile(f"{name} is needed to read {ACTION_CLASSES_FILE}; looked in "
                               + ", ".join(str(f) for f in folders))
        tables[kind] = found
    return read_action_classes(Path(split_dir) / ACTION_CLASSES_FILE, tables["verb"], tables["noun"])


def write_split_files(splits: EpicSplits, split_dir: PathLike) -> None:
    """Write ``splits`` as the files :func:`read_split_files` reads (to pin a generated split)."""
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    for split in splits.splits.values():
        atomic_write_text(split_dir / f"{split.name}.txt",
                           "".join(c.narration_id + "\n" for c in split.clips))


# --------------------------------------------------------------------------------------------
# Raw inputs
# --------------------------------------------------------------------------------------------

def _uniform(first: int, last: int, count: int) -> list[int]:
    """``count`` indices spread uniformly over ``[first, last]`` (segment centres; repeats
    when the range is shorter than ``count``)."""
    last = max(first, last)
    span = last - first + 1
    return [first + min(span - 1, int((i + 0.5) * span / count)) for i in range(count)]


def rgb_frame_indices(clip: EpicClip, frames: int) -> list[int]:
    """The ``frames`` RGB frame numbers sampled uniformly within the clip.

    Example::

        >>> rgb_frame_indices(EpicClip("a", "P01", "P01_01", 0, 1, 8, 15, 0, 0), 4)
        [9, 11, 13, 15]
    """
    return _uniform(clip.start_frame, clip.stop_frame, frames)


def flow_frame_indices(clip: EpicClip, frames: int, stride: int = 2) -> list[int]:
    """Flow frame numbers for the clip: EPIC-Kitchens computes flow on every second RGB frame,
    so flow frame ``i`` covers RGB frames ``2i - 1, 2i`` and the clip spans flow frames
    ``start_frame // 2 .. stop_frame // 2`` (at least 1).

    Example::

        >>> flow_frame_indices(EpicClip("a", "P01", "P01_01", 0, 1, 8, 15, 0, 0), 4)
        [4, 5, 6, 7]
    """
    return _uniform(max(1, clip.start_frame // stride), max(1, clip.stop_frame // stride), frames)


def _frame_name(index: int) -> str:
    return f"frame_{index:010d}.jpg"


def audio_candidates(clip: EpicClip, root: PathLike) -> list[tuple[Path, bool]]:
    """The wav files that may hold ``clip``'s audio, in the order they are tried.

    Each entry is ``(path, whole)``: ``whole`` files hold only the clip and are used whole; the
    others hold the clip's video and are cut by the clip's timestamps. The four layouts:

    1. ``<root>/<participant>/<narration_id>.wav``: one per clip, what the paper's released
       data loader reads;
    2. ``<root>/<narration_id>.wav``: one per clip, no participant folder;
    3. ``<root>/<participant>/<video_id>.wav``: one per video;
    4. ``<root>/<video_id>.wav``: one per video, what the paper's ``extract_audio.py`` writes
       (16 kHz mono).

    Example::

        >>> clip = EpicClip("P01_01_0", "P01", "P01_01", 0.1, 3.4, 8, 202, 3, 3)
        >>> [(str(p), whole) for p, whole in audio_candidates(clip, "A")]
        [('A/P01/P01_01_0.wav', True), ('A/P01_01_0.wav', True), ('A/P01/P01_01.wav', False), ('A/P01_01.wav', False)]
    """
    root = Path(root)
    return [
        (root / clip.participant_id / f"{clip.narration_id}.wav", True),
        (root / f"{clip.narration_id}.wav", True),
        (root / clip.participant_id / f"{clip.video_id}.wav", False),
        (root / f"{clip.video_id}.wav", False),
    ]


def _audio_source(root: PathLike, clip: EpicClip) -> Optional[tuple[Path, bool]]:
    """The first of :func:`audio_candidates` that exists, or None."""
    return next(((p, whole) for p, whole in audio_candidates(clip, root) if p.is_file()), None)


def clip_input_paths(clip: EpicClip, modality: str, root: PathLike, config: "ExtractionConfig") -> list[Path]:
    """Every file the extractor of ``modality`` reads for ``clip`` under ``root``.

    Layouts (those of the EPIC-Kitchens-100 release once the per-video tars are extracted):

    - rgb: ``<root>/<participant>/rgb_frames/<video>/frame_%010d.jpg``
    - flow: ``<root>/<participant>/flow_frames/<video>/{u,v}/frame_%010d.jpg``
    - audio: the first existing file of :func:`audio_candidates` (all four candidates when none
      exists)
    """
    root = Path(root)
    if modality == "rgb":
        folder = root / clip.participant_id / "rgb_frames" / clip.video_id
        return [folder / _frame_name(i) for i in dict.fromkeys(rgb_frame_indices(clip, config.frames))]
    if modality == "flow":
        folder = root / clip.participant_id / "flow_frames" / clip.video_id
        assert config.flow_frames is not None, "ExtractionConfig fills in its default"
        indices = dict.fromkeys(flow_frame_indices(clip, config.flow_frames, config.flow_stride))
        return [folder / axis / _frame_name(i) for i in indices for axis in ("u", "v")]
    if modality == "audio":
        found = _audio_source(root, clip)
        return [found[0]] if found is not None else [p for p, _ in audio_candidates(clip, root)]
    raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")


def find_missing_inputs(clip: EpicClip, modality: str, root: PathLike,
                        config: "ExtractionConfig") -> tuple[Path, ...]:
    """What is missing for ``clip``: ``()`` when every input exists; else the first missing
    frame, or (audio) every wav layout tried."""
    if modality == "audio":
        if _audio_source(root, clip) is not None:
            return ()
        return tuple(p for p, _ in audio_candidates(clip, root))
    for path in clip_input_paths(clip, modality, root, config):
        if not path.is_file():
            return (path,)
    return ()


def _require(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtra(module, extra, "extracting EPIC-Kitchens features") from err


def _load_image(path: Path, size: int, mode: str, short_side: Optional[int] = None) -> np.ndarray:
    """Shorter side resized to ``short_side`` (default ``size``), centre-cropped to
    ``size x size``; uint8 (H, W[, 3])."""
    image_module = _require("PIL.Image", "datasets")
    short = short_side or size
    with image_module.open(path) as image:
        image = image.convert(mode)
        width, height = image.size
        scale = short / min(width, height)
        new_w, new_h = max(short, round(width * scale)), max(short, round(height * scale))
        image = image.resize((new_w, new_h), image_module.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)))


def _read_wav(path: Path, start: Optional[float], stop: Optional[float]) -> tuple[np.ndarray, int]:
    """PCM wav (8/16/32-bit) as float32 mono in [-1, 1]; only the [start, stop) seconds."""
    with wave.open(str(path), "rb") as handle:
        rate, channels, width = handle.getframerate(), handle.getnchannels(), handle.getsampwidth()
        total = handle.getnframes()
        first = 0 if start is None else min(total, max(0, int(round(start * rate))))
        last = total if stop is None else min(total, max(first, int(round(stop * rate))))
        handle.setpos(first)
        raw = handle.readframes(last - first)
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}.get(width)
    if dtype is None:
        raise EpicDataError(f"{path}: {8 * width}-bit wav is not supported (use 8/16/32-bit PCM)")
    samples = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    if width == 1:
        samples = (samples - 128.0) / 128.0
    else:
        samples /= float(2 ** (8 * width - 1))
    return samples.reshape(-1, channels).mean(axis=1), rate


# --------------------------------------------------------------------------------------------
# Extractors
# --------------------------------------------------------------------------------------------

AUDIO_STATS: dict[str, tuple[float, float]] = {
    "audioset": (-4.2677393, 4.5689974),
    "released": (-5.388, 2.94),
}
"""Filterbank normalisation statistics ``(mean, std)``; a filterbank becomes
``(fbank - mean) / (2 * std)`` (AST's rule, which the released loaders keep). ``audioset``: AST's
AudioSet statistics; ``released``: the paper's released code's (``ast_configs.py``,
``norm_stats = [-5.388, 2.94]``, used by its train, validation and test loaders)."""

AUDIO_CROPS: tuple[str, ...] = ("first", "released")
"""Which ``audio_frames`` filterbank frames of a longer clip are kept. ``first``: the first ones.
``released``: the released loaders' crops: one random crop in a training split
(``dataloader_train.py``; seeded by the clip's narration id here, so a rerun writes the same
store), and at val/test the crops starting every ``int(n / 3.1)`` frames (``dataloader_test.py``,
at most 4), whose tokens are averaged (the released ``test.py`` averages the crops' predicted
probabilities instead; a store row holds one set of tokens). See :func:`audio_crop_starts`."""

RELEASED_PREPROCESSING: dict[str, Any] = {"short_side": 256, "audio_stats": "released", "audio_crop": "released"}
"""The released code's preprocessing as :class:`ExtractionConfig` fields (``epic_extract.py
--preset paper``): RGB frames' shorter side resized to 256, then the centre 224 crop
(``ShortSideScale(256)`` and ``SpatialCrop(224, num_crops=1)`` of its loaders); the audio of
:data:`AUDIO_STATS` ``released`` and :data:`AUDIO_CROPS` ``released``."""

EXTRACTION_FILE = "epic_extraction.json"
"""Written next to the FeatureStore's files: the :class:`ExtractionConfig` that made the tokens
(the weights as given, without device, batch size or workers)."""


def audio_crop_starts(frames: int, target: int, rule: str, *, train: bool, seed: int = 0) -> list[int]:
    """First frame of each ``target``-frame crop of a ``frames``-frame filterbank.

    ``rule`` is one of :data:`AUDIO_CROPS`. A filterbank of at most ``target`` frames gives one
    crop at 0 (zero-padded later). ``released``, ``train``: one start drawn from
    ``[0, frames - target)`` as ``np.random.randint`` does in the released training loader, with
    a generator seeded by ``seed``; not ``train``: ``0, s, 2s, ... < frames - target`` with
    ``s = int(frames / 3.1)``, the released test loader's crops.

    Example::

        >>> audio_crop_starts(300, 128, "released", train=False)
        [0, 96]
        >>> audio_crop_starts(1000, 128, "released", train=False)
        [0, 322, 644]
        >>> audio_crop_starts(300, 128, "first", train=True), audio_crop_starts(100, 128, "released", train=True)
        ([0], [0])
    """
    if rule not in AUDIO_CROPS:
        raise ValueError(f"audio_crop must be one of {', '.join(AUDIO_CROPS)}, got {rule!r}")
    extra = frames - target
    if rule == "first" or extra <= 0:
        return [0]
    if train:
        return [int(np.random.default_rng(seed).integers(0, extra))]
    return list(range(0, extra, int(frames / 3.1)))


@dataclass
class ExtractionConfig:
    """Settings of the three extractors (defaults: the paper's extractors and the sizes of its
    released features: Swin-T on 32 RGB frames at 224 px, 784 tokens; AST on 128 mel bins x 128
    frames with 16 x 16 patches every 10, 12 x 12 = 144 patch tokens).

    Args:
        frames: RGB frames per clip (32 at 224 px gives Swin-T's 16 x 7 x 7 = 784 tokens).
        image_size: square input side for RGB and flow.
        short_side: RGB frames' shorter side is resized to this, then centre-cropped to
            ``image_size``; None = ``image_size`` (the whole shorter side is kept). The released
            loaders: 256 (then 224). Flow is always resized to ``image_size``.
        flow_frames: flow frames per clip (u and v stacked: ``2 * flow_frames`` channels);
            None = ``frames``.
        flow_stride: RGB frames per flow frame (2 in EPIC-Kitchens).
        rgb_arch: ``swin3d_t`` (default), ``swin3d_s`` or ``swin3d_b`` (torchvision).
        flow_arch: ``resnet18`` or ``resnet50`` (torchvision).
        audio_arch: a timm ViT name; ``deit_base_distilled_patch16_384`` is AST's network (its
            AudioSet checkpoint loads as is, see :mod:`umilayers.datasets.checkpoints`).
        audio_frames: filterbank frames (10 ms each) per clip, padded or cropped (AST's
            ``target_length``; 128 in the paper's released code).
        audio_stride: patch stride in frequency and time (16 x 16 patches; AST: 10, overlapping).
        audio_stats: filterbank statistics, a key of :data:`AUDIO_STATS` (``audioset``, AST's;
            ``released``, the released code's).
        audio_crop: which frames of a clip longer than ``audio_frames`` are used, one of
            :data:`AUDIO_CROPS` (``first``; ``released``: a random crop in training splits, the
            test loader's crops averaged in val/test).
        sample_rate: audio is resampled to this rate before the filterbank.
        weights: modality -> state-dict path, or ``"random"`` to keep the random init.
        device: where the backbones run.
        batch_size: clips per forward pass.
        workers: DataLoader worker processes decoding the inputs.

    Example::

        >>> ExtractionConfig(frames=4, image_size=64).flow_frames
        4
    """

    frames: int = 32
    image_size: int = 224
    short_side: Optional[int] = None
    flow_frames: Optional[int] = None
    flow_stride: int = 2
    rgb_arch: str = "swin3d_t"
    flow_arch: str = "resnet18"
    audio_arch: str = "deit_base_distilled_patch16_384"
    audio_frames: int = 128
    audio_stride: int = 10
    audio_stats: str = "audioset"
    audio_crop: str = "first"
    sample_rate: int = 16000
    weights: Mapping[str, str] = field(default_factory=dict)
    device: str = "cpu"
    batch_size: int = 8
    workers: int = 0

    def __post_init__(self) -> None:
        if self.flow_frames is None:
            self.flow_frames = self.frames
        for name in ("frames", "image_size", "flow_frames", "flow_stride", "audio_frames",
                     "audio_stride", "sample_rate", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.audio_frames < 16:
            raise ValueError(f"audio_frames must be at least one 16-frame patch, got {self.audio_frames}")
        if self.audio_stride > 16:
            raise ValueError(f"audio_stride must be at most the patch (16), got {self.audio_stride}")
        if self.short_side is not None and (isinstance(self.short_side, bool) or not isinstance(self.short_side, int)
                                            or self.short_side < self.image_size):
            raise ValueError(f"short_side must be an int of at least image_size ({self.image_size}) or None, "
                             f"got {self.short_side!r}")
        if self.audio_stats not in AUDIO_STATS:
            raise ValueError(f"audio_stats must be one of {', '.join(AUDIO_STATS)}, got {self.audio_stats!r}")
        if self.audio_crop not in AUDIO_CROPS:
            raise ValueError(f"audio_crop must be one of {', '.join(AUDIO_CROPS)}, got {self.audio_crop!r}")

    def preprocessing(self) -> dict[str, Any]:
        """The fields that decide the tokens (for :data:`EXTRACTION_FILE`)."""
        skip = {"device", "batch_size", "workers"}
        return {f: (dict(v) if isinstance(v := getattr(self, f), Mapping) else v)
                for f in self.__dataclass_fields__ if f not in skip}


def resolve_weights(values: Sequence[str], modalities: Sequence[str]) -> dict[str, str]:
    """Weights per modality from ``--weights`` values.

    Each value is ``random`` (every modality keeps its random init: tests only), a folder
    holding ``rgb.pth`` / ``flow.pth`` / ``audio.pth``, or ``MODALITY=PATH``; later values
    override earlier ones. Every modality of ``modalities`` must end up with weights.

    Example::

        >>> resolve_weights(["random", "rgb=swin3d_t-7615ae03.pth"], ["rgb", "audio"])
        {'rgb': 'swin3d_t-7615ae03.pth', 'audio': 'random'}
    """
    weights: dict[str, str] = {}
    for value in values:
        if value == "random":
            weights.update({m: "random" for m in modalities})
        elif "=" in value:
            modality, path = value.split("=", 1)
            if modality not in MODALITIES:
                raise EpicDataError(f"--weights {value}: modality must be one of "
                                    f"{', '.join(MODALITIES)}, got {modality!r}")
            weights[modality] = path
        elif Path(value).is_dir():
            for m in modalities:
                if (Path(value) / f"{m}.pth").is_file():
                    weights[m] = str(Path(value) / f"{m}.pth")
        else:
            raise EpicDataError(f"--weights {value}: expected 'random', a folder with <modality>.pth "
                                "files, or MODALITY=PATH")
    missing = [m for m in modalities if m not in weights]
    if missing:
        raise EpicDataError(f"no weights for {', '.join(missing)}: pass --weights {missing[0]}=PATH "
                            "(or a folder holding <modality>.pth, or 'random' for a smoke test); "
                            "nothing is downloaded")
    return {m: weights[m] for m in modalities}


def _load_into(model: nn.Module, state: dict[str, Tensor], path: str, head: Sequence[str]) -> None:
    """Load weights, tolerating only the classifier head (``head`` prefixes) differing, and
    relative-position index buffers (a function of the window size) being absent."""
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if not (k.startswith(tuple(head)) and (k not in own or own[k].shape != v.shape))}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys
               if not k.startswith(tuple(head)) and not k.endswith("relative_position_index")]
    if missing or result.unexpected_keys:
        raise EpicDataError(f"{path} does not match the {type(model).__name__} backbone: missing "
                            f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}")


class _Extractor:
    """A frozen backbone: clips -> fp16 tokens (N, tokens, dim) and valid lengths (N,)."""

    modality: str
    tokens: int
    dim: int

    def __init__(self, root: PathLike, config: ExtractionConfig) -> None:
        self.root = Path(root)
        self.config = config

    def load(self, clip: EpicClip, train: bool = False) -> tuple[Tensor, Any]:
        """One clip's input tensor (on CPU) and its count of real (unpadded) time steps;
        ``train``: the clip belongs to a training split."""
        raise NotImplementedError

    def forward(self, batch: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens ``(B, tokens, dim)`` and valid token counts ``(B,)`` of a batch of inputs."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, clips: Sequence[EpicClip], train: bool = False) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.empty((len(clips), self.tokens, self.dim), dtype=np.float16)
        lengths = np.empty((len(clips),), dtype=np.int64)
        loader = torch.utils.data.DataLoader(
            _ClipInputs(self, clips, train), batch_size=self.config.batch_size,
            num_workers=self.config.workers,
        )
        row = 0
        for batch, valid in loader:
            out, valid = self.forward(batch.to(self.config.device), valid)
            tokens[row:row + len(batch)] = out.float().cpu().numpy().astype(np.float16)
            lengths[row:row + len(batch)] = valid.cpu().numpy()
            row += len(batch)
        return tokens, lengths


class _ClipInputs(torch.utils.data.Dataset):
    def __init__(self, extractor: _Extractor, clips: Sequence[EpicClip], train: bool) -> None:
        self.extractor, self.clips, self.train = extractor, clips, train

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[Tensor, Any]:
        return self.extractor.load(self.clips[i], self.train)


class _RGBExtractor(_Extractor):
    """torchvision video Swin: tokens = the final (T', H', W') map after the last norm."""

    modality = "rgb"
    # Normalisation of torchvision's Swin3D_T_Weights.KINETICS400_V1 transforms.
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    def __init__(self, root: PathLike, config: ExtractionConfig) -> None:
        super().__init__(root, config)
        video = _require("torchvision.models.video", "vision")
        if config.rgb_arch not in ("swin3d_t", "swin3d_s", "swin3d_b"):
            raise ValueError(f"rgb_arch must be swin3d_t, swin3d_s or swin3d_b, got {config.rgb_arch!r}")
        model = getattr(video, config.rgb_arch)(weights=None)
        weights = config.weights.get("rgb", "random")
        if weights != "random":
            checkpoint = load_checkpoint(weights)
            if checkpoint_format(checkpoint) in ("video-swin", "omnivore"):
                state = convert_video_swin_state_dict(checkpoint).state_dict
            else:
                state = unwrap_state_dict(checkpoint)
            _load_into(model, state, weights, head=("head.",))
        self.model = model.eval().to(config.device)
        probe = self._tokens(torch.zeros(1, 3, config.frames, config.image_size, config.image_size,
                                         device=config.device))
        self.tokens, self.dim = probe.shape[1], probe.shape[2]

    def _tokens(self, video: Tensor) -> Tensor:
        m = self.model
        x = m.norm(m.features(m.pos_drop(m.patch_embed(video))))  # (B, T', H', W', C)
        return x.flatten(1, 3)

    def load(self, clip: EpicClip, train: bool = False) -> tuple[Tensor, int]:
        folder = self.root / clip.participant_id / "rgb_frames" / clip.video_id
        frames = [_load_image(folder / _frame_name(i), self.config.image_size, "RGB", self.config.short_side)
                  for i in rgb_frame_indices(clip, self.config.frames)]
        video = torch.from_numpy(np.stack(frames)).float().div_(255)  # (T, H, W, 3)
        video = (video - torch.tensor(self.mean)) / torch.tensor(self.std)
        return video.permute(3, 0, 1, 2).contiguous(), len(frames)  # (3, T, H, W)

    def forward(self, batch: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        out = self._tokens(batch)
        return out, torch.full((len(batch),), out.shape[1])


class _FlowExtractor(_Extractor):
    """torchvision ResNet whose stem takes the 2T stacked u/v frames; tokens = layer4 positions."""

    modality = "flow"

    def __init__(self, root: PathLike, config: ExtractionConfig) -> None:
        super().__init__(root, config)
        models = _require("torchvision.models", "vision")
        if config.flow_arch not in ("resnet18", "resnet50"):
            raise ValueError(f"flow_arch must be resnet18 or resnet50, got {config.flow_arch!r}")
        model = getattr(models, config.flow_arch)(weights=None)
        assert config.flow_frames is not None, "ExtractionConfig fills in its default"
        channels = 2 * config.flow_frames
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        weights = config.weights.get("flow", "random")
        if weights != "random":
            state = unwrap_state_dict(load_checkpoint(weights))
            stem = state.get("conv1.weight")
            if stem is not None and stem.shape[1] != channels:
                # TSN cross-modality initialisation: an RGB (or other-T) stem averaged over its
                # input channels and repeated over the 2T flow channels.
                state["conv1.weight"] = stem.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1).clone()
            _load_into(model, state, weights, head=("fc.",))
        model.fc = nn.Identity()
        self.model = model.eval().to(config.device)
        probe = self._tokens(torch.zeros(1, channels, config.image_size, config.image_size,
                                         device=config.device))
        self.tokens, self.dim = probe.shape[1], probe.shape[2]

    def _tokens(self, x: Tensor) -> Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))  # (B, C, H', W')
        return x.flatten(2).transpose(1, 2)

    def load(self, clip: EpicClip, train: bool = False) -> tuple[Tensor, int]:
        folder = self.root / clip.participant_id / "flow_frames" / clip.video_id
        planes = []
        assert self.config.flow_frames is not None, "ExtractionConfig fills in its default"
        for i in flow_frame_indices(clip, self.config.flow_frames, self.config.flow_stride):
            for axis in ("u", "v"):
                planes.append(_load_image(folder / axis / _frame_name(i), self.config.image_size, "L"))
        flow = torch.from_numpy(np.stack(planes)).float()  # (2T, H, W), u/v interleaved
        return flow.div_(127.5).sub_(1.0), len(planes) // 2

    def forward(self, batch: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        out = self._tokens(batch)
        return out, torch.full((len(batch),), out.shape[1])


class _AudioExtractor(_Extractor):
    """Kaldi log-mel filterbank (128 bins, 25 ms / 10 ms) -> timm ViT on 16 x 16 patches every
    ``audio_stride`` (AST: 10, overlapping), built by :func:`~umilayers.datasets.checkpoints.ast_audio_vit`.

    Tokens are the patch tokens in time-major order (all frequency patches of the first time
    step, then the next...), so that a clip shorter than ``audio_frames`` has its real tokens
    first: ``lengths`` counts the time steps whose patch starts inside the real frames. With
    several crops of a clip (:func:`audio_crop_starts`) the tokens are their mean.
    """

    modality = "audio"
    mel_bins = 128
    max_crops = 4  # the released test loader's crops: never more than 4 (stride n / 3.1)

    def __init__(self, root: PathLike, config: ExtractionConfig) -> None:
        super().__init__(root, config)
        _require("timm", "vision")
        _require("torchaudio", "audio")
        model = cast("VisionTransformer",  # what timm builds for AST
                     ast_audio_vit(config.audio_arch, self.mel_bins, config.audio_frames, config.audio_stride))
        weights = config.weights.get("audio", "random")
        if weights != "random":
            _load_into(model, self._audio_state(load_checkpoint(weights), model), weights,
                       head=("head.", "head_dist.", "fc_norm."))
        self.model = model.eval().to(config.device)
        self.grid = tuple(model.patch_embed.grid_size)  # (frequency, time) patches
        self.tokens, self.dim = self.grid[0] * self.grid[1], model.num_features

    @staticmethod
    def _audio_state(checkpoint: Mapping[str, Any], model: VisionTransformer) -> dict[str, Tensor]:
        """An AST checkpoint converted; any other timm ViT state dict (an image ViT too: its
        RGB patch filters summed to one channel, position embeddings resampled by timm)."""
        if checkpoint_format(checkpoint) == "ast":
            return convert_ast_state_dict(checkpoint, grid=tuple(model.patch_embed.grid_size)).state_dict
        state = unwrap_state_dict(checkpoint)
        proj = state.get("patch_embed.proj.weight")
        if proj is not None and proj.shape[1] != 1:
            state["patch_embed.proj.weight"] = proj.sum(dim=1, keepdim=True)
        from timm.models.vision_transformer import checkpoint_filter_fn

        return checkpoint_filter_fn(state, model)

    def load(self, clip: EpicClip, train: bool = False) -> tuple[Tensor, Tensor]:
        """Up to :attr:`max_crops` spectrograms ``(max_crops, 1, 128, audio_frames)`` (unused
        crops zero) and ``[real frames of a crop, crops used]``."""
        kaldi = _require("torchaudio.compliance.kaldi", "audio")
        functional = _require("torchaudio.functional", "audio")
        found = _audio_source(self.root, clip)
        if found is None:
            raise MissingInputError([p for p, _ in audio_candidates(clip, self.root)],
                                    clip.narration_id, "audio")
        path, whole = found
        start, stop = (None, None) if whole else (clip.start_timestamp, clip.stop_timestamp)
        samples, rate = _read_wav(path, start, stop)
        wav = torch.from_numpy(samples)[None]
        if rate != self.config.sample_rate:
            wav = functional.resample(wav, rate, self.config.sample_rate)
        wav = nn.functional.pad(wav, (0, max(0, int(0.025 * self.config.sample_rate) - wav.shape[1])))
        fbank = kaldi.fbank(wav - wav.mean(), htk_compat=True, sample_frequency=self.config.sample_rate,
                            use_energy=False, window_type="hanning", num_mel_bins=self.mel_bins,
                            dither=0.0, frame_shift=10)  # (frames, 128)
        mean, std = AUDIO_STATS[self.config.audio_stats]
        fbank = (fbank - mean) / (2 * std)
        target = self.config.audio_frames
        starts = audio_crop_starts(fbank.shape[0], target, self.config.audio_crop, train=train,
                                   seed=zlib.crc32(clip.narration_id.encode()))
        frames = min(fbank.shape[0], target)
        spectrograms = torch.zeros(self.max_crops, 1, self.mel_bins, target)
        for i, start in enumerate(starts):
            spectrograms[i, 0, :, :frames] = fbank[start:start + frames].T
        return spectrograms, torch.tensor([frames, len(starts)])

    def forward(self, batch: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        frames, crops = valid[:, 0], valid[:, 1].to(batch.device)
        used = torch.arange(self.max_crops, device=batch.device)[None] < crops[:, None]  # (B, max_crops)
        x = self.model.forward_features(batch[used])[:, self.model.num_prefix_tokens:]
        f, t = self.grid
        x = x.reshape(len(x), f, t, -1).transpose(1, 2).flatten(1, 2)  # time-major tokens
        # the mean over each clip's crops: rows of `x` are the used crops, clip by clip
        owner = torch.arange(len(batch), device=batch.device).repeat_interleave(crops)
        summed = torch.zeros(len(batch), *x.shape[1:], dtype=x.dtype, device=x.device).index_add_(0, owner, x)
        x = summed / crops.to(x.dtype)[:, None, None]
        stride = self.config.audio_stride
        valid_time = torch.div(frames + stride - 1, stride, rounding_mode="floor")
        return x, valid_time.clamp(1, t) * f


_EXTRACTORS: dict[str, Callable[[PathLike, ExtractionConfig], _Extractor]] = {
    "rgb": _RGBExtractor, "flow": _FlowExtractor, "audio": _AudioExtractor,
}


def build_extractor(modality: str, root: PathLike, config: ExtractionConfig) -> _Extractor:
    """The frozen backbone of ``modality`` reading raw inputs under ``root``.

    The returned callable maps a list of clips to ``(tokens, lengths)``: float16
    ``(N, tokens, dim)`` and int64 ``(N,)`` (valid tokens; audio shorter than ``audio_frames``
    has fewer). ``extractor.tokens`` and ``extractor.dim`` give the sizes up front.

    Raises:
        ImportError: torchvision / timm / torchaudio missing (names the extra to install).
        ValueError: unknown architecture, or weights that do not fit it.
    """
    if modality not in _EXTRACTORS:
        raise ValueError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    # A fixed seed per modality: "random" weights are the same in every run, so a resumed
    # extraction never mixes shards from two different random backbones.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODALITIES.index(modality))
        return _EXTRACTORS[modality](root, config)


# --------------------------------------------------------------------------------------------
# Resumable extraction
# --------------------------------------------------------------------------------------------

def _shard_valid(path: Path, ids: list[str], fingerprint: str) -> bool:
    try:
        with np.load(path) as shard:
            return (shard["narration_ids"].tolist() == ids
                    and str(shard["fingerprint"]) == fingerprint)
    except (OSError, ValueError, KeyError):
        return False


def extract_shards(
    clips: Sequence[EpicClip],
    extractor: Callable[[Sequence[EpicClip]], tuple[np.ndarray, np.ndarray]],
    folder: PathLike,
    shard_size: int = 256,
    *,
    progress: bool = True,
    description: str = "",
    fingerprint: str = "",
) -> list[Path]:
    """Run ``extractor`` over ``clips`` in shards of ``shard_size``, written to ``folder``.

    Shard ``i`` (``shard_00000.npz``: ``tokens``, ``lengths``, ``narration_ids``) is written to
    a temporary name and renamed, so an interrupted run leaves only whole shards; a rerun skips
    every shard already present whose narration ids and ``fingerprint`` (a string describing
    the extractor's settings) match, and computes the rest.

    Returns:
        The shard paths, in clip order.
    """
    if shard_size <= 0:
        raise InvalidArgument("shard_size", f"expected a positive int, got {shard_size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    bar = progress_bar(len(clips), description, enabled=progress, unit="clip")
    try:
        for index, start in enumerate(range(0, len(clips), shard_size)):
            chunk = clips[start:start + shard_size]
            ids = [c.narration_id for c in chunk]
            path = folder / f"shard_{index:05d}.npz"
            if not _shard_valid(path, ids, fingerprint):
                tokens, lengths = extractor(chunk)
                atomic_write(path, functools.partial(
                    np.savez, tokens=tokens, lengths=lengths, narration_ids=np.array(ids),
                    fingerprint=np.array(fingerprint)))
            paths.append(path)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return paths


def _fingerprint(modality: str, config: ExtractionConfig) -> str:
    """The settings that change ``modality``'s tokens (not device, batch size or workers)."""
    fields = {
        "rgb": ("frames", "image_size", "short_side", "rgb_arch"),
        "flow": ("flow_frames", "flow_stride", "image_size", "flow_arch"),
        "audio": ("audio_arch", "audio_frames", "audio_stride", "audio_stats", "audio_crop", "sample_rate"),
    }[modality]
    values = {f: getattr(config, f) for f in fields}
    values["weights"] = config.weights.get(modality)
    return json.dumps(values, sort_keys=True)


def _assemble(paths: Sequence[Path], size: int, folder: Path) -> tuple[np.ndarray, np.ndarray, Path]:
    """Concatenate shards into one float16 memmap (never the whole split in RAM at once).

    The memmap is a scratch file (a temporary name in ``folder``) that the caller deletes once
    the split is in the store; it is never an output.
    """
    with np.load(paths[0]) as first:
        _, tokens, dim = first["tokens"].shape
    fd, name = tempfile.mkstemp(dir=folder, prefix=".assembled-", suffix=".npy")
    os.close(fd)
    scratch = Path(name)
    features = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float16,
                                         shape=(size, tokens, dim))
    lengths = np.empty((size,), dtype=np.int64)
    row = 0
    for path in paths:
        with np.load(path) as shard:
            n = len(shard["lengths"])
            features[row:row + n] = shard["tokens"]
            lengths[row:row + n] = shard["lengths"]
            row += n
    features.flush()
    return features, lengths, scratch


def extract_epic(
    annotations: PathLike,
    roots: Mapping[str, PathLike],
    out: PathLike,
    setting: str,
    *,
    config: Optional[ExtractionConfig] = None,
    shard_size: int = 256,
    skip_missing: bool = False,
    split_dir: Optional[PathLike] = None,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    work_dir: Optional[PathLike] = None,
    overwrite: bool = False,
    keep_shards: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Raw EPIC-Kitchens-100 data -> a classification FeatureStore at ``out``.

    Every input file is checked before any backbone runs: a missing one raises
    :class:`MissingInputError` (naming the file and the clip), or, with ``skip_missing``, the
    clip is dropped from its split and counted. Features are extracted in shards under
    ``work_dir`` (default ``<out>.shards``; an interrupted run resumes there), then written
    with ``FeatureStore.write_split``: the unimodal train splits with role ``train`` and their
    one modality, val and test with every modality of the setting; targets are action ids of
    :func:`action_vocabulary` (the paper's 3,806 classes when ``split_dir`` holds the released
    ``epic_action_classes.csv``, else built from all annotated clips), saved as
    ``epic_actions.json`` in the store folder for verb/noun scoring.

    Splits: :func:`build_splits` (the released split when ``split_dir`` holds it, files of
    narration ids, or participant-disjoint splits by default).

    Returns:
        A dict with ``splits`` (split name -> clips written), ``dropped`` (split name -> clips
        dropped for missing inputs), ``no_sound`` (split name -> clips left out for a video
        without sound; released split only), ``num_actions`` and ``modalities`` (name ->
        (tokens, dim)).
    """
    config = config or ExtractionConfig()
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError("out", f"{out} already exists; pass {{overwrite}} to replace it", refs=("overwrite",))
    modalities = SETTINGS.get(setting)
    if modalities is None:
        raise ValueError(f"setting must be one of {', '.join(SETTINGS)}, got {setting!r}")
    missing_roots = [m for m in modalities if roots.get(m) is None]
    if missing_roots:
        raise EpicDataError(f"setting {setting} needs a data root for {', '.join(missing_roots)} "
                            f"(--{' --'.join(missing_roots)})")
    for m in modalities:
        if config.weights.get(m) is None:
            raise EpicDataError(f"no weights for {m}: give a state-dict path or 'random'")

    clips = load_annotations(annotations)
    splits = build_splits(clips, setting, seed=seed, fractions=fractions, split_dir=split_dir)
    vocab = action_vocabulary(clips, split_dir, annotations)
    unlabelled = vocab.missing(c for split in splits.splits.values() for c in split.clips)
    if unlabelled:
        first = unlabelled[0]
        assert split_dir is not None, "a vocabulary made from the clips has every clip's pair"
        raise EpicDataError(f"{len(unlabelled)} clip(s) of the splits have a (verb_class, noun_class) "
                            f"pair with no action id in {Path(split_dir) / ACTION_CLASSES_FILE}, first "
                            f"{first.narration_id} ({first.verb_class}, {first.noun_class})")
    log(splits.summary())

    dropped: dict[str, int] = {}
    for split in splits.splits.values():
        kept = []
        for clip in split.clips:
            missing = [(m, p) for m in split.modalities
                       if (p := find_missing_inputs(clip, m, roots[m], config))]
            if not missing:
                kept.append(clip)
            elif not skip_missing:
                modality, paths = missing[0]
                raise MissingInputError(paths, clip.narration_id, modality)
        dropped[split.name] = len(split.clips) - len(kept)
        if not kept:
            raise EpicDataError(f"split {split.name} has no clip left"
                                + (" after dropping clips with missing inputs" if dropped[split.name] else ""))
        split.clips = kept
    if skip_missing:
        log("dropped clips with missing inputs: "
            + ", ".join(f"{name} {count}" for name, count in dropped.items()))

    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".shards")
    shards: dict[tuple[str, str], list[Path]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for m in modalities:
        built: list[_Extractor] = []

        def extract(chunk: Sequence[EpicClip], train: bool, m: str = m,
                    built: list[_Extractor] = built) -> tuple[np.ndarray, np.ndarray]:
            if not built:  # only when a shard is missing: a finished run resumes without models
                built.append(build_extractor(m, roots[m], config))
            return built[0](chunk, train)

        for split in splits.splits.values():
            if m in split.modalities:
                train = split.role == "train"
                shards[split.name, m] = extract_shards(
                    split.clips, functools.partial(extract, train=train), work / split.name / m, shard_size,
                    progress=progress, description=f"{split.name}/{m}",
                    fingerprint=_fingerprint(m, config))
        first_shard = next(paths[0] for (_, mod), paths in shards.items() if mod == m)
        with np.load(first_shard) as shard:
            # shards hold (N, k, d) tokens: their shape's tail is (k, d)
            sizes[m] = cast("tuple[int, int]", tuple(int(v) for v in shard["tokens"].shape[1:]))
        built.clear()

    store = FeatureStore.create(out, task="classification", num_outputs=vocab.num_actions,
                                modalities=sizes, overwrite=overwrite)
    for split in splits.splits.values():
        features, lengths, scratch = {}, {}, []
        try:
            for m in split.modalities:
                features[m], lengths[m], path = _assemble(shards[split.name, m], len(split.clips),
                                                          work / split.name / m)
                scratch.append(path)
            store.write_split(split.name, split.role, features=features,
                              targets=vocab.targets(split.clips), lengths=lengths)
        finally:
            del features
            for path in scratch:
                path.unlink(missing_ok=True)
    vocab.save(out / ACTIONS_FILE)
    atomic_write_text(out / EXTRACTION_FILE, json.dumps(config.preprocessing(), indent=1, sort_keys=True))
    write_split_files(splits, out / "epic_splits")
    if not keep_shards:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "splits": {name: len(s.clips) for name, s in splits.splits.items()},
        "dropped": dropped,
        "no_sound": dict(splits.no_sound),
        "num_actions": vocab.num_actions,
        "modalities": sizes,
    }
