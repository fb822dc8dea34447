"""One training step of UnseenModalityModel against the authors' released way of computing it.

Size: the paper's EPIC-Kitchens model (rgb 784 tokens x 768, audio 146 tokens x 768, K=512
slots, D=256, projection depth 6, fusion depth 6, 8 heads, 3,806 classes, two branches), on a
modality-incomplete batch: half the samples rgb-only, half audio-only (alternating rows).

One step = forward + loss (Eq. 3: alignment + cross-entropy on branch 0 + KL to pseudo-labels
on branch 1) + backward + AdamW step, computed two ways with THE SAME model instance (so the
same parameters, counted and printed):

- ``ours``: ``UnseenModalityModel.forward``: each modality's projection runs on the rows that
  have it; the common-space sum scatters them; one group-masked transformer pass runs both
  branches (``auto`` attention backend).
- ``released``: :func:`released_forward`, a straightforward transcription of the released code
  (xiaobai1217/Unseen-Modality-Interaction, ``feature_reorganization.py`` + ``vit.py``): every
  modality's projection runs on every sample, the missing one fed with random stand-ins (made
  before the step, as the released data loader does, so not timed), each projected feature is
  multiplied by its 0/1 mask and the products summed; the fusion transformer (our blocks, our
  weights) takes the released token layout ``[r_0, r_1, slots_0, slots_1]`` and computes
  attention as ``vit.py`` does: a Python loop over the branches that concatenates the branch's
  readout token with its slice of slots, attends within it, and concatenates the outputs. By
  default the attention on each slice is ``F.scaled_dot_product_attention`` (the released code
  writes ``softmax(q k^T * scale) v`` by hand; ``--released-attention matmul`` does that too):
  the default gives the baseline the same fused kernel as ours, so the ratio measures the
  structure (skipped projections, one-pass branches), not a better attention kernel.

``tests/test_benchmarks.py`` checks that both give the same prediction, loss and gradients.

Reported: median step time over ``--repeats`` rounds after ``--warmup`` (each round runs both
ways once, so a shared machine's load hits both alike), the median per-round ratio, and the
peak memory of one more step of each (CPU: resident-set growth, ``VmHWM`` reset through
``/proc/self/clear_refs``; CUDA: ``torch.cuda.max_memory_allocated``). Goal (issue 5): ours at
least 1.8x faster per step. Writes ``results/train_step.json`` and ``results/train_step.png``.

Run::

    python benchmarks/train_step.py                  # EPIC size, B=8, CPU float32
    python benchmarks/train_step.py --batch 4        # smaller batch, same token counts/widths
    python benchmarks/train_step.py --quick          # smoke test, small sizes, < 20 s
    python benchmarks/train_step.py --device cuda --batch 64 --dtype bfloat16
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
if __name__ == "__main__":
    import _common

    _common.pin_mmap_threshold()  # before torch allocates anything

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from typing import Callable, Mapping, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange, repeat  # noqa: E402
from torch import Tensor  # noqa: E402

import _common  # noqa: E402

sys.path.insert(0, str(_common.ROOT))
from umilayers.attention import attention_backend  # noqa: E402
from umilayers.model import UMIOutput, UnseenModalityModel, combine_branches  # noqa: E402

GOAL_SPEEDUP = 1.8
#: The paper's EPIC-Kitchens sizes (Sec. 5 and the released code).
EPIC = {"tokens": {"rgb": 784, "audio": 146}, "feature_dim": 768, "num_tokens": 512, "dim": 256,
        "projection_depth": 6, "fusion_depth": 6, "heads": 8, "classes": 3806, "branches": 2}
QUICK = {"tokens": {"rgb": 98, "audio": 30}, "feature_dim": 96, "num_tokens": 64, "dim": 64,
         "projection_depth": 2, "fusion_depth": 2, "heads": 4, "classes": 100, "branches": 2}


# ----------------------------------------------------------------------------- the released way


def released_attention(q: Tensor, k: Tensor, v: Tensor, branches: int, kernel: str = "sdpa") -> Tensor:
    """``vit.py``'s dual-branch attention: a Python loop over the branches.

    Token layout ``[r_0, ..., r_{G-1}, slots_0, ..., slots_{G-1}]``; branch i attends over its
    readout ``r_i`` and its own ``K / G`` slots; the outputs are reassembled in that layout.

    Shape:
        - q, k, v: ``(B, H, G + K, h)``
        - output: ``(B, H, G + K, h)``
    """
    per_branch = (q.shape[2] - branches) // branches
    readouts, slots = [], []
    for i in range(branches):
        lo, hi = branches + i * per_branch, branches + (i + 1) * per_branch
        qi, ki, vi = (torch.cat([t[:, :, i:i + 1], t[:, :, lo:hi]], dim=2) for t in (q, k, v))
        if kernel == "sdpa":
            out = F.scaled_dot_product_attention(qi, ki, vi)
        else:  # exactly as vit.py writes it
            dots = qi @ ki.transpose(-1, -2) * qi.shape[-1] ** -0.5
            out = dots.softmax(dim=-1) @ vi
        readouts.append(out[:, :, :1])
        slots.append(out[:, :, 1:])
    return torch.cat(readouts + slots, dim=2)


def released_block(block: torch.nn.Module, x: Tensor, branches: int, kernel: str) -> Tensor:
    """One layer of our fusion transformer (its weights) with the released attention loop."""
    qkv = block.qkv(block.norm1(x))
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=block.heads)
    attn = released_attention(q, k, v, branches, kernel)
    x = x + block.proj(rearrange(attn, "b h n d -> b n (h d)"))
    return x + block.mlp(block.norm2(x))


def released_forward(
    model: UnseenModalityModel,
    full_inputs: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    kernel: str = "sdpa",
) -> UMIOutput:
    """The released code's forward pass, with ``model``'s parameters.

    Args:
        model: a ``projection="feature"`` :class:`UnseenModalityModel`.
        full_inputs: modality -> ``(B, k_m, d_m)`` for EVERY sample; rows that lack the modality
            hold stand-ins (random noise), which the 0/1 mask multiplies by zero.
        present: modality -> ``(B,)`` bool.
        kernel: ``"sdpa"`` (fused attention in the projections and on each branch slice) or
            ``"matmul"`` (hand-written attention everywhere, as ``feature_reorganization.py``
            and ``vit.py`` write it).

    Returns:
        :class:`UMIOutput` like ``model.forward`` (``modality_features[m]`` holds the rows that
        have ``m``, so ``model.loss`` applies unchanged).

    Shape:
        - full_inputs[m]: ``(B, k_m, d_m)``; present[m]: ``(B,)``
        - prediction: ``(B, C)``; branch_outputs: ``(B, G, C)``
    """
    g = model.config.branches
    names = sorted(full_inputs)
    # feature_reorganization.py writes its attention by hand too: with kernel="matmul" the
    # projections use the explicit float32 softmax(q k^T / sqrt(h)) v of the reference backend.
    projection_kernel = attention_backend("reference") if kernel == "matmul" else contextlib.nullcontext()
    with projection_kernel:
        projected = {m: model.projections[m](full_inputs[m]) for m in names}  # every modality, every row
    features = None
    for m in names:
        masked = projected[m] * present[m].to(projected[m].dtype)[:, None, None]
        features = masked if features is None else features + masked
    batch = features.shape[0]
    x = torch.cat([repeat(model.readout, "g d -> b g d", b=batch), features + model.positions], dim=1)
    for block in model.transformer.blocks:
        x = released_block(block, x, g, kernel)
    branch_outputs = model.head(x[:, :g])
    if model.config.task == "retrieval":
        branch_outputs = F.normalize(branch_outputs, dim=-1)
    return UMIOutput(
        prediction=combine_branches(model.config.task, branch_outputs),
        branch_outputs=branch_outputs,
        modality_features={m: projected[m][present[m]] for m in names},
        present=dict(present),
    )


# ----------------------------------------------------------------------------- the batch


def make_batch(sizes: dict, batch: int, device, generator: torch.Generator) -> dict:
    """Half rgb-only, half audio-only (alternating rows), in both layouts, plus targets.

    ``inputs`` holds each modality's rows only (our layout); ``full_inputs`` the same rows with
    noise in the rows that lack the modality (the released layout).
    """
    names = sorted(sizes["tokens"])
    rows = torch.arange(batch)
    present = {m: (rows % len(names) == i) for i, m in enumerate(names)}
    full_inputs, inputs = {}, {}
    for m in names:
        full = torch.randn(batch, sizes["tokens"][m], sizes["feature_dim"], generator=generator)
        full_inputs[m] = full.to(device)
        inputs[m] = full[present[m]].contiguous().to(device)
    labels = torch.randint(0, sizes["classes"], (batch,), generator=generator).to(device)
    pseudo = torch.softmax(torch.randn(batch, sizes["classes"], generator=generator) * 3, dim=-1).to(device)
    return {"inputs": inputs, "full_inputs": full_inputs, "labels": labels, "pseudo": pseudo,
            "present": {m: p.to(device) for m, p in present.items()}}


def build_model(sizes: dict, device) -> UnseenModalityModel:
    torch.manual_seed(0)
    return UnseenModalityModel(
        {m: sizes["feature_dim"] for m in sizes["tokens"]}, num_outputs=sizes["classes"],
        dim=sizes["dim"], num_tokens=sizes["num_tokens"], projection_depth=sizes["projection_depth"],
        fusion_depth=sizes["fusion_depth"], heads=sizes["heads"], branches=sizes["branches"],
        device=device,
    )


def make_step(method: str, model, optimizer, data: dict, autocast: Optional[torch.dtype], kernel: str,
              used: Optional[dict] = None) -> Callable[[], float]:
    """A closure running one full training step; returns the loss."""
    device_type = data["labels"].device.type

    def step() -> float:
        with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
            if method == "ours":
                out = model(data["inputs"], present=data["present"])
            else:
                out = released_forward(model, data["full_inputs"], data["present"], kernel)
            loss = model.loss(out, data["labels"], pseudo_targets=data["pseudo"]).total
        loss.backward()
        if used is not None:
            used[method] = sum(p.numel() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def count_flops(step: Callable[[], float]) -> int:
    """Matmul FLOPs of one step (forward + backward).

    ``torch.utils.flop_counter`` counts matrix products; SDPA's fused CPU kernel is invisible to
    it, so the step runs with SDPA's math backend here (same FLOPs, explicit ``bmm``).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- report


def plot(path: Path, result: dict) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    methods = ["released", "ours"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    times = [result["methods"][m]["median_s"] for m in methods]
    axes[0].bar(methods, times, color=["C3", "C0"])
    axes[0].set_ylabel("median step time (s)")
    axes[0].set_title(f"speed-up {result['speedup']:.2f}x (goal {GOAL_SPEEDUP}x)")
    peaks = [result["methods"][m]["peak_bytes"] for m in methods]
    if all(peaks) and result["peak_ratio"] is not None:
        axes[1].bar(methods, [p / 2**20 for p in peaks], color=["C3", "C0"])
        axes[1].set_ylabel("peak memory of one step (MiB)")
        axes[1].set_title(f"ours / released = {result['peak_ratio']:.2f}")
    fig.suptitle(textwrap.fill(result["title"], 130), fontsize=8)
    fig.tight_layout()
    _common.save_figure(fig, path)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype; bfloat16/float16 run under torch.autocast with float32 parameters")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; --quick: 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs both ways once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: steadier on a shared machine; 0 = torch's choice)")
    p.add_argument("--released-attention", choices=["sdpa", "matmul"], default="sdpa",
                   help="attention kernel of the released-style loop (default sdpa, the same kernel as ours)")
    p.add_argument("--no-flops", action="store_true", help="skip counting the FLOPs of one step of each")
    p.add_argument("--quick", action="store_true", help="smoke size (small widths and tokens), < 20 s")
    p.add_argument("--out", type=Path, default=_common.ROOT / "results")
    p.add_argument("--name", default=None, help="results/<name>.json and .png (default train_step)")
    p.add_argument(_common.NO_REEXEC, action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else EPIC
    batch = args.batch or (4 if args.quick else 8)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    if batch < 2 or batch % 2:
        p.error(f"--batch: expected an even number >= 2 (half rgb-only, half audio-only), got {batch}")
    name = args.name or ("train_step_quick" if args.quick else "train_step")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    autocast = None if args.dtype == "float32" else getattr(torch, args.dtype)

    model = build_model(sizes, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = make_batch(sizes, batch, device, torch.Generator().manual_seed(0))
    used: dict[str, int] = {}
    steps = {m: make_step(m, model, optimizer, data, autocast, args.released_attention, used)
             for m in ("released", "ours")}
    total_params = sum(p.numel() for p in model.parameters())

    info = _common.machine_info(device)
    title = (f"UnseenModalityModel train step, B={batch} (half rgb-only, half audio-only), "
             f"rgb {sizes['tokens']['rgb']}x{sizes['feature_dim']}, audio {sizes['tokens']['audio']}x"
             f"{sizes['feature_dim']}, K={sizes['num_tokens']}, D={sizes['dim']}, depth "
             f"{sizes['projection_depth']}+{sizes['fusion_depth']}, C={sizes['classes']}, {args.dtype}, "
             f"{_common.describe_machine(info)}, median of {args.repeats}")
    print(title)
    started = time.perf_counter()
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = _common.interleaved_times(steps, args.warmup, args.repeats, sync)
    peaks = {m: _common.peak_bytes(step, device) for m, step in steps.items()}
    flops = None if args.no_flops else {m: count_flops(step) for m, step in steps.items()}
    methods = {
        m: {"median_s": statistics.median(times[m]), "times_s": times[m], "peak_bytes": peaks[m],
            "parameters_with_grad": used[m], "flops": flops[m] if flops else None}
        for m in steps
    }
    speedup = _common.median_ratio(times["released"], times["ours"])
    # Resident-set growth below zero means the step fit in memory freed earlier: not measurable.
    measurable = all(peaks[m] is not None and peaks[m] > 0 for m in ("ours", "released"))
    peak_ratio = peaks["ours"] / peaks["released"] if measurable else None
    info_after = _common.machine_info(device)

    rows = [["method", "median step (s)", "steps (s)", "peak memory (MiB)", "GFLOP fwd+bwd", "parameters (with grad)"]]
    for m in ("released", "ours"):
        r = methods[m]
        rows.append([m, f"{r['median_s']:.3f}", " ".join(f"{t:.2f}" for t in r["times_s"]),
                     _common.mib(r["peak_bytes"]), f"{r['flops'] / 1e9:,.1f}" if r["flops"] else "-",
                     f"{total_params:,} ({r['parameters_with_grad']:,})"])
    print(_common.table(rows))
    verdict = ("quick size; the goal is for the EPIC size" if args.quick
               else ("met" if speedup >= GOAL_SPEEDUP else "MISSED"))
    baseline = ("faithful released code: hand-written attention" if args.released_attention == "matmul"
                else "released structure with our fused attention kernel")
    print(f"speed-up released/ours (median of per-round ratios): {speedup:.2f}x "
          f"[{verdict}: goal >= {GOAL_SPEEDUP}x; baseline: {baseline}]")
    flop_ratio = flops["released"] / flops["ours"] if flops else None
    if flop_ratio is not None:
        print(f"FLOP ratio released/ours: {flop_ratio:.2f} (the speed-up if time followed the arithmetic)")
    if peak_ratio is not None:
        print(f"peak memory ours/released: {peak_ratio:.2f}")
    else:
        print("peak memory ours/released: not measurable at this size (no resident-set growth)")
    print(f"parameters: ours {total_params:,}, released-style {total_params:,} (the same module); "
          f"released attention kernel: {args.released_attention}")

    result = {
        "title": title,
        "command": " ".join(["python", "benchmarks/train_step.py", *[a for a in (argv if argv is not None else sys.argv[1:]) if a != _common.NO_REEXEC]]),
        "config": {"batch": batch, "sizes": sizes, "dtype": args.dtype, "device": str(device),
                   "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
                   "released_attention": args.released_attention, "quick": args.quick,
                   "optimizer": "AdamW"},
        "machine": info,
        "load_average_1min_after": info_after.get("load_average_1min"),
        "parameters": {"ours": total_params, "released": total_params},
        "methods": methods,
        "speedup": speedup,
        "peak_ratio": peak_ratio,
        "flop_ratio": flop_ratio,
        "goal": {"speedup": GOAL_SPEEDUP, "met": speedup >= GOAL_SPEEDUP},
        "seconds": time.perf_counter() - started,
    }
    _common.write_json(args.out / f"{name}.json", result)
    plot(args.out / f"{name}.png", result)
    print(f"wrote {args.out / (name + '.json')} and .png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
