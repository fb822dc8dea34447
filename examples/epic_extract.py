"""EPIC-Kitchens-100 raw data -> token features in a FeatureStore (resumable, by shard).

    python examples/epic_extract.py --annotations epic-kitchens-100-annotations \\
        --rgb EPIC-KITCHENS --audio EPIC-KITCHENS-Audio --out epic_rgb_audio \\
        --setting rgb+audio --split-dir Unseen-Modality-Interaction/epic-annotations \\
        --weights rgb=swinT_checkpoint.torch --weights audio=audioset_10_10_0.4593.pth

See docs/datasets_epic.rst for the folder layout, the weights and the splits. ``--preset paper``
preprocesses as the paper's released code does (RGB: shorter side 256, centre 224 crop; audio: its
filterbank statistics, a random 128-frame crop in training, several crops averaged at val/test);
without it: shorter side 224, AST's AudioSet statistics, the first 128 frames. Any flag given
overrides the preset.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from umilayers._threads import add_threads_argument, apply_thread_policy
from umilayers.cli import USER_ERRORS, ArgumentParser, HelpFormatter, report_error
from umilayers.datasets import epic


def _preset(argv: Optional[Sequence[str]]) -> list[str]:
    """The ``--preset`` named in ``argv`` (read first, so that it sets defaults other flags override)."""
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=["paper"], default=None)
    known, _ = pre.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    return [known.preset] if known.preset else []


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--annotations", required=True,
                      help="folder holding EPIC_100_train.csv (and EPIC_100_validation.csv)")
    data.add_argument("--rgb", help="root of <participant>/rgb_frames/<video>/frame_%%010d.jpg")
    data.add_argument("--flow", help="root of <participant>/flow_frames/<video>/{u,v}/frame_%%010d.jpg")
    data.add_argument("--audio", help="folder of wavs: [<participant>/]<narration_id>.wav (one per "
                                      "clip) or [<participant>/]<video_id>.wav (one per video)")
    data.add_argument("--out", required=True, help="FeatureStore folder to write")
    data.add_argument("--setting", required=True, choices=list(epic.SETTINGS),
                      help="the modalities: one of the paper's settings (one training split per modality)")
    data.add_argument("--split-dir", help="the paper's released split (the folder holding "
                      "EPIC_100_train_full_half1.csv ..., available_sound.csv, "
                      "epic_action_classes.csv), or <split>.txt files of narration ids; default: "
                      "participant-disjoint splits")
    data.add_argument("--seed", type=int, default=0, help="participant shuffle seed")
    data.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1),
                      metavar=("TRAIN", "VAL", "TEST"), help="participant fractions")
    data.add_argument("--skip-missing", action="store_true",
                      help="drop clips whose frames or wav are missing (counts are reported)")
    data.add_argument("--preset", choices=["paper"], default=None,
                      help="paper = the released code's preprocessing: --short-side 256 --audio-stats released "
                           "--audio-crop released; flags given override it")

    model = parser.add_argument_group("backbones")
    model.add_argument("--weights", action="append", default=[],
                       help="'random', a folder with rgb.pth/flow.pth/audio.pth, or MODALITY=PATH "
                            "(repeatable); AST and Video Swin / Omnivore checkpoints load in their "
                            "original key names; never downloaded")
    model.add_argument("--frames", type=int, default=32, help="RGB frames per clip")
    model.add_argument("--flow-frames", type=int, help="flow frames per clip (default: --frames)")
    model.add_argument("--image-size", type=int, default=224, help="RGB/flow input side")
    model.add_argument("--short-side", type=int, default=None,
                       help="RGB: shorter side resized to this, then the centre --image-size crop (default: "
                            "--image-size, the whole shorter side; the released code: 256, --preset paper's; "
                            "the paper: none in what we quote)")
    model.add_argument("--rgb-arch", default="swin3d_t", choices=["swin3d_t", "swin3d_s", "swin3d_b"],
                       help="RGB backbone (torchvision's video Swin)")
    model.add_argument("--flow-arch", default="resnet18", choices=["resnet18", "resnet50"],
                       help="flow backbone (torchvision's ResNet)")
    model.add_argument("--audio-arch", default="deit_base_distilled_patch16_384",
                       help="timm ViT name (AST's)")
    model.add_argument("--audio-frames", type=int, default=128,
                       help="10 ms filterbank frames per clip, padded/cropped (the paper's: 128)")
    model.add_argument("--audio-stride", type=int, default=10,
                       help="16x16 patch stride over the 128-bin spectrogram (AST's: 10)")
    model.add_argument("--audio-stats", choices=list(epic.AUDIO_STATS), default="audioset",
                       help="filterbank normalisation: audioset = AST's AudioSet mean/std (-4.27, 4.57); "
                            "released = the released code's (-5.388, 2.94), --preset paper's; "
                            "the paper: none in what we quote")
    model.add_argument("--audio-crop", choices=list(epic.AUDIO_CROPS), default="first",
                       help="frames kept of a clip longer than --audio-frames: first = the first ones; "
                            "released = the released code's, --preset paper's (a random crop in training "
                            "splits, val/test crops every n/3.1 frames, their tokens averaged); "
                            "the paper: none in what we quote")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="cpu", help="where the backbones run: cpu, cuda, cuda:1, ...")
    run.add_argument("--batch-size", type=int, default=8, help="clips per forward pass")
    run.add_argument("--workers", type=int, default=0, help="input-decoding processes")
    run.add_argument("--shard-size", type=int, default=256, help="clips per shard")
    run.add_argument("--work-dir", help="shard folder (default <out>.shards); rerun to resume")
    run.add_argument("--keep-shards", action="store_true", help="keep the shards once the store is written")
    run.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(run, note="The measurements behind the CPU default were of the trainer's models; "
                                    "for these backbones on a CPU of your own, --threads 0 may be faster.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    if "paper" in _preset(argv):
        parser.set_defaults(**epic.RELEASED_PREPROCESSING)
    args = parser.parse_args(argv)
    apply_thread_policy(args.threads, args.device)
    modalities = epic.SETTINGS[args.setting]
    try:
        config = epic.ExtractionConfig(
            frames=args.frames, image_size=args.image_size, short_side=args.short_side,
            flow_frames=args.flow_frames, rgb_arch=args.rgb_arch, flow_arch=args.flow_arch,
            audio_arch=args.audio_arch, audio_frames=args.audio_frames, audio_stride=args.audio_stride,
            audio_stats=args.audio_stats, audio_crop=args.audio_crop,
            device=args.device, batch_size=args.batch_size,
            workers=args.workers, weights=epic.resolve_weights(args.weights, modalities),
        )
    except ValueError as err:
        parser.error(str(err))
    roots = {"rgb": args.rgb, "flow": args.flow, "audio": args.audio}
    missing = [m for m in modalities if roots[m] is None]
    if missing:
        parser.error(f"--setting {args.setting} needs " + " ".join(f"--{m} ROOT" for m in missing))
    try:
        report = epic.extract_epic(
            args.annotations, roots, args.out, args.setting, config=config,
            shard_size=args.shard_size, skip_missing=args.skip_missing, split_dir=args.split_dir,
            seed=args.seed, fractions=args.fractions, work_dir=args.work_dir,
            overwrite=args.overwrite, keep_shards=args.keep_shards, progress=not args.no_progress,
        )
    except USER_ERRORS as err:
        return report_error(parser.prog, err)
    sizes = ", ".join(f"{m} {t}x{d}" for m, (t, d) in report["modalities"].items())
    print(f"wrote {args.out}: {report['num_actions']} actions; tokens {sizes}; clips "
          + ", ".join(f"{n} {c}" for n, c in report["splits"].items()))
    if report["no_sound"]:
        print("left out, video without sound: "
              + ", ".join(f"{n} {c}" for n, c in report["no_sound"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
