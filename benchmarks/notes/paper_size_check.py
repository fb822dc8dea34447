"""Do FitConfig's default learning rate and warm-up train the paper-size models (D=256, 6 + 6
layers, 8 heads, k*=16)? Synthetic classification, 600 rows per training split, 200 val/test,
3 epochs (2 unimodal), everything else FitConfig's defaults; one line per run appended to
benchmarks/notes/defaults.jsonl with the per-epoch training loss and val top-1.
Recorded lines come from the pre-restructure layout (branch ``realdata`` at commit 6e67df5,
``umilayers.recipes``); the script now uses ``umilayers.train`` and today's option names.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    torch.set_num_threads(1)
    from umilayers.data.synthetic import make_synthetic_store
    from umilayers.train import fit

    methods = sys.argv[1].split(",")
    lrs = [None if v == "default" else float(v) for v in sys.argv[2].split(",")]
    warmups = [int(v) for v in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1]
    store = Path("/tmp/rd/syn/paper-size-classification")
    if not (store / "store.json").exists():
        make_synthetic_store("classification", store, num_train=600, num_eval=200, seed=0)
    for method, lr, warmup in itertools.product(methods, lrs, warmups):
        out = Path(f"/tmp/rd/runs/paper-{method}-{lr}-{warmup}")
        start = time.perf_counter()
        m = fit(store, method, out, overwrite=True, quiet=True, epochs=3, unimodal_epochs=2, pseudo_window=1,
                lr=lr, warmup_epochs=warmup)
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        curve = [(r["epoch"], round(r["loss"], 4), r["val"]["top1"]) for r in log if r.get("stage") == "multimodal"]
        rec = {"check": "paper-size", "method": method, "lr": lr, "warmup": warmup, "val": m["val"]["top1"],
               "test": m["test"]["top1"], "curve": curve, "wall_s": round(time.perf_counter() - start, 1),
               "load": round(os.getloadavg()[0], 2)}
        print(json.dumps(rec), flush=True)
        with open(os.environ.get("DEFAULTS_LOG", str(Path(__file__).with_name("defaults.jsonl"))), "a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
