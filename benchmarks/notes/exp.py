"""One experiment of the real-data diagnosis: fit + per-subset / per-branch evaluation, logged.

Usage: python benchmarks/notes/exp.py TAG STORE METHOD '{"fit": "options"}' [--keep]
Appends one JSON line to benchmarks/notes/experiments.jsonl (command, options, val/test, per
test-time subset, per branch, wall time, load average) so nothing is lost on interruption.

The runs recorded in experiments.jsonl were made on the pre-restructure layout (branch
``realdata`` up to commit 6e67df5, ``umilayers.recipes``), whose option names differ: their
``options`` say ``tokens``, ``depth``, ``no_align``, ``no_pseudo``, ``unimodal_predictor``;
today's are ``num_tokens``, ``projection_depth`` / ``fusion_depth``, ``use_alignment=false``,
``use_pseudo=false``, ``predictor`` (this script uses today's API and names).
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnose import branch_report  # noqa: E402

BASE = dict(dim=64, num_tokens=16, projection_depth=2, fusion_depth=2, heads=4, batch_size=64, lr=2e-3,
            predictor="transformer", epochs=12, unimodal_epochs=8, pseudo_window=4, warmup_epochs=0)


def main() -> None:
    torch.set_num_threads(1)
    from umilayers.train import evaluate, fit

    tag, store, method = sys.argv[1:4]
    options = json.loads(sys.argv[4]) if len(sys.argv) > 4 and not sys.argv[4].startswith("--") else {}
    opts = {**BASE, **options}
    out = Path("/tmp/rd/runs") / tag
    start = time.perf_counter()
    metrics = fit(store, method, out, overwrite=True, quiet=True, **opts)
    wall = time.perf_counter() - start
    mods = sorted(json.loads((Path(store) / "store.json").read_text())["modalities"])
    subsets = {}
    if method != "unimodal":
        for k in range(1, len(mods)):
            for s in itertools.combinations(mods, k):
                subsets["+".join(s)] = evaluate(out, split="test", modalities=list(s), device="cpu")["top1"]
    record = {"tag": tag, "store": Path(store).name, "method": method, "options": options,
              "val": metrics["val"]["top1"],
              "test": metrics["test"]["top1"], "best_epoch": metrics["best_epoch"], "subsets": subsets,
              "wall_s": round(wall, 1), "load": round(os.getloadavg()[0], 2), "time": time.strftime("%H:%M")}
    if method in ("umi", "pooled"):
        record["branches"] = branch_report(out, store)
    line = json.dumps(record)
    print(line)
    with open(os.environ.get("EXP_LOG", str(Path(__file__).with_name("experiments.jsonl"))), "a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
