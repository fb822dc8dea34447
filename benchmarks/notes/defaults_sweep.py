"""Learning-rate / warm-up sweep behind FitConfig's defaults, on the synthetic suite (val only).

Usage: python benchmarks/notes/defaults_sweep.py TASKS METHODS LRS WARMUPS [SEED] [EPOCHS]
e.g.   python benchmarks/notes/defaults_sweep.py classification,regression umi,late-fusion 1e-3,2e-3 0,1
Each run: the demo's store and model size (DemoSize.default: 1,200 per training split, dim 32,
tokens 8, depth 1, heads 4, batch 64, 12 epochs, 8 unimodal, window 4), transformer unimodal
predictor, the given lr / warmup_epochs. Appends one JSON line per run to
benchmarks/notes/defaults.jsonl (val and test metric, best epoch, wall time, load).

Recorded lines come from the pre-restructure layout (branch ``realdata`` at commit 6e67df5,
``umilayers.recipes``); the script now uses ``umilayers.train`` and today's option names.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    torch.set_num_threads(1)
    from umilayers.data.synthetic import make_synthetic_store
    from umilayers.demo import DemoSize, headline_metric
    from umilayers.train import fit

    tasks, methods, lrs, warmups = (a.split(",") for a in sys.argv[1:5])
    seed = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    epochs = int(sys.argv[6]) if len(sys.argv) > 6 else None
    size = DemoSize.default()
    model = {k: v for k, v in size.model.items() if k != "lr"}
    for task in tasks:
        store = Path(f"/tmp/rd/syn/{task}-seed{seed}")
        if not (store / "store.json").exists():
            make_synthetic_store(task, store, num_train=size.num_train, num_eval=size.num_eval, seed=seed)
        for method in methods:
            for lr in lrs:
                for warmup in warmups:
                    opts = dict(model, lr=float(lr), warmup_epochs=int(warmup), epochs=epochs or size.epochs,
                                unimodal_epochs=size.unimodal_epochs, pseudo_window=size.pseudo_window)
                    start = time.perf_counter()
                    m = fit(store, method, f"/tmp/rd/runs/sweep-{task}-{method}", seed=seed, overwrite=True,
                            quiet=True, **opts)
                    rec = {"task": task, "method": method, "lr": float(lr), "warmup": int(warmup), "seed": seed,
                           "epochs": opts["epochs"], "val": headline_metric(task, m["val"]),
                           "test": headline_metric(task, m["test"]), "best_epoch": m["best_epoch"],
                           "wall_s": round(time.perf_counter() - start, 1), "load": round(os.getloadavg()[0], 2)}
                    print(json.dumps(rec), flush=True)
                    log = os.environ.get("DEFAULTS_LOG", str(Path(__file__).with_name("defaults.jsonl")))
                    with open(log, "a") as f:
                        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
