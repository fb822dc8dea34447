"""The trainer's own overhead: ``umilayers fit`` against a bare PyTorch loop, and what validating costs.

Size: the demo's classification task (``umilayers demo``: two training splits of 1,200 samples,
rgb-only and audio-only, 400 val samples) and the demo's model and settings
(:meth:`umilayers.demo.DemoSize.default`: D=32, K=8, depth 1 + 1, 4 heads, batch 64, lr 2e-3),
method ``umi`` (stage 1 kept short: one unimodal epoch, the measured stage is the multimodal one).

Measured in one process, interleaved: :func:`umilayers.train.fit` runs with a ``callback``
that stamps every step and the end of every epoch (timing from outside the library, as
``docs/training.rst`` describes); after each multimodal epoch of ``fit`` the callback runs one
epoch of the bare loop, then one bare validation pass, and only then lets ``fit`` go on. So every
round holds one epoch of each, under the same load.

- **fit, training**: from the end of the previous epoch (the callback's return) to the last
  step of the epoch: ``fit``'s sampler, collate, pseudo-label lookups, the step (forward, Eq. 3,
  backward, clipping, AdamW, schedule), its bookkeeping.
- **fit, end of epoch**: from the last step to the checkpoint event: validation (prediction on
  the val split, its metric), the copy of the best model, the checkpoint written to disk.
- **bare loop**: the same model class and initialisation, the same data (the store's training
  splits through a ``DataLoader(shuffle=True)`` with the store's ``collate``, the pseudo-labels
  from the same bank), the same step arithmetic (forward, ``model.loss``, backward,
  ``clip_grad_norm_``, AdamW, the same learning-rate schedule), nothing else.
- **bare validation**: prediction over the val split (eval mode, no grad) and top-1.

Reported: samples per second of each (medians over the rounds after ``--warmup``), the
overhead ``fit / bare - 1`` (median of per-round ratios; goal <= 10%), and the end-of-epoch and
bare validation times as a fraction of fit's training epoch (goal <= 15%), each in wall time and
in the process's CPU time (``time.process_time``; on a loaded machine the steadier one: it
leaves out the time spent waiting for a core). Writes ``results/fit.json`` and
``results/fit.png``.

Run::

    python benchmarks/fit.py                 # demo size, 24 epochs (rounds), ~2 min on 2 cores
    python benchmarks/fit.py --quick         # smoke test, < 30 s
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any, Optional  # noqa: E402

import _common  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

sys.path.insert(0, str(_common.ROOT))
from umilayers import metrics  # noqa: E402
from umilayers.data import collate  # noqa: E402
from umilayers.data.synthetic import make_synthetic_store  # noqa: E402
from umilayers.demo import DemoSize  # noqa: E402
from umilayers.pseudo_labels import PseudoLabelBank  # noqa: E402
from umilayers.train import FitConfig, FitEvent, fit  # noqa: E402
from umilayers.train.loop import concat, lr_schedule, splits  # noqa: E402
from umilayers.train.run import model_for_store  # noqa: E402

GOAL_OVERHEAD, GOAL_VALIDATION = 0.10, 0.15


class Clock:
    """Wall and CPU time of now, and of intervals between two of them."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def since(self, start: "Clock") -> tuple[float, float]:
        return self.wall - start.wall, self.cpu - start.cpu


class BareLoop:
    """The loop a user writes by hand: the same model, data, pseudo-labels and optimizer as ``fit``."""

    def __init__(self, cfg: FitConfig, store: Any, bank: PseudoLabelBank, steps_per_epoch: int) -> None:
        torch.manual_seed(cfg.train.seed)
        self.cfg, self.bank = cfg, bank
        self.model = model_for_store(cfg, store)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.peak_lr(),
                                           weight_decay=cfg.train.weight_decay)
        self.scheduler = lr_schedule(self.optimizer, cfg.train, steps_per_epoch, cfg.train.epochs)
        batch = cfg.train.batch_size
        self.train = DataLoader(concat(store, splits(store, "train")), batch_size=batch, shuffle=True,
                                collate_fn=collate)
        self.val = DataLoader(concat(store, splits(store, "val")), batch_size=batch, collate_fn=collate)
        self.samples = len(self.train.dataset)

    def epoch(self) -> tuple[float, float]:
        """One training epoch; returns its wall and CPU time."""
        started = Clock()
        self.model.train()
        for batch in self.train:
            pseudo = self.bank.targets(batch.indices, batch.present, batch.targets)
            out = self.model(batch.inputs, batch.padding_masks, batch.present)
            loss = self.model.loss(out, batch.targets, pseudo, text_padding_mask=batch.text_padding_mask).total
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return Clock().since(started)

    @torch.no_grad()
    def validate(self) -> tuple[tuple[float, float], float]:
        """Top-1 on the val split; returns ``((wall, CPU seconds), top1)``."""
        started = Clock()
        self.model.eval()
        predictions, targets = [], []
        for batch in self.val:
            predictions.append(self.model(batch.inputs, batch.padding_masks, batch.present).prediction)
            targets.append(batch.targets)
        top1 = metrics.top1(torch.cat(predictions), torch.cat(targets))
        return Clock().since(started), top1


class Rounds:
    """``fit``'s callback: stamps fit's epochs and runs one bare epoch and validation after each."""

    def __init__(self, cfg: FitConfig, store: Any, out: Path) -> None:
        self.cfg, self.store, self.out = cfg, store, out
        self.bare: Optional[BareLoop] = None
        self.resumed_at = Clock()  # when fit last got control back
        self.last_step: Optional[Clock] = None
        self.checkpoint: Optional[Clock] = None
        self.steps = 0
        self.rounds: list[dict[str, Any]] = []

    def __call__(self, event: FitEvent) -> None:
        now = Clock()
        if event.stage != "multimodal":
            self.resumed_at = Clock()
            return
        if event.kind == "step":
            self.last_step, self.steps = now, self.steps + 1
            return
        if event.kind == "checkpoint":
            self.checkpoint = now
            return
        record = event.record or {}
        fit_train = self.last_step.since(self.resumed_at)
        fit_end = self.checkpoint.since(self.last_step)
        if self.bare is None:  # stage 1 has written the bank by now
            bank = PseudoLabelBank.load(self.out / "pseudo_labels")
            self.bare = BareLoop(self.cfg, self.store, bank, self.steps)
        bare_train = self.bare.epoch()
        bare_val, bare_top1 = self.bare.validate()
        self.rounds.append({"epoch": event.epoch, "steps": self.steps, "validated": "val" in record,
                            "fit_val_top1": (record.get("val") or {}).get("top1"), "bare_val_top1": bare_top1})
        for clock, i in (("", 0), ("cpu_", 1)):
            self.rounds[-1].update({f"{clock}fit_train_s": fit_train[i], f"{clock}fit_end_of_epoch_s": fit_end[i],
                                    f"{clock}bare_train_s": bare_train[i], f"{clock}bare_validation_s": bare_val[i]})
        print(f"  epoch {event.epoch}: fit {fit_train[0]:.2f} s + end of epoch {fit_end[0]:.2f} s, "
              f"bare {bare_train[0]:.2f} s + validation {bare_val[0]:.2f} s ({self.steps} steps; CPU "
              f"{fit_train[1]:.2f} + {fit_end[1]:.2f}, {bare_train[1]:.2f} + {bare_val[1]:.2f} s)", flush=True)
        self.steps = 0
        self.resumed_at = Clock()


def summarise(rounds: list[dict], samples: int, warmup: int, clock: str = "") -> dict[str, Any]:
    """Figures of the rounds after ``warmup``, in wall time (``clock=""``) or CPU time (``"cpu_"``)."""
    timed = rounds[warmup:]
    fit_train = [r[f"{clock}fit_train_s"] for r in timed]
    bare_train = [r[f"{clock}bare_train_s"] for r in timed]
    end = [r[f"{clock}fit_end_of_epoch_s"] for r in timed]
    return {
        "fit_samples_per_s": samples / statistics.median(fit_train),
        "bare_samples_per_s": samples / statistics.median(bare_train),
        "overhead": _common.median_ratio(fit_train, bare_train) - 1.0,
        "end_of_epoch_share": _common.median_ratio(end, fit_train),
        "bare_validation_share": _common.median_ratio([r[f"{clock}bare_validation_s"] for r in timed], bare_train),
        "rounds_timed": len(timed),
    }


def plot(path: Path, result: dict) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    s = result["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].bar(["umilayers fit", "bare loop"], [s["fit_samples_per_s"], s["bare_samples_per_s"]], color=["C0", "C7"])
    axes[0].set_ylabel("training samples / s")
    axes[0].set_title(f"overhead {s['overhead']:+.1%} wall, {result['summary_cpu']['overhead']:+.1%} CPU "
                      f"(goal <= {GOAL_OVERHEAD:.0%})", fontsize=9)
    shares = {"fit: end of epoch\n(val + checkpoint)": s["end_of_epoch_share"],
              "bare validation": s["bare_validation_share"]}
    axes[1].bar(list(shares), list(shares.values()), color=["C0", "C7"])
    axes[1].axhline(GOAL_VALIDATION, color="grey", linestyle="--", linewidth=0.8, label="goal")
    axes[1].set_ylabel("fraction of a training epoch")
    axes[1].legend(fontsize=7)
    _common.finish_figure(fig, path, result["title"])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None,
                   help="multimodal epochs, each one round (default 24; --quick: 3)")
    p.add_argument("--warmup", type=int, default=1, help="first rounds not counted")
    _common.add_threads_option(p)
    p.add_argument("--quick", action="store_true", help="smoke size: a small store and model, 3 epochs")
    p.add_argument("--out", type=Path, default=_common.ROOT / "results")
    p.add_argument("--name", default=None, help="results/<name>.json and .png (default fit)")
    args = p.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else 24)
    if epochs <= args.warmup:
        p.error(f"--epochs: expected more than --warmup={args.warmup} epochs, got {epochs}")
    threads = _common.set_threads(args.threads)
    size = DemoSize.quick() if args.quick else DemoSize.default()
    name = args.name or ("fit_quick" if args.quick else "fit")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="umilayers-fit-bench-") as tmp:
        root = Path(tmp)
        store = make_synthetic_store("classification", root / "store", num_train=size.num_train,
                                     num_eval=size.num_eval)
        options = dict(size.model, method="umi", epochs=epochs, unimodal_epochs=1, pseudo_window=1,
                       device="cpu", quiet=True)
        cfg = FitConfig.from_options(**options)
        rounds = Rounds(cfg, store, root / "run")
        info = _common.machine_info()
        samples = sum(len(store.dataset(s)) for s in splits(store, "train"))
        title = (f"umilayers fit vs a bare loop, demo classification ({samples} training samples, "
                 f"{sum(len(store.dataset(s)) for s in splits(store, 'val'))} val), umi, D={cfg.model.dim}, "
                 f"K={cfg.model.num_tokens}, batch {cfg.train.batch_size}, {epochs} epochs, "
                 f"{_common.describe_machine(info)}")
        print(title)
        fit(store, out=root / "run", config=cfg, callback=rounds)
    summary = summarise(rounds.rounds, samples, args.warmup)
    cpu = summarise(rounds.rounds, samples, args.warmup, "cpu_")
    info_after = _common.machine_info()
    steps = math.ceil(samples / cfg.train.batch_size)
    print(_common.table([
        ["", "samples / s", "epoch (s)", "samples / CPU s", "epoch (CPU s)"],
        *([name, f"{summary[key]:.0f}", f"{samples / summary[key]:.2f}", f"{cpu[key]:.0f}", f"{samples / cpu[key]:.2f}"]
          for name, key in (("umilayers fit (training)", "fit_samples_per_s"), ("bare loop", "bare_samples_per_s"))),
    ]))
    overhead_met = max(summary["overhead"], cpu["overhead"]) <= GOAL_OVERHEAD
    end_met = max(summary["end_of_epoch_share"], cpu["end_of_epoch_share"]) <= GOAL_VALIDATION

    def verdict(met: bool) -> str:
        return "quick size" if args.quick else ("met" if met else "MISSED")

    print(f"fit's overhead over the bare loop (median of per-round ratios - 1): {summary['overhead']:+.1%} wall, "
          f"{cpu['overhead']:+.1%} CPU [{verdict(overhead_met)}: goal <= {GOAL_OVERHEAD:.0%}]")
    print(f"end of epoch (validation + checkpoint) / training epoch (median of per-round ratios): "
          f"{summary['end_of_epoch_share']:.1%} wall, {cpu['end_of_epoch_share']:.1%} CPU [{verdict(end_met)}: goal <= "
          f"{GOAL_VALIDATION:.0%}]; bare validation alone: {summary['bare_validation_share']:.1%} wall, "
          f"{cpu['bare_validation_share']:.1%} CPU")
    result = {
        "title": title,
        "command": " ".join(["python", "benchmarks/fit.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": {"epochs": epochs, "warmup": args.warmup, "threads": threads,
                   "quick": args.quick, "samples": samples, "steps_per_epoch": steps, "fit_options": options},
        "machine": info,
        "load_average_1min_after": info_after.get("load_average_1min"),
        "rounds": rounds.rounds,
        "summary": summary,
        "summary_cpu": cpu,
        "goals": {"overhead": {"limit": GOAL_OVERHEAD, "met": overhead_met},
                  "end_of_epoch": {"limit": GOAL_VALIDATION, "met": end_met}},
        "seconds": time.perf_counter() - started,
    }
    _common.write_results(args.out, name, result, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
