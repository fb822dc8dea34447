"""How far is the common-space sum of two modalities from anything training fed the fusion
transformer? For a finished umi run on the halves store: nearest-neighbour distance (flattened
K x D fused features) from test inputs to the training inputs (each training row has one half),
for test rows with the left half only, the right half only, and both (the sum).
Recorded lines come from the pre-restructure layout (branch ``realdata`` at commit 6e67df5,
``umilayers.recipes``); the script now uses ``umilayers.train`` and today's option names.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnose import arrays, load_model  # noqa: E402


@torch.no_grad()
def fused(model, feats, subset, limit):
    out = []
    for i in range(0, limit, 500):
        x = {m: torch.from_numpy(np.asarray(feats[m][i:min(i + 500, limit)], dtype=np.float32)) for m in subset}
        f = {m: model.projections[m](x[m]) for m in subset}
        out.append(sum(f.values()).flatten(1))
    return torch.cat(out)


def main() -> None:
    torch.set_num_threads(1)
    run, store = sys.argv[1], sys.argv[2]
    model = load_model(run)
    train = torch.cat([fused(model, arrays(store, split)[0], (m,), 5000)
                       for split, m in (("train_left", "left"), ("train_right", "right"))])
    test, _ = arrays(store, "test")
    for subset in (("left",), ("right",), ("left", "right")):
        q = fused(model, test, subset, 2000)
        d = torch.cdist(q, train).min(dim=1).values
        print(f"{'+'.join(subset):11s} nearest training input: median {d.median():.2f}, "
              f"mean {d.mean():.2f}; norm median {q.norm(dim=1).median():.2f}")


if __name__ == "__main__":
    main()
