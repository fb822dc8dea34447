"""Training-step time against torch's intra-op thread count, as the machine is and under load.

What a user's first runs meet: one training step of :class:`umilayers.UnseenModalityModel`
(collate of 64 samples read from the synthetic classification store, half rgb-only and half
audio-only, forward, the loss of Eq. 3 with alignment, cross-entropy and pseudo-label KL,
backward, gradient clipping at 1.0, AdamW) at two sizes:

- ``demo``: the size ``umilayers demo`` trains (``umilayers.demo.DemoSize.default()``: D=32,
  k*=8, depth 1, 4 heads, batch 64);
- ``paper``: the paper's D=256, k*=16, 6 layers in both transformers, 8 heads, batch 64 (the
  defaults of ``umilayers fit``), so that the rule is not tuned to one size.

Variants: torch intra-op threads 1, 2, torch's default and all cores (the distinct ones), with
OpenMP's default waiting (threads spin a while before they sleep: what a user meets), and the
same counts above 1 with ``OMP_WAIT_POLICY=passive`` (waiting threads sleep at once). A wait
policy is read once when torch loads, so each policy has its own worker process, started once;
the thread count is switched inside a worker with ``torch.set_num_threads``.

Two conditions, one after the other:

1. **as is**: the machine as it is (on a shared machine, that is a loaded machine: the load
   average at the start and the end of each measurement is in the JSON);
2. **loaded**: plus a controlled background load that this script starts and stops:
   ``--load-procs`` (default: one per CPU) processes alternating numpy matrix products and pure
   Python arithmetic, one thread each. They stop by themselves after ``--load-cap`` seconds or
   when this script's process goes away, and are killed in a ``finally`` whatever happens; the
   CPU time they got is reported.

Each (condition, size) is timed in rounds: every round runs every variant once, in a rotated
order, so the load hits them alike. A round's block of a variant runs enough steps to last about
``--block-seconds`` (calibrated in the warm-up round); its figure is the median step of the block.
Reported: the median over rounds, and each variant's ratio to one thread as the median of the
per-round ratios. Also reported once, as the machine is: whether the gradients of one step are
bit-identical to one thread's at each count (float sums change with the thread count).

Run::

    python benchmarks/threads.py            # both sizes, both conditions: ~5-10 min on a loaded 2-core machine
    python benchmarks/threads.py --quick    # smoke test: demo size, 2 rounds, seconds

Writes ``results/threads.json`` and ``results/threads.png``. The rule these figures chose is in
``umilayers/_threads.py``; the figures and the reasoning in ``docs/benchmarks.rst`` ("Threads").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Iterator, Optional, Sequence  # noqa: E402

import _common  # noqa: E402

sys.path.insert(0, str(_common.ROOT))

WORKER = "--worker"
#: The demo size if ``umilayers.demo.DemoSize.default()`` cannot be read (its value on 2026-12-01).
DEMO_FALLBACK = {"dim": 32, "num_tokens": 8, "projection_depth": 1, "fusion_depth": 1, "heads": 4, "batch": 64,
                 "lr": 2e-3}
#: The paper's size (the model defaults of ``umilayers fit``) at the demo's batch; ``lr`` is fit's first
#: default, as measured (a step's time does not depend on it).
PAPER = {"dim": 256, "num_tokens": 16, "projection_depth": 6, "fusion_depth": 6, "heads": 8, "batch": 64, "lr": 1e-4}
WAIT_POLICIES = ("default", "passive")
CONDITIONS = ("as is", "loaded")
# Environment variables that would change what a worker measures; each worker starts without them.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

# A background load process: numpy matrix products (BLAS, one thread) and pure Python, until
# the cap or until its parent is gone. Each pass is a few milliseconds, so it stops promptly.
LOAD_CODE = """
import os, sys, time
import numpy as np
cap, parent = float(sys.argv[1]), int(sys.argv[2])
end = time.monotonic() + cap
a = np.random.default_rng(os.getpid()).standard_normal((96, 96))
while time.monotonic() < end and os.getppid() == parent:
    for _ in range(20):
        a = np.tanh(a @ a * 0.01)
    s = 0
    for i in range(20000):
        s += i * i
"""


# ----------------------------------------------------------------------------- worker side


def demo_size() -> tuple[dict, str]:
    """The demo's model size and batch, and where they came from."""
    def pick(m: dict, *names: str) -> Any:  # the model's argument name, or FitConfig's older one
        return m[next((n for n in names if n in m), names[0])]

    try:
        from umilayers.demo import DemoSize
        from umilayers.train import TrainConfig

        m = DemoSize.default().model
        # the demo trains at fit's default learning rate for its batch unless it sets one
        lr = m["lr"] if "lr" in m else TrainConfig(batch_size=m["batch_size"]).peak_lr()
        size = {"dim": m["dim"], "num_tokens": pick(m, "num_tokens", "tokens"),
                "projection_depth": pick(m, "projection_depth", "depth"),
                "fusion_depth": pick(m, "fusion_depth", "depth"), "heads": m["heads"],
                "batch": m["batch_size"], "lr": lr}
        return size, "umilayers.demo.DemoSize.default()"
    except (ImportError, AttributeError, KeyError, TypeError):
        return dict(DEMO_FALLBACK), "benchmarks/threads.py DEMO_FALLBACK (DemoSize.default() not readable)"


def build_step(size: dict, folder: Path) -> dict[str, Any]:
    """The training step of one size, its parameter count, and a gradient probe.

    Everything through the public API: the synthetic store, ``collate``, the model's forward and
    loss. The step reads nothing from disk (the batch's items are read once here).
    """
    import copy

    import torch

    from umilayers import UnseenModalityModel, collate, make_synthetic_store

    batch = size["batch"]
    store = make_synthetic_store("classification", folder, num_train=batch, num_eval=8, seed=0)
    items = []
    for split in store.splits_with_role("train"):
        dataset = store.dataset(split)
        items += [dataset[i] for i in range(len(dataset))]
    gen = torch.Generator().manual_seed(0)
    batch_items = [items[i] for i in torch.randperm(len(items), generator=gen)[:batch].tolist()]
    pseudo = torch.softmax(torch.randn(batch, store.num_outputs, generator=gen), dim=-1)
    torch.manual_seed(0)
    model = UnseenModalityModel(
        {m: int(store.modalities[m][1]) for m in sorted(store.modalities)}, num_outputs=store.num_outputs,
        dim=size["dim"], num_tokens=size["num_tokens"], projection_depth=size["projection_depth"],
        fusion_depth=size["fusion_depth"], heads=size["heads"],
    )
    probe = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size["lr"], weight_decay=0.01)

    def loss_of(net: Any) -> Any:
        b = collate(batch_items)
        return net.loss(net(b.inputs, b.padding_masks, b.present), b.targets, pseudo).total

    def step() -> None:
        loss = loss_of(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    def gradients() -> Any:
        """All gradients of one forward/backward of the untrained model, flattened."""
        probe.zero_grad(set_to_none=True)
        loss_of(probe).backward()
        return torch.cat([p.grad.flatten() for p in probe.parameters() if p.grad is not None])

    return {"step": step, "gradients": gradients, "parameters": sum(p.numel() for p in model.parameters())}


def worker_main(spec: dict) -> int:
    """A worker: builds every size, then answers one JSON request per line on stdin."""
    import tempfile

    import torch

    from umilayers._threads import choose_threads

    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the protocol

    def send(payload: dict) -> None:
        protocol.write(json.dumps(payload) + "\n")
        protocol.flush()

    default_threads = torch.get_num_threads()
    backend = [line.split(":", 1)[1].strip() for line in torch.__config__.parallel_info().splitlines()
               if line.startswith("ATen parallel backend")]
    with tempfile.TemporaryDirectory(prefix="umilayers-threads-") as tmp:
        steps = {name: build_step(size, Path(tmp) / name) for name, size in spec["sizes"].items()}
        send({"torch": torch.__version__, "torch_default_threads": default_threads,
              "parallel_backend": backend[0] if backend else None,
              "policy_cpu_threads": choose_threads(None, "cpu", environ={})[0],
              "parameters": {name: s["parameters"] for name, s in steps.items()}})
        reference: dict[str, Any] = {}
        for line in sys.stdin:
            request = json.loads(line)
            torch.set_num_threads(request["threads"])
            entry = steps[request["size"]]
            if request["cmd"] == "time":
                times = []
                for _ in range(request["steps"]):
                    start = time.perf_counter()
                    entry["step"]()
                    times.append(time.perf_counter() - start)
                send({"times_s": times})
            else:  # "gradients": compared with the first count asked (one thread)
                grads = entry["gradients"]()
                ref = reference.setdefault(request["size"], grads)
                send({"bit_identical": bool(torch.equal(grads, ref)),
                      "max_abs_difference": float((grads - ref).abs().max()),
                      "max_abs_gradient": float(ref.abs().max())})
    return 0


# ----------------------------------------------------------------------------- parent side


@dataclass(frozen=True)
class Variant:
    threads: int
    wait: str  # "default" or "passive"
    label: str


class Worker:
    """One worker process (one OpenMP wait policy), spoken to over its stdin and stdout."""

    def __init__(self, wait: str, sizes: dict) -> None:
        env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
        if wait == "passive":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        self.wait = wait
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), WORKER, json.dumps({"sizes": sizes})],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
        )
        self.info: dict = {}

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.wait}-wait worker exited with code {self.proc.wait()} "
                               f"(its error is above)")
        return json.loads(line)

    def ask(self, **request: Any) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def background_load(procs: int, cap_s: float) -> Iterator[dict]:
    """``procs`` busy processes for the duration of the block, always stopped; yields their record.

    Their CPU time (filled in on exit) is the growth of this process's reaped children's time:
    the workers are still running then, so only the load processes are counted.
    """
    record: dict[str, Any] = {"processes": procs, "cap_s": cap_s,
                              "work": "numpy 96x96 matrix products + tanh, pure-Python sums; one thread each"}
    if procs == 0:
        yield record
        return
    env = {**os.environ, **ONE_THREAD_ENV}
    cpu_before, started = children_cpu_s(), time.perf_counter()
    children: list[subprocess.Popen] = []
    try:
        for _ in range(procs):
            children.append(subprocess.Popen([sys.executable, "-c", LOAD_CODE, str(cap_s), str(os.getpid())],
                                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        record["pids"] = [c.pid for c in children]
        yield record
    finally:
        ended_by_themselves = sum(c.poll() is not None for c in children)
        for child in children:
            if child.poll() is None:
                child.kill()
        for child in children:
            child.wait()
        wall = time.perf_counter() - started
        record.update(wall_s=wall, cpu_s=children_cpu_s() - cpu_before, ended_before_kill=ended_by_themselves)
        record["cpu_share"] = record["cpu_s"] / (wall * procs) if wall > 0 else None


def time_block(workers: dict[str, Worker], v: Variant, size: str, steps: int) -> list[float]:
    return workers[v.wait].ask(cmd="time", size=size, threads=v.threads, steps=steps)["times_s"]


def measure(workers: dict[str, Worker], variants: Sequence[Variant], size: str, args: argparse.Namespace,
            log: Callable[[str], None]) -> dict:
    """Warm-up round (calibrates each variant's steps per block), then ``args.rounds`` rounds."""
    record: dict[str, Any] = {"load_average_start": load_average()}
    estimate = {}
    for v in variants:
        estimate[v] = min(time_block(workers, v, size, 2))
    steps = {v: max(1, min(args.max_steps, round(args.block_seconds / estimate[v]))) for v in variants}
    blocks: dict[Variant, list[float]] = {v: [] for v in variants}
    round_loads = []
    for r in range(args.rounds):
        shift = r % len(variants)
        for v in list(variants[shift:]) + list(variants[:shift]):
            blocks[v].append(statistics.median(time_block(workers, v, size, steps[v])))
        now = load_average()
        round_loads.append(now[0] if now else None)
        log(f"    round {r + 1}/{args.rounds}: " + ", ".join(f"{v.label} {blocks[v][-1] * 1e3:.0f} ms"
                                                               for v in variants))
    base = blocks[variants[0]]
    record["variants"] = {
        v.label: {"threads": v.threads, "wait_policy": v.wait, "steps_per_block": steps[v],
                  "median_s": statistics.median(blocks[v]), "block_medians_s": blocks[v],
                  "ratio_to_1_thread": _common.median_ratio(blocks[v], base)}
        for v in variants
    }
    record["load_average_per_round"] = round_loads
    record["load_average_end"] = load_average()
    return record


def make_variants(counts: Sequence[int], cpus: int, passive: bool) -> list[Variant]:
    def label(t: int, wait: str) -> str:
        return f"{t}{' (all)' if t == cpus else ''}{', passive' if wait == 'passive' else ''}"

    variants = [Variant(t, "default", label(t, "default")) for t in counts]
    if passive:
        variants += [Variant(t, "passive", label(t, "passive")) for t in counts if t > 1]
    return variants


def pairwise(record: dict, a: str, b: str) -> float:
    """Median over rounds of ``a``'s block time over ``b``'s."""
    return _common.median_ratio(record["variants"][a]["block_medians_s"], record["variants"][b]["block_medians_s"])


def policy_check(result: dict, policy: str, torch_default: str) -> list[dict]:
    """For each (condition, size): the fastest variant, the policy's and torch's default against it."""
    rows = []
    for condition, by_size in result["conditions"].items():
        for size, record in by_size["sizes"].items():
            variants = record["variants"]
            fastest = min(variants, key=lambda k: variants[k]["ratio_to_1_thread"])  # the ratios' own measure
            rows.append({"condition": condition, "size": size, "fastest": fastest, "policy": policy,
                         "policy_over_fastest": pairwise(record, policy, fastest),
                         "torch_default": torch_default,
                         "torch_default_over_policy": pairwise(record, torch_default, policy)})
    return rows


def plot(path: Path, result: dict) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    sizes = list(result["sizes"])
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.2 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        records = [result["conditions"][c]["sizes"][size] for c in result["conditions"]]
        labels = list(records[0]["variants"])
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(records))]
            ys = [r["variants"][label]["median_s"] * 1e3 for r in records]
            bars = ax.bar(xs, ys, width, label=f"threads: {label}")
            for bar, r in zip(bars, records):
                ratio = r["variants"][label]["ratio_to_1_thread"]
                ax.annotate(f"{ratio:.2g}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(records)))
        ax.set_xticklabels([f"{c}\n(load {r['load_average_start'][0]:.1f}-{r['load_average_end'][0]:.1f})"
                            if r["load_average_start"] else c for c, r in zip(result["conditions"], records)])
        ax.set_yscale("log")
        ax.set_ylabel("training step, median (ms)")
        p = result["parameters"][size]
        ax.set_title(f"{size}: {result['sizes'][size]['description']}, {p / 1e6:.2g} M parameters", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(result["title"] + "\n(bar label: time / 1 thread, median of per-round ratios)", fontsize=8)
    fig.tight_layout()
    _common.save_figure(fig, path)
    plt.close(fig)


def describe(size: dict) -> str:
    p, f = size["projection_depth"], size["fusion_depth"]
    return (f"D={size['dim']}, k*={size['num_tokens']}, depth {p if p == f else f'{p}+{f}'}, "
            f"{size['heads']} heads, batch {size['batch']}")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: demo size only, 2 rounds, short blocks (seconds)")
    p.add_argument("--sizes", default=None, help="comma-separated subset of demo,paper (default both; --quick: demo)")
    p.add_argument("--conditions", default="as-is,loaded",
                   help="comma-separated subset of as-is,loaded (default both)")
    p.add_argument("--counts", default=None,
                   help="comma-separated thread counts besides 1 (default: 2, torch's default and all cores)")
    p.add_argument("--no-passive", action="store_true", help="skip the OMP_WAIT_POLICY=passive variants")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds per size and condition (default 7; --quick: 2)")
    p.add_argument("--block-seconds", type=float, default=None,
                   help="about how long one variant's block of steps lasts (default 1.0; --quick: 0.05)")
    p.add_argument("--max-steps", type=int, default=50, help="most steps in one block (default 50)")
    p.add_argument("--load-procs", type=int, default=None,
                   help="background load processes in the 'loaded' condition (default: one per CPU)")
    p.add_argument("--load-cap", type=float, default=None,
                   help="seconds after which a load process stops by itself (default 1800; --quick: 120)")
    p.add_argument("--out", type=Path, default=_common.ROOT / "results")
    p.add_argument("--name", default=None, help="results/<name>.json and .png (default threads)")
    args = p.parse_args(argv)
    args.sizes = (args.sizes or ("demo" if args.quick else "demo,paper")).split(",")
    if not set(args.sizes) <= {"demo", "paper"} or not args.sizes:
        p.error(f"--sizes: expected a comma-separated subset of demo,paper, got {','.join(args.sizes)!r}")
    args.conditions = [c.replace("-", " ") for c in args.conditions.split(",")]
    if not args.conditions or not set(args.conditions) <= set(CONDITIONS):
        p.error(f"--conditions: expected a comma-separated subset of as-is,loaded, got {','.join(args.conditions)!r}")
    if args.counts is not None:
        try:
            args.counts = sorted({int(c) for c in args.counts.split(",")})
        except ValueError:
            args.counts = [0]
        if args.counts[0] < 1:
            p.error("--counts: expected comma-separated ints >= 1, e.g. 1,2,4")
    args.rounds = args.rounds if args.rounds is not None else (2 if args.quick else 7)
    args.block_seconds = args.block_seconds if args.block_seconds is not None else (0.05 if args.quick else 1.0)
    args.load_cap = args.load_cap if args.load_cap is not None else (120.0 if args.quick else 1800.0)
    cpus = os.cpu_count() or 1
    args.load_procs = cpus if args.load_procs is None else args.load_procs
    for name, value, least in (("--rounds", args.rounds, 1), ("--max-steps", args.max_steps, 1),
                               ("--load-procs", args.load_procs, 0)):
        if value < least:
            p.error(f"{name}: expected an int >= {least}, got {value}")
    for name, value in (("--block-seconds", args.block_seconds), ("--load-cap", args.load_cap)):
        if not value > 0:
            p.error(f"{name}: expected a number > 0, got {value}")
    args.name = args.name or ("threads_quick" if args.quick else "threads")
    return args


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    started = time.perf_counter()
    cpus = os.cpu_count() or 1
    demo, demo_source = demo_size()
    sizes = {name: {"demo": demo, "paper": PAPER}[name] for name in args.sizes}
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/threads.py", *argv]),
        "config": {"quick": args.quick, "rounds": args.rounds, "warmup": "1 round of 2 steps per variant",
                   "block_seconds": args.block_seconds, "max_steps": args.max_steps,
                   "demo_size_from": demo_source},
        "sizes": {name: {**size, "description": describe(size)} for name, size in sizes.items()},
        "step": "collate 64 items (half rgb-only, half audio-only) + forward + Eq. 3 loss (align, CE, pseudo KL) "
                "+ backward + clip_grad_norm_(1.0) + AdamW, float32, CPU",
        "load_average_start": load_average(),
        "environment": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "note": "'as is' is the machine as it was during the run; on a shared machine that is a loaded one: "
                "see the load averages recorded with each measurement",
    }
    workers: dict[str, Worker] = {}
    try:
        waits = ("default",) if args.no_passive else WAIT_POLICIES
        for wait in waits:  # started together, then awaited: they build their stores in parallel
            workers[wait] = Worker(wait, sizes)
        for worker in workers.values():
            worker.info = worker.read()
        info = workers["default"].info
        torch_default = info["torch_default_threads"]
        counts = sorted({1, *(args.counts or (2, torch_default, cpus))})  # 1 first: the ratios' base
        variants = make_variants(counts, cpus, not args.no_passive)
        policy = next((v.label for v in variants
                       if v.threads == info["policy_cpu_threads"] and v.wait == "default"), None)
        default_label = next((v.label for v in variants if v.threads == torch_default and v.wait == "default"), None)
        machine = {k: v for k, v in _common.machine_info().items() if k != "torch_threads"}  # not this process's
        result["machine"] = {**machine, "torch": info["torch"],
                             "torch_default_threads": torch_default, "parallel_backend": info["parallel_backend"]}
        result["parameters"] = info["parameters"]
        result["policy"] = {"module": "umilayers._threads", "cpu_threads": info["policy_cpu_threads"], "label": policy}
        result["title"] = (f"UnseenModalityModel training step against torch threads, "
                           f"{result['machine']['processor']}, {cpus} CPUs, median of {args.rounds} rounds")
        print(result["title"])
        print(f"variants: {', '.join(v.label for v in variants)}; torch's default here: {torch_default}; "
              f"load average at start {result['load_average_start']}")

        result["determinism"] = {}
        for size in sizes:
            result["determinism"][size] = {
                str(t): workers["default"].ask(cmd="gradients", size=size, threads=t) for t in counts
            }
        result["conditions"] = {}
        for condition in args.conditions:
            procs = args.load_procs if condition == "loaded" else 0
            print(f"\n{condition}" + (f": + {procs} background load processes" if procs else ""))
            with background_load(procs, args.load_cap) as load:
                by_size = {}
                for size in sizes:
                    print(f"  {size} ({describe(sizes[size])})")
                    by_size[size] = measure(workers, variants, size, args, print)
            result["conditions"][condition] = {"background_load": load, "sizes": by_size}
    finally:
        for worker in workers.values():
            worker.close()

    if policy is not None and default_label is not None:
        result["policy_check"] = policy_check(result, policy, default_label)
    result["load_average_end"] = load_average()
    result["seconds"] = time.perf_counter() - started
    return result


def report(result: dict) -> None:
    conditions = list(result["conditions"])
    for size in result["sizes"]:
        print(f"\n{size}: {result['sizes'][size]['description']}, {result['parameters'][size]:,} parameters")
        header = ["threads"]
        for c in conditions:
            rec = result["conditions"][c]["sizes"][size]
            loads = (f"load {rec['load_average_start'][0]:.1f}-{rec['load_average_end'][0]:.1f}"
                     if rec["load_average_start"] else "")
            header += [f"{c} ({loads}) ms", "/ 1 thread"]
        rows = [header]
        for label in result["conditions"][conditions[0]]["sizes"][size]["variants"]:
            row = [label]
            for c in conditions:
                v = result["conditions"][c]["sizes"][size]["variants"][label]
                row += [f"{v['median_s'] * 1e3:.1f}", f"{v['ratio_to_1_thread']:.2f}"]
            rows.append(row)
        print(_common.table(rows))
        det = result["determinism"][size]
        print("  gradients against 1 thread: " + ", ".join(
            f"{t}: {'bit-identical' if d['bit_identical'] else 'max |diff| %.1e' % d['max_abs_difference']}"
            for t, d in det.items()))
    for c in conditions:
        load = result["conditions"][c]["background_load"]
        if load["processes"]:
            print(f"\nbackground load ({c}): {load['processes']} processes, {load['cpu_s']:.0f} s of CPU in "
                  f"{load['wall_s']:.0f} s ({load['cpu_share']:.0%} of their cores' time)")
    for row in result.get("policy_check", []):
        print(f"{row['condition']}, {row['size']}: fastest {row['fastest']}; the policy ({row['policy']}) takes "
              f"{row['policy_over_fastest']:.2f}x the fastest's time; torch's default ({row['torch_default']}) "
              f"{row['torch_default_over_policy']:.2f}x the policy's")


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER]:
        return worker_main(json.loads(argv[1]))
    args = parse_args(argv)
    # SIGTERM must unwind through the finally blocks that stop the load and the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(args, argv)
    report(result)
    print()
    _common.write_results(args.out, args.name, result, plot, seconds=result["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
