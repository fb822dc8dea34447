"""The paper's EPIC-Kitchens backbones and the authors' released model, from their checkpoints.

Zhang et al. extract EPIC-Kitchens features with an Audio Spectrogram Transformer (AST,
Gong et al. 2021, AudioSet's DeiT-B/16) and Omnivore's video Swin-T, both fine-tuned on
EPIC-Kitchens actions (the released ``train.py`` builds the two networks and loads ``audio.pt``
and ``rgb.pt`` into them). The checkpoints are published with their own key names; the extractors
of :mod:`umilayers.datasets.epic` run timm's ViT and torchvision's ``swin3d_t``. The functions
here translate one into the other, tensor by tensor, and say which tensors were left out
(classifier heads only). Nothing is downloaded: every function takes a path or a loaded dict.

- **AST** (``YuanGongND/ast``, ``audioset_10_10_0.4593.pth``): the model is timm's DeiT-B/16
  distilled (384) run on a one-channel log-mel spectrogram with *overlapping* 16 x 16 patches
  (stride 10 in frequency and time), keys ``module.v.*`` (the timm ViT) and ``module.mlp_head.*``
  (the AudioSet head). :func:`ast_audio_vit` builds the same network in timm (the patch stride
  is a constructor argument, :class:`OverlappingPatchEmbed`), and
  :func:`convert_ast_state_dict` maps the keys and adapts the position embeddings to the
  spectrogram length as AST does when fine-tuning at another length (a centred crop in time
  when shorter than the checkpoint's 101 patches, bilinear interpolation when longer; the same
  in frequency).
- **Video Swin / Omnivore Swin-T** (``SwinTransformer/Video-Swin-Transformer``:
  ``backbone.layers.{i}.blocks.{j}.*``, ``cls_head.fc_cls.*``; ``facebookresearch/omnivore``:
  a ``{"trunk": ..., "heads": ...}`` dict with the same trunk names): torchvision's
  ``swin3d_t`` is the same network (torchvision's own Kinetics weights were ported from Video
  Swin) with other names: ``layers.{i}.blocks.{j}`` -> ``features.{2i}.{j}``,
  ``layers.{i}.downsample`` -> ``features.{2i+1}``, ``mlp.fc1``/``mlp.fc2`` ->
  ``mlp.0``/``mlp.3``. :func:`convert_video_swin_state_dict` does the renaming.
- **The released model** (``feature_reorganization.py``'s ``ViTReorganization``, ``vit.py``'s
  ``ViT`` and ``train.py``'s ``AlignmentModule``, as ``train.py`` saves them):
  :func:`load_released_model` builds the :class:`~umilayers.model.UnseenModalityModel` that
  computes the same logits and losses, and :func:`convert_released_state_dict` maps the keys.

Example::

    >>> import torch
    >>> ast = {"module.v.cls_token": torch.zeros(1, 1, 4), "module.v.dist_token": torch.zeros(1, 1, 4),
    ...        "module.v.pos_embed": torch.zeros(1, 2 + 2 * 3, 4),
    ...        "module.v.patch_embed.proj.weight": torch.zeros(4, 1, 16, 16),
    ...        "module.v.patch_embed.proj.bias": torch.zeros(4), "module.v.norm.weight": torch.ones(4),
    ...        "module.v.norm.bias": torch.zeros(4), "module.mlp_head.1.weight": torch.zeros(5, 4)}
    >>> converted = convert_ast_state_dict(ast, grid=(2, 2), source_grid=(2, 3))
    >>> converted.state_dict["pos_embed"].shape, converted.dropped
    (torch.Size([1, 6, 4]), ('mlp_head.1.weight',))
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from umilayers._validation import InvalidArgument, MissingExtra, check_positive_int
from umilayers.data.store import StoreError
from umilayers.model import UnseenModalityModel

__all__ = [
    "AST_AUDIOSET_GRID",
    "AST_STRIDE",
    "CheckpointError",
    "RELEASED_MODALITIES",
    "ConvertedCheckpoint",
    "OverlappingPatchEmbed",
    "ast_audio_vit",
    "ast_patch_grid",
    "checkpoint_format",
    "convert_ast_state_dict",
    "convert_released_state_dict",
    "convert_video_swin_state_dict",
    "load_checkpoint",
    "load_released_model",
    "unwrap_state_dict",
]

PathLike = Union[str, os.PathLike]


class CheckpointError(StoreError):
    """A weights file does not exist or does not hold what its converter reads (a
    :class:`~umilayers.data.StoreError`: the command line shows it as one line)."""


class _MissingWeights(CheckpointError, FileNotFoundError):
    """:class:`CheckpointError` for a weights file that does not exist (also a ``FileNotFoundError``)."""

AST_AUDIOSET_GRID: tuple[int, int] = (12, 101)
"""(frequency, time) patches of AST's AudioSet checkpoint: 128 mel bins x 1024 frames, stride 10."""

AST_STRIDE = 10
"""AST's patch stride in frequency and time (``fstride = tstride = 10``: 16 x 16 patches overlap by 6)."""

_CONTAINERS = ("state_dict", "model", "module")


@dataclass(frozen=True)
class ConvertedCheckpoint:
    """A state dict in the target's key names and the source keys deliberately left out.

    Example::

        >>> ConvertedCheckpoint({}, ("cls_head.fc_cls.weight",)).dropped
        ('cls_head.fc_cls.weight',)
    """

    state_dict: dict[str, Tensor]
    dropped: tuple[str, ...] = ()


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read a local checkpoint file (``torch.load(weights_only=True)``, on the CPU).

    Returns the top-level dict as saved (a plain state dict, or a wrapper such as
    ``{"state_dict": ...}`` / ``{"model": ...}`` / Omnivore's ``{"trunk": ..., "heads": ...}``);
    the converters and :func:`checkpoint_format` accept either.

    Raises:
        CheckpointError: ``path`` does not exist (also a ``FileNotFoundError``), or does not
            hold a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise _MissingWeights(f"weights file {path} does not exist")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors (a state dict), found {type(loaded).__name__}")
    return dict(loaded)


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict inside the common wrappers (``state_dict``, ``model``, ``module``), with a
    ``module.`` (DataParallel) key prefix removed.

    Example::

        >>> unwrap_state_dict({"state_dict": {"module.norm.weight": 1}})
        {'norm.weight': 1}
    """
    state: Mapping[str, Any] = checkpoint
    while True:
        inner = next((state[k] for k in _CONTAINERS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    return {k.removeprefix("module."): v for k, v in state.items()}


def checkpoint_format(checkpoint: Mapping[str, Any]) -> str:
    """Which key naming a loaded checkpoint uses.

    Returns:
        ``"ast"`` (AST's ``v.*`` ViT), ``"video-swin"`` (Video Swin ``backbone.layers.*`` or bare
        ``layers.*``), ``"omnivore"`` (``trunk`` dict or ``trunk.layers.*``), or ``"native"`` for
        anything else (taken to be in timm's / torchvision's own names already).

    Example::

        >>> checkpoint_format({"trunk": {"layers.0.blocks.0.norm1.weight": None}, "heads": {}})
        'omnivore'
        >>> checkpoint_format({"patch_embed.proj.weight": None})
        'native'
    """
    if isinstance(checkpoint.get("trunk"), Mapping):
        return "omnivore"
    keys = unwrap_state_dict(checkpoint)
    if "v.pos_embed" in keys:
        return "ast"
    if any(k.startswith("trunk.layers.") for k in keys):
        return "omnivore"
    if any(k.startswith(("backbone.layers.", "layers.")) for k in keys):
        return "video-swin"
    return "native"


# ------------------------------------------------------------------------------------ AST

def ast_patch_grid(mel_bins: int, frames: int, stride: int = AST_STRIDE, patch: int = 16) -> tuple[int, int]:
    """(frequency, time) patch counts of a ``mel_bins x frames`` spectrogram (AST's ``get_shape``).

    Example::

        >>> ast_patch_grid(128, 1024), ast_patch_grid(128, 128)
        ((12, 101), (12, 12))
    """
    if min(mel_bins, frames) < patch:
        raise ValueError(f"the spectrogram ({mel_bins} x {frames}) must be at least one {patch} x "
                         f"{patch} patch")
    return (mel_bins - patch) // stride + 1, (frames - patch) // stride + 1


class OverlappingPatchEmbed(nn.Module):
    """AST's patch embedding as a timm ``embed_layer``: ``patch x patch`` patches every ``stride``.

    timm's ``PatchEmbed`` ties the stride to the patch size; AST's overlapping patches (stride 10
    for 16 x 16 patches) need their own. Pass ``functools.partial(OverlappingPatchEmbed,
    stride=10)`` as ``embed_layer`` to a timm ViT (what :func:`ast_audio_vit` does).

    Args:
        img_size: input ``(height, width)`` (mel bins, frames); an int means square.
        patch_size: patch side.
        in_chans: input channels (1 for a spectrogram).
        embed_dim: token width.
        stride: patch stride in both directions.
        bias: a bias on the projection.
        dynamic_img_pad, norm_layer, strict_img_size, output_fmt: timm's embed-layer options;
            only their defaults are supported (AST uses none of them).

    Shape:
        - x: ``(B, in_chans, H, W)`` with ``(H, W) == img_size``
        - output: ``(B, grid_size[0] * grid_size[1], embed_dim)``, frequency-major

    Example::

        >>> embed = OverlappingPatchEmbed((36, 46), 16, 1, 8, stride=10)
        >>> embed.grid_size, embed(torch.zeros(2, 1, 36, 46)).shape
        ((3, 4), torch.Size([2, 12, 8]))
    """

    def __init__(
        self,
        img_size: Union[int, tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        stride: int = AST_STRIDE,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        norm_layer: Optional[Any] = None,
        strict_img_size: bool = True,
        output_fmt: Optional[str] = None,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if dynamic_img_pad or norm_layer is not None or not strict_img_size or output_fmt is not None:
            raise ValueError("OverlappingPatchEmbed supports a fixed input size only (no dynamic "
                             "size, padding, norm or output format)")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.patch_size = (patch_size, patch_size)
        self.stride = (stride, stride)
        self.grid_size = ast_patch_grid(self.img_size[0], self.img_size[1], stride, patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, bias=bias,
                              device=device, dtype=dtype)

    def feat_ratio(self, as_scalar: bool = True) -> Union[int, tuple[int, int]]:
        """Input pixels per token step (timm's feature-info hook)."""
        return self.stride[0] if as_scalar else self.stride

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"OverlappingPatchEmbed: expected input (B, C, {self.img_size[0]}, "
                             f"{self.img_size[1]}), got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)


def ast_audio_vit(
    arch: str = "deit_base_distilled_patch16_384",
    mel_bins: int = 128,
    frames: int = 128,
    stride: int = AST_STRIDE,
    **kwargs: Any,
) -> nn.Module:
    """AST's network in timm: ``arch`` on a one-channel ``mel_bins x frames`` spectrogram with
    overlapping patches (``stride``), no classifier (``num_classes=0``).

    ``arch`` is any timm ViT; AST's AudioSet checkpoint is ``deit_base_distilled_patch16_384``
    (two prefix tokens, class and distillation). Extra ``kwargs`` go to ``timm.create_model``
    (``embed_dim``, ``depth``, ``num_heads`` make a small model for tests).

    Raises:
        MissingExtra: timm is not installed (an ImportError).
    """
    try:
        import timm
    except ImportError as err:
        raise MissingExtra("timm", "vision", "the audio extractor") from err
    return timm.create_model(arch, pretrained=False, in_chans=1, img_size=(mel_bins, frames),
                             num_classes=0, embed_layer=partial(OverlappingPatchEmbed, stride=stride),
                             **kwargs)


def _resize_grid(grid: Tensor, size: int, axis: int) -> Tensor:
    """AST's rule on one axis (2: frequency, 3: time) of a ``(1, D, F, T)`` position grid: a
    centred crop when the target is smaller, bilinear interpolation when larger."""
    current = grid.shape[axis]
    if size < current:
        return grid.narrow(axis, current // 2 - size // 2, size)
    if size > current:
        target = (grid.shape[2], size) if axis == 3 else (size, grid.shape[3])
        return nn.functional.interpolate(grid, size=target, mode="bilinear")
    return grid


def convert_ast_state_dict(
    checkpoint: Mapping[str, Any],
    *,
    grid: tuple[int, int],
    source_grid: Optional[tuple[int, int]] = None,
) -> ConvertedCheckpoint:
    """An AST checkpoint in the key names of :func:`ast_audio_vit`'s timm ViT.

    Keys ``module.v.<name>`` become ``<name>``; the AudioSet head (``mlp_head.*``) and the timm
    0.4.5 ImageNet heads inside ``v`` (``v.head.*``, ``v.head_dist.*``) are left out and listed
    in ``dropped``. The position embeddings (two prefix tokens, then the ``source_grid`` patches
    frequency-major) are adapted to ``grid`` as AST adapts them: time first (centred crop if
    fewer patches, bilinear interpolation if more), then frequency the same way.

    Args:
        checkpoint: the loaded file (a state dict, or ``{"state_dict"|"model": ...}``).
        grid: ``(frequency, time)`` patches of the target (``model.patch_embed.grid_size``).
        source_grid: the checkpoint's patches. Default: 12 in frequency (128 mel bins, as in
            AST's AudioSet model, ``(12, 101)``, and in the paper's EPIC-fine-tuned
            ``audio.pt``, ``(12, 12)``) and the rest of the table, after the class and
            distillation tokens, in time.

    Raises:
        ValueError: not AST key names, a key this function does not know, or a position
            embedding that does not hold ``source_grid`` patches.
    """
    state = unwrap_state_dict(checkpoint)
    if "v.pos_embed" not in state:
        raise CheckpointError("not an AST checkpoint: no key 'v.pos_embed' (expected AST's "
                              "'module.v.*' names)")
    unknown = sorted(k for k in state if not k.startswith(("v.", "mlp_head.")))
    if unknown:
        raise CheckpointError(f"AST checkpoint: unexpected key(s) {unknown[:5]}")
    dropped = tuple(sorted(k for k in state if k.startswith(("mlp_head.", "v.head.", "v.head_dist."))))
    out = {k.removeprefix("v."): v for k, v in state.items() if k not in dropped}
    pos = out["pos_embed"]
    inferred = source_grid is None
    if source_grid is None:
        frequency = AST_AUDIOSET_GRID[0]
        source_grid = (frequency, (pos.shape[1] - 2) // frequency if pos.dim() == 3 else 0)
    f0, t0 = source_grid
    prefix = pos.shape[1] - f0 * t0
    if prefix < 0 or pos.dim() != 3 or (inferred and prefix != 2):
        raise CheckpointError(f"AST checkpoint: pos_embed {tuple(pos.shape)} does not hold a "
                              f"{f0} x {t0} patch grid (pass source_grid=)")
    dim = pos.shape[2]
    patches = pos[:, prefix:].transpose(1, 2).reshape(1, dim, f0, t0)
    patches = _resize_grid(patches, grid[1], axis=3)
    patches = _resize_grid(patches, grid[0], axis=2)
    out["pos_embed"] = torch.cat([pos[:, :prefix], patches.flatten(2).transpose(1, 2)], dim=1)
    return ConvertedCheckpoint(out, dropped)


# ------------------------------------------------------------------------------ Video Swin

_SWIN_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_SWIN_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.(.+)$")
_SWIN_MLP = {"mlp.fc1.": "mlp.0.", "mlp.fc2.": "mlp.3."}
_SWIN_SAME = ("patch_embed.proj.", "patch_embed.norm.", "norm.")


def _swin_key(key: str) -> Optional[str]:
    """torchvision's name of one Video Swin trunk key, or None if it is not a trunk key."""
    if key.startswith(_SWIN_SAME):
        return key
    block = _SWIN_BLOCK.match(key)
    if block:
        stage, index, rest = block.groups()
        for old, new in _SWIN_MLP.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
        return f"features.{2 * int(stage)}.{index}.{rest}"
    downsample = _SWIN_DOWNSAMPLE.match(key)
    if downsample:
        stage, rest = downsample.groups()
        return f"features.{2 * int(stage) + 1}.{rest}"
    return None


def convert_video_swin_state_dict(checkpoint: Mapping[str, Any]) -> ConvertedCheckpoint:
    """A Video Swin or Omnivore Swin checkpoint in torchvision's ``swin3d_*`` key names.

    Accepted: Video Swin's mmaction checkpoints (``{"state_dict": {"backbone.*", "cls_head.*"}}``),
    Omnivore's (``{"trunk": {...}, "heads": {...}}``), a DataParallel-wrapped Omnivore model
    (``module.trunk.*``, ``module.heads.*``, as the paper's released ``rgb.pt``), or a bare trunk.
    Video Swin's Kinetics-400 classifier ``cls_head.fc_cls`` becomes torchvision's ``head``;
    Omnivore's heads and its depth-channel stem (``depth_patch_embed``, RGB-D only) are left out
    and listed in ``dropped``. The relative-position index buffers are passed through (they
    equal torchvision's for the same window).

    Raises:
        ValueError: a key that is neither a Swin trunk key nor a known head.
    """
    if isinstance(checkpoint.get("trunk"), Mapping):
        trunk = {k.removeprefix("module."): v for k, v in checkpoint["trunk"].items()}
        heads = checkpoint.get("heads")
        extra = tuple(f"heads.{k}" for k in heads) if isinstance(heads, Mapping) else ()
    else:
        trunk, extra = unwrap_state_dict(checkpoint), ()
    out: dict[str, Tensor] = {}
    dropped: list[str] = list(extra)
    unknown: list[str] = []
    for key, value in trunk.items():
        name = key
        for prefix in ("backbone.", "trunk."):
            name = name.removeprefix(prefix)
        if name.startswith("cls_head.fc_cls."):
            out["head." + name.removeprefix("cls_head.fc_cls.")] = value
            continue
        if name.startswith(("heads.", "cls_head.", "depth_patch_embed.", "patch_embed.var_proj.")):
            dropped.append(key)
            continue
        target = _swin_key(name)
        if target is None:
            unknown.append(key)
        else:
            out[target] = value
    if unknown:
        raise CheckpointError(f"Video Swin checkpoint: key(s) that are not Swin trunk keys: {sorted(unknown)[:5]}")
    return ConvertedCheckpoint(out, tuple(sorted(dropped)))


# ------------------------------------------------------------------ the paper's released model

RELEASED_MODALITIES: tuple[str, ...] = ("rgb", "audio")
"""The modalities of the authors' released EPIC-Kitchens model (its key prefixes ``rgb_`` and
``audio_``), named as in :mod:`umilayers.datasets.epic`."""

# (part of the released checkpoint, released key prefix, this library's key prefix); {m} stands for
# a modality, {i} for a layer. feature_reorganization.py's {m}_embedding (LayerNorm, Linear,
# LayerNorm) wraps the projection's token embedding; vit.py's {m}_embedding maps the reorganised
# features to the common width, its last LayerNorm being the model's feature norm. Released
# transformer layers: [PreNorm(Attention), PreNorm(FeedForward)] in the reorganisation,
# [PreNorm, Attention, PreNorm, FeedForward] in the ViT.
_RELEASED_RULES: tuple[tuple[str, str, str], ...] = (
    ("reorganization", "{m}_embedding.0.", "projections.{m}.norms.0."),
    ("reorganization", "{m}_embedding.1.", "projections.{m}.embed."),
    ("reorganization", "{m}_embedding.2.", "projections.{m}.norms.1."),
    ("reorganization", "{m}_pos_embedding", "projections.{m}.pos_embed"),
    ("reorganization", "{m}_transformer.layers.{i}.0.norm.", "projections.{m}.encoder.blocks.{i}.norm1."),
    ("reorganization", "{m}_transformer.layers.{i}.0.fn.to_qkv.", "projections.{m}.encoder.blocks.{i}.qkv."),
    ("reorganization", "{m}_transformer.layers.{i}.0.fn.to_out.0.", "projections.{m}.encoder.blocks.{i}.proj."),
    ("reorganization", "{m}_transformer.layers.{i}.1.norm.", "projections.{m}.encoder.blocks.{i}.norm2."),
    ("reorganization", "{m}_transformer.layers.{i}.1.fn.net.0.", "projections.{m}.encoder.blocks.{i}.mlp.0."),
    ("reorganization", "{m}_transformer.layers.{i}.1.fn.net.3.", "projections.{m}.encoder.blocks.{i}.mlp.2."),
    ("reorganization", "{m}_head.0.", "projections.{m}.norm."),
    ("reorganization", "{m}_head.1.", "projections.{m}.head."),
    ("model", "{m}_embedding.0.", "projections.{m}.norms.2."),
    ("model", "{m}_embedding.1.", "projections.{m}.proj."),
    ("model", "{m}_embedding.2.", "feature_norms.{m}."),
    ("model", "cls_token", "readout"),
    ("model", "pos_embedding", "positions"),
    ("model", "transformer.layers.{i}.0.norm.", "transformer.blocks.{i}.norm1."),
    ("model", "transformer.layers.{i}.1.to_qkv.", "transformer.blocks.{i}.qkv."),
    ("model", "transformer.layers.{i}.1.to_out.0.", "transformer.blocks.{i}.proj."),
    ("model", "transformer.layers.{i}.2.norm.", "transformer.blocks.{i}.norm2."),
    ("model", "transformer.layers.{i}.3.net.0.", "transformer.blocks.{i}.mlp.0."),
    ("model", "transformer.layers.{i}.3.net.3.", "transformer.blocks.{i}.mlp.2."),
    ("model", "mlp_head.", "head."),
    ("alignment", "base_vectors", "alignment.tokens"),
)
_RELEASED_PARTS = ("model", "reorganization", "alignment")


@lru_cache(maxsize=None)
def _template(prefix: str) -> re.Pattern:
    pattern = re.escape(prefix).replace(r"\{m\}", "(?P<m>rgb|audio)").replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(pattern + "(?P<rest>.*)$")


def _translate(key: str, parts: Optional[str] = None) -> Optional[tuple[str, str]]:
    """``(part, released key)`` of one of this library's keys (``parts`` None), or ``("", our
    key)`` of one released key of part ``parts``; None if no rule matches. A zero ``qkv.bias``
    has the released ``to_qkv.weight`` as its source (the released maps have no bias)."""
    for part, released, ours in _RELEASED_RULES:
        if parts is not None and part != parts:
            continue
        source, target = (released, ours) if parts is not None else (ours, released)
        match = _template(source).match(key)
        if match and (match["rest"] == "" or source.endswith(".")):
            fields = {k: v for k, v in match.groupdict().items() if k != "rest" and v is not None}
            rest = "weight" if parts is None and key.endswith("qkv.bias") else match["rest"]
            return ("" if parts is not None else part), target.format(**fields) + rest
    return None


def _released_parts(checkpoint: Mapping[str, Any]) -> dict[str, dict[str, Tensor]]:
    """The released state dicts by part (``model``, ``reorganization``, optional ``alignment``),
    ``module.`` (DataParallel) prefixes removed."""
    if not all(isinstance(checkpoint.get(k), Mapping) for k in ("model", "reorganization")):
        raise CheckpointError(f"released checkpoint: expected the state dicts 'model' (ViT) and 'reorganization' "
                              f"(ViTReorganization) as the released train.py saves them, got keys {sorted(checkpoint)}")
    return {part: {k.removeprefix("module."): v for k, v in checkpoint[part].items()}
            for part in _RELEASED_PARTS if isinstance(checkpoint.get(part), Mapping)}


def convert_released_state_dict(checkpoint: Mapping[str, Any]) -> ConvertedCheckpoint:
    """The authors' released EPIC-Kitchens model in :class:`~umilayers.model.UnseenModalityModel`'s names.

    ``checkpoint`` is what the released ``train.py`` saves (``{"model": ViT, "reorganization":
    ViTReorganization, "alignment": AlignmentModule, ...}``, DataParallel ``module.`` prefixes
    allowed), or the three modules' ``state_dict()`` in such a dict; ``alignment`` may be left
    out. The released bias-free query/key/value maps get zero biases; the ViT's ``cls_token``
    plus the first ``G`` rows of its ``pos_embedding`` (added on every call there) become
    ``readout``, the other rows ``positions``; the ``(1, n, D)`` tables lose their leading 1.
    :func:`load_released_model` builds the model and checks every shape.

    Raises:
        ValueError: not the released layout, or a key the released modules do not have.
    """
    parts = _released_parts(checkpoint)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for part, state in parts.items():
        for key, value in state.items():
            found = _translate(key, part)
            if found is None:
                unknown.append(f"{part}:{key}")
                continue
            name = found[1]
            if name.endswith(".qkv.weight"):
                out[name.removesuffix("weight") + "bias"] = value.new_zeros(value.shape[:1])
            out[name] = value[0] if value.dim() == 3 and value.shape[0] == 1 else value
    if unknown:
        raise CheckpointError(f"released checkpoint: key(s) the released modules do not have: {sorted(unknown)[:5]}")
    if "readout" not in out or "positions" not in out:
        raise CheckpointError("released checkpoint: 'model' needs both 'cls_token' and 'pos_embedding'")
    branches = out["readout"].shape[0]
    if out["positions"].shape[0] <= branches or out["positions"].shape[1:] != out["readout"].shape[1:]:
        raise CheckpointError(f"released checkpoint: model:pos_embedding {tuple(out['positions'].shape)} does not "
                              f"hold model:cls_token {tuple(out['readout'].shape)}'s rows and then the slots'")
    out["readout"] = out["readout"] + out["positions"][:branches]
    out["positions"] = out["positions"][branches:]
    return ConvertedCheckpoint(out)


def _released_config(parts: Mapping[str, Mapping[str, Tensor]], heads: int) -> dict[str, Any]:
    """:class:`~umilayers.model.UnseenModalityModel` arguments of the released computation, the
    sizes read from the released tensors (the head count is not in them: ``heads``)."""
    def shape(part: str, key: str, dims: int) -> tuple[int, ...]:
        value = parts[part].get(key)
        if value is None:
            raise CheckpointError(f"released checkpoint: {part}:{key} is missing")
        if value.dim() != dims:
            raise CheckpointError(f"released checkpoint: {part}:{key} has shape {tuple(value.shape)}, "
                                  f"expected {dims} dimensions")
        return tuple(value.shape)

    def depth(part: str, prefix: str) -> int:
        return len({k.split(".")[2] for k in parts[part] if k.startswith(prefix + ".layers.")})

    num_classes, dim = shape("model", "mlp_head.1.weight", 2)
    inner = shape("model", "transformer.layers.0.1.to_qkv.weight", 2)[0] // 3
    if inner % heads:
        raise InvalidArgument("heads", f"must divide the released attention width {inner}, got {heads}")
    return dict(
        modality_dims={m: shape("reorganization", f"{m}_embedding.0.weight", 1)[0] for m in RELEASED_MODALITIES},
        modality_tokens={m: shape("reorganization", f"{m}_pos_embedding", 3)[1] for m in RELEASED_MODALITIES},
        num_outputs=num_classes, dim=dim, heads=heads, head_dim=inner // heads,
        num_tokens=shape("reorganization", "rgb_head.1.weight", 2)[0],
        branches=shape("model", "cls_token", 3)[1],
        projection_depth=depth("reorganization", "rgb_transformer"), fusion_depth=depth("model", "transformer"),
        mlp_ratio=shape("model", "transformer.layers.0.3.net.0.weight", 2)[0] / dim,
        normalize="slots", positions="learned", projection_norms=True, feature_norm=True,
        use_alignment="alignment" in parts, align_weight=1e-3, align_reduction="elementwise_mean",
        pseudo_weight=3000.0, pseudo_reduction="elementwise_mean", label_smoothing=0.1,
    )


def load_released_model(
    checkpoint: Union[PathLike, Mapping[str, Any]], *, heads: int = 8, device: Optional[torch.device] = None
) -> UnseenModalityModel:
    """An :class:`~umilayers.model.UnseenModalityModel` that computes what the authors' released
    EPIC-Kitchens model computes, with its weights.

    The released ``train.py`` builds ``ViTReorganization`` (``feature_reorganization.py``) and
    ``ViT`` (``vit.py``) with ``dim=256, depth=6, heads=8, mlp_dim=512`` and 64-wide heads,
    learned positions for 784 RGB and 146 audio tokens of width 768, ``k* = 512`` slots, two
    branches and 3,806 classes; the sizes are read from the tensors (only ``heads`` is not in
    them). The model takes the released settings: the softmax over the slots
    (``normalize="slots"``), learned positions, the LayerNorms around the projection's linear
    maps (``projection_norms`` and ``feature_norm``), and for training the released loss: label
    smoothing 0.1, the KL and alignment terms as means over every element
    (``pseudo_reduction`` and ``align_reduction`` ``"elementwise_mean"``), alpha 3000, lambda
    0.001. Without ``alignment`` in the checkpoint the model has no alignment loss
    (``use_alignment=False``).

    Args:
        checkpoint: a path to a checkpoint the released ``train.py`` saved, or the loaded dict
            (see :func:`convert_released_state_dict`).
        heads: attention heads of both transformers (the released code's 8).
        device: device of the model.

    Raises:
        FileNotFoundError: ``checkpoint`` is a path that does not exist.
        ValueError: not the released layout, a missing key, or a tensor of the wrong shape (one
            line naming the released key, its shape and the expected one).

    Example::

        >>> model = load_released_model("checkpoints/best_multimodal1e-1.pt")  # doctest: +SKIP
    """
    check_positive_int("heads", heads)
    if not isinstance(checkpoint, Mapping):
        checkpoint = load_checkpoint(checkpoint)
    parts = _released_parts(checkpoint)
    model = UnseenModalityModel(**_released_config(parts, heads), device=device)
    converted = convert_released_state_dict(checkpoint).state_dict
    expected = model.state_dict()

    def source(key: str) -> str:
        found = _translate(key)
        return f"{found[0]}:{found[1]}" if found else key

    missing = sorted({source(k) for k in expected if k not in converted})
    if missing:
        raise CheckpointError(f"released checkpoint: {len(missing)} tensor(s) missing: {missing[:3]}")
    branches = expected["readout"].shape[0]
    for key, value in converted.items():
        got, want = tuple(value.shape), tuple(expected[key].shape)
        if got != want:
            if key in ("readout", "positions"):  # both come from the released (1, G + K, D) table
                got, want = (1, branches + got[0], *got[1:]), (1, branches + want[0], *want[1:])
            elif len(want) == 2 and key.endswith(("pos_embed", "tokens")):
                got, want = (1, *got), (1, *want)
            raise CheckpointError(f"released checkpoint: {source(key)} has shape {got}, expected {want}")
    model.load_state_dict(converted)
    return model
