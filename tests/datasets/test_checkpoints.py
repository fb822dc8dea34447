"""Checkpoint conversion: AST -> timm ViT, Video Swin / Omnivore Swin-T -> torchvision swin3d.

Each original network is written here again, small, in the original repositories' module names
(so its ``state_dict()`` has the original key names and shapes) and with the original forward:
AST's (``YuanGongND/ast``, ``ASTModel.forward``: overlapping patches, class and distillation
tokens, position embeddings, timm blocks, final norm) and Video Swin's
(``SwinTransformer/Video-Swin-Transformer``: 3D patch embedding, shifted-window attention with
a relative position bias and the shift mask, patch merging, final norm). Converted weights must
load into timm / torchvision with nothing missing and nothing left over, and give the same
tokens. A real-size test checks keys and shapes on the meta device.
"""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn

from tests.tolerances import tol
from umilayers.datasets import checkpoints as ckpt

timm = pytest.importorskip("timm", reason="the checkpoint converters need timm (umilayers[vision])")
torchvision = pytest.importorskip("torchvision",
                                  reason="the checkpoint converters need torchvision (umilayers[vision])")


# ------------------------------------------------------------------------------ AST reference

class _RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        return self.proj(rearrange(scores.softmax(-1) @ v, "b h n d -> b n (h d)"))


class _RefMlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class _RefViTBlock(nn.Module):
    """timm 0.4.5's Block, as AST uses it (pre-norm, LayerNorm eps 1e-6)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = _RefAttention(dim, heads), _RefMlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _RefAST(nn.Module):
    """AST: ``v`` is the DeiT-distilled timm model, ``mlp_head`` the AudioSet classifier."""

    def __init__(self, dim=32, depth=2, heads=2, fdim=36, tdim=96, stride=10, classes=7) -> None:
        super().__init__()
        f, t = (fdim - 16) // stride + 1, (tdim - 16) // stride + 1
        self.v = nn.Module()
        self.v.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.v.dist_token = nn.Parameter(torch.randn(1, 1, dim))
        self.v.pos_embed = nn.Parameter(torch.randn(1, 2 + f * t, dim))
        self.v.patch_embed = nn.Module()
        self.v.patch_embed.proj = nn.Conv2d(1, dim, 16, stride=stride)
        self.v.blocks = nn.ModuleList(_RefViTBlock(dim, heads) for _ in range(depth))
        self.v.norm = nn.LayerNorm(dim, eps=1e-6)
        self.v.head, self.v.head_dist = nn.Linear(dim, 10), nn.Linear(dim, 10)  # unused (timm 0.4.5)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))
        for p in self.parameters():  # non-trivial norms and biases too
            nn.init.normal_(p, std=0.3)

    def tokens(self, fbank):
        """``ASTModel.forward`` up to the final norm; fbank (B, T, F) as AST takes it."""
        x = fbank.unsqueeze(1).transpose(2, 3)
        x = self.v.patch_embed.proj(x).flatten(2).transpose(1, 2)
        prefix = torch.cat([self.v.cls_token, self.v.dist_token], 1).expand(len(x), -1, -1)
        x = torch.cat([prefix, x], 1) + self.v.pos_embed
        for block in self.v.blocks:
            x = block(x)
        return self.v.norm(x)


def _ast_checkpoint(ref: nn.Module) -> dict:
    """As AST saves it: a DataParallel model's state dict."""
    return {"module." + k: v.detach().clone() for k, v in ref.state_dict().items()}


def test_ast_checkpoint_loads_into_timm_and_gives_the_same_tokens():
    torch.manual_seed(0)
    ref = _RefAST().eval()
    model = ckpt.ast_audio_vit("deit_tiny_distilled_patch16_224", mel_bins=36, frames=96,
                               embed_dim=32, depth=2, num_heads=2).eval()
    assert model.patch_embed.grid_size == (3, 9)
    checkpoint = _ast_checkpoint(ref)
    assert ckpt.checkpoint_format(checkpoint) == "ast"
    converted = ckpt.convert_ast_state_dict(checkpoint, grid=(3, 9), source_grid=(3, 9))
    result = model.load_state_dict(converted.state_dict, strict=True)  # every tensor lands
    assert not result.missing_keys and not result.unexpected_keys
    assert converted.dropped == ("mlp_head.0.bias", "mlp_head.0.weight", "mlp_head.1.bias",
                                 "mlp_head.1.weight", "v.head.bias", "v.head.weight",
                                 "v.head_dist.bias", "v.head_dist.weight")
    fbank = torch.randn(2, 96, 36)
    with torch.no_grad():
        expected = ref.tokens(fbank)
        actual = model.forward_features(fbank.unsqueeze(1).transpose(2, 3))
    torch.testing.assert_close(actual, expected, **tol(torch.float32))


def test_ast_position_embeddings_follow_asts_rule():
    """AST fine-tunes its AudioSet model (12 x 101 patches) at another length by cutting the
    time axis at 50 - t // 2 (fewer patches) or bilinear interpolation (more); then frequency at
    6 - f // 2."""
    torch.manual_seed(0)
    pos = torch.randn(1, 2 + 12 * 101, 8)
    state = {"module.v.pos_embed": pos}
    grid = pos[:, 2:].transpose(1, 2).reshape(1, 8, 12, 101)

    def adapted(f, t):
        out = ckpt.convert_ast_state_dict(state, grid=(f, t)).state_dict["pos_embed"]
        assert out.shape == (1, 2 + f * t, 8)
        torch.testing.assert_close(out[:, :2], pos[:, :2])
        return out[:, 2:].transpose(1, 2).reshape(1, 8, f, t)

    torch.testing.assert_close(adapted(12, 12), grid[..., 50 - 6:50 - 6 + 12])  # the paper's 128 frames
    torch.testing.assert_close(adapted(12, 101), grid)
    longer = nn.functional.interpolate(grid, size=(12, 150), mode="bilinear")
    torch.testing.assert_close(adapted(12, 150), longer)
    torch.testing.assert_close(adapted(5, 12), grid[:, :, 6 - 2:6 - 2 + 5, 50 - 6:50 - 6 + 12])
    with pytest.raises(ValueError, match="12 x 130 patch grid"):
        ckpt.convert_ast_state_dict(state, grid=(12, 12), source_grid=(12, 130))
    with pytest.raises(ValueError, match="not an AST checkpoint"):
        ckpt.convert_ast_state_dict({"pos_embed": pos}, grid=(12, 12))


def _ast_real_shapes() -> dict[str, tuple[int, ...]]:
    """AST's AudioSet checkpoint (``audioset_10_10_0.4593.pth``): DeiT-B/16 distilled, 12 blocks
    of width 768, 12 x 101 patches, 527 AudioSet classes; timm 0.4.5 keeps its ImageNet heads."""
    d = 768
    shapes = {"v.cls_token": (1, 1, d), "v.dist_token": (1, 1, d), "v.pos_embed": (1, 2 + 12 * 101, d),
              "v.patch_embed.proj.weight": (d, 1, 16, 16), "v.patch_embed.proj.bias": (d,),
              "v.norm.weight": (d,), "v.norm.bias": (d,), "v.head.weight": (1000, d),
              "v.head.bias": (1000,), "v.head_dist.weight": (1000, d), "v.head_dist.bias": (1000,),
              "mlp_head.0.weight": (d,), "mlp_head.0.bias": (d,), "mlp_head.1.weight": (527, d),
              "mlp_head.1.bias": (527,)}
    for i in range(12):
        block = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d),
                 "attn.qkv.bias": (3 * d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
                 "norm2.weight": (d,), "norm2.bias": (d,), "mlp.fc1.weight": (4 * d, d),
                 "mlp.fc1.bias": (4 * d,), "mlp.fc2.weight": (d, 4 * d), "mlp.fc2.bias": (d,)}
        shapes.update({f"v.blocks.{i}.{k}": v for k, v in block.items()})
    return shapes


def test_ast_fine_tuned_audio_pt_grid_is_read_from_its_table():
    """The paper's EPIC-fine-tuned ``audio.pt`` (AST at 128 mel bins x 128 frames: 12 x 12
    patches, 146 tokens) loads without a source_grid, and its 3,806-class head is left out."""
    torch.manual_seed(0)
    pos = torch.randn(1, 2 + 12 * 12, 8)
    head = {"module.mlp_head.1.weight": torch.zeros(3806, 8), "module.mlp_head.1.bias": torch.zeros(3806)}
    converted = ckpt.convert_ast_state_dict({"model": {"module.v.pos_embed": pos, **head}}, grid=(12, 12))
    torch.testing.assert_close(converted.state_dict["pos_embed"], pos)
    assert converted.dropped == ("mlp_head.1.bias", "mlp_head.1.weight")
    with pytest.raises(ValueError, match=r"does not hold a 12 x 12 patch grid \(pass source_grid=\)"):
        ckpt.convert_ast_state_dict({"module.v.pos_embed": torch.randn(1, 2 + 12 * 12 + 5, 8)}, grid=(12, 12))


def test_ast_audioset_keys_and_shapes_at_real_size():
    checkpoint = {"module." + k: torch.empty(s, device="meta") for k, s in _ast_real_shapes().items()}
    with torch.device("meta"):
        model = ckpt.ast_audio_vit()  # the extractor's default: 128 mel bins x 128 frames
    converted = ckpt.convert_ast_state_dict(checkpoint, grid=model.patch_embed.grid_size)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.state_dict.items()} == expected
    assert expected["pos_embed"] == (1, 2 + 12 * 12, 768)  # the released features' 146 tokens


# ----------------------------------------------------------------------- Video Swin reference

def _window_partition(x, window):
    """(B, D, H, W, C) -> (B * windows, Wd * Wh * Ww, C)."""
    return rearrange(x, "b (d wd) (h wh) (w ww) c -> (b d h w) (wd wh ww) c",
                     wd=window[0], wh=window[1], ww=window[2])


def _window_reverse(windows, window, b, d, h, w):
    return rearrange(windows, "(b d h w) (wd wh ww) c -> b (d wd) (h wh) (w ww) c", b=b,
                     d=d // window[0], h=h // window[1], w=w // window[2], wd=window[0], wh=window[1])


def _window_and_shift(size, window, shift):
    """Video Swin's ``get_window_size``: a dimension no larger than the window is one window, unshifted."""
    window, shift = list(window), list(shift)
    for i in range(3):
        if size[i] <= window[i]:
            window[i], shift[i] = size[i], 0
    return tuple(window), tuple(shift)


def _shift_mask(size, window, shift):
    """Video Swin's ``compute_mask``: -100 between tokens of different regions after the roll."""
    regions = torch.zeros(1, *size, 1)
    count = 0
    bounds = [(slice(-window[i]), slice(-window[i], -shift[i]), slice(-shift[i], None)) for i in range(3)]
    for d in bounds[0]:
        for h in bounds[1]:
            for w in bounds[2]:
                regions[:, d, h, w, :] = count
                count += 1
    ids = _window_partition(regions, window).squeeze(-1)
    mask = ids[:, None, :] - ids[:, :, None]
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def _relative_position_index(window):
    coords = torch.stack(torch.meshgrid(*[torch.arange(w) for w in window], indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel = rel + torch.tensor([w - 1 for w in window])
    return (rel[..., 0] * (2 * window[1] - 1) * (2 * window[2] - 1)
            + rel[..., 1] * (2 * window[2] - 1) + rel[..., 2])


class _RefWindowAttention(_RefAttention):
    def __init__(self, dim, heads, window) -> None:
        super().__init__(dim, heads)
        size = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.randn(size, heads))
        self.register_buffer("relative_position_index", _relative_position_index(window))

    def forward(self, x, mask=None):
        n = x.shape[1]
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].reshape(n, n, -1).permute(2, 0, 1)[None]
        if mask is not None:  # (windows, N, N), repeated over the batch
            bias = bias + mask[:, None].repeat(x.shape[0] // mask.shape[0], 1, 1, 1)
        return super().forward(x, bias)


class _RefSwinBlock(nn.Module):
    def __init__(self, dim, heads, window, shift) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = _RefWindowAttention(dim, heads, window), _RefMlp(dim)

    def forward(self, x):
        b, d, h, w, c = x.shape
        window, shift = _window_and_shift((d, h, w), self.window, self.shift)
        y = self.norm1(x)
        pad = [(-s) % ws for s, ws in zip((d, h, w), window)]
        y = nn.functional.pad(y, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        padded = y.shape[1:4]
        mask = None
        if any(shift):
            y = torch.roll(y, shifts=[-s for s in shift], dims=(1, 2, 3))
            mask = _shift_mask(padded, window, shift)
        y = _window_reverse(self.attn(_window_partition(y, window), mask), window, b, *padded)
        if any(shift):
            y = torch.roll(y, shifts=list(shift), dims=(1, 2, 3))
        x = x + y[:, :d, :h, :w]
        return x + self.mlp(self.norm2(x))


class _RefMerging(nn.Module):
    def __init__(self, dim) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x):
        h, w = x.shape[2:4]
        x = nn.functional.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class _RefStage(nn.Module):
    def __init__(self, dim, depth, heads, window, downsample) -> None:
        super().__init__()
        shift = tuple(w // 2 for w in window)
        self.blocks = nn.ModuleList(_RefSwinBlock(dim, heads, window, (0, 0, 0) if i % 2 == 0 else shift)
                                    for i in range(depth))
        self.downsample = _RefMerging(dim) if downsample else None

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class _RefPatchEmbed(nn.Module):
    def __init__(self, patch, dim) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, video):  # (B, 3, T, H, W) -> (B, D, H, W, C)
        pad = [(-s) % p for s, p in zip(video.shape[2:], self.patch)]
        video = nn.functional.pad(video, (0, pad[2], 0, pad[1], 0, pad[0]))
        return self.norm(rearrange(self.proj(video), "b c d h w -> b d h w c"))


class _RefVideoSwin(nn.Module):
    """Video Swin's ``SwinTransformer3D`` trunk (also Omnivore's), module names as published."""

    def __init__(self, dim=8, depths=(2, 2), heads=(1, 2), window=(2, 3, 3), patch=(2, 4, 4)) -> None:
        super().__init__()
        self.patch_embed = _RefPatchEmbed(patch, dim)
        self.layers = nn.ModuleList(
            _RefStage(dim * 2 ** i, depth, heads[i], window, downsample=i < len(depths) - 1)
            for i, depth in enumerate(depths))
        self.norm = nn.LayerNorm(dim * 2 ** (len(depths) - 1))
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(std=0.3)

    def forward(self, video):
        x = self.patch_embed(video)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


def _torchvision_swin(**kwargs):
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    options = dict(patch_size=[2, 4, 4], embed_dim=8, depths=[2, 2], num_heads=[1, 2],
                   window_size=[2, 3, 3], num_classes=5)
    options.update(kwargs)
    return SwinTransformer3d(**options).eval()


def _tokens(model, video):
    return model.norm(model.features(model.patch_embed(video)))


@pytest.mark.parametrize("frames, side", [(8, 48), (6, 40)], ids=["windows-divide", "padded"])
def test_video_swin_checkpoint_loads_into_torchvision_and_gives_the_same_tokens(frames, side):
    torch.manual_seed(0)
    ref = _RefVideoSwin().eval()
    head = nn.Linear(16, 5)
    checkpoint = {"meta": {"epoch": 30}, "state_dict": {
        **{"backbone." + k: v for k, v in ref.state_dict().items()},
        "cls_head.fc_cls.weight": head.weight.detach(), "cls_head.fc_cls.bias": head.bias.detach()}}
    assert ckpt.checkpoint_format(checkpoint) == "video-swin"
    converted = ckpt.convert_video_swin_state_dict(checkpoint)
    model = _torchvision_swin()
    result = model.load_state_dict(converted.state_dict, strict=True)  # every tensor lands
    assert not result.missing_keys and not result.unexpected_keys and converted.dropped == ()
    video = torch.randn(2, 3, frames, side, side)
    with torch.no_grad():
        torch.testing.assert_close(_tokens(model, video), ref(video), **tol(torch.float32))
    torch.testing.assert_close(model.head.weight, head.weight)
    # the index buffers passed through are torchvision's own for the window
    fresh = _torchvision_swin().state_dict()
    for key, value in converted.state_dict.items():
        if key.endswith("relative_position_index"):
            assert torch.equal(value, fresh[key]), key


def test_omnivore_checkpoints_load_the_same_trunk():
    torch.manual_seed(1)
    ref = _RefVideoSwin().eval()
    trunk = {k: v for k, v in ref.state_dict().items()}
    trunk["depth_patch_embed.proj.weight"] = torch.randn(8, 1, 2, 4, 4)  # Omnivore's RGB-D stem
    trunk["depth_patch_embed.norm.weight"] = torch.randn(8)
    hub = {"trunk": trunk, "heads": {"image.weight": torch.randn(10, 16), "video.1.weight": torch.randn(5, 16)}}
    released = {"state_dict": {**{"module.trunk." + k: v for k, v in trunk.items()},
                               "module.heads.1.weight": torch.randn(3806, 16)}}  # the paper's rgb.pt
    video = torch.randn(1, 3, 8, 48, 48)
    for checkpoint in (hub, released):
        assert ckpt.checkpoint_format(checkpoint) == "omnivore"
        converted = ckpt.convert_video_swin_state_dict(checkpoint)
        assert all("depth_patch_embed" in k or "heads" in k for k in converted.dropped)
        assert len(converted.dropped) == (4 if checkpoint is hub else 3)
        model = _torchvision_swin()
        missing, unexpected = model.load_state_dict(converted.state_dict, strict=False)
        assert missing == ["head.weight", "head.bias"] and unexpected == []
        with torch.no_grad():
            torch.testing.assert_close(_tokens(model, video), ref(video), **tol(torch.float32))
    with pytest.raises(ValueError, match="not Swin trunk keys"):
        ckpt.convert_video_swin_state_dict({"backbone.pos_embed": torch.zeros(1)})


def test_video_swin_t_keys_and_shapes_at_real_size():
    """Video Swin-T / Omnivore Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 8x7x7,
    patch 2x4x4, Kinetics-400 head) against torchvision's ``swin3d_t``, on the meta device."""
    with torch.device("meta"):
        ref = _RefVideoSwin(96, (2, 2, 6, 2), (3, 6, 12, 24), (8, 7, 7))
        target = torchvision.models.video.swin3d_t(weights=None)
    checkpoint = {"state_dict": {**{"backbone." + k: v for k, v in ref.state_dict().items()},
                                 "cls_head.fc_cls.weight": torch.empty(400, 768, device="meta"),
                                 "cls_head.fc_cls.bias": torch.empty(400, device="meta")}}
    converted = ckpt.convert_video_swin_state_dict(checkpoint).state_dict
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in target.state_dict().items()}
    # and the relative position index of the 8 x 7 x 7 window is torchvision's
    from torchvision.models.video.swin_transformer import ShiftedWindowAttention3d

    attention = ShiftedWindowAttention3d(96, [8, 7, 7], [0, 0, 0], 3)
    assert torch.equal(attention.relative_position_index.reshape(392, 392), _relative_position_index((8, 7, 7)))


def test_load_checkpoint_reads_local_files_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="expected a dict"):
        ckpt.load_checkpoint(tmp_path / "list.pth")
    torch.save({"model": {"module.norm.weight": torch.ones(2)}}, tmp_path / "wrapped.pth")
    loaded = ckpt.load_checkpoint(tmp_path / "wrapped.pth")
    assert list(ckpt.unwrap_state_dict(loaded)) == ["norm.weight"]
    assert ckpt.checkpoint_format(loaded) == "native"


# --------------------------------------------------------------------- the paper's released model

def _released_checkpoint(dim=8, inner=16, hidden=16, depth=2, classes=5, slots=4, branches=2, width=12,
                         tokens=(("rgb", 6), ("audio", 3))):
    """What the released train.py saves, small: ``{"model": ViT, "reorganization":
    ViTReorganization, "alignment": AlignmentModule, "epoch": ...}``, DataParallel prefixes and
    all. The key names and shapes are those of the released vit.py and
    feature_reorganization.py, written out here independently of the converter's rules."""
    g = torch.Generator().manual_seed(0)

    def ln(prefix, n):
        return {f"{prefix}.weight": torch.randn(n, generator=g), f"{prefix}.bias": torch.randn(n, generator=g)}

    def linear(prefix, n_in, n_out, bias=True):
        out = {f"{prefix}.weight": torch.randn(n_out, n_in, generator=g)}
        return {**out, f"{prefix}.bias": torch.randn(n_out, generator=g)} if bias else out

    def layer(prefix, attention, feed_forward, norms):
        return {**ln(f"{prefix}.{norms[0]}", dim), **linear(f"{prefix}.{attention}to_qkv", dim, 3 * inner, bias=False),
                **linear(f"{prefix}.{attention}to_out.0", inner, dim), **ln(f"{prefix}.{norms[1]}", dim),
                **linear(f"{prefix}.{feed_forward}net.0", dim, hidden),
                **linear(f"{prefix}.{feed_forward}net.3", hidden, dim)}

    reorg, vit = {}, {}
    for m, n in tokens:
        for part in (reorg, vit):
            part.update({**ln(f"{m}_embedding.0", width), **linear(f"{m}_embedding.1", width, dim),
                         **ln(f"{m}_embedding.2", dim)})
        reorg[f"{m}_pos_embedding"] = torch.randn(1, n, dim, generator=g)
        for i in range(depth):  # [PreNorm(Attention), PreNorm(FeedForward)]
            reorg.update(layer(f"{m}_transformer.layers.{i}", "0.fn.", "1.fn.", ("0.norm", "1.norm")))
        reorg.update({**ln(f"{m}_head.0", dim), **linear(f"{m}_head.1", dim, slots)})
    vit["pos_embedding"] = torch.randn(1, branches + slots, dim, generator=g)
    vit["cls_token"] = torch.randn(1, branches, dim, generator=g)
    for i in range(depth):  # [PreNorm, Attention, PreNorm, FeedForward]
        vit.update(layer(f"transformer.layers.{i}", "1.", "3.", ("0.norm", "2.norm")))
    vit.update({**ln("mlp_head.0", dim), **linear("mlp_head.1", dim, classes)})
    alignment = {"base_vectors": torch.randn(1, classes, dim, generator=g)}
    parts = {"model": vit, "reorganization": reorg, "alignment": alignment}
    return {**{k: {"module." + n: v for n, v in part.items()} for k, part in parts.items()}, "epoch": 3}


def test_released_checkpoint_lands_tensor_by_tensor():
    checkpoint = _released_checkpoint()
    vit, reorg = ({k.removeprefix("module."): v for k, v in checkpoint[p].items()} for p in ("model", "reorganization"))
    model = ckpt.load_released_model(checkpoint, heads=2)
    cfg = model.config
    assert (cfg.dim, cfg.num_tokens, cfg.branches, cfg.heads, cfg.head_dim, cfg.mlp_ratio) == (8, 4, 2, 2, 8, 2.0)
    assert (cfg.projection_depth, cfg.fusion_depth, cfg.num_outputs) == (2, 2, 5)
    assert cfg.modality_dims == {"audio": 12, "rgb": 12} and cfg.modality_tokens == {"audio": 3, "rgb": 6}
    assert (cfg.normalize, cfg.positions, cfg.projection_norms, cfg.feature_norm) == ("slots", "learned", True, True)
    assert (cfg.align_reduction, cfg.pseudo_reduction, cfg.label_smoothing) == (
        "elementwise_mean", "elementwise_mean", 0.1)
    state = model.state_dict()
    pairs = {  # a sample of each rule: this library's key -> the released tensor
        "projections.rgb.norms.0.weight": reorg["rgb_embedding.0.weight"],
        "projections.rgb.embed.weight": reorg["rgb_embedding.1.weight"],
        "projections.audio.norms.1.bias": reorg["audio_embedding.2.bias"],
        "projections.audio.pos_embed": reorg["audio_pos_embedding"][0],
        "projections.rgb.encoder.blocks.1.qkv.weight": reorg["rgb_transformer.layers.1.0.fn.to_qkv.weight"],
        "projections.rgb.encoder.blocks.0.mlp.2.bias": reorg["rgb_transformer.layers.0.1.fn.net.3.bias"],
        "projections.audio.encoder.blocks.1.norm2.weight": reorg["audio_transformer.layers.1.1.norm.weight"],
        "projections.rgb.norm.bias": reorg["rgb_head.0.bias"],
        "projections.audio.head.weight": reorg["audio_head.1.weight"],
        "projections.rgb.norms.2.weight": vit["rgb_embedding.0.weight"],
        "projections.audio.proj.weight": vit["audio_embedding.1.weight"],
        "feature_norms.rgb.bias": vit["rgb_embedding.2.bias"],
        "transformer.blocks.0.norm1.weight": vit["transformer.layers.0.0.norm.weight"],
        "transformer.blocks.1.proj.bias": vit["transformer.layers.1.1.to_out.0.bias"],
        "transformer.blocks.1.norm2.bias": vit["transformer.layers.1.2.norm.bias"],
        "transformer.blocks.0.mlp.0.weight": vit["transformer.layers.0.3.net.0.weight"],
        "head.1.weight": vit["mlp_head.1.weight"],
        "alignment.tokens": checkpoint["alignment"]["module.base_vectors"][0],
        "readout": vit["cls_token"][0] + vit["pos_embedding"][0, :2],  # train.py adds them per call
        "positions": vit["pos_embedding"][0, 2:],
    }
    for key, value in pairs.items():
        assert torch.equal(state[key], value), key
    assert not any(state[k].any() for k in state if k.endswith("qkv.bias"))  # the released maps have none
    converted = ckpt.convert_released_state_dict(checkpoint)
    assert set(converted.state_dict) == set(state) and converted.dropped == ()


def test_released_checkpoint_without_alignment_has_no_alignment_loss():
    checkpoint = _released_checkpoint()
    del checkpoint["alignment"]
    assert ckpt.load_released_model(checkpoint, heads=2).alignment is None


@pytest.mark.parametrize("change, message", [
    (lambda c: c["reorganization"].pop("module.audio_head.1.bias"),
     r"^released checkpoint: 1 tensor\(s\) missing: \['reorganization:audio_head.1.bias'\]$"),
    (lambda c: c["model"].update({"module.transformer.layers.1.3.net.0.weight": torch.zeros(16, 7)}),
     r"^released checkpoint: model:transformer.layers.1.3.net.0.weight has shape \(16, 7\), expected \(16, 8\)$"),
    (lambda c: c["reorganization"].update({"module.rgb_pos_embedding": torch.zeros(1, 6, 9)}),
     r"^released checkpoint: reorganization:rgb_pos_embedding has shape \(1, 6, 9\), expected \(1, 6, 8\)$"),
    (lambda c: c["model"].update({"module.pos_embedding": torch.zeros(1, 7, 8)}),
     r"^released checkpoint: model:pos_embedding has shape \(1, 7, 8\), expected \(1, 6, 8\)$"),
    (lambda c: c["model"].pop("module.mlp_head.1.weight"),
     r"^released checkpoint: model:mlp_head.1.weight is missing$"),
    (lambda c: c["model"].update({"module.extra.weight": torch.zeros(1)}),
     r"^released checkpoint: key\(s\) the released modules do not have: \['model:extra.weight'\]$"),
    (lambda c: c.pop("reorganization"), r"^released checkpoint: expected the state dicts 'model' \(ViT\)"),
])
def test_released_checkpoint_errors_name_the_key(change, message):
    checkpoint = _released_checkpoint()
    change(checkpoint)
    with pytest.raises(ValueError, match=message):
        ckpt.load_released_model(checkpoint, heads=2)


def test_released_checkpoint_loads_from_a_file(tmp_path):
    torch.save(_released_checkpoint(), tmp_path / "best_multimodal.pt")
    model = ckpt.load_released_model(tmp_path / "best_multimodal.pt", heads=2)
    out = model.eval()({"rgb": torch.randn(2, 6, 12), "audio": torch.randn(2, 3, 12)})
    assert out.branch_outputs.shape == (2, 2, 5)
    with pytest.raises(ValueError, match="heads: must divide the released attention width 16, got 3"):
        ckpt.load_released_model(tmp_path / "best_multimodal.pt", heads=3)
