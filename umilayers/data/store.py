"""FeatureStore: the one on-disk format of umilayers (``umilayers-store/1``).

A store is a directory holding ``store.json`` and one folder per split (see
``docs/store_format.rst`` for the full specification)::

    store.json
    <split>/<modality>.npy           (size, tokens, dim) float16 or float32, read with mmap
    <split>/<modality>.lengths.npy   optional (size,) int: valid tokens, the rest is padding;
                                     0 = this sample lacks the modality (absent, not zeros)
    <split>/targets.npy              classification (size,) int64; regression (size, T) float32;
                                     retrieval: caption token features (size, text_tokens, text_dim),
                                     or (size, K, text_tokens, text_dim) with K captions per row
    <split>/targets.lengths.npy      optional, retrieval only: (size,) | (size, K) int valid tokens
    <split>/targets.counts.npy       optional, retrieval with K > 1: (size,) int captions per row

``store.json`` is the source of truth: a split exists only once it is listed there. Writes go to a
temporary folder inside the store that is renamed into place, then ``store.json`` is rewritten
through a temporary file and ``os.replace``, so a failed or interrupted write never leaves a
half-written split visible.

Every violation found when opening or validating raises :class:`StoreError` (a ``ValueError``)
naming the file and the expected versus found shape, key or value.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
from torch.utils.data import ConcatDataset

from umilayers._io import atomic_write_text
from umilayers._validation import InvalidArgument, format_indices, is_int
from umilayers.data.dataset import FeatureDataset, SplitInfo
from umilayers.losses import TASKS

__all__ = ["FORMAT", "ROLES", "StoreError", "FeatureStore", "check_store"]

FORMAT = "umilayers-store/1"
ROLES = ("train", "val", "test")
FEATURE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
_RESERVED = ("targets",)
_NPY_MAGIC = b"\x93NUMPY"  # the first bytes of every .npy file
_CHUNK_BYTES = 64 * 2**20  # deep validation scans features in chunks of about this size

PathLike = Union[str, "os.PathLike[str]"]


class StoreError(InvalidArgument):
    """A FeatureStore violates the ``umilayers-store/1`` format (the message names the file).

    An :class:`~umilayers._validation.InvalidArgument` (a ``ValueError``) of the store whose
    message is the problem alone, with no argument name in front: it starts with the file.

    Example::

        >>> try:
        ...     FeatureStore("/nonexistent/store")
        ... except StoreError as err:
        ...     print(err)
        /nonexistent/store/store.json: missing file (not a FeatureStore directory?)
    """

    def __init__(self, text: str) -> None:
        super().__init__("store", text)

    def message(self, spell: Callable[[str], str] = str) -> str:
        return self.reason

    def __reduce__(self):
        return type(self), (self.reason,)


def _is_pos_int(value: Any) -> bool:
    return is_int(value) and value > 0


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + (",)" if len(shape) == 1 else ")")


def _size_on_disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.npy") if p.is_file())


def _human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    raise AssertionError  # pragma: no cover


class FeatureStore:
    """A directory of token features in the ``umilayers-store/1`` format.

    Opening a store (``FeatureStore(path)``) reads ``store.json`` and checks, cheaply, that every
    declared file exists with the declared shape and dtype (arrays are opened with
    ``np.load(mmap_mode="r")``; only the small label and length arrays are read), that every
    val/test modality was seen by some training split, and that labels and lengths are in range.
    ``deep=True`` (or :meth:`validate` with ``deep=True``) also scans all features for NaN/inf.

    Args:
        path: the store's directory (or its ``store.json``).
        deep: also scan every feature array for NaN/inf (reads all data once).

    Attributes:
        task: ``"classification"``, ``"regression"`` or ``"retrieval"``.
        num_outputs: classes ``C``, regression outputs ``T``, or (retrieval) the joint embedding
            size ``E`` to train.
        modalities: ``{name: (tokens, dim)}`` in sorted name order.
        text: retrieval caption features ``(tokens, dim)``, else None.
        max_captions: captions per row ``K`` (retrieval; 1 = one caption per row, the layout of
            stores without ``"captions"`` in ``store.json``).
        splits: ``{name: SplitInfo}`` in the order of ``store.json``.

    Example::

        >>> import tempfile, numpy as np
        >>> root = tempfile.mkdtemp()
        >>> store = FeatureStore.create(root + "/s", "classification", 3, {"rgb": (4, 8)})
        >>> store.write_split("train", "train", {"rgb": np.zeros((5, 4, 8), np.float32)},
        ...                   np.array([0, 1, 2, 0, 1]))
        >>> FeatureStore(root + "/s").splits["train"]
        SplitInfo(name='train', role='train', size=5, modalities=('rgb',))
    """

    def __init__(self, path: PathLike, *, deep: bool = False) -> None:
        self.path = Path(path)
        if self.path.name == "store.json" and self.path.is_file():
            self.path = self.path.parent  # the store's own store.json names the store too
        meta_path = self.path / "store.json"
        if self.path.is_file():
            raise StoreError(f"{self.path}: a file, not a FeatureStore; pass the folder that holds store.json")
        if not meta_path.is_file():
            raise StoreError(f"{meta_path}: missing file (not a FeatureStore directory?)")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{meta_path}: not valid JSON ({err})") from err
        self._load_meta(meta)
        self.validate(deep=deep)

    # ------------------------------------------------------------------ metadata
    def _load_meta(self, meta: Any) -> None:
        where = self.path / "store.json"
        if not isinstance(meta, dict):
            raise StoreError(f"{where}: expected a JSON object, found {type(meta).__name__}")
        for key in ("format", "task", "num_outputs", "modalities", "splits"):
            if key not in meta:
                raise StoreError(f"{where}: missing key {key!r}")
        if meta["format"] != FORMAT:
            raise StoreError(f"{where}: 'format' expected {FORMAT!r}, found {meta['format']!r}")
        if meta["task"] not in TASKS:
            raise StoreError(f"{where}: 'task' expected one of {list(TASKS)}, found {meta['task']!r}")
        if not _is_pos_int(meta["num_outputs"]):
            raise StoreError(
                f"{where}: 'num_outputs' expected a positive int, found {meta['num_outputs']!r}"
            )
        self.task: str = meta["task"]
        self.num_outputs: int = int(meta["num_outputs"])
        self.modalities: dict[str, tuple[int, int]] = _parse_modalities(meta["modalities"], where)
        text = meta.get("text")
        if self.task == "retrieval" and text is None:
            raise StoreError(f"{where}: task 'retrieval' needs a 'text' entry {{tokens, dim}}")
        if self.task != "retrieval" and text is not None:
            raise StoreError(f"{where}: 'text' is only allowed for task 'retrieval', found it "
                             f"with task {self.task!r}")
        self.text: Optional[tuple[int, int]] = None
        self.max_captions: int = 1
        if text is not None:
            if not isinstance(text, dict):
                raise StoreError(f"{where}: 'text' expected {{'tokens': int, 'dim': int}}, found {text!r}")
            shape = {k: v for k, v in text.items() if k != "captions"}
            self.text = _parse_shape_entry(shape, f"{where}: 'text'")
            captions = text.get("captions", 1)
            if not _is_pos_int(captions):
                raise StoreError(f"{where}: 'text' 'captions' expected a positive int, found {captions!r}")
            self.max_captions = int(captions)
        if not isinstance(meta["splits"], dict):
            raise StoreError(f"{where}: 'splits' expected an object, found {type(meta['splits']).__name__}")
        self.splits: dict[str, SplitInfo] = {}
        for name, entry in meta["splits"].items():
            self.splits[name] = self._parse_split(name, entry, where)

    def _parse_split(self, name: str, entry: Any, where: Path) -> SplitInfo:
        label = f"{where}: split {name!r}"
        if not _NAME.match(name):
            raise StoreError(f"{label}: invalid split name (expected letters, digits, '_' or '-')")
        if not isinstance(entry, dict):
            raise StoreError(f"{label}: expected an object, found {type(entry).__name__}")
        for key in ("role", "size", "modalities"):
            if key not in entry:
                raise StoreError(f"{label}: missing key {key!r}")
        if entry["role"] not in ROLES:
            raise StoreError(f"{label}: 'role' expected one of {list(ROLES)}, found {entry['role']!r}")
        size = entry["size"]
        if is_int(size) and size == 0:
            raise StoreError(f"{label}: empty split (size 0); a split needs at least one sample")
        if not _is_pos_int(size):
            raise StoreError(f"{label}: 'size' expected a positive int, found {size!r}")
        mods = entry["modalities"]
        if not isinstance(mods, list) or not mods or not all(isinstance(m, str) for m in mods):
            raise StoreError(f"{label}: 'modalities' expected a non-empty list of names, found {mods!r}")
        unknown = sorted(set(mods) - set(self.modalities))
        if unknown:
            raise StoreError(
                f"{label}: unknown modality {unknown} (declared modalities: {sorted(self.modalities)})"
            )
        if len(set(mods)) != len(mods):
            raise StoreError(f"{label}: 'modalities' lists a name twice: {mods}")
        return SplitInfo(name, entry["role"], int(size), tuple(sorted(mods)))

    def _meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "format": FORMAT,
            "task": self.task,
            "num_outputs": self.num_outputs,
            "modalities": {m: {"tokens": k, "dim": d} for m, (k, d) in self.modalities.items()},
        }
        if self.text is not None:
            meta["text"] = {"tokens": self.text[0], "dim": self.text[1]}
            if self.max_captions > 1:
                meta["text"]["captions"] = self.max_captions
        meta["splits"] = {
            s.name: {"role": s.role, "size": s.size, "modalities": list(s.modalities)}
            for s in self.splits.values()
        }
        return meta

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        path: PathLike,
        task: str,
        num_outputs: int,
        modalities: Mapping[str, tuple[int, int]],
        text: Optional[tuple[int, int]] = None,
        overwrite: bool = False,
        *,
        captions: int = 1,
    ) -> "FeatureStore":
        """Create an empty store (``store.json`` with no splits) and return it.

        Args:
            path: directory to create (may exist if empty, or with ``overwrite``).
            task: ``"classification"``, ``"regression"`` or ``"retrieval"``.
            num_outputs: classes, regression outputs, or the retrieval embedding size.
            modalities: ``{name: (tokens, dim)}``.
            text: retrieval only (and required there): caption features ``(tokens, dim)``.
            captions: retrieval only: ``K``, the most captions a row holds (MSR-VTT: 20);
                with ``K > 1`` a split's targets are ``(size, K, tokens, dim)``.
            overwrite: replace an existing store at ``path`` (its contents are deleted).
        """
        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise StoreError(f"{path}: exists and is not a directory")
            if any(path.iterdir()):
                if not overwrite:
                    raise StoreError(f"{path}: directory is not empty (pass overwrite=True to replace)")
                if not (path / "store.json").is_file():
                    raise StoreError(f"{path}: refusing to overwrite a directory that holds no "
                                     f"store.json (not a FeatureStore)")
                shutil.rmtree(path)
        meta: dict[str, Any] = {
            "format": FORMAT,
            "task": task,
            "num_outputs": num_outputs,
            "modalities": {
                m: _shape_entry(v, f"modalities[{m!r}]") for m, v in dict(modalities).items()
            },
            "splits": {},
        }
        if text is not None:
            meta["text"] = _shape_entry(text, "text")
            if captions != 1:
                meta["text"]["captions"] = captions
        elif captions != 1:
            raise StoreError(f"{path}: captions={captions!r} needs task 'retrieval' and text")
        self = cls.__new__(cls)
        self.path = path
        self._load_meta(meta)  # validates before anything touches the disk
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "store.json", json.dumps(self._meta(), indent=2) + "\n")
        return self

    def write_split(
        self,
        name: str,
        role: str,
        features: Mapping[str, np.ndarray],
        targets: np.ndarray,
        lengths: Optional[Mapping[str, np.ndarray]] = None,
        *,
        target_lengths: Optional[np.ndarray] = None,
        target_counts: Optional[np.ndarray] = None,
        overwrite: bool = False,
    ) -> None:
        """Write one split, validating every array before anything is written.

        Args:
            name: split name (letters, digits, ``_``, ``-``).
            role: ``"train"``, ``"val"`` or ``"test"``.
            features: ``{modality: (size, tokens, dim)}`` float arrays (float64 is stored as
                float32); the split's modalities are the keys.
            targets: classification ``(size,)`` ints in ``[0, num_outputs)``; regression
                ``(size, num_outputs)`` floats; retrieval ``(size, text_tokens, text_dim)`` floats,
                or ``(size, K, text_tokens, text_dim)`` when the store has ``K > 1`` captions.
            lengths: optional ``{modality: (size,)}`` valid token counts in ``[0, tokens]``; 0 marks
                the modality as missing for that sample (every sample must keep at least one).
            target_lengths: retrieval only: optional valid caption token counts, ``(size,)``, or
                ``(size, K)`` with ``K > 1`` captions (0 for the empty slots of a row).
            target_counts: retrieval with ``K > 1`` only: optional ``(size,)`` captions in each
                row, in ``[1, K]``; a row's captions fill slots ``0 .. count - 1`` (default: all
                ``K`` slots hold one).
            overwrite: replace an existing split of the same name.

        Raises:
            StoreError: naming the argument, expected and found shape/value; nothing is written.
        """
        arrays = self._check_split_arrays(name, role, features, targets, lengths, target_lengths,
                                          target_counts)
        if name in self.splits and not overwrite:
            raise StoreError(f"{self.path / name}: split {name!r} already exists "
                             f"(pass overwrite=True to replace it)")
        size = len(arrays["targets.npy"])
        tmp = self.path / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            for filename, array in arrays.items():
                np.save(tmp / filename, array, allow_pickle=False)
            final = self.path / name
            trash = None
            if final.exists():  # a replaced split, or an orphan of an interrupted write
                trash = self.path / f".trash-{name}-{uuid.uuid4().hex[:8]}"
                os.replace(final, trash)
            os.replace(tmp, final)
            splits = dict(self.splits)
            splits[name] = SplitInfo(name, role, size, tuple(sorted(features)))
            old_splits, self.splits = self.splits, splits
            try:
                atomic_write_text(self.path / "store.json", json.dumps(self._meta(), indent=2) + "\n")
            except BaseException:
                self.splits = old_splits
                raise
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _check_split_arrays(
        self,
        name: str,
        role: str,
        features: Mapping[str, np.ndarray],
        targets: np.ndarray,
        lengths: Optional[Mapping[str, np.ndarray]],
        target_lengths: Optional[np.ndarray],
        target_counts: Optional[np.ndarray] = None,
    ) -> dict[str, np.ndarray]:
        """Validate in-memory arrays and return ``{filename: array to save}``."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise StoreError(f"write_split: invalid split name {name!r} (letters, digits, '_', '-')")
        if role not in ROLES:
            raise StoreError(f"write_split {name!r}: role expected one of {list(ROLES)}, found {role!r}")
        if not features:
            raise StoreError(f"write_split {name!r}: features is empty; a split needs a modality")
        unknown = sorted(set(features) - set(self.modalities))
        if unknown:
            raise StoreError(f"write_split {name!r}: unknown modality {unknown} "
                             f"(declared modalities: {sorted(self.modalities)})")
        targets = np.asarray(targets)
        if targets.ndim == 0 or len(targets) == 0:
            raise StoreError(f"write_split {name!r}: empty split (targets has shape "
                             f"{_shape(targets.shape)}); a split needs at least one sample")
        size = len(targets)
        out: dict[str, np.ndarray] = {}
        for m in sorted(features):
            tokens, dim = self.modalities[m]
            label = f"write_split {name!r}: features[{m!r}] ({m}.npy)"
            array = np.asarray(features[m])
            if array.dtype == np.float64:
                array = array.astype(np.float32)
            if array.dtype not in FEATURE_DTYPES:
                raise StoreError(f"{label}: expected dtype float16 or float32, found {array.dtype}")
            if array.shape != (size, tokens, dim):
                raise StoreError(f"{label}: expected shape (size={size}, tokens={tokens}, dim={dim}), "
                                 f"found {_shape(array.shape)}")
            if not np.isfinite(array).all():
                raise StoreError(f"{label}: expected finite values, found "
                                 f"{int((~np.isfinite(array)).sum())} NaN/inf entries")
            out[f"{m}.npy"] = np.ascontiguousarray(array)
        for m, value in dict(lengths or {}).items():
            if m not in features:
                raise StoreError(f"write_split {name!r}: lengths[{m!r}] given but {m!r} is not in "
                                 f"features {sorted(features)}")
            out[f"{m}.lengths.npy"] = _check_lengths(
                np.asarray(value), size, self.modalities[m][0],
                f"write_split {name!r}: lengths[{m!r}] ({m}.lengths.npy)", minimum=0)
        _check_every_row_has_a_modality(
            {m: out.get(f"{m}.lengths.npy") for m in features}, size, f"write_split {name!r}: lengths")
        out["targets.npy"] = self._check_targets(targets, size, f"write_split {name!r}: targets (targets.npy)")
        if (target_lengths is not None or target_counts is not None) and self.task != "retrieval":
            raise StoreError(f"write_split {name!r}: target_lengths / target_counts are only for "
                             "task 'retrieval'")
        if target_counts is not None:
            out["targets.counts.npy"] = self._check_caption_counts(
                np.asarray(target_counts), size, f"write_split {name!r}: target_counts (targets.counts.npy)")
        if target_lengths is not None:
            out["targets.lengths.npy"] = self._check_caption_lengths(
                np.asarray(target_lengths), size, out.get("targets.counts.npy"),
                f"write_split {name!r}: target_lengths (targets.lengths.npy)")
        return out

    def _check_caption_counts(self, counts: np.ndarray, size: int, label: str) -> np.ndarray:
        if self.max_captions == 1:
            raise StoreError(f"{label}: caption counts need a store with several captions per row "
                             f"(FeatureStore.create(..., captions=K)); this store has one")
        return _check_lengths(counts, size, self.max_captions, label)

    def _check_caption_lengths(self, lengths: np.ndarray, size: int, counts: Optional[np.ndarray],
                               label: str) -> np.ndarray:
        """Caption token counts: ``(size,)`` in [1, tokens]; with K captions ``(size, K)``, in
        [1, tokens] for the row's captions and 0 for its empty slots."""
        assert self.text is not None
        if self.max_captions == 1:
            return _check_lengths(lengths, size, self.text[0], label)
        expected = (size, self.max_captions)
        if lengths.shape != expected:
            raise StoreError(f"{label}: expected shape (size={size}, captions={self.max_captions}), "
                             f"found {_shape(lengths.shape)}")
        if not np.issubdtype(lengths.dtype, np.integer):
            raise StoreError(f"{label}: expected integer token counts, found dtype {lengths.dtype}")
        filled = np.arange(self.max_captions)[None, :] < (
            counts[:, None] if counts is not None else self.max_captions)
        bad = filled & ((lengths < 1) | (lengths > self.text[0])) | ~filled & (lengths != 0)
        if bad.any():
            row, slot = (int(i) for i in np.argwhere(bad)[0])
            raise StoreError(f"{label}: {int(bad.sum())} entries out of range, first row {row} caption "
                             f"{slot}: {int(lengths[row, slot])} (expected [1, {self.text[0]}] for the "
                             "row's captions, 0 for empty slots past its count)")
        return lengths.astype(np.int64)

    def _check_targets(self, targets: np.ndarray, size: int, label: str) -> np.ndarray:
        if self.task == "classification":
            if targets.shape != (size,):
                raise StoreError(f"{label}: expected shape (size={size},), found {_shape(targets.shape)}")
            if not np.issubdtype(targets.dtype, np.integer):
                raise StoreError(f"{label}: expected integer class labels, found dtype {targets.dtype}")
            _check_label_range(targets, self.num_outputs, label)
            return targets.astype(np.int64)
        expected: tuple[int, ...]
        if self.task == "regression":
            expected = (size, self.num_outputs)
        else:
            expected = self._target_shape(size)
        if targets.shape != expected:
            names = ("T" if self.task == "regression" else "text_tokens, text_dim"
                     if self.max_captions == 1 else "captions, text_tokens, text_dim")
            raise StoreError(f"{label}: expected shape {_shape(expected)} (size, {names}), "
                             f"found {_shape(targets.shape)}")
        if not np.issubdtype(targets.dtype, np.floating):
            raise StoreError(f"{label}: expected a float array, found dtype {targets.dtype}")
        _check_finite_chunked(targets, label)
        # float16 stays float16 (caption features of 20 captions per row are large)
        return targets if targets.dtype in FEATURE_DTYPES else targets.astype(np.float32)

    def _target_shape(self, size: int) -> tuple[int, ...]:
        """Expected shape of a regression or retrieval split's ``targets.npy``."""
        if self.task == "regression":
            return (size, self.num_outputs)
        assert self.text is not None
        captions = (self.max_captions,) if self.max_captions > 1 else ()
        return (size, *captions, *self.text)

    # ------------------------------------------------------------------ validation
    def validate(self, deep: bool = True) -> None:
        """Check every split's files against ``store.json``; raise :class:`StoreError` if not.

        Always: files exist; shapes, dtypes, labels and lengths; every val/test modality is seen
        by at least one training split (and a store with val/test splits has a training split).
        With ``deep``: features and float targets hold no NaN/inf (reads every array once).
        """
        for info in self.splits.values():
            self._validate_split(info, deep)
        self._validate_coverage()

    def _validate_coverage(self) -> None:
        train = self.splits_with_role("train")
        evaluation = [s for s in self.splits.values() if s.role != "train"]
        where = self.path / "store.json"
        if evaluation and not train:
            raise StoreError(f"{where}: splits {[s.name for s in evaluation]} have no training "
                             f"split to learn from (expected at least one split with role 'train')")
        seen = {m for s in train for m in self.splits[s].modalities}
        for info in evaluation:
            unseen = sorted(set(info.modalities) - seen)
            if unseen:
                raise StoreError(
                    f"{where}: {info.role} split {info.name!r} has modality {unseen} that no "
                    f"training split has (training modalities: {sorted(seen)})"
                )

    def _load(self, file: Path, label: str) -> np.ndarray:
        if not file.is_file():
            raise StoreError(f"{file}: missing file ({label})")
        try:
            return np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as err:
            raise StoreError(f"{file}: {_npy_problem(file, err)} ({label})") from None

    def _validate_split(self, info: SplitInfo, deep: bool) -> None:
        folder = self.path / info.name
        if not folder.is_dir():
            raise StoreError(f"{folder}: missing folder of split {info.name!r} listed in store.json")
        lengths: dict[str, Optional[np.ndarray]] = {}
        for m in info.modalities:
            tokens, dim = self.modalities[m]
            file = folder / f"{m}.npy"
            array = self._load(file, f"modality {m!r} of split {info.name!r}")
            expected = (info.size, tokens, dim)
            if array.shape != expected:
                raise StoreError(f"{file}: expected shape (size={info.size}, tokens={tokens}, "
                                 f"dim={dim}), found {_shape(array.shape)}")
            if array.dtype not in FEATURE_DTYPES:
                raise StoreError(f"{file}: expected dtype float16 or float32, found {array.dtype}")
            if deep:
                _check_finite_chunked(array, file)
            lengths_file = folder / f"{m}.lengths.npy"
            lengths[m] = None
            if lengths_file.is_file():
                lengths[m] = _check_lengths(np.asarray(self._load(lengths_file, "lengths")), info.size,
                                            tokens, str(lengths_file), minimum=0)
        _check_every_row_has_a_modality(lengths, info.size, f"{folder}/*.lengths.npy")
        for extra in sorted(folder.glob("*.npy")):
            stem = extra.name[: -len(".npy")].removesuffix(".lengths")
            if stem not in ("targets", "targets.counts") and stem not in info.modalities:
                raise StoreError(
                    f"{extra}: modality {stem!r} is on disk but not listed for split {info.name!r} "
                    f"in store.json (listed: {list(info.modalities)})"
                )
        file = folder / "targets.npy"
        targets = self._load(file, f"targets of split {info.name!r}")
        if self.task == "classification":
            if targets.shape != (info.size,):
                raise StoreError(f"{file}: expected shape (size={info.size},), found {_shape(targets.shape)}")
            if not np.issubdtype(targets.dtype, np.integer):
                raise StoreError(f"{file}: expected integer class labels, found dtype {targets.dtype}")
            _check_label_range(np.asarray(targets), self.num_outputs, str(file))
        else:
            target_shape = self._target_shape(info.size)
            if targets.shape != target_shape:
                raise StoreError(f"{file}: expected shape {_shape(target_shape)}, found {_shape(targets.shape)}")
            if targets.dtype not in FEATURE_DTYPES:
                raise StoreError(f"{file}: expected dtype float16 or float32, found {targets.dtype}")
            if deep:
                _check_finite_chunked(targets, file)
        lengths_file, counts_file = folder / "targets.lengths.npy", folder / "targets.counts.npy"
        for file in (lengths_file, counts_file):
            if file.is_file() and self.task != "retrieval":
                raise StoreError(f"{file}: caption lengths and counts are only allowed for task "
                                 f"'retrieval', found with task {self.task!r}")
        counts = None
        if counts_file.is_file():
            counts = self._check_caption_counts(np.asarray(self._load(counts_file, "caption counts")),
                                                info.size, str(counts_file))
        if lengths_file.is_file():
            self._check_caption_lengths(np.asarray(self._load(lengths_file, "caption lengths")),
                                        info.size, counts, str(lengths_file))

    # ------------------------------------------------------------------ access
    def splits_with_role(self, role: str) -> list[str]:
        """Names of the splits with ``role``, in ``store.json`` order."""
        if role not in ROLES:
            raise ValueError(f"role: expected one of {list(ROLES)}, got {role!r}")
        return [s.name for s in self.splits.values() if s.role == role]

    def train_index(self) -> dict[str, int]:
        """Global id offset of each training split: ``id = offset[split] + row``.

        Training splits are enumerated in ``store.json`` order; :attr:`num_train` is the total.
        """
        offsets, total = {}, 0
        for name in self.splits_with_role("train"):
            offsets[name] = total
            total += self.splits[name].size
        return offsets

    @property
    def num_train(self) -> int:
        """Total number of training samples (the ``PseudoLabelBank``'s ``num_samples``)."""
        return sum(self.splits[s].size for s in self.splits_with_role("train"))

    def split_id(self, split: str) -> int:
        """Index of ``split`` in ``store.json`` order (``Batch.split_ids``)."""
        self._require_split(split)
        return list(self.splits).index(split)

    def _require_split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise KeyError(f"split {split!r} not in store {self.path} (splits: {list(self.splits)})")
        return self.splits[split]

    def targets(self, split: str) -> np.ndarray:
        """The split's targets, loaded into memory."""
        self._require_split(split)
        return np.array(np.load(self.path / split / "targets.npy", mmap_mode="r"))

    def present(self, split: str, modality: str) -> np.ndarray:
        """Which rows of ``split`` have ``modality``: ``(size,)`` bool (False for every row when
        the split does not have the modality; a row of length 0 lacks it).

        Example::

            >>> import tempfile
            >>> store = FeatureStore.create(tempfile.mkdtemp() + "/s", "classification", 2,
            ...                             {"rgb": (3, 4), "audio": (2, 4)})
            >>> features = {"rgb": np.ones((3, 3, 4), np.float16), "audio": np.ones((3, 2, 4), np.float16)}
            >>> store.write_split("tr", "train", features, np.array([0, 1, 1]),
            ...                   lengths={"rgb": np.array([3, 0, 2])})
            >>> store.present("tr", "rgb").tolist(), store.present("tr", "audio").tolist()
            ([True, False, True], [True, True, True])
        """
        info = self._require_split(split)
        if modality not in info.modalities:
            return np.zeros(info.size, dtype=bool)
        lengths = self.path / split / f"{modality}.lengths.npy"
        if not lengths.is_file():
            return np.ones(info.size, dtype=bool)
        return np.load(lengths) > 0

    def caption_counts(self, split: str) -> np.ndarray:
        """Captions in each row of a retrieval split, int64 ``(size,)`` (all 1 in a store with
        one caption per row)."""
        info = self._require_split(split)
        if self.task != "retrieval":
            raise StoreError(f"{self.path}: caption counts need task 'retrieval', the store's is {self.task!r}")
        file = self.path / split / "targets.counts.npy"
        if file.is_file():
            return np.load(file).astype(np.int64)
        return np.full(info.size, self.max_captions, dtype=np.int64)

    def dataset(self, split: str, *, caption: str = "first", caption_seed: int = 0) -> "FeatureDataset":
        """A torch ``Dataset`` over one split (items as in ``docs/contracts.md``).

        Args:
            split: the split's name.
            caption: retrieval stores with several captions per row: which caption an item
                carries: ``"first"`` (caption 0), ``"random"`` (one per row drawn from
                ``(caption_seed, epoch, row)``, see :meth:`FeatureDataset.set_epoch`) or ``"all"``
                (every caption: ``(K, tokens, dim)`` with per-caption lengths and the count).
                With one caption per row the three are the same caption.
            caption_seed: seed of ``"random"``.
        """
        info = self._require_split(split)
        offset = self.train_index().get(split, 0) if info.role == "train" else 0
        return FeatureDataset(self.path, info, self.split_id(split), offset, self.modalities,
                              self.task, self.text, max_captions=self.max_captions,
                              caption=caption, caption_seed=caption_seed)

    def train_dataset(self, *, caption: str = "first", caption_seed: int = 0) -> ConcatDataset:
        """All training splits as one ``ConcatDataset`` (items carry global train ids);
        ``caption`` and ``caption_seed`` as in :meth:`dataset`."""
        names = self.splits_with_role("train")
        if not names:
            raise StoreError(f"{self.path / 'store.json'}: no split with role 'train'")
        return ConcatDataset([self.dataset(n, caption=caption, caption_seed=caption_seed) for n in names])

    def summary(self) -> str:
        """A readable table of the store: task, modalities, and per split role, size, files."""
        lines = [
            f"FeatureStore {self.path}  ({FORMAT})",
            f"task: {self.task}   num_outputs: {self.num_outputs}",
            "modalities: " + ", ".join(f"{m} (tokens={k}, dim={d})" for m, (k, d) in self.modalities.items()),
        ]
        if self.text is not None:
            lines.append(f"text: tokens={self.text[0]}, dim={self.text[1]}"
                         + (f", captions per row <= {self.max_captions}" if self.max_captions > 1 else ""))
        rows = [("split", "role", "size", "modalities", "dtype", "disk")]
        for info in self.splits.values():
            folder = self.path / info.name
            dtypes = sorted({str(np.load(folder / f"{m}.npy", mmap_mode="r").dtype) for m in info.modalities})
            rows.append((info.name, info.role, str(info.size), ",".join(info.modalities),
                         "/".join(dtypes), _human(_size_on_disk(folder))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for i, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if len(rows) == 1:
            lines.append("(no splits)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"FeatureStore({str(self.path)!r}, task={self.task!r}, "
                f"splits={[s for s in self.splits]})")


def check_store(path: PathLike, deep: bool = True) -> str:
    """Open and validate a store (``umilayers check PATH``); return its summary.

    Raises:
        StoreError: the first violation found, naming the file.
    """
    store = FeatureStore(path, deep=deep)
    return store.summary() + f"\nOK: {len(store.splits)} splits valid" + (
        " (deep check: no NaN/inf)" if deep else "")


# ---------------------------------------------------------------------- helpers
def _shape_entry(value: Any, label: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return {"tokens": value[0], "dim": value[1]}
    raise StoreError(f"{label}: expected (tokens, dim), found {value!r}")


def _parse_shape_entry(entry: Any, label: str) -> tuple[int, int]:
    if not isinstance(entry, dict) or set(entry) != {"tokens", "dim"}:
        raise StoreError(f"{label}: expected {{'tokens': int, 'dim': int}}, found {entry!r}")
    if not (_is_pos_int(entry["tokens"]) and _is_pos_int(entry["dim"])):
        raise StoreError(f"{label}: tokens and dim must be positive ints, found {entry!r}")
    return int(entry["tokens"]), int(entry["dim"])


def _parse_modalities(value: Any, where: Path) -> dict[str, tuple[int, int]]:
    if not isinstance(value, dict) or not value:
        raise StoreError(f"{where}: 'modalities' expected a non-empty object, found {value!r}")
    out = {}
    for name in sorted(value):
        if not isinstance(name, str) or not _NAME.match(name) or name in _RESERVED:
            raise StoreError(f"{where}: invalid modality name {name!r} (letters, digits, '_', '-'; "
                             f"not {list(_RESERVED)})")
        out[name] = _parse_shape_entry(value[name], f"{where}: modality {name!r}")
    return out


def _npy_problem(file: Path, err: Exception) -> str:
    """Why ``file`` did not load as a numeric array; never suggests unpickling it.

    Example::

        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "rgb.npy"
        >>> _ = path.write_text("hello")
        >>> print(_npy_problem(path, ValueError()))
        not a numeric .npy array: the file does not start with the .npy signature (it starts with b'hello');
        write arrays with numpy.save
    """
    with open(file, "rb") as handle:
        head = handle.read(len(_NPY_MAGIC))
        if head != _NPY_MAGIC:
            return (f"not a numeric .npy array: the file does not start with the .npy signature "
                    f"(it starts with {head!r}); write arrays with numpy.save")
        handle.seek(0)
        try:
            version = np.lib.format.read_magic(handle)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            dtype = read(handle)[2]
        except (ValueError, OSError):
            return "not a numeric .npy array: its header is damaged (an incomplete copy?)"
    if dtype.hasobject:
        return f"not a numeric .npy array: it holds Python objects (dtype {dtype}), not numbers"
    return f"cannot be read as a .npy array ({type(err).__name__}: {err}; an incomplete copy?)"


def _check_label_range(labels: np.ndarray, num_classes: int, label: str) -> None:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = int(((labels < 0) | (labels >= num_classes)).sum())
        raise StoreError(f"{label}: labels expected in [0, {num_classes}), found range "
                         f"[{low}, {high}] ({bad} out of range)")


def _check_lengths(lengths: np.ndarray, size: int, tokens: int, label: str, minimum: int = 1) -> np.ndarray:
    if lengths.shape != (size,):
        raise StoreError(f"{label}: expected shape (size={size},), found {_shape(lengths.shape)}")
    if not np.issubdtype(lengths.dtype, np.integer):
        raise StoreError(f"{label}: expected integer token counts, found dtype {lengths.dtype}")
    low, high = int(lengths.min()), int(lengths.max())
    if low < minimum or high > tokens:
        raise StoreError(f"{label}: lengths expected in [{minimum}, {tokens}], found range [{low}, {high}]")
    return lengths.astype(np.int64)


def _check_every_row_has_a_modality(
    lengths: Mapping[str, Optional[np.ndarray]], size: int, label: str
) -> None:
    """A length of 0 marks a modality missing for one sample; no sample may miss them all."""
    if not lengths or any(value is None for value in lengths.values()):
        return  # a modality without a lengths file is present in every row
    has_any = np.zeros(size, dtype=bool)
    for value in lengths.values():
        has_any |= np.asarray(value) > 0
    if not has_any.all():
        rows = np.flatnonzero(~has_any)
        raise StoreError(
            f"{label}: {rows.size} sample(s) have length 0 for every modality (no modality at all), "
            f"rows {format_indices(rows)}"
        )


def _check_finite_chunked(array: np.ndarray, file: Union[Path, str]) -> None:
    row_bytes = max(1, math.prod(array.shape[1:]) * array.dtype.itemsize)
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, len(array), step):
        chunk = np.asarray(array[start:start + step])
        finite = np.isfinite(chunk)
        if not finite.all():
            bad_rows = np.nonzero(~finite.reshape(len(chunk), -1).all(axis=1))[0] + start
            raise StoreError(f"{file}: expected finite values, found NaN/inf in "
                             f"{int((~finite).sum())} entries (first bad row {int(bad_rows[0])})")
