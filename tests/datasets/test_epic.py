"""EPIC-Kitchens-100 adapter: annotations, splits, missing inputs, extraction end to end.

The fixture writes a tiny copy of the real layout into ``tmp_path``: annotation CSVs in the
release's exact format (list columns quoted as the csv module writes them), RGB frames, u/v
flow frames at half the RGB frame rate, and wavs (one per video, one per clip).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
import wave
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from umilayers.datasets import epic

ROOT = Path(__file__).resolve().parents[2]
HEADER = list(epic.REQUIRED_COLUMNS)
PARTICIPANTS = ["P01", "P02", "P03", "P04", "P05", "P06", "P07"]
FPS = 60
# (verb, verb_class, noun, noun_class, all_nouns) cycling over the clips
LABELS = [
    ("open", 3, "door", 3, ["door"]),
    ("put-in", 5, "rubbish", 54, ["rubbish", "bin"]),
    ("take", 0, "plate", 2, ["plate"]),
    ("open", 3, "fridge", 12, ["fridge"]),
]


def _timestamp(seconds: float, decimals: int) -> str:
    minutes, sec = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours:02d}:{minutes:02d}:{sec:0{3 + decimals}.{decimals}f}"


def _rows(participants, clips_per_participant=3):
    rows = []
    for p_index, participant in enumerate(participants):
        video = f"{participant}_01"
        for i in range(clips_per_participant + (p_index % 2)):  # unequal participant sizes
            start, stop = 1 + 12 * i, 10 + 12 * i
            verb, verb_class, noun, noun_class, nouns = LABELS[(p_index + i) % len(LABELS)]
            all_classes = [noun_class] + ([36] if len(nouns) > 1 else [])
            rows.append({
                "narration_id": f"{video}_{i}", "participant_id": participant, "video_id": video,
                "narration_timestamp": _timestamp(stop / FPS + 0.05, 3),
                "start_timestamp": _timestamp(start / FPS, 2),
                "stop_timestamp": _timestamp(stop / FPS, 2),
                "start_frame": start, "stop_frame": stop,
                "narration": f"{verb} {noun}", "verb": verb, "verb_class": verb_class,
                "noun": noun, "noun_class": noun_class,
                "all_nouns": str(nouns), "all_noun_classes": str(all_classes),
            })
    return rows


def _write_csv(path: Path, rows, header=HEADER):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_wav(path: Path, seconds: float, rate: int = 8000):
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.tobytes())


@pytest.fixture(scope="module")
def epic_data(tmp_path_factory):
    Image = pytest.importorskip("PIL.Image", reason="the frames are written with pillow (umilayers[datasets])")

    base = tmp_path_factory.mktemp("epic")
    annotations = base / "annotations"
    annotations.mkdir()
    rows = _rows(PARTICIPANTS)
    train_rows = [r for r in rows if r["participant_id"] != "P07"]
    _write_csv(annotations / "EPIC_100_train.csv", train_rows)
    _write_csv(annotations / "EPIC_100_validation.csv", [r for r in rows if r["participant_id"] == "P07"])
    frames, audio = base / "frames", base / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    last_frame = max(r["stop_frame"] for r in rows)
    for participant in PARTICIPANTS:
        video = f"{participant}_01"
        rgb = frames / participant / "rgb_frames" / video
        rgb.mkdir(parents=True)
        for i in range(1, last_frame + 1):
            pixels = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(rgb / f"frame_{i:010d}.jpg")
        for axis in ("u", "v"):
            flow = frames / participant / "flow_frames" / video / axis
            flow.mkdir(parents=True)
            for i in range(1, last_frame // 2 + 1):
                pixels = rng.integers(0, 255, (24, 32), dtype=np.uint8)
                Image.fromarray(pixels).save(flow / f"frame_{i:010d}.jpg")
        _write_wav(audio / f"{video}.wav", last_frame / FPS + 0.5)
    _write_wav(audio / "P01_01_0.wav", 0.3)  # a per-clip wav takes precedence over the video's
    return {"annotations": annotations, "frames": frames, "audio": audio, "rows": rows}


def _needs(*modalities: str) -> None:
    """Skip, saying why, when a package an extractor of ``modalities`` needs is not installed
    (the ``[test]`` extra leaves out the large ``vision`` and ``audio`` extras)."""
    packages = {"rgb": [("torchvision", "vision")], "flow": [("torchvision", "vision")],
                "audio": [("timm", "vision"), ("torchaudio", "audio")]}
    for modality in modalities:
        for module, extra in packages[modality]:
            pytest.importorskip(module, reason=f"the {modality} extractor needs {module} (umilayers[{extra}])")


def _config(**kwargs):
    options = dict(frames=2, image_size=32, audio_frames=32, audio_arch="vit_tiny_patch16_224",
                   audio_stride=16, batch_size=4, weights={m: "random" for m in epic.MODALITIES})
    options.update(kwargs)
    return epic.ExtractionConfig(**options)


# ------------------------------------------------------------------------------ annotations

def test_read_annotations_real_format(epic_data):
    clips = epic.read_annotations(epic_data["annotations"] / "EPIC_100_train.csv")
    assert len(clips) == len([r for r in epic_data["rows"] if r["participant_id"] != "P07"])
    first = clips[0]
    assert (first.narration_id, first.participant_id, first.video_id) == ("P01_01_0", "P01", "P01_01")
    assert first.start_frame == 1 and first.stop_frame == 10
    assert first.start_timestamp == pytest.approx(1 / FPS, abs=0.005)
    assert (first.verb_class, first.noun_class, first.all_noun_classes) == (3, 3, (3,))
    two_nouns = next(c for c in clips if c.noun == "rubbish")
    assert two_nouns.all_noun_classes == (54, 36)
    # the quoted list column is really quoted in the file, as in the release
    assert "\"['rubbish', 'bin']\"" in (epic_data["annotations"] / "EPIC_100_train.csv").read_text()
    assert len(epic.load_annotations(epic_data["annotations"])) == len(epic_data["rows"])


def test_timestamps_with_two_or_three_decimals():
    assert epic.parse_timestamp("00:00:01.089") == pytest.approx(1.089)
    assert epic.parse_timestamp("01:02:03.50") == pytest.approx(3723.5)
    with pytest.raises(ValueError, match="HH:MM:SS"):
        epic.parse_timestamp("1.5")


def test_missing_columns_named(tmp_path):
    header = [c for c in HEADER if c not in ("verb_class", "stop_frame")]
    path = tmp_path / "EPIC_100_train.csv"
    _write_csv(path, _rows(["P01"]), header=header)
    with pytest.raises(ValueError) as err:
        epic.read_annotations(path)
    assert str(path) in str(err.value)
    assert "stop_frame, verb_class" in str(err.value)


def test_bad_value_names_file_and_line(tmp_path):
    rows = _rows(["P01"])
    rows[1]["start_frame"] = "ten"
    path = tmp_path / "EPIC_100_train.csv"
    _write_csv(path, rows)
    with pytest.raises(ValueError, match=r"line 3 \(P01_01_1\)"):
        epic.read_annotations(path)


def test_action_vocabulary_sorted_pairs_and_verb_noun_scores(epic_data):
    clips = epic.load_annotations(epic_data["annotations"])
    vocab = epic.ActionVocabulary.from_clips(clips)
    assert vocab.pairs.tolist() == [list(p) for p in sorted({(c.verb_class, c.noun_class) for c in clips})]
    assert vocab.pairs.tolist() == [[0, 2], [3, 3], [3, 12], [5, 54]]
    shuffled = epic.ActionVocabulary.from_clips(list(reversed(clips)))
    assert shuffled.pairs.tolist() == vocab.pairs.tolist()
    targets = vocab.targets(clips)
    verbs, nouns = vocab.verb_noun(targets)
    assert verbs.tolist() == [c.verb_class for c in clips]
    assert nouns.tolist() == [c.noun_class for c in clips]
    # (3, 3) open door predicted as (3, 12) open fridge: right verb, wrong noun
    scores = epic.verb_noun_accuracy(np.array([vocab.action_id(3, 12)]),
                                     np.array([vocab.action_id(3, 3)]), vocab)
    assert scores == {"action_top1": 0.0, "verb_top1": 1.0, "noun_top1": 0.0}
    with pytest.raises(KeyError, match="not in the vocabulary"):
        vocab.action_id(99, 99)


# ------------------------------------------------------------------------------ splits

@pytest.mark.parametrize("setting", list(epic.SETTINGS))
def test_splits_disjoint_participants_and_modalities(epic_data, setting):
    clips = epic.load_annotations(epic_data["annotations"])
    splits = epic.build_splits(clips, setting, seed=3)
    modalities = epic.SETTINGS[setting]
    expected = [f"train_{m}" for m in modalities] + ["val", "test"]
    assert list(splits.splits) == expected
    owners = {}
    for split in splits.splits.values():
        assert split.clips, split.name
        if split.role == "train":
            assert len(split.modalities) == 1 and split.name == f"train_{split.modalities[0]}"
        else:
            assert split.modalities == modalities
        for participant in split.participants:
            assert participant not in owners, f"{participant} in {owners.get(participant)} and {split.name}"
            owners[participant] = split.name
    assert sorted(owners) == PARTICIPANTS
    assert sum(len(s.clips) for s in splits.splits.values()) == len(clips)
    assert {s.role for s in splits.splits.values()} == {"train", "val", "test"}


def test_splits_deterministic_and_seeded(epic_data):
    clips = epic.load_annotations(epic_data["annotations"])
    def owners(seed):
        return {n: s.participants for n, s in epic.build_splits(clips, "rgb+audio", seed=seed).splits.items()}
    assert owners(0) == owners(0)
    assert any(owners(0) != owners(s) for s in range(1, 6))


def test_unimodal_train_splits_balanced(epic_data):
    clips = epic.load_annotations(epic_data["annotations"])
    splits = epic.build_splits(clips, "rgb+flow", fractions=(5, 1, 1))
    a, b = len(splits.splits["train_rgb"].clips), len(splits.splits["train_flow"].clips)
    assert abs(a - b) <= 4  # at most one participant's worth of clips apart


def test_too_few_participants(epic_data):
    clips = [c for c in epic.load_annotations(epic_data["annotations"]) if c.participant_id < "P05"]
    with pytest.raises(ValueError, match="at least 5 participants"):
        epic.build_splits(clips, "rgb+flow+audio")
    with pytest.raises(ValueError, match="setting must be one of"):
        epic.build_splits(clips, "rgb+depth")


def test_explicit_split_files(epic_data, tmp_path):
    clips = epic.load_annotations(epic_data["annotations"])
    ids = [c.narration_id for c in clips]
    files = {"train_rgb": ids[:5], "train_audio": ids[5:10], "val": ids[10:12], "test": ids[12:15]}
    for name, chosen in files.items():
        (tmp_path / f"{name}.txt").write_text("# pinned split\n" + "\n".join(chosen) + "\n\n")
    splits = epic.build_splits(clips, "rgb+audio", split_dir=tmp_path)
    assert {n: [c.narration_id for c in s.clips] for n, s in splits.splits.items()} == files
    assert splits.splits["val"].modalities == ("rgb", "audio")
    # a generated split written out and read back is the same split
    generated = epic.build_splits(clips, "rgb+flow+audio", seed=1)
    epic.write_split_files(generated, tmp_path / "pinned")
    again = epic.read_split_files(clips, "rgb+flow+audio", tmp_path / "pinned")
    assert {n: s.clips for n, s in again.splits.items()} == {n: s.clips for n, s in generated.splits.items()}


def test_explicit_split_file_errors(epic_data, tmp_path):
    clips = epic.load_annotations(epic_data["annotations"])
    (tmp_path / "train_rgb.txt").write_text("P01_01_0\n")
    with pytest.raises(FileNotFoundError, match="train_audio.txt, val.txt, test.txt"):
        epic.build_splits(clips, "rgb+audio", split_dir=tmp_path)
    (tmp_path / "train_audio.txt").write_text("P02_01_0\n")
    (tmp_path / "val.txt").write_text("P04_01_0\n")
    (tmp_path / "test.txt").write_text("P03_01_0\nP99_01_7\n")
    with pytest.raises(ValueError, match=r"test.txt, line 2: narration_id P99_01_7 is not in"):
        epic.build_splits(clips, "rgb+audio", split_dir=tmp_path)
    (tmp_path / "test.txt").write_text("P03_01_0\nP02_01_0\n")
    with pytest.raises(ValueError, match="test.txt, line 2: narration_id P02_01_0 is already in split train_audio"):
        epic.build_splits(clips, "rgb+audio", split_dir=tmp_path)


# ------------------------------------------------------------------------------ raw inputs

def test_frame_sampling_and_flow_half_rate():
    clip = epic.EpicClip("x", "P01", "P01_01", 0.0, 1.0, 101, 200, 0, 0)
    rgb = epic.rgb_frame_indices(clip, 8)
    assert rgb == sorted(rgb) and 101 <= rgb[0] and rgb[-1] <= 200 and len(set(rgb)) == 8
    flow = epic.flow_frame_indices(clip, 8)
    assert 50 <= flow[0] and flow[-1] <= 100
    short = epic.EpicClip("y", "P01", "P01_01", 0.0, 1.0, 1, 2, 0, 0)
    assert epic.flow_frame_indices(short, 3) == [1, 1, 1]


def test_missing_frame_error_names_file_and_clip(epic_data, tmp_path):
    clips = epic.load_annotations(epic_data["annotations"])
    train_rgb = epic.build_splits(clips, "rgb+audio").splits["train_rgb"]
    clip = train_rgb.clips[0]
    frame = (epic_data["frames"] / clip.participant_id / "rgb_frames" / clip.video_id
             / f"frame_{epic.rgb_frame_indices(clip, 2)[-1]:010d}.jpg")
    moved = tmp_path / "held.jpg"
    frame.rename(moved)
    try:
        with pytest.raises(epic.MissingInputError) as err:
            epic.extract_epic(epic_data["annotations"],
                              {"rgb": epic_data["frames"], "audio": epic_data["audio"]},
                              tmp_path / "store", "rgb+audio", config=_config(), progress=False,
                              log=lambda s: None)
        assert str(frame) in str(err.value) and clip.narration_id in str(err.value)
        assert "rgb input" in str(err.value)
        assert not (tmp_path / "store").exists()  # raised before any work
    finally:
        moved.rename(frame)


def test_resolve_weights(tmp_path):
    (tmp_path / "rgb.pth").write_bytes(b"")
    assert epic.resolve_weights([str(tmp_path), "audio=a.pth"], ["rgb", "audio"]) == {
        "rgb": str(tmp_path / "rgb.pth"), "audio": "a.pth"}
    with pytest.raises(ValueError, match="no weights for audio"):
        epic.resolve_weights([str(tmp_path)], ["rgb", "audio"])
    with pytest.raises(ValueError, match="modality must be one of"):
        epic.resolve_weights(["depth=x.pth"], ["rgb"])


# ------------------------------------------------------------------------------ extractors

def test_flow_resnet_loads_rgb_weights_with_cross_modality_stem(epic_data, tmp_path):
    _needs("flow")
    import torchvision

    rgb_resnet = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(rgb_resnet.state_dict(), path)
    config = _config(weights={"flow": str(path)}, flow_frames=3)
    extractor = epic.build_extractor("flow", epic_data["frames"], config)
    stem = extractor.model.conv1.weight
    assert stem.shape == (64, 6, 7, 7)
    expected = rgb_resnet.conv1.weight.mean(dim=1, keepdim=True).expand_as(stem)
    torch.testing.assert_close(stem.detach(), expected)
    torch.testing.assert_close(extractor.model.layer1[0].conv1.weight, rgb_resnet.layer1[0].conv1.weight)
    tokens, _ = extractor(epic.load_annotations(epic_data["annotations"])[:1])
    assert tokens.shape == (1, 1, 512)  # 32 px / 32 = one position

    torch.save({"not": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="does not match"):
        epic.build_extractor("flow", epic_data["frames"], _config(weights={"flow": str(tmp_path / "wrong.pth")}))


def test_audio_tokens_time_major_with_lengths(epic_data):
    _needs("audio")
    clips = {c.narration_id: c for c in epic.load_annotations(epic_data["annotations"])}
    extractor = epic.build_extractor("audio", epic_data["audio"], _config(audio_frames=64))
    assert (extractor.tokens, extractor.dim) == (8 * 4, 192)
    # P02_01_1: frames 13..22 of the video wav = 0.15 s -> 13 filterbank frames -> 1 time patch.
    # P01_01_0 has its own 0.3 s wav -> 28 frames -> 2 time patches of 16 frames.
    tokens, lengths = extractor([clips["P02_01_1"], clips["P01_01_0"]])
    assert lengths.tolist() == [8, 16]
    assert tokens.shape == (2, 32, 192)


def test_audio_ast_overlapping_patches_by_default(epic_data):
    """The default extractor is AST's: 16 x 16 patches every 10 frames / bins, 128 mel bins."""
    _needs("audio")
    assert (epic.ExtractionConfig().audio_stride, epic.ExtractionConfig().audio_frames) == (10, 128)
    clips = {c.narration_id: c for c in epic.load_annotations(epic_data["annotations"])}
    extractor = epic.build_extractor("audio", epic_data["audio"], _config(audio_frames=64, audio_stride=10))
    # (128 - 16) // 10 + 1 = 12 frequency x (64 - 16) // 10 + 1 = 5 time patches
    assert extractor.tokens == 12 * 5
    # 13 real frames -> time patches starting at 0 and 10; 28 frames -> at 0, 10 and 20
    _, lengths = extractor([clips["P02_01_1"], clips["P01_01_0"]])
    assert lengths.tolist() == [12 * 2, 12 * 3]


def test_audio_extractor_loads_an_ast_checkpoint_as_published(epic_data, tmp_path):
    """An AST checkpoint (``module.v.*`` keys, 12 x 101 position grid, AudioSet head) passed as
    it is: converted on load, position embeddings cut to the 12 x 12 grid of 128 frames."""
    _needs("audio")
    from umilayers.datasets import checkpoints as ckpt

    source = ckpt.ast_audio_vit("deit_tiny_distilled_patch16_224", mel_bins=128, frames=1024)
    assert source.patch_embed.grid_size == ckpt.AST_AUDIOSET_GRID
    state = {"module.v." + k: v for k, v in source.state_dict().items()}
    state["module.mlp_head.1.weight"] = torch.zeros(527, 192)
    torch.save(state, tmp_path / "audioset.pth")
    config = _config(audio_arch="deit_tiny_distilled_patch16_224", audio_frames=128, audio_stride=10,
                     weights={"audio": str(tmp_path / "audioset.pth")})
    model = epic.build_extractor("audio", epic_data["audio"], config).model
    torch.testing.assert_close(model.blocks[3].attn.qkv.weight, source.blocks[3].attn.qkv.weight)
    torch.testing.assert_close(model.dist_token, source.dist_token)
    grid = source.pos_embed[:, 2:].reshape(1, 12, 101, 192)
    torch.testing.assert_close(model.pos_embed[:, 2:].reshape(1, 12, 12, 192), grid[:, :, 50 - 6:50 + 6])


# ------------------------------------------------------------------------------ preprocessing

def test_released_preprocessing_is_named_and_not_the_default():
    """The released loaders: ``ast_configs.py`` norm_stats [-5.388, 2.94]; ``ShortSideScale(256)``
    then ``SpatialCrop(224, num_crops=1)``; a random crop in training, several at test."""
    assert epic.AUDIO_STATS["released"] == (-5.388, 2.94)
    assert epic.AUDIO_STATS["audioset"] == (-4.2677393, 4.5689974)
    assert epic.RELEASED_PREPROCESSING == {"short_side": 256, "audio_stats": "released", "audio_crop": "released"}
    default = epic.ExtractionConfig()
    assert (default.short_side, default.audio_stats, default.audio_crop) == (None, "audioset", "first")
    epic.ExtractionConfig(**epic.RELEASED_PREPROCESSING)  # valid together at 224 px
    for bad, match in ((dict(short_side=100), "short_side must be an int of at least image_size"),
                       (dict(audio_stats="kinetics"), "audio_stats must be one of audioset, released"),
                       (dict(audio_crop="centre"), "audio_crop must be one of first, released")):
        with pytest.raises(ValueError, match=match):
            epic.ExtractionConfig(**bad)


def test_audio_crop_starts_follow_the_released_loaders():
    # test loader: np.arange(0, n - 128, int(n / 3.1)) when n > 128
    for n in (129, 200, 300, 417, 1000, 5000, 100_000):
        assert epic.audio_crop_starts(n, 128, "released", train=False) == \
            list(range(0, n - 128, int(n / 3.1)))
        assert 1 <= len(epic.audio_crop_starts(n, 128, "released", train=False)) <= 4
    # training loader: one np.random.randint(0, n - 128) start; here seeded, so reruns agree
    starts = {epic.audio_crop_starts(300, 128, "released", train=True, seed=seed)[0] for seed in range(200)}
    assert min(starts) >= 0 and max(starts) < 300 - 128 and len(starts) > 50
    assert epic.audio_crop_starts(300, 128, "released", train=True, seed=7) == \
        epic.audio_crop_starts(300, 128, "released", train=True, seed=7)
    # short clips are padded, one crop; "first" is always the first frames
    assert epic.audio_crop_starts(128, 128, "released", train=False) == [0]
    assert epic.audio_crop_starts(5000, 128, "first", train=False) == [0]


def _long_clip(tmp_path):
    """A clip with its own 2 s wav of a rising tone: 198 filterbank frames, each different."""
    path = tmp_path / "P03" / "P03_01_1.wav"
    path.parent.mkdir(parents=True)
    rate = 16000
    t = np.arange(2 * rate) / rate
    samples = (0.3 * np.sin(2 * np.pi * (200 + 600 * t) * t) * 32767).astype(np.int16)
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(samples.tobytes())
    return LAYOUT_CLIP


def test_audio_statistics_and_crops_of_the_released_code(tmp_path):
    _needs("audio")
    clip = _long_clip(tmp_path)
    whole = epic.build_extractor("audio", tmp_path, _config(audio_frames=256))
    full, valid = whole.load(clip)
    frames = int(valid[0])
    assert frames == 198 and int(valid[1]) == 1
    full = full[0, 0, :, :frames]  # (128 bins, 198 frames), AudioSet statistics
    mean_a, std_a = epic.AUDIO_STATS["audioset"]
    mean_r, std_r = epic.AUDIO_STATS["released"]
    released = full * (2 * std_a) + mean_a  # back to log-mel, then the released statistics
    released = (released - mean_r) / (2 * std_r)
    config = _config(audio_frames=32, audio_stats="released", audio_crop="released")
    extractor = epic.build_extractor("audio", tmp_path, config)
    # val/test: the test loader's crops, every int(198 / 3.1) = 63 frames
    crops, valid = extractor.load(clip, train=False)
    assert valid.tolist() == [32, 3]
    for i, start in enumerate([0, 63, 126]):
        torch.testing.assert_close(crops[i, 0], released[:, start:start + 32], atol=1e-4, rtol=1e-5)
    assert not crops[3].any()
    # training: one seeded random crop, the same on every call
    crop, valid = extractor.load(clip, train=True)
    start, = epic.audio_crop_starts(198, 32, "released", train=True, seed=zlib.crc32(b"P03_01_1"))
    assert valid.tolist() == [32, 1]
    torch.testing.assert_close(crop[0, 0], released[:, start:start + 32], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(extractor.load(clip, train=True)[0], crop)
    # the tokens of val/test are the mean of the crops' tokens
    tokens, lengths = extractor([clip], train=False)
    with torch.no_grad():
        per_crop = extractor.model.forward_features(crops[:3])[:, extractor.model.num_prefix_tokens:]
    f, t = extractor.grid
    per_crop = per_crop.reshape(3, f, t, -1).transpose(1, 2).flatten(1, 2)
    np.testing.assert_allclose(tokens[0].astype(np.float32), per_crop.mean(0).numpy(), rtol=1e-2, atol=1e-2)
    assert lengths.tolist() == [extractor.tokens]
    # the default keeps the first 32 frames with AudioSet statistics
    first, valid = epic.build_extractor("audio", tmp_path, _config(audio_frames=32)).load(clip, train=True)
    assert valid.tolist() == [32, 1]
    torch.testing.assert_close(first[0, 0], full[:, :32])


def test_rgb_short_side_then_centre_crop(epic_data):
    """``short_side``: the shorter side resized to it, then the centre crop (the released
    ``ShortSideScale(256)`` + ``SpatialCrop(224)``); without it the whole shorter side is kept."""
    from PIL import Image

    path = epic_data["frames"] / "P01" / "rgb_frames" / "P01_01" / "frame_0000000001.jpg"
    original = np.asarray(Image.open(path).convert("RGB"))  # 24 x 32
    # short side 24 = the frame's own: no resize, the centre 16 x 16
    np.testing.assert_array_equal(epic._load_image(path, 16, "RGB", short_side=24), original[4:20, 8:24])
    assert epic._load_image(path, 16, "RGB").shape == (16, 16, 3)
    assert not np.array_equal(epic._load_image(path, 16, "RGB"), original[4:20, 8:24])
    clip = epic.EpicClip("x", "P01", "P01_01", 0.0, 0.1, 1, 2, 0, 0)
    _needs("rgb")  # the extractor below; the frame loading above needs pillow only
    video, _ = epic.build_extractor("rgb", epic_data["frames"], _config(image_size=16, short_side=24)).load(clip)
    mean, std = torch.tensor(epic._RGBExtractor.mean), torch.tensor(epic._RGBExtractor.std)
    expected = (torch.from_numpy(original[4:20, 8:24].copy()).float() / 255 - mean) / std
    torch.testing.assert_close(video[:, 0], expected.permute(2, 0, 1))


# ------------------------------------------------------------------------------ audio layouts

AUDIO_LAYOUTS = {  # relative path, whether the file holds the clip only
    "per clip, participant folder (released loader)": ("P03/P03_01_1.wav", True),
    "per clip": ("P03_01_1.wav", True),
    "per video, participant folder": ("P03/P03_01.wav", False),
    "per video (released extract_audio.py)": ("P03_01.wav", False),
}
# P03_01_1: 0.15 s of its video at 1.0 s; a per-clip wav holds 0.3 s (used whole)
LAYOUT_CLIP = epic.EpicClip("P03_01_1", "P03", "P03_01", 1.0, 1.15, 60, 69, 3, 3)


def _write_layout(root: Path, relative: str, whole: bool) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_wav(path, 0.3 if whole else 2.0, rate=16000)
    return path


@pytest.mark.parametrize("layout", list(AUDIO_LAYOUTS))
def test_audio_layouts(layout, tmp_path):
    _needs("audio")
    relative, whole = AUDIO_LAYOUTS[layout]
    path = _write_layout(tmp_path, relative, whole)
    config = _config(audio_frames=64)
    assert epic.find_missing_inputs(LAYOUT_CLIP, "audio", tmp_path, config) == ()
    assert epic.clip_input_paths(LAYOUT_CLIP, "audio", tmp_path, config) == [path]
    _, lengths = epic.build_extractor("audio", tmp_path, config)([LAYOUT_CLIP])
    # whole 0.3 s -> 28 filterbank frames -> 2 time patches of 16; cut 0.15 s -> 13 -> 1
    assert lengths.tolist() == [8 * (2 if whole else 1)]


def test_audio_layout_precedence(tmp_path):
    for relative, whole in AUDIO_LAYOUTS.values():
        _write_layout(tmp_path, relative, whole)
    config = _config()
    assert epic.clip_input_paths(LAYOUT_CLIP, "audio", tmp_path, config) == [tmp_path / "P03" / "P03_01_1.wav"]
    (tmp_path / "P03" / "P03_01_1.wav").unlink()
    (tmp_path / "P03_01_1.wav").unlink()
    assert epic.clip_input_paths(LAYOUT_CLIP, "audio", tmp_path, config) == [tmp_path / "P03" / "P03_01.wav"]


def test_missing_audio_names_every_layout_tried(epic_data, tmp_path):
    empty = tmp_path / "audio"
    empty.mkdir()
    with pytest.raises(epic.MissingInputError) as err:
        epic.extract_epic(epic_data["annotations"], {"rgb": epic_data["frames"], "audio": empty},
                          tmp_path / "store", "rgb+audio", config=_config(), progress=False,
                          log=lambda s: None)
    clip = err.value.narration_id
    participant, video = clip[:3], clip.rsplit("_", 1)[0]
    expected = [empty / participant / f"{clip}.wav", empty / f"{clip}.wav",
                empty / participant / f"{video}.wav", empty / f"{video}.wav"]
    assert err.value.tried == tuple(str(p) for p in expected)
    for path in expected:
        assert str(path) in str(err.value)
    assert not (tmp_path / "store").exists()


# ------------------------------------------------------------------------------ released split

# The class tables' columns and the released files' formats (one id a line, no header;
# "verb_key,noun_key" a line), with the keys of LABELS.
VERB_TABLE = [(0, "take"), (3, "open"), (5, "put")]
NOUN_TABLE = [(2, "plate"), (3, "door"), (12, "fridge"), (36, "bin"), (54, "rubbish")]
ACTION_LINES = ["open,fridge", "take,plate", "put,rubbish", "open,door", "take,door"]
ACTION_PAIRS = [(3, 12), (0, 2), (5, 54), (3, 3), (0, 3)]  # file order = action id
RELEASED = {"EPIC_100_train_full_half1.csv": ["P01", "P02"], "EPIC_100_train_full_half2.csv": ["P03", "P04"],
            "EPIC_100_full_val.csv": ["P05"], "EPIC_100_full_test.csv": ["P06", "P07"]}
WITH_SOUND = ["P01_01", "P02_01", "P03_01", "P05_01", "P06_01", "P07_01"]  # P04_01 has none


def _write_class_table(path: Path, table) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "key", "instances", "category"])
        for class_id, key in table:
            writer.writerow([class_id, key, str([key, key + "-x"]), "misc"])


def _write_released(folder: Path, rows, tables: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, participants in RELEASED.items():
        ids = [r["narration_id"] for r in rows if r["participant_id"] in participants]
        (folder / name).write_text("".join(i + "\n" for i in ids))
    (folder / "available_sound.csv").write_text("".join(v + "\n" for v in WITH_SOUND))
    (folder / "epic_action_classes.csv").write_text("".join(line + "\n" for line in ACTION_LINES))
    if tables:
        _write_class_table(folder / "EPIC_100_verb_classes.csv", VERB_TABLE)
        _write_class_table(folder / "EPIC_100_noun_classes.csv", NOUN_TABLE)
    return folder


def _ids(split):
    return [c.narration_id for c in split.clips]


def test_released_split_read_as_published(epic_data, tmp_path):
    rows = epic_data["rows"]
    released = _write_released(tmp_path / "epic-annotations", rows)
    clips = epic.load_annotations(epic_data["annotations"])
    splits = epic.build_splits(clips, "rgb+audio", split_dir=released)

    def of(*participants):
        return [r["narration_id"] for r in rows if r["participant_id"] in participants]

    assert {n: (s.role, s.modalities) for n, s in splits.splits.items()} == {
        "train_rgb": ("train", ("rgb",)), "train_audio": ("train", ("audio",)),
        "val": ("val", ("rgb", "audio")), "test": ("test", ("rgb", "audio"))}
    assert _ids(splits.splits["train_rgb"]) == of("P01", "P02")
    assert _ids(splits.splits["train_audio"]) == of("P03")  # P04_01 has no sound
    assert _ids(splits.splits["val"]) == of("P05")
    assert _ids(splits.splits["test"]) == of("P06", "P07")  # P07: EPIC_100_validation.csv
    assert splits.no_sound == {"train_audio": len(of("P04")), "val": 0, "test": 0}
    assert "video without sound" in splits.summary()
    # without audio in the setting nothing is filtered, and the halves follow the setting's order
    flow = epic.build_splits(clips, "rgb+flow", split_dir=released)
    assert _ids(flow.splits["train_flow"]) == of("P03", "P04") and flow.no_sound == {}


def test_released_action_classes_in_file_order(epic_data, tmp_path):
    clips = epic.load_annotations(epic_data["annotations"])
    released = _write_released(tmp_path / "released", epic_data["rows"])
    vocab = epic.action_vocabulary(clips, released, epic_data["annotations"])
    assert vocab.pairs.tolist() == [list(p) for p in ACTION_PAIRS]
    assert vocab.action_id(3, 3) == 3 and vocab.num_actions == len(ACTION_LINES)
    # the class tables may also come from the annotations folder (the official repository)
    bare = _write_released(tmp_path / "bare", epic_data["rows"], tables=False)
    tables = tmp_path / "annotations"
    tables.mkdir()
    _write_class_table(tables / "EPIC_100_verb_classes.csv", VERB_TABLE)
    _write_class_table(tables / "EPIC_100_noun_classes.csv", NOUN_TABLE)
    assert epic.action_vocabulary(clips, bare, tables).pairs.tolist() == vocab.pairs.tolist()
    with pytest.raises(FileNotFoundError, match="EPIC_100_verb_classes.csv is needed"):
        epic.action_vocabulary(clips, bare, tmp_path)
    # saved and loaded, the ids keep the file's order
    vocab.save(tmp_path / "actions.json")
    assert epic.ActionVocabulary.load(tmp_path / "actions.json").pairs.tolist() == vocab.pairs.tolist()


def test_released_split_errors(epic_data, tmp_path):
    clips = epic.load_annotations(epic_data["annotations"])
    released = _write_released(tmp_path / "released", epic_data["rows"])
    with pytest.raises(ValueError, match="two training halves.*rgb\\+flow\\+audio needs 3"):
        epic.build_splits(clips, "rgb+flow+audio", split_dir=released)
    partial = [c for c in clips if c.participant_id != "P07"]  # without EPIC_100_validation.csv
    with pytest.raises(ValueError, match="EPIC_100_full_test.csv: 3 narration id.*EPIC_100_validation.csv"):
        epic.build_splits(partial, "rgb+audio", split_dir=released)
    (released / "available_sound.csv").unlink()
    with pytest.raises(FileNotFoundError, match="available_sound.csv"):
        epic.build_splits(clips, "rgb+audio", split_dir=released)
    assert epic.build_splits(clips, "rgb+flow", split_dir=released).splits  # not needed without audio
    (released / "epic_action_classes.csv").write_text("open,fridge\ntake,spatula\n")
    with pytest.raises(ValueError, match="epic_action_classes.csv, line 2: noun 'spatula' is not a key"):
        epic.action_vocabulary(clips, released)
    (released / "epic_action_classes.csv").write_text("open,fridge\nopen,fridge\n")
    with pytest.raises(ValueError, match="appears twice"):
        epic.action_vocabulary(clips, released)


def test_extract_with_the_released_split(epic_data, tmp_path, capsys):
    _needs("rgb", "audio")
    from umilayers.data.store import FeatureStore

    released = _write_released(tmp_path / "epic-annotations", epic_data["rows"])
    out = tmp_path / "store"
    assert _run_extract(epic_data, out, "--setting", "rgb+audio", "--split-dir", str(released)) == 0
    store = FeatureStore(out)
    assert store.num_outputs == len(ACTION_LINES)
    clips = {c.narration_id: c for c in epic.load_annotations(epic_data["annotations"])}
    for name in ("train_rgb", "train_audio", "val", "test"):
        ids = (out / "epic_splits" / f"{name}.txt").read_text().split()
        pairs = [(clips[i].verb_class, clips[i].noun_class) for i in ids]
        np.testing.assert_array_equal(store.targets(name), [ACTION_PAIRS.index(p) for p in pairs])
    assert not any(i.startswith("P04") for i in (out / "epic_splits" / "train_audio.txt").read_text().split())
    assert epic.ActionVocabulary.load(out / epic.ACTIONS_FILE).pairs.tolist() == [list(p) for p in ACTION_PAIRS]
    assert "left out, video without sound (available_sound.csv): train_audio 4" in capsys.readouterr().out


def test_extract_shards_resume(tmp_path):
    clips = [epic.EpicClip(f"c{i}", "P01", "P01_01", 0.0, 1.0, 1, 2, 0, 0) for i in range(5)]
    calls = []

    def fake(chunk):
        calls.append([c.narration_id for c in chunk])
        return np.ones((len(chunk), 2, 3), np.float16), np.full(len(chunk), 2)

    paths = epic.extract_shards(clips, fake, tmp_path, shard_size=2, progress=False)
    assert [p.name for p in paths] == ["shard_00000.npz", "shard_00001.npz", "shard_00002.npz"]
    assert len(calls) == 3
    paths[1].unlink()  # as if interrupted before shard 1 was renamed into place
    (tmp_path / ".shard_00001.abc.npz").write_bytes(b"partial")
    calls.clear()
    epic.extract_shards(clips, fake, tmp_path, shard_size=2, progress=False)
    assert calls == [["c2", "c3"]]
    calls.clear()
    epic.extract_shards(clips[::-1], fake, tmp_path, shard_size=2, progress=False)
    assert len(calls) == 3  # shards of other clips are recomputed, never reused


# ------------------------------------------------------------------------------ end to end

def _example(name):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _run_extract(epic_data, out, *extra):
    epic_extract = _example("epic_extract")
    argv = ["--annotations", str(epic_data["annotations"]), "--rgb", str(epic_data["frames"]),
            "--flow", str(epic_data["frames"]), "--audio", str(epic_data["audio"]),
            "--out", str(out), "--weights", "random", "--frames", "4", "--image-size", "64",
            "--audio-arch", "vit_tiny_patch16_224", "--audio-frames", "32", "--shard-size", "3",
            "--no-progress", *extra]
    return epic_extract.main(argv)


@pytest.fixture(scope="module")
def epic_store(epic_data, tmp_path_factory):
    _needs("rgb", "flow", "audio")
    out = tmp_path_factory.mktemp("stores") / "epic_rgb_flow_audio"
    assert _run_extract(epic_data, out, "--setting", "rgb+flow+audio", "--keep-shards") == 0
    return out


def test_extract_end_to_end_store(epic_data, epic_store):
    from umilayers.data.store import FeatureStore

    store = FeatureStore(epic_store)
    clips = {c.narration_id: c for c in epic.load_annotations(epic_data["annotations"])}
    vocab = epic.ActionVocabulary.load(epic_store / epic.ACTIONS_FILE)
    assert store.task == "classification" and store.num_outputs == vocab.num_actions
    # swin3d_t: patch (2, 4, 4) then three 2x merges -> (4/2) x (64/32) x (64/32) tokens of 768;
    # resnet18: 64/32 = 2 x 2 positions of 512; ViT-tiny with AST's stride-10 patches on 128 mel
    # bins x 32 frames: 12 frequency x 2 time patches of 192
    assert store.modalities == {"audio": (12 * 2, 192), "flow": (4, 512), "rgb": (8, 768)}
    assert [(s.name, s.role, s.modalities) for s in store.splits.values()] == [
        ("train_rgb", "train", ("rgb",)), ("train_flow", "train", ("flow",)),
        ("train_audio", "train", ("audio",)), ("val", "val", ("audio", "flow", "rgb")),
        ("test", "test", ("audio", "flow", "rgb"))]
    for name, info in store.splits.items():
        ids = (epic_store / "epic_splits" / f"{name}.txt").read_text().split()
        assert info.size == len(ids)
        expected = vocab.targets([clips[i] for i in ids])
        np.testing.assert_array_equal(np.load(epic_store / name / "targets.npy"), expected)
    rgb = np.load(epic_store / "test" / "rgb.npy")
    assert rgb.dtype == np.float16 and np.isfinite(rgb).all()
    assert not np.allclose(rgb[0], rgb[1])  # clips differ
    assert np.load(epic_store / "test" / "rgb.lengths.npy").tolist() == [8] * len(rgb)
    audio_lengths = np.load(epic_store / "train_audio" / "audio.lengths.npy")
    assert set(audio_lengths.tolist()) <= {12, 24}


def test_extract_resumes_from_shards_without_recomputing(epic_data, epic_store, tmp_path, capsys):
    from umilayers.data.store import FeatureStore

    shards = sorted(Path(str(epic_store) + ".shards").rglob("shard_*.npz"))
    expected = sum(-(-s.size // 3) * len(s.modalities) for s in FeatureStore(epic_store).splits.values())
    assert len(shards) == expected  # every split/modality pair, shards of 3 clips
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    # the assembled splits were scratch: only shards remain in the kept work folder
    assert sorted({p.suffix for p in Path(str(epic_store) + ".shards").rglob("*") if p.is_file()}) == [".npz"]
    out = tmp_path / "again"
    assert _run_extract(epic_data, out, "--setting", "rgb+flow+audio",
                        "--work-dir", str(epic_store) + ".shards", "--keep-shards") == 0
    assert {p: p.stat().st_mtime_ns for p in shards} == stamps  # nothing recomputed
    for split in ("train_audio", "val", "test"):
        for m in ("audio", "flow", "rgb"):
            if (epic_store / split / f"{m}.npy").exists():
                np.testing.assert_array_equal(np.load(out / split / f"{m}.npy"),
                                              np.load(epic_store / split / f"{m}.npy"))
    with pytest.raises(FileExistsError, match=r"^out: .* already exists; pass overwrite to replace it$"):
        epic.extract_epic(epic_data["annotations"], {"rgb": epic_data["frames"]}, out, "rgb+audio")
    assert _run_extract(epic_data, out, "--setting", "rgb+flow+audio") == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f": error: --out: {out} already exists; pass --overwrite to replace it")
    # other settings change the fingerprint: those shards are recomputed, not reused
    assert _run_extract(epic_data, out, "--setting", "rgb+flow+audio", "--overwrite",
                        "--work-dir", str(epic_store) + ".shards", "--keep-shards",
                        "--flow-frames", "1") == 0
    flow = [p for p in shards if p.parent.name == "flow"]
    assert all(p.stat().st_mtime_ns != stamps[p] for p in flow)
    assert all(p.stat().st_mtime_ns == stamps[p] for p in shards if p not in flow)


def test_store_records_its_preprocessing(epic_store):
    recorded = json.loads((epic_store / epic.EXTRACTION_FILE).read_text())
    assert (recorded["short_side"], recorded["audio_stats"], recorded["audio_crop"]) == (None, "audioset", "first")
    assert (recorded["frames"], recorded["image_size"], recorded["audio_frames"]) == (4, 64, 32)
    assert "device" not in recorded and "batch_size" not in recorded


def test_extract_preset_paper_takes_the_released_preprocessing(epic_data, tmp_path, monkeypatch):
    """``epic_extract.py --preset paper``: the released code's preprocessing; flags override it;
    without the preset, the library's."""
    seen = []

    def fake_extract(annotations, roots, out, setting, *, config, **kwargs):
        seen.append(config)
        return {"modalities": {}, "num_actions": 1, "splits": {}, "no_sound": {}}

    epic_extract = _example("epic_extract")
    monkeypatch.setattr(epic_extract.epic, "extract_epic", fake_extract)
    base = ["--annotations", "a", "--rgb", "r", "--audio", "w", "--out", str(tmp_path / "o"),
            "--setting", "rgb+audio", "--weights", "random"]
    assert epic_extract.main([*base, "--preset", "paper"]) == 0
    assert epic_extract.main([*base, "--preset", "paper", "--audio-crop", "first", "--short-side", "240"]) == 0
    assert epic_extract.main(base) == 0
    got = [(c.short_side, c.image_size, c.audio_stats, c.audio_crop) for c in seen]
    assert got == [(256, 224, "released", "released"), (240, 224, "released", "first"),
                   (None, 224, "audioset", "first")]
    help_text = " ".join(epic_extract.build_parser().format_help().split())
    for named in ("the released code: 256", "released = the released code's (-5.388, 2.94)",
                  "released = the released code's, --preset paper's (a random crop in training"):
        assert named in help_text


def test_epic_train_preset_notes_a_store_without_the_released_preprocessing(epic_store, tmp_path):
    epic_train = _example("epic_train")
    note = epic_train.preprocessing_note(epic_store)
    assert note.startswith("note: --preset paper trains as the paper does, but ")
    assert "short_side None, audio_stats audioset, audio_crop first" in note
    released = tmp_path / "store"
    released.mkdir()
    (released / epic.EXTRACTION_FILE).write_text(json.dumps(epic.RELEASED_PREPROCESSING))
    assert epic_train.preprocessing_note(released) is None


def test_random_rgb_backbone_is_torchvisions_own_init(epic_data):
    """Building the RGB extractor leaves torch's initialisers alone: its random weights are
    exactly torchvision's swin3d_t init under the modality's seed."""
    _needs("rgb")
    import torchvision

    original = torch.nn.init.trunc_normal_
    extractor = epic.build_extractor("rgb", epic_data["frames"], _config())
    assert torch.nn.init.trunc_normal_ is original
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(epic.MODALITIES.index("rgb"))
        reference = torchvision.models.video.swin3d_t(weights=None)
    built = extractor.model.state_dict()
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(built[name], value, rtol=0, atol=0, msg=name)


def test_shards_are_written_through_the_one_atomic_writer(tmp_path, monkeypatch):
    calls = []

    def recording(path, write):
        calls.append(Path(path).name)
        from umilayers._io import atomic_write

        atomic_write(path, write)

    monkeypatch.setattr(epic, "atomic_write", recording)
    clips = [epic.EpicClip(f"c{i}", "P01", "P01_01", 0.0, 1.0, 1, 2, 0, 0) for i in range(3)]
    epic.extract_shards(clips, lambda chunk: (np.ones((len(chunk), 2, 3), np.float16),
                                              np.full(len(chunk), 2)), tmp_path, shard_size=2, progress=False)
    assert calls == ["shard_00000.npz", "shard_00001.npz"]


def test_random_weights_are_reproducible(epic_data):
    _needs("flow")
    one = epic.build_extractor("flow", epic_data["frames"], _config())
    two = epic.build_extractor("flow", epic_data["frames"], _config())
    for (name, a), b in zip(one.model.state_dict().items(), two.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_skip_missing_drops_and_reports(epic_data, tmp_path, capsys):
    _needs("audio", "flow")
    clips = epic.load_annotations(epic_data["annotations"])
    splits = epic.build_splits(clips, "audio+flow", seed=0)
    dropped_participant = splits.splits["train_audio"].participants[-1]
    wav = epic_data["audio"] / f"{dropped_participant}_01.wav"
    held = tmp_path / "held.wav"
    wav.rename(held)
    try:
        assert _run_extract(epic_data, tmp_path / "a", "--setting", "audio+flow", "--seed", "0") == 2
        line, = capsys.readouterr().err.strip().splitlines()
        assert line.endswith(f"{dropped_participant}_01.wav exists (--skip-missing drops such clips)")
        assert not (tmp_path / "a").exists() and not (tmp_path / "a.shards").exists()
        assert _run_extract(epic_data, tmp_path / "b", "--setting", "audio+flow", "--seed", "0",
                            "--skip-missing") == 0
    finally:
        held.rename(wav)
    count = sum(c.participant_id == dropped_participant for c in clips)
    report = capsys.readouterr().out
    assert f"dropped clips with missing inputs: train_audio {count}, train_flow 0, val 0, test 0" in report
    from umilayers.data.store import FeatureStore

    store = FeatureStore(tmp_path / "b")
    assert store.splits["train_audio"].size == len(splits.splits["train_audio"].clips) - count
    assert store.splits["train_flow"].size == len(splits.splits["train_flow"].clips)


def test_skip_missing_refuses_to_empty_a_split(epic_data, tmp_path):
    clips = epic.load_annotations(epic_data["annotations"])
    val = epic.build_splits(clips, "audio+flow", seed=0).splits["val"]
    assert len(val.participants) == 1
    wav = epic_data["audio"] / f"{val.participants[0]}_01.wav"
    held = tmp_path / "held.wav"
    wav.rename(held)
    try:
        with pytest.raises(ValueError, match="split val has no clip left after dropping"):
            epic.extract_epic(epic_data["annotations"], {"audio": epic_data["audio"], "flow": epic_data["frames"]},
                              tmp_path / "s", "audio+flow", config=_config(), skip_missing=True,
                              progress=False, log=lambda s: None)
    finally:
        held.rename(wav)


def test_extract_cli_flags_and_errors(capsys):
    epic_extract = _example("epic_extract")
    usage = epic_extract.build_parser().format_help()
    for flag in ("--annotations", "--rgb", "--flow", "--audio", "--out", "--setting", "--weights",
                 "--frames", "--shard-size", "--skip-missing", "--split-dir", "--device",
                 "--image-size", "--rgb-arch"):
        assert flag in usage
    for setting in epic.SETTINGS:
        assert setting in usage
    with pytest.raises(SystemExit) as exit_:
        epic_extract.main(["--annotations", "a", "--out", "o", "--setting", "rgb+audio",
                           "--weights", "random", "--rgb", "r"])
    assert exit_.value.code == 2 and "--audio ROOT" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        epic_extract.main(["--annotations", "a", "--out", "o", "--setting", "rgb+audio",
                           "--rgb", "r", "--audio", "a"])
    assert "no weights for rgb, audio" in capsys.readouterr().err


def _env():
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ------------------------------------------------------------------------------ training

def test_epic_train_on_extracted_store(epic_store, tmp_path):
    epic_train = _example("epic_train")
    parser = epic_train.build_parser()
    defaults = parser.parse_args([str(epic_store), "--out", "run"])
    assert (defaults.num_tokens, defaults.pseudo_weight, defaults.pseudo_window) == (512, 3000.0, 10)
    run = tmp_path / "run"
    assert epic_train.main([
        str(epic_store), "--out", str(run), "--method", "umi", "--epochs", "1",
        "--unimodal-epochs", "2", "--pseudo-window", "1", "--num-tokens", "4", "--dim", "16",
        "--projection-depth", "1", "--fusion-depth", "1", "--heads", "2", "--batch-size", "4", "--device", "cpu",
        "--quiet"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    for key in ("action_top1", "verb_top1", "noun_top1"):
        assert 0.0 <= test[key] <= 1.0
    assert test["verb_top1"] >= test["action_top1"] and test["noun_top1"] >= test["action_top1"]
    if "top1" in test:  # the recipe's own action top-1 agrees with ours
        assert test["top1"] == pytest.approx(test["action_top1"])
    # recomputed by hand from the saved predictions
    from umilayers.data.store import FeatureStore

    predicted = np.load(run / "test_predictions.npy").argmax(axis=1)
    targets = FeatureStore(epic_store).targets("test")
    vocab = epic.ActionVocabulary.load(epic_store / epic.ACTIONS_FILE)
    verbs, _ = vocab.verb_noun(predicted)
    assert test["verb_top1"] == pytest.approx(np.mean(verbs == vocab.verb_noun(targets)[0]))


def test_epic_train_preset_paper(epic_store, tmp_path, capsys):
    """``--preset paper``: the paper's EPIC-Kitchens schedule and sizes (values written out here,
    not read from the preset), then the same run end to end with tiny sizes given as flags."""
    from umilayers.cli import parse_fit_args, preset_defaults

    epic_train = _example("epic_train")
    argv = [str(epic_store), "--out", str(tmp_path / "unused"), "--preset", "paper"]
    _, config = parse_fit_args(epic_train.build_parser(preset_defaults(argv, "epic")), argv)
    train, model = config.train, config.model
    assert (train.epochs, train.lr, train.schedule, train.lr_drop_epochs, train.lr_drop_factor) == \
        (120, 1e-1, "step", "70", 0.1)  # the released code's 1e-1, then 1e-2 for the last 50 epochs
    assert (train.batch_size, train.pseudo_window, train.optimizer, train.momentum, train.weight_decay,
            train.grad_clip) == (96, 10, "sgd", 0.9, 5e-4, 0.0)
    assert (model.pseudo_weight, model.pseudo_reduction, model.num_tokens, model.num_align_tokens) == \
        (3000.0, "elementwise_mean", 512, None)  # n_u: one token per action class (3,806 on EPIC)
    assert (model.dim, model.projection_depth, model.fusion_depth, model.heads, model.align_weight,
            model.normalize) == (256, 6, 6, 8, 0.001, "inputs")
    # the released Attention(dim, heads=8, dim_head=64) of both transformers: 8 x 64 = 512 wide
    assert (model.head_dim, model.mlp_ratio, model.align_reduction) == (64, 2.0, "elementwise_mean")
    # without the preset: the model settings are the paper's, alpha on the released code's scale,
    # the heads this library's default width (dim // heads)
    _, plain = parse_fit_args(epic_train.build_parser(), [str(epic_store), "--out", "x"])
    assert (plain.model.pseudo_weight, plain.model.pseudo_reduction, plain.model.head_dim) == \
        (3000.0, "elementwise_mean", None)

    run = tmp_path / "run"
    assert epic_train.main([
        str(epic_store), "--out", str(run), "--preset", "paper", "--epochs", "2", "--lr-drop-epochs", "1",
        "--unimodal-epochs", "2", "--pseudo-window", "1", "--num-tokens", "4", "--dim", "16",
        "--projection-depth", "1", "--fusion-depth", "1", "--heads", "2", "--batch-size", "4", "--device", "cpu",
        "--quiet"]) == 0
    assert "note: --preset paper trains as the paper does, but" in capsys.readouterr().err
    saved = json.loads((run / "config.json").read_text())["config"]
    assert (saved["train"]["optimizer"], saved["train"]["schedule"], saved["model"]["pseudo_weight"],
            saved["model"]["head_dim"]) == ("sgd", "step", 3000.0, 64)
    assert 0.0 <= json.loads((run / "metrics.json").read_text())["test"]["action_top1"] <= 1.0
    lrs = [json.loads(line)["lr"] for line in (run / "log.jsonl").read_text().splitlines()
           if json.loads(line).get("stage") == "multimodal" and "lr" in json.loads(line)]
    assert lrs[-1] == pytest.approx(1e-2)  # dropped ten-fold at epoch 1


# ------------------------------------------------------------------------------ the released code

def _table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the list-table row of docs/training.rst whose first cell is ``first_cell``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == f"* - {first_cell}")
    cells: list[str] = [first_cell]
    for line in lines[start + 1:]:
        stripped = line.strip()
        if stripped.startswith("* - ") or not stripped:
            break
        if stripped.startswith("- "):
            cells.append(stripped[2:])
        else:
            cells[-1] += " " + stripped
    return cells


def test_training_docs_say_the_released_code_trains_in_float32():
    """The released ``train.py`` (EPIC-Kitchens) passes its loss through a ``GradScaler`` but
    never enters ``torch.autocast`` nor casts to half: it trains in float32. The table of
    docs/training.rst says so."""
    row = _table_row((ROOT / "docs" / "training.rst").read_text(), "mixed precision (``--amp``)")
    released = row[2]
    assert "float32" in released and "float16" not in released, row
