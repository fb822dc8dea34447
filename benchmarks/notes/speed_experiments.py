"""Attempts at the train step's largest items, what paid and what did not (issue 12, 2026-11-30).

Not a benchmark of the suite (CI does not run it): the record of what was tried against the
rgb projection's attention (the largest item of ``benchmarks/train_step.py``'s breakdown) and
the copies around it, so
that the next person starts from the measurements. Each experiment prints forward and backward
times (least of ``--repeats``, one torch thread) and checks that the variant computes what the
library does:

1. ``attention``: ``F.scaled_dot_product_attention`` (PyTorch's fused CPU kernel, which
   recomputes the scores in the backward pass: 5 products) against an explicit attention that
   keeps the probabilities for the backward pass (4 products, :class:`KeptProbabilities`), at
   the rgb projection's shape (4 rows x 8 heads x 784 tokens x 64), the fusion's (16 x 8 x 257
   x 64) and the audio projection's (4 x 8 x 146 x 64).
2. ``qkv``: six blocks of the rgb projection (forward + backward, round-robin) computing q, k,
   v as one QKV product cut into three views (as the library did before: autograd stacks their
   gradients and copies them back), as three products with row blocks of the same weight (the
   library since: ``_Block._qkv``), and as ``select`` views of one product.
3. ``compile`` (``--compile``, about 2 minutes): the whole train step of ``train_step.py`` under
   ``torch.compile`` against eager.
4. ``step`` (``--step-rounds N``, about 8 s a round): the whole train step of ``train_step.py``
   with the blocks' QKV as one product cut into views (``train_step.previous_block_forward``)
   against three products (the library), round-robin, CPU time; prints the median per-round
   ratio.

Measured on the 2-core CPU (1 thread, quiet), 2026-11-30: (1) kept probabilities are slower at
the rgb shape (forward 133 ms against 43, backward 167 against 111: writing 32 score matrices of
784 x 784 costs more than recomputing them blockwise) and at the fusion's (61 + 80 against
24 + 64 ms); faster only at the audio's small shape (6.6 against 7.6 ms: 6 ms of a 3.6 s step);
(2) least of 7 rounds, four runs: one product cut into views 1725, 1737, 1761, 1781 ms; three
products 1669, 1648, 1689, 1698 ms (3-5% faster: taken; a train step 4-5% faster, see (4));
select views 1785, 1851, 1793, 1869 ms. (Timed one variant after the other instead, an earlier run had
the order reversed, 1840 against 1956 ms: the machine's speed drifts, hence round-robin.)
(3) compiled 3.9-4.5 s per step against 3.5-4.0 s eager, after 76 s of compilation; (4) median
per-round ratio 1.049 and 1.040 in two runs of 15 rounds (1.047 and 1.086 over 7 in two
earlier runs, before the A/B was part of this script).

Run::

    python benchmarks/notes/speed_experiments.py
    python benchmarks/notes/speed_experiments.py --compile
    python benchmarks/notes/speed_experiments.py --step-rounds 15
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from umilayers.attention import _Block  # noqa: E402


class KeptProbabilities(torch.autograd.Function):
    """``softmax(q k^T / sqrt(h)) v`` that keeps the probabilities for the backward pass."""

    @staticmethod
    def forward(ctx, q, k, v):
        scale = q.shape[-1] ** -0.5
        q3, k3, v3 = (t.reshape(-1, *t.shape[-2:]) for t in (q, k, v))
        p = torch.softmax(torch.bmm(q3, k3.transpose(1, 2)).mul_(scale), dim=-1)
        o = torch.bmm(p, v3)
        ctx.save_for_backward(q3, k3, v3, p, o)
        ctx.scale = scale
        return o.view(q.shape)

    @staticmethod
    def backward(ctx, grad):
        q3, k3, v3, p, o = ctx.saved_tensors
        g3 = grad.reshape(o.shape)
        dv = torch.bmm(p.transpose(1, 2), g3)
        ds = torch.bmm(g3, v3.transpose(1, 2)).sub_((g3 * o).sum(-1, keepdim=True)).mul_(p)
        dq = torch.bmm(ds, k3).mul_(ctx.scale)
        dk = torch.bmm(ds.transpose(1, 2), q3).mul_(ctx.scale)
        return dq.view(grad.shape), dk.view(grad.shape), dv.view(grad.shape)


def forward_backward_ms(fn: Callable, inputs, grad, repeats: int) -> tuple[float, float]:
    """Least forward and backward times (ms) of ``fn(*inputs)`` with output gradient ``grad``."""
    best_f = best_b = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        out = fn(*inputs)
        mid = time.perf_counter()
        out.backward(grad)
        end = time.perf_counter()
        if i:
            best_f, best_b = min(best_f, mid - start), min(best_b, end - mid)
    return best_f * 1e3, best_b * 1e3


def attention(repeats: int) -> None:
    q, k, v = (torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(KeptProbabilities.apply, (q, k, v))
    print("attention forward / backward ms: fused SDPA | kept probabilities")
    for shape in [(4, 8, 784, 64), (16, 8, 257, 64), (4, 8, 146, 64)]:
        inputs = [torch.randn(shape, requires_grad=True) for _ in range(3)]
        grad = torch.randn(shape)
        torch.testing.assert_close(KeptProbabilities.apply(*inputs), F.scaled_dot_product_attention(*inputs),
                                   rtol=1e-4, atol=1e-5)
        fused = forward_backward_ms(F.scaled_dot_product_attention, inputs, grad, repeats)
        kept = forward_backward_ms(KeptProbabilities.apply, inputs, grad, repeats)
        print(f"  {str(shape):18s} {fused[0]:6.1f} / {fused[1]:6.1f} | {kept[0]:6.1f} / {kept[1]:6.1f}")


def qkv(repeats: int) -> None:
    batch, tokens, dim, heads, head = 4, 784, 256, 8, 64
    torch.manual_seed(0)
    blocks = [_Block(dim, heads, head, 2.0) for _ in range(6)]

    def run(make_qkv: Callable) -> Callable:
        def forward(x):
            for b in blocks:
                q, k, v = make_qkv(b, b.norm1(x))
                a = F.scaled_dot_product_attention(q, k, v)
                x = x + b.proj(rearrange(a, "b h n d -> b n (h d)"))
                x = x + b.mlp(b.norm2(x))
            return x
        return forward

    def one_product(b, h):
        return rearrange(b.qkv(h), "b n (three h d) -> three b h n d", three=3, h=heads)

    def library(b, h):  # _Block._qkv: three products with row blocks of the one weight
        return [rearrange(t, "b n (h d) -> b h n d", h=heads) for t in b._qkv(h)]

    def selected(b, h):
        both = b.qkv(h).view(batch, tokens, 3, heads, head)
        return [both.select(2, i).transpose(1, 2) for i in range(3)]

    x = torch.randn(batch, tokens, dim)
    grad = torch.randn(batch, tokens, dim)
    reference = run(one_product)(x)
    variants = {"one product cut into views": one_product, "three products (library)": library,
                "one product, select views": selected}
    for make in variants.values():
        torch.testing.assert_close(run(make)(x), reference, rtol=1e-4, atol=1e-5)
    best = {name: float("inf") for name in variants}
    for _ in range(repeats):  # round-robin: drifts of the machine's speed hit every variant alike
        for name, make in variants.items():
            f, b = forward_backward_ms(run(make), [x], grad, 1)
            best[name] = min(best[name], f + b)
    print("six rgb-projection blocks, forward + backward ms (least of the rounds):")
    for name, ms in best.items():
        print(f"  {name:30s} {ms:7.1f}")


def compiled(repeats: int) -> None:
    import train_step

    sizes = dict(train_step.EPIC)
    data = train_step.make_batch(sizes, 8, "cpu", torch.Generator().manual_seed(0))
    model = train_step.build_model(sizes, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model)

    def step(fn) -> float:
        start = time.perf_counter()
        out = fn(data["inputs"], present=data["present"])
        model.loss(out, data["labels"], pseudo_targets=data["pseudo"]).total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    print(f"compile and first step: {step(forward):.1f} s")
    for name, fn in [("compiled", forward), ("eager", model)]:
        print(f"  {name}: " + " ".join(f"{step(fn):.2f}" for _ in range(repeats + 1)) + " s per step")


def step_ab(rounds: int) -> None:
    import statistics

    import train_step

    from umilayers.attention import _Block

    sizes = dict(train_step.EPIC)
    data = train_step.make_batch(sizes, 8, "cpu", torch.Generator().manual_seed(0))
    model = train_step.build_model(sizes, "cpu")
    step = train_step.make_step("ours", model, torch.optim.AdamW(model.parameters(), lr=1e-4), data, None)
    variants = {"one product cut into views": train_step.previous_block_forward, "three products (library)": _Block.forward}
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for round_ in range(rounds + 1):
            for name, forward in variants.items():
                _Block.forward = forward
                start = time.process_time()
                step()
                if round_:
                    times[name].append(time.process_time() - start)
    finally:
        _Block.forward = variants["three products (library)"]
    (a, slow), (b, fast) = times.items()
    print(f"train step, CPU s, median of {rounds} rounds: {a} {statistics.median(slow):.2f}, {b} "
          f"{statistics.median(fast):.2f}; median per-round ratio {statistics.median(x / y for x, y in zip(slow, fast)):.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also the compiled train step (minutes)")
    p.add_argument("--step-rounds", type=int, default=0, help="also the train-step A/B of the QKV layouts")
    args = p.parse_args()
    torch.set_num_threads(1)
    attention(args.repeats)
    qkv(args.repeats)
    if args.compile:
        compiled(args.repeats)
    if args.step_rounds:
        step_ab(args.step_rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
