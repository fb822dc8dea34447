"""CI check: `torchrun --nproc_per_node=2 -m umilayers fit` equals a single-process fit.

Both runs train the same method on the same tiny synthetic store with the same seed and global
batch size. The distributed sampler gives every step the same global batch as one process and
each rank's loss is weighted by its share, so the runs differ only by float rounding and by the
two documented per-rank effects (the alignment loss and the retrieval triplet loss see only the
rank's sub-batch). Stated tolerance: classification top-1 within one test sample (1/num_eval),
regression MAE within 1e-3 relative.

Usage: python .ci/torchrun_check.py WORKDIR
"""

import json
import subprocess
import sys
from pathlib import Path

from umilayers.data.synthetic import make_synthetic_store

NUM_EVAL = 64
FIT = ["--epochs", "2", "--unimodal-epochs", "2", "--pseudo-window", "1", "--dim", "16",
       "--num-tokens", "4", "--projection-depth", "1", "--fusion-depth", "1", "--heads", "2",
       "--batch-size", "32", "--lr", "1e-3", "--device", "cpu", "--quiet", "--seed", "0"]


def fit(store: Path, out: Path, task: str, processes: int) -> dict:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={processes}"] if processes > 1 else [sys.executable])
    command = launcher + ["-m", "umilayers", "fit", str(store), "--method", "umi", "--out", str(out)] + FIT
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads((out / "metrics.json").read_text())["test"]


def main(workdir: str) -> int:
    root = Path(workdir)
    failures = []
    for task, key, tolerance in (("classification", "top1", 1.0 / NUM_EVAL + 1e-9),
                                 ("regression", "mae", 1e-3)):
        store = root / f"store-{task}"
        make_synthetic_store(task, store, num_train=96, num_eval=NUM_EVAL, seed=0)
        one = fit(store, root / f"run-{task}-1", task, 1)[key]
        two = fit(store, root / f"run-{task}-2", task, 2)[key]
        difference = abs(one - two) if key == "top1" else abs(one - two) / max(abs(one), 1e-12)
        verdict = "ok" if difference <= tolerance else "FAIL"
        print(f"{task}: test {key} 1 process {one:.6f}, 2 processes {two:.6f}, "
              f"difference {difference:.2e} (tolerance {tolerance:.2e}) {verdict}", flush=True)
        if verdict != "ok":
            failures.append(task)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
