"""Robot state regression on Lee et al.'s "Making Sense of Vision and Touch" data.

The dataset is a folder of HDF5 files, one per episode (``<name>_<n>_1000.h5``), each holding
arrays indexed by time step (50 steps in the release). What this module reads, confirmed against
the dataset's own loader ``MultimodalManipulationDataset`` (stanford-iprl-lab/
multimodal_representation and pliang279/MultiBench ``datasets/robotics``):

- ``image`` ``(T, 128, 128, 3)`` uint8 RGB (a step stored channel-first ``(3, W, H)`` is
  transposed back, as the loader does);
- ``depth_data`` ``(T, 128, 128, 1)`` (or ``(T, 128, 128)``) float depth;
- ``ee_forces_continuous`` ``(T, 50, 6)``: the 50 force/torque readings before each step;
- ``proprio`` ``(T, 8)``: end-effector position, orientation and velocities (the loader keeps
  ``[:8]``).

A sample is one step ``t`` in ``0 .. T-2`` of an episode; its target is the next end-effector
pose, ``ee_yaw_next = proprio[t + 1][:4]`` exactly as the loader defines it; the metric is the
mean absolute error. Preprocessing follows the public code: images scaled by 1/255
(``rescaleImage``), depth kept in ``(1e-7, 2)`` and zeroed elsewhere (``filter_depth``), force
truncated to its last 32 readings and squashed with ``tanh`` (MultiBench ``ProcessForce(32,
tanh=True)``).

The unimodal encoders keep Lee et al.'s layer sizes (``models/base_models/encoders.py``) but
return tokens instead of one vector: the image and depth encoders return the positions of their
last feature map (``2 x 2 = 4`` tokens of ``z_dim`` at 128 px); the proprio MLP's ``2 z_dim``
output becomes 2 tokens of ``z_dim``; the force encoder's causal 1-D convolutions keep time
tokens (the last two of its five layers use stride 1, so 32 readings become 4 tokens of
``2 z_dim``).

:func:`build_robot_store` is the whole extraction: split the episodes (Table 1 of Zhang et al.:
training episodes halved into an ``{image, depth}`` split and a ``{proprio, force}`` split, plus
disjoint val and test episodes with all four), train each encoder with a linear head on the
regression target using the training split that has its modality, and write every sample's
tokens to a :class:`~umilayers.data.store.FeatureStore` (task ``regression``, 4 outputs).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from umilayers._io import atomic_torch_save, atomic_write_text
from umilayers._validation import InvalidArgument, MissingExtra, check_positive_int, check_tensor
from umilayers.data.store import FeatureStore, StoreError

__all__ = [
    "ROBOT_MODALITIES",
    "ROBOT_KEYS",
    "TARGET_SIZE",
    "STANDARD_HELD_OUT",
    "SPLIT_FRACTIONS",
    "RobotDataError",
    "RobotEpisode",
    "RobotSplits",
    "RobotImageEncoder",
    "RobotDepthEncoder",
    "RobotProprioEncoder",
    "RobotForceEncoder",
    "list_episodes",
    "read_episode",
    "load_episodes",
    "split_robot_episodes",
    "build_robot_encoder",
    "train_unimodal_encoder",
    "encode",
    "check_episodes",
    "subsets",
    "build_robot_store",
]

#: The four modalities, in the order of Zhang et al.'s Table 1.
ROBOT_MODALITIES: tuple[str, ...] = ("image", "depth", "proprio", "force")
#: HDF5 key read for each modality.
ROBOT_KEYS: dict[str, str] = {
    "image": "image",
    "depth": "depth_data",
    "proprio": "proprio",
    "force": "ee_forces_continuous",
}
#: ``ee_yaw_next = proprio[t + 1][:TARGET_SIZE]`` (the loader's ``action_dim``).
TARGET_SIZE = 4
_TARGET_KEY = "proprio"
#: The dataset's standard split: the share of episode files held out, on which Lee et al. and
#: MultiBench report (``val_ratio: 0.20`` in stanford-iprl-lab/multimodal_representation's
#: ``multimodal/configs/training_default.yaml`` and MultiBench's
#: ``examples/robotics/training_default.yaml``, drawn by file in MultiBench's
#: ``datasets/robotics/data_loader.py``). It has no third split.
STANDARD_HELD_OUT = 0.2
#: Held-out episode fractions (the defaults, and ``--preset paper``'s). ``test``: the standard
#: split's held-out 20 %, the episodes results are reported on. ``val``: the standard split has
#: none, so val episodes come out of its 80 % training part; 0.1 of all episodes (1/8 of that
#: part) is this library's choice, not a figure of the paper or of the dataset.
SPLIT_FRACTIONS: dict[str, float] = {"val": 0.1, "test": STANDARD_HELD_OUT}
#: The two training splits of Table 1 and their modalities.
TRAIN_GROUPS: dict[str, tuple[str, ...]] = {
    "train_image_depth": ("image", "depth"),
    "train_proprio_force": ("proprio", "force"),
}


class RobotDataError(StoreError):
    """An episode file lacks a key or holds an array of an unexpected shape, or the data folder
    holds none (a :class:`~umilayers.data.StoreError`: the command line shows it as one line).

    Example::

        >>> raise RobotDataError("ep_1_1000.h5: missing key 'depth_data'")
        Traceback (most recent call last):
        ...
        umilayers.datasets.robot.RobotDataError: ep_1_1000.h5: missing key 'depth_data'
    """


def _h5py():
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingExtra("h5py", "datasets", "reading the robot dataset") from err
    return h5py


# ----------------------------------------------------------------------------------------
# Reading episodes
# ----------------------------------------------------------------------------------------


def list_episodes(data_dir: str | os.PathLike) -> list[Path]:
    """All ``*.h5`` files directly in ``data_dir``, sorted by name.

    Raises:
        RobotDataError: ``data_dir`` does not exist or holds no ``.h5`` file.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise RobotDataError(f"{root}: not a directory (--data: the folder of the dataset's .h5 episode files)")
    files = sorted(p for p in root.iterdir() if p.suffix == ".h5" and p.is_file())
    if not files:
        raise RobotDataError(f"{root}: no .h5 episode files (--data: the folder of the dataset's .h5 episode files)")
    return files


@dataclass
class RobotEpisode:
    """The samples of one episode, preprocessed, for the modalities that were read.

    Attributes:
        path: the episode's file.
        inputs: modality -> array with one row per sample (step ``t`` in ``0 .. T-2``):
            image ``(N, 3, S, S)`` float32 in [0, 1]; depth ``(N, 1, S, S)`` float32;
            proprio ``(N, 8)`` float32; force ``(N, 6, W)`` float32 (W readings, tanh).
        targets: ``(N, 4)`` float32, ``proprio[t + 1][:4]``.

    Example::

        >>> ep = RobotEpisode(Path("e.h5"), {"proprio": np.zeros((3, 8), np.float32)},
        ...                   np.zeros((3, 4), np.float32))
        >>> len(ep)
        3
    """

    path: Path
    inputs: dict[str, np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return int(self.targets.shape[0])


def _read_key(handle, path: Path, key: str) -> np.ndarray:
    if key not in handle:
        present = ", ".join(sorted(handle.keys()))
        raise RobotDataError(f"{path}: missing key {key!r} (keys present: {present})")
    return np.asarray(handle[key][()])


def _resize(x: np.ndarray, size: int, mode: str) -> np.ndarray:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    kwargs = {} if mode == "nearest" else {"antialias": False}
    return F.interpolate(t, size=(size, size), mode=mode, **kwargs).numpy()


def _prep_image(raw: np.ndarray, path: Path, steps: int, size: int) -> np.ndarray:
    # The loader transposes a step stored channel-first: (3, W, H) -> (H, W, 3).
    if raw.ndim == 4 and raw.shape[1] == 3 and raw.shape[-1] != 3:
        raw = raw.transpose(0, 3, 2, 1)
    if raw.ndim != 4 or raw.shape[-1] != 3 or raw.shape[0] != steps:
        raise RobotDataError(
            f"{path}: 'image' expected shape (T={steps}, H, W, 3), got {tuple(raw.shape)}"
        )
    x = raw[:-1].astype(np.float32) / 255.0  # rescaleImage
    x = rearrange(x, "n h w c -> n c h w")
    return _resize(x, size, "area").astype(np.float32)


def _prep_depth(raw: np.ndarray, path: Path, steps: int, size: int) -> np.ndarray:
    if raw.ndim == 3:
        raw = raw[..., None]
    if raw.ndim != 4 or raw.shape[-1] != 1 or raw.shape[0] != steps:
        raise RobotDataError(
            f"{path}: 'depth_data' expected shape (T={steps}, H, W, 1), got {tuple(raw.shape)}"
        )
    x = raw[:-1].astype(np.float32)
    x = np.where((x > 1e-7) & (x < 2.0), x, 0.0).astype(np.float32)  # filter_depth
    x = rearrange(x, "n h w c -> n c h w")
    return _resize(x, size, "nearest").astype(np.float32)


def _prep_force(raw: np.ndarray, path: Path, steps: int, window: int) -> np.ndarray:
    if raw.ndim != 3 or raw.shape[-1] != 6 or raw.shape[0] != steps or raw.shape[1] < window:
        raise RobotDataError(
            f"{path}: 'ee_forces_continuous' expected shape (T={steps}, >={window}, 6), "
            f"got {tuple(raw.shape)}"
        )
    x = np.tanh(raw[:-1, -window:].astype(np.float32))  # ProcessForce(window, tanh=True)
    return np.ascontiguousarray(rearrange(x, "n w c -> n c w"))


def read_episode(
    path: str | os.PathLike,
    modalities: Iterable[str] = ROBOT_MODALITIES,
    *,
    image_size: int = 128,
    force_window: int = 32,
) -> RobotEpisode:
    """Read one episode's samples for ``modalities`` (and always its targets).

    Args:
        path: the episode's ``.h5`` file.
        modalities: which of :data:`ROBOT_MODALITIES` to read.
        image_size: side of the square image and depth maps after resizing (128 = as stored).
        force_window: number of most recent force readings kept per step.

    Raises:
        RobotDataError: a needed key is missing or an array has an unexpected shape; the
            message names the file and the key.
    """
    path = Path(path)
    modalities = list(modalities)
    for m in modalities:
        if m not in ROBOT_KEYS:
            raise ValueError(f"modalities: unknown modality {m!r}, expected one of {ROBOT_MODALITIES}")
    h5py = _h5py()
    with h5py.File(path, "r") as handle:
        # Check every key first so the error names the first missing one before any work.
        for key in [_TARGET_KEY] + [ROBOT_KEYS[m] for m in modalities]:
            if key not in handle:
                present = ", ".join(sorted(handle.keys()))
                raise RobotDataError(f"{path}: missing key {key!r} (keys present: {present})")
        proprio = _read_key(handle, path, _TARGET_KEY)
        if proprio.ndim != 2 or proprio.shape[1] < 8 or proprio.shape[0] < 2:
            raise RobotDataError(
                f"{path}: 'proprio' expected shape (T>=2, 8), got {tuple(proprio.shape)}"
            )
        steps = proprio.shape[0]
        targets = proprio[1:, :TARGET_SIZE].astype(np.float32)  # ee_yaw_next
        inputs: dict[str, np.ndarray] = {}
        for m in modalities:
            if m == "proprio":
                inputs[m] = proprio[:-1, :8].astype(np.float32)
                continue
            raw = _read_key(handle, path, ROBOT_KEYS[m])
            if m == "image":
                inputs[m] = _prep_image(raw, path, steps, image_size)
            elif m == "depth":
                inputs[m] = _prep_depth(raw, path, steps, image_size)
            else:
                inputs[m] = _prep_force(raw, path, steps, force_window)
    for m, x in inputs.items():
        if not np.isfinite(x).all():
            raise RobotDataError(f"{path}: {ROBOT_KEYS[m]!r} holds NaN or infinite values")
    if not np.isfinite(targets).all():
        raise RobotDataError(f"{path}: 'proprio' holds NaN or infinite values")
    return RobotEpisode(path, inputs, targets)


@dataclass
class _Loaded:
    inputs: dict[str, np.ndarray]
    targets: np.ndarray
    episodes: list[Path]
    episode_of_row: np.ndarray


def load_episodes(
    paths: Sequence[Path],
    modalities: Iterable[str],
    *,
    image_size: int = 128,
    force_window: int = 32,
) -> _Loaded:
    """Read and concatenate the samples of several episodes (rows in episode order)."""
    modalities = list(modalities)
    chunks: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    targets, owner = [], []
    for i, p in enumerate(paths):
        ep = read_episode(p, modalities, image_size=image_size, force_window=force_window)
        for m in modalities:
            chunks[m].append(ep.inputs[m])
        targets.append(ep.targets)
        owner.append(np.full(len(ep), i, dtype=np.int64))
    return _Loaded(
        {m: np.concatenate(c) for m, c in chunks.items()},
        np.concatenate(targets),
        list(paths),
        np.concatenate(owner),
    )


def check_episodes(
    paths: Sequence[Path], *, skip_missing: bool = False, log: Callable[[str], None] = print
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Check that every episode has every key; drop bad ones when ``skip_missing``.

    Returns:
        ``(kept, dropped)`` where ``dropped`` lists ``(path, reason)``.

    Raises:
        RobotDataError: an episode is bad and ``skip_missing`` is False.
    """
    h5py = _h5py()
    needed = [_TARGET_KEY] + [ROBOT_KEYS[m] for m in ROBOT_MODALITIES if m != "proprio"]
    kept, dropped = [], []
    for p in paths:
        try:
            with h5py.File(p, "r") as handle:
                for key in needed:
                    if key not in handle:
                        present = ", ".join(sorted(handle.keys()))
                        raise RobotDataError(
                            f"{p}: missing key {key!r} (keys present: {present})"
                        )
                if handle[_TARGET_KEY].shape[0] < 2:
                    raise RobotDataError(f"{p}: 'proprio' has fewer than 2 steps")
        except RobotDataError as err:
            if not skip_missing:
                raise RobotDataError(f"{err} (use --skip-missing to drop such episodes)") from None
            dropped.append((p, str(err)))
            continue
        except OSError as err:
            if not skip_missing:
                raise RobotDataError(f"{p}: cannot be read as HDF5 ({err})") from err
            dropped.append((p, f"{p}: cannot be read as HDF5"))
            continue
        kept.append(p)
    if dropped:
        log(f"skipped {len(dropped)} episode(s) with missing keys or unreadable files")
    return kept, dropped


# ----------------------------------------------------------------------------------------
# Splits (Zhang et al., Table 1)
# ----------------------------------------------------------------------------------------


@dataclass
class RobotSplits:
    """Episode files per split, and the modalities each split carries.

    Example::

        >>> s = split_robot_episodes([Path(f"e{i}.h5") for i in range(10)], seed=0)
        >>> sorted(s.episodes)
        ['test', 'train_image_depth', 'train_proprio_force', 'val']
        >>> s.modalities["train_image_depth"]
        ('image', 'depth')
    """

    episodes: dict[str, list[Path]]
    modalities: dict[str, tuple[str, ...]]
    roles: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            name: {
                "role": self.roles[name],
                "modalities": list(self.modalities[name]),
                "episodes": [p.name for p in eps],
            }
            for name, eps in self.episodes.items()
        }


def split_robot_episodes(
    paths: Sequence[Path],
    *,
    seed: int = 0,
    val_fraction: float = SPLIT_FRACTIONS["val"],
    test_fraction: float = SPLIT_FRACTIONS["test"],
) -> RobotSplits:
    """Split episodes (never steps) into the paper's four splits, deterministically.

    A seeded permutation of the sorted episodes gives the test episodes, then the val
    episodes, and the remaining training episodes are halved: the first half gets
    ``{image, depth}``, the second ``{proprio, force}``. Val and test have all four. The default
    fractions, :data:`SPLIT_FRACTIONS`: test = the dataset's standard held-out 20 %
    (:data:`STANDARD_HELD_OUT`), val = 0.1 of the episodes taken from the standard split's
    training part.

    Raises:
        ValueError: fewer than 4 episodes, or fractions outside ``(0, 1)`` leaving no training
            episode in a half.
    """
    paths = sorted(Path(p) for p in paths)
    n = len(paths)
    if n < 4:
        raise RobotDataError(f"episodes: need at least 4 episodes for train/train/val/test, got {n}")
    for name, frac in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 1.0:
            raise InvalidArgument(name, f"expected a fraction in (0, 1), got {frac}")
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, int(round(test_fraction * n)))
    n_val = max(1, int(round(val_fraction * n)))
    n_train = n - n_test - n_val
    if n_train < 2:
        raise RobotDataError(
            f"episodes: {n} episodes leave {n_train} for training with val_fraction="
            f"{val_fraction}, test_fraction={test_fraction}; need at least 2"
        )
    shuffled = [paths[i] for i in order]
    test = sorted(shuffled[:n_test])
    val = sorted(shuffled[n_test:n_test + n_val])
    train = shuffled[n_test + n_val:]
    half = (len(train) + 1) // 2
    episodes = {
        "train_image_depth": sorted(train[:half]),
        "train_proprio_force": sorted(train[half:]),
        "val": val,
        "test": test,
    }
    modalities = dict(TRAIN_GROUPS)
    modalities["val"] = ROBOT_MODALITIES
    modalities["test"] = ROBOT_MODALITIES
    roles = {"train_image_depth": "train", "train_proprio_force": "train", "val": "val", "test": "test"}
    return RobotSplits(episodes, modalities, roles)


# ----------------------------------------------------------------------------------------
# Encoders (Lee et al., models/base_models/encoders.py), returning tokens
# ----------------------------------------------------------------------------------------


def _conv2d(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, **factory) -> nn.Sequential:
    # Lee et al.'s ``conv2d``: "same" padding then LeakyReLU(0.1).
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=(kernel - 1) // 2, **factory),
        nn.LeakyReLU(0.1),
    )


class _CausalConv1d(nn.Conv1d):
    """Lee et al.'s ``CausalConv1D``: pads by ``kernel - 1`` and drops the trailing outputs."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, **factory) -> None:
        self._trim = kernel - 1
        super().__init__(c_in, c_out, kernel, stride=stride, padding=self._trim, **factory)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        y = super().forward(x)
        return y[:, :, : -self._trim] if self._trim else y


def _init_conv(module: nn.Module) -> None:
    # Lee et al.'s init_weights: Kaiming normal for convolutions, zero bias.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class _MapTokens(nn.Module):
    """A conv stack whose last feature map's positions become the tokens.

    Subclasses give Lee et al.'s table: ``channels`` (input first, ``z_dim`` appended last) and
    one kernel size per stride-2 convolution.
    """

    channels: tuple[int, ...]
    kernels: tuple[int, ...]

    def __init__(self, z_dim: int = 128, *, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int("z_dim", z_dim)
        f = {"device": device, "dtype": dtype}
        self.z_dim = z_dim
        sizes = (*self.channels, z_dim)
        self.convs = nn.Sequential(*(
            _conv2d(c_in, c_out, kernel, 2, **f) for c_in, c_out, kernel in zip(sizes, sizes[1:], self.kernels)
        ))
        _init_conv(self)

    @property
    def in_channels(self) -> int:
        """Channels of the input image (3 for RGB, 1 for depth)."""
        return self.channels[0]

    def forward(self, x: Tensor) -> Tensor:
        """Encode images to tokens.

        Shape:
            - x: ``(B, C, S, S)`` with ``C = in_channels``
            - output: ``(B, k, z_dim)``: the last map's positions (``k = 4`` at S = 128)
        """
        check_tensor("x", x, (None, self.in_channels, None, None), floating=True)
        return rearrange(self.convs(x), "b c h w -> b (h w) c")


class RobotImageEncoder(_MapTokens):
    """Lee et al.'s RGB encoder (six stride-2 convolutions) returning map positions as tokens.

    Channels 3-16-32-64-64-128-``z_dim``, kernels 7, 5, 5, 3, 3, 3. A 128 px image gives a
    ``2 x 2`` map, so 4 tokens of size ``z_dim``.

    Args:
        z_dim: channels of the last map (Lee et al.: 128).

    Example::

        >>> enc = RobotImageEncoder(z_dim=16)
        >>> enc(torch.rand(2, 3, 128, 128)).shape
        torch.Size([2, 4, 16])
    """

    channels = (3, 16, 32, 64, 64, 128)
    kernels = (7, 5, 5, 3, 3, 3)


class RobotDepthEncoder(_MapTokens):
    """Lee et al.'s depth encoder (six stride-2 convolutions) returning map positions as tokens.

    Channels 1-32-64-64-64-128-``z_dim``, kernels 3, 3, 4, 3, 3, 3.

    Args:
        z_dim: channels of the last map (Lee et al.: 128).

    Example::

        >>> enc = RobotDepthEncoder(z_dim=16)
        >>> enc(torch.rand(2, 1, 128, 128)).shape
        torch.Size([2, 4, 16])
    """

    channels = (1, 32, 64, 64, 64, 128)
    kernels = (3, 3, 4, 3, 3, 3)


class RobotProprioEncoder(nn.Module):
    """Lee et al.'s proprio MLP (8-32-64-128-``2 z_dim``), its output split into 2 tokens.

    Args:
        z_dim: token size (Lee et al.: 128).

    Example::

        >>> RobotProprioEncoder(z_dim=16)(torch.rand(5, 8)).shape
        torch.Size([5, 2, 16])
    """

    def __init__(self, z_dim: int = 128, *, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int("z_dim", z_dim)
        f = {"device": device, "dtype": dtype}
        self.z_dim = z_dim
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.mlp = nn.Sequential(
            nn.Linear(8, 32, **f), act(),
            nn.Linear(32, 64, **f), act(),
            nn.Linear(64, 128, **f), act(),
            nn.Linear(128, 2 * z_dim, **f), act(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Encode proprioception to tokens.

        Shape:
            - x: ``(B, 8)``
            - output: ``(B, 2, z_dim)``
        """
        check_tensor("x", x, (None, 8), floating=True)
        return rearrange(self.mlp(x), "b (k d) -> b k d", k=2)


class RobotForceEncoder(nn.Module):
    """Lee et al.'s causal 1-D force encoder, keeping time tokens.

    Channels 6-16-32-64-128-``2 z_dim``, kernel 2; strides 2, 2, 2, 1, 1 (Lee et al. use stride
    2 throughout, which reduces 32 readings to a single vector; here the last two keep the
    time axis), so a window of 32 readings gives 4 tokens of size ``2 z_dim``.

    Args:
        z_dim: half the token size (Lee et al.: 128).

    Example::

        >>> RobotForceEncoder(z_dim=16)(torch.rand(5, 6, 32)).shape
        torch.Size([5, 4, 32])
    """

    def __init__(self, z_dim: int = 128, *, device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int("z_dim", z_dim)
        f = {"device": device, "dtype": dtype}
        self.z_dim = z_dim
        layers: list[nn.Module] = []
        channels = [6, 16, 32, 64, 128, 2 * z_dim]
        for i, stride in enumerate((2, 2, 2, 1, 1)):
            layers += [_CausalConv1d(channels[i], channels[i + 1], 2, stride, **f), nn.LeakyReLU(0.1)]
        self.convs = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Encode a window of force readings to time tokens.

        Shape:
            - x: ``(B, 6, W)``
            - output: ``(B, W // 8, 2 * z_dim)`` (W = 32 gives 4 tokens)
        """
        check_tensor("x", x, (None, 6, None), floating=True)
        if x.shape[-1] < 8:
            raise ValueError(f"x: expected at least 8 force readings (W >= 8), got W={x.shape[-1]}")
        return rearrange(self.convs(x), "b c t -> b t c")



def build_robot_encoder(modality: str, z_dim: int) -> nn.Module:
    """The encoder for one of :data:`ROBOT_MODALITIES`."""
    classes = {
        "image": RobotImageEncoder,
        "depth": RobotDepthEncoder,
        "proprio": RobotProprioEncoder,
        "force": RobotForceEncoder,
    }
    if modality not in classes:
        raise ValueError(f"modality: expected one of {ROBOT_MODALITIES}, got {modality!r}")
    return classes[modality](z_dim)


# ----------------------------------------------------------------------------------------
# Stage 1: per-modality encoder training, then token extraction
# ----------------------------------------------------------------------------------------


class _WithHead(nn.Module):
    def __init__(self, encoder: nn.Module, width: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, TARGET_SIZE)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def _token_width(encoder: nn.Module) -> int:
    z_dim = cast(int, encoder.z_dim)  # every robot encoder keeps its int z_dim
    return 2 * z_dim if isinstance(encoder, RobotForceEncoder) else z_dim


def train_unimodal_encoder(
    encoder: nn.Module,
    inputs: np.ndarray,
    targets: np.ndarray,
    *,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> list[float]:
    """Train ``encoder`` plus a linear head on the mean of its tokens with the MSE loss.

    Returns:
        The mean training loss of each epoch.
    """
    check_positive_int("epochs", epochs)
    check_positive_int("batch_size", batch_size)
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(
            f"inputs/targets: expected the same non-zero number of rows, got {len(inputs)} "
            f"and {len(targets)}"
        )
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = _WithHead(encoder, _token_width(encoder)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x_all = torch.from_numpy(inputs)
    y_all = torch.from_numpy(targets)
    history = []
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            loss = F.mse_loss(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        history.append(total / count)
    model.eval()
    return history


@torch.no_grad()
def encode(
    encoder: nn.Module, inputs: np.ndarray, *, batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Tokens of every row of ``inputs``: ``(N, k, d)`` float32."""
    encoder = encoder.to(device).eval()
    out = []
    for start in range(0, len(inputs), batch_size):
        x = torch.from_numpy(inputs[start:start + batch_size]).to(device)
        out.append(encoder(x).float().cpu().numpy())
    return np.concatenate(out)


def build_robot_store(
    data_dir: str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    z_dim: int = 128,
    image_size: int = 128,
    force_window: int = 32,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    val_fraction: float = SPLIT_FRACTIONS["val"],
    test_fraction: float = SPLIT_FRACTIONS["test"],
    skip_missing: bool = False,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
    log: Callable[[str], None] = print,
) -> dict:
    """Extract the robot dataset into a FeatureStore (stage 1 of the paper's recipe).

    Splits the episodes (:func:`split_robot_episodes`), trains each modality's encoder with a
    linear head on the training split that has the modality (:func:`train_unimodal_encoder`),
    and writes every split's tokens with targets ``ee_yaw_next`` to ``store_path``. Also writes
    ``store_path/robot_extraction.json`` (splits, episodes, stage-1 losses, dropped episodes)
    and ``store_path/robot_encoders.pt`` (the trained encoders' weights).

    Returns:
        The summary written to ``robot_extraction.json``.

    Raises:
        RobotDataError: an episode lacks a key (unless ``skip_missing``: then it is dropped
            and counted).
    """
    check_positive_int("image_size", image_size)
    check_positive_int("force_window", force_window)
    if force_window < 8:
        raise ValueError(f"force_window: expected at least 8 readings, got {force_window}")
    store_path = Path(store_path)
    episodes, dropped = check_episodes(list_episodes(data_dir), skip_missing=skip_missing, log=log)
    splits = split_robot_episodes(
        episodes, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
    )
    load = lambda eps, mods: load_episodes(  # noqa: E731
        eps, mods, image_size=image_size, force_window=force_window
    )

    encoders: dict[str, nn.Module] = {}
    losses: dict[str, list[float]] = {}
    for split_name, mods in TRAIN_GROUPS.items():
        data = load(splits.episodes[split_name], mods)
        for offset, m in enumerate(mods):
            torch.manual_seed(seed + offset)
            enc = build_robot_encoder(m, z_dim)
            losses[m] = train_unimodal_encoder(
                enc, data.inputs[m], data.targets, epochs=epochs, batch_size=batch_size,
                lr=lr, seed=seed + offset, device=device,
            )
            encoders[m] = enc
            log(f"stage 1 {m}: {len(data.targets)} samples, train MSE by epoch "
                + ", ".join(f"{v:.4g}" for v in losses[m]))

    token_shapes: dict[str, tuple[int, int]] = {}
    split_arrays = {}
    for split_name, eps in splits.episodes.items():
        mods = splits.modalities[split_name]
        data = load(eps, mods)
        feats = {m: encode(encoders[m], data.inputs[m], device=device) for m in mods}
        for m, f in feats.items():
            token_shapes[m] = (int(f.shape[1]), int(f.shape[2]))
        split_arrays[split_name] = (feats, data.targets)

    store = FeatureStore.create(
        store_path, "regression", TARGET_SIZE, modalities=token_shapes, overwrite=overwrite
    )
    rows = {}
    for split_name, (feats, targets) in split_arrays.items():
        store.write_split(split_name, splits.roles[split_name], feats, targets)
        rows[split_name] = int(len(targets))

    summary = {
        "data": str(Path(data_dir)),
        "target": "ee_yaw_next = proprio[t + 1][:4]",
        "image_size": image_size,
        "force_window": force_window,
        "z_dim": z_dim,
        "seed": seed,
        "splits": splits.to_json(),
        "rows": rows,
        "token_shapes": {m: list(s) for m, s in token_shapes.items()},
        "stage1_train_mse": losses,
        "dropped_episodes": [{"file": str(p), "reason": r} for p, r in dropped],
    }
    atomic_write_text(store_path / "robot_extraction.json", json.dumps(summary, indent=2))
    atomic_torch_save(
        store_path / "robot_encoders.pt", {m: enc.state_dict() for m, enc in encoders.items()}
    )
    return summary


def subsets(modalities: Sequence[str] = ROBOT_MODALITIES) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``modalities``, smallest first (the paper's Figure 3)."""
    from itertools import combinations

    out: list[tuple[str, ...]] = []
    for r in range(1, len(modalities) + 1):
        out.extend(combinations(modalities, r))
    return out
