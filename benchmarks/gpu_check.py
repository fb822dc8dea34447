"""The pieces of ``benchmarks/gpu.sh`` that are neither a test nor a benchmark script.

- ``machine``: torch, CUDA and the device;
- ``xformers``: whether xformers imports, which of its attention operators are available, and
  which kernels serve this library's xformers backend at the sizes of the model (k* = 512 slots
  + 2 readouts in two groups; head width 32 and 64; fp16, bf16, fp32): the GPU kernels that
  ``group_attention(backend="xformers")`` launches, forward and backward, by name
  (``torch.profiler``), and its result against the float32 ``mask`` backend (forward and
  gradients);
- ``host-reads``: one training step of the trainer on the device under the host-read counter of
  ``tests/train/test_loop.py``, printed by where each read comes from (the package must make
  none).

Each runs on CPU too (``--device cpu``): the dry run of ``gpu.sh``, where xformers has no kernel
and says so. Results also go to ``<out>/gpu_<command>.json``.

Run::

    python benchmarks/gpu_check.py xformers --device cuda
    python benchmarks/gpu_check.py host-reads --device cpu
    python benchmarks/gpu_check.py --quick      # every command on the CPU (CI)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import argparse  # noqa: E402
import functools  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import _common  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(_common.ROOT))
from umilayers.attention import AttentionBackendError, group_attention  # noqa: E402

#: The fusion attention of the EPIC-size model: 2 groups of 1 readout + 256 slots.
GROUPS = [257, 257]


def machine(args: argparse.Namespace) -> dict[str, Any]:
    found: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "cuda_available": torch.cuda.is_available()}
    if args.device.type == "cuda":
        props = torch.cuda.get_device_properties(args.device)
        found.update(device=props.name, capability=f"{props.major}.{props.minor}",
                     memory_gib=round(props.total_memory / 2**30, 1))
    for key, value in found.items():
        print(f"{key}: {value}")
    return found


#: Substrings of the names of attention kernels in a profile (xformers' and PyTorch's).
ATTENTION_KERNEL_NAMES = ("fmha", "flash", "cutlass", "attention", "attn")


def _device_kernels(fn: Callable[[], Any]) -> tuple[Any, list[str]]:
    """``fn()`` and the attention kernels it launched on the GPU, by name (``torch.profiler``):
    which of xformers' (or PyTorch's) kernels served, from public API only. Empty on a CPU."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return fn(), []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
             and any(part in e.name.lower() for part in ATTENTION_KERNEL_NAMES)}
    return result, sorted(names)


def _fwd_bwd(fn, q, k, v, grad, kernels: Optional[dict[str, list[str]]] = None):
    """Forward and backward of ``fn(q, k, v)`` on fresh leaves; ``kernels``, when given, receives
    the attention kernels each pass launched (:func:`_device_kernels`)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    if kernels is None:
        out = fn(*leaves)
        out.backward(grad)
    else:
        out, kernels["forward"] = _device_kernels(lambda: fn(*leaves))
        _, kernels["backward"] = _device_kernels(lambda: out.backward(grad))
    return out.detach(), [t.grad for t in leaves]


def xformers(args: argparse.Namespace) -> dict[str, Any]:
    found: dict[str, Any] = {"cases": []}
    try:
        import xformers as xf
        import xformers.info
    except Exception as err:  # not installed or a broken binary
        print(f"XFORMERS UNUSABLE: import failed: {type(err).__name__}: {err}")
        found["error"] = f"{type(err).__name__}: {err}"
        return found
    found["version"] = xf.__version__
    features = xformers.info.get_features_status()
    found["operators"] = {k: v for k, v in features.items() if k.startswith("memory_efficient_attention")}
    print(f"xformers {xf.__version__}; attention operators available: "
          + ", ".join(k.split(".", 1)[1] for k, v in found["operators"].items() if v == "available"))
    gen = torch.Generator().manual_seed(0)
    for head_dim in (32, 64):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            q, k, v, grad = (torch.randn(args.batch, 8, sum(GROUPS), head_dim, generator=gen).to(args.device, dtype)
                             for _ in range(4))
            case: dict[str, Any] = {"dtype": str(dtype), "head_dim": head_dim, "served": False}
            label = f"  {str(dtype):15s} head_dim {head_dim}:"
            found["cases"].append(case)
            kernels: dict[str, list[str]] = {}
            try:
                ours = _fwd_bwd(lambda a, b, c: group_attention(a, b, c, GROUPS, backend="xformers"), q, k, v, grad,
                                kernels)
                reference = _fwd_bwd(lambda a, b, c: group_attention(a, b, c, GROUPS, backend="mask"),
                                     q.float(), k.float(), v.float(), grad.float())
                errors = [(a.float() - b).abs().max().item() for a, b in zip([ours[0], *ours[1]],
                                                                              [reference[0], *reference[1]])]
            except AttentionBackendError as err:  # the backend refuses this input: its reasons
                print(f"{label} no kernel: " + "; ".join(err.reasons))
                case["backend_reasons"] = err.reasons
                continue
            except Exception as err:  # a kernel that is listed but fails to run: the finding to report
                case["error"] = f"{type(err).__name__}: {str(err)[:500]}"
                print(f"{label} FAILED: {case['error']}")
                continue
            case.update(served=True, forward=kernels["forward"], backward=kernels["backward"],
                        max_abs_error_vs_float32=dict(zip(["out", "dq", "dk", "dv"], errors)))
            print(f"{label} served by {', '.join(kernels['forward']) or '?'} (forward) / "
                  f"{', '.join(kernels['backward']) or '?'} (backward); max |error| vs float32 reference "
                  + ", ".join(f"{n} {e:.2e}" for n, e in case["max_abs_error_vs_float32"].items()))
    return found


def host_reads(args: argparse.Namespace) -> dict[str, Any]:
    from tests.train.test_loop import PACKAGE, HostReads  # the counter of the CPU test, reused as is
    from umilayers.data.synthetic import make_synthetic_store
    from umilayers.train.config import FitConfig
    from umilayers.train.distributed import DistContext
    from umilayers.train.loop import KeepModalities, Phase, concat, splits, train_step
    from umilayers.train.run import model_for_store

    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="umilayers-gpu-check-") as tmp:
        store = make_synthetic_store("classification", Path(tmp) / "store", num_train=16, num_eval=8)
        for method in ("umi", "vanilla"):
            cfg = FitConfig.from_options(method=method, dim=32, num_tokens=8, projection_depth=1, fusion_depth=1,
                                         heads=4, batch_size=16, device=str(args.device), quiet=True)
            ctx = DistContext(device=args.device)
            torch.manual_seed(0)
            phase = Phase(model_for_store(cfg, store), cfg, ctx, steps_per_epoch=2, epochs=1)
            dataset = concat(store, splits(store, "train"))
            batch = KeepModalities()([dataset[i] for i in range(len(dataset) - 16, len(dataset))]).to(args.device)
            pseudo = torch.softmax(torch.randn(16, store.num_outputs), -1).to(args.device) \
                if phase.model.needs_pseudo_labels else None
            for _ in range(2):  # the first step creates AdamW's state; count the second
                with HostReads() as counter:
                    train_step(phase, batch, pseudo, 1.0, cfg, ctx)
                if args.device.type == "cuda":
                    torch.cuda.synchronize()
            step = functools.partial(train_step, phase, batch, pseudo, 1.0, cfg, ctx)
            syncs = cuda_synchronizations(step, args.device)
            package = [r for r in counter.reads if r[2].startswith(PACKAGE)]
            others = Counter(f"{name} ({Path(line).parent.name}/{Path(line).name.split(':')[0]})"
                             for name, _, line in counter.reads if not line.startswith(PACKAGE))
            found[method] = {"package": len(package), "torch": dict(others), "cuda_synchronizations": syncs}
            print(f"  {method}: host reads in one training step on {args.device}: {len(package)} by umilayers"
                  + (f" {Counter((n, w) for n, w, _ in package).most_common()}" if package else "")
                  + f"; by torch: {dict(others) or 'none'}"
                  + ("" if syncs is None else f"; synchronizing CUDA calls (torch's sync debug mode): "
                     f"{sum(syncs.values())} {syncs or ''}"))
    found["ok"] = all(v["package"] == 0 for v in found.values() if isinstance(v, dict))
    return found


def cuda_synchronizations(step, device: torch.device) -> Optional[dict[str, int]]:
    """Synchronizing CUDA calls of ``step`` by the line that made them (torch's sync debug mode,
    which also sees the implicit ones, e.g. an index whose size depends on values); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return dict(Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                        if "synchroniz" in str(w.message).lower()))


COMMANDS = {"machine": machine, "xformers": xformers, "host-reads": host_reads}


def failures(command: str, found: dict[str, Any], device: torch.device) -> list[str]:
    """What makes a command fail: reads by the package; on a GPU, an xformers case not served."""
    if command == "host-reads" and not found["ok"]:
        return ["the package read tensor values back to the host during a training step"]
    if command == "xformers" and device.type == "cuda":
        cases = found.get("cases") or [{"served": False, "dtype": "any"}]
        return [f"xformers did not serve {c['dtype']} head_dim {c.get('head_dim')}" for c in cases
                if not c["served"]]
    return []


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("commands", nargs="*", metavar="COMMAND",
                   help=f"what to check, some of {', '.join(COMMANDS)} (default: all)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=4, help="batch of the xformers check")
    _common.add_threads_option(p)
    p.add_argument("--quick", action="store_true", help="every command on the CPU, batch 1 (the dry run)")
    p.add_argument("--out", type=Path, default=_common.ROOT / "results")
    args = p.parse_args(argv)
    unknown = [c for c in args.commands if c not in COMMANDS]
    if unknown:
        p.error(f"COMMAND: expected some of {', '.join(COMMANDS)}, got {', '.join(unknown)}")
    if args.quick:
        args.device, args.batch = "cpu", 1
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available (use --device cpu for the dry run)")
    _common.set_threads(args.threads, args.device)
    problems = []
    for command in args.commands or list(COMMANDS):
        found = COMMANDS[command](args)
        found["machine"] = _common.machine_info(args.device)
        name = "gpu_" + command.replace("-", "_") + ("_quick" if args.quick else "")
        _common.write_json(args.out / f"{name}.json", found)
        problems += failures(command, found, args.device)
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
