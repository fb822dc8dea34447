"""One training step of UnseenModalityModel against the authors' released way of computing it.

Size: the paper's EPIC-Kitchens model (rgb 784 tokens x 768, audio 146 tokens x 768, K=512
slots, D=256, projection depth 6, fusion depth 6, 8 heads, 3,806 classes, two branches) with the
released code's attention width, 8 heads x ``head_dim`` 64 = 512 (``--head-dim``), on a
modality-incomplete batch: half the samples rgb-only, half audio-only (alternating rows).

One step = forward + loss (Eq. 3: alignment + cross-entropy on branch 0 + KL to pseudo-labels
on branch 1) + backward + AdamW step. Methods, timed round-robin (each round runs every method
once, so a shared machine's load hits all alike):

- ``ours``: ``UnseenModalityModel.forward``: each modality's projection runs on the rows that
  have it; the common-space sum scatters them; one group-masked transformer pass runs both
  branches (``auto`` attention backend). ``--backends`` adds ``ours[<backend>]`` for each
  backend named (the GPU check times xformers, fold and mask this way).
- ``released``: :func:`released_forward` with THE SAME model instance (the same parameters): a
  transcription of the released code (xiaobai1217/Unseen-Modality-Interaction,
  ``feature_reorganization.py`` + ``vit.py``): every modality's projection runs on every sample,
  the missing one fed random stand-ins (made before the step, as the released data loader does,
  so not timed), each projected feature is multiplied by its 0/1 mask and the products summed;
  attention is written by hand, ``softmax(q k^T * scale) v``, in the projections and in the
  fusion transformer, where a Python loop over the branches concatenates the branch's readout
  token with its slice of slots, attends within it, and concatenates the outputs.
- ``released-sdpa``: the same structure with our fused attention kernel
  (``F.scaled_dot_product_attention``) everywhere: the ratio to it is what the structure alone
  (skipped projections, one-pass branches) is worth.
- ``released-code`` (with ``--released-code PATH``, a clone of the authors' repository): their
  own ``ViTReorganization`` and ``ViT`` modules, imported from that folder (nothing of it is
  copied here), with ``dim_head = --head-dim``, the 3,806 alignment tokens of their
  ``train.py`` and its three loss terms (label-smoothed cross-entropy, element-mean KL times
  3000, alignment), and AdamW like the others. Their modules have their own parameters
  (LayerNorms around the embeddings, fixed positional embeddings of 784 and 146 tokens, no bias
  in the QKV maps); the counts of both are printed.

``tests/test_benchmarks.py`` checks that ``released`` and ``released-sdpa`` give the same
prediction, loss and gradients as ``model.forward``, and run every projection on every row.

Reported: median step time over ``--repeats`` rounds after ``--warmup``, the median per-round
ratio of each baseline to ``ours`` in wall time and in the process's CPU time (on a loaded
machine the steadier of the two: it leaves out the time spent waiting for a core), peak memory of
one step of each after a warm-up step (CUDA:
``max_memory_allocated``, in the timed process; CPU: resident-set growth, ``VmHWM`` reset through
``/proc/self/clear_refs``, in a fresh process with glibc's mmap threshold pinned so that freed
tensors leave the resident set; the timed process keeps glibc's defaults, as a training run does),
matrix-product FLOPs, and where the time of ``ours`` goes: one step under ``torch.profiler``,
every forward op attributed to a part of the model (module hooks open ``record_function``
regions; the attention kernel is wrapped) and every backward op to the part whose forward op
made its autograd node (the profiler's sequence numbers). Goal: at equal parameter count, ours
at least 3x faster than the released computation (stretch 4x), peak memory at most 0.5x. Writes
``results/<name>.json`` and ``results/<name>.png``.

Run::

    python benchmarks/train_step.py                  # EPIC size, B=8, CPU float32, ~6 min on 2 cores
    python benchmarks/train_step.py --released-code ~/Unseen-Modality-Interaction
    python benchmarks/train_step.py --quick          # smoke test, small sizes, < 30 s
    python benchmarks/train_step.py --device cuda --batch 32 --dtype bfloat16 --backends xformers fold mask
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence  # noqa: E402

import _common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange, repeat  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(_common.ROOT))
from umilayers.attention import _KERNELS, BACKENDS, GroupMaskedTransformer  # noqa: E402
from umilayers.model import UMIOutput, UnseenModalityModel, combine_branches  # noqa: E402

GOAL_SPEEDUP, STRETCH_SPEEDUP, GOAL_PEAK = 3.0, 4.0, 0.5
#: The paper's EPIC-Kitchens sizes (Sec. 5) and the released code's attention width (8 x 64).
EPIC = {"tokens": {"rgb": 784, "audio": 146}, "feature_dim": 768, "num_tokens": 512, "dim": 256,
        "projection_depth": 6, "fusion_depth": 6, "heads": 8, "head_dim": 64, "classes": 3806, "branches": 2}
QUICK = {"tokens": {"rgb": 98, "audio": 30}, "feature_dim": 96, "num_tokens": 64, "dim": 64,
         "projection_depth": 2, "fusion_depth": 2, "heads": 4, "head_dim": 32, "classes": 100, "branches": 2}
#: The baselines: the released way, transcribed with our parameters, and its attention kernel.
TRANSCRIPTIONS = {"released": "matmul", "released-sdpa": "sdpa"}
#: The released train.py's loss weights on EPIC (Eq. 3) and its label smoothing.
RELEASED_PSEUDO_WEIGHT, RELEASED_ALIGN_WEIGHT, RELEASED_SMOOTHING = 3000.0, 0.001, 0.1


# ----------------------------------------------------------------------------- the released way


def released_matmul(q: Tensor, k: Tensor, v: Tensor, group_sizes: Sequence[int],
                    key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Attention as ``feature_reorganization.py`` writes it: ``softmax(q k^T * scale) v``.

    An :data:`~umilayers.attention.AttentionKernel` for one group without padding (what the
    released projections compute).
    """
    assert len(group_sizes) == 1 and key_padding_mask is None, "the released projections attend over all tokens"
    dots = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return dots.softmax(dim=-1) @ v


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
            out = released_matmul(qi, ki, vi, [qi.shape[2]])
        readouts.append(out[:, :, :1])
        slots.append(out[:, :, 1:])
    return torch.cat(readouts + slots, dim=2)


def released_block(block: nn.Module, x: Tensor, branches: int, kernel: str) -> Tensor:
    """One layer of our fusion transformer (its weights) computed as ``vit.py`` computes one: a
    single QKV product cut into three views, :func:`released_attention`, output map, MLP."""
    qkv = block.qkv(block.norm1(x))
    q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=block.heads)
    x = x + block.proj(rearrange(released_attention(q, k, v, branches, kernel), "b h n d -> b n (h d)"))
    return x + block.mlp(block.norm2(x))


@contextlib.contextmanager
def forced_backend(model: nn.Module, backend: str) -> Iterator[None]:
    """Every attention of ``model`` (projections and fusion) with ``backend`` instead of the one
    each chose at construction (restored on exit)."""
    transformers = [m for m in model.modules() if isinstance(m, GroupMaskedTransformer)]
    saved = [t.backend for t in transformers]
    for t in transformers:
        t.backend = backend
    try:
        yield
    finally:
        for t, chosen in zip(transformers, saved):
            t.backend = chosen


@contextlib.contextmanager
def projection_kernel(model: UnseenModalityModel, kernel: str) -> Iterator[None]:
    """With ``kernel="matmul"``, the projections' transformers attend as the released code does
    (their ``backend`` attribute is the documented switch); ``"sdpa"`` leaves them alone."""
    encoders = [p.encoder for p in model.projections.values() if getattr(p, "encoder", None) is not None]
    saved = [e.backend for e in encoders]
    if kernel == "matmul":
        for e in encoders:
            e.backend = released_matmul
    try:
        yield
    finally:
        for e, backend in zip(encoders, saved):
            e.backend = backend


def released_forward(
    model: UnseenModalityModel,
    full_inputs: Mapping[str, Tensor],
    present: Mapping[str, Tensor],
    kernel: str = "matmul",
) -> UMIOutput:
    """The released code's forward pass, with ``model``'s parameters.

    Args:
        model: a ``projection="feature"`` :class:`UnseenModalityModel`.
        full_inputs: modality -> ``(B, k_m, d_m)`` for EVERY sample; rows that lack the modality
            hold stand-ins (random noise), which the 0/1 mask multiplies by zero.
        present: modality -> ``(B,)`` bool.
        kernel: ``"matmul"`` (hand-written attention everywhere, as ``feature_reorganization.py``
            and ``vit.py`` write it) or ``"sdpa"`` (our fused kernel in the projections and on
            each branch slice: the released structure alone).

    Returns:
        :class:`UMIOutput` like ``model.forward`` (``modality_features[m]`` holds the rows that
        have ``m``, so ``model.loss`` applies unchanged).

    Shape:
        - full_inputs[m]: ``(B, k_m, d_m)``; present[m]: ``(B,)``
        - prediction: ``(B, C)``; branch_outputs: ``(B, G, C)``
    """
    g = model.config.branches
    names = sorted(full_inputs)
    with projection_kernel(model, kernel):
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


# ----------------------------------------------------------------------------- the released modules


def load_released_code(folder: Path) -> dict[str, Any]:
    """The authors' ``feature_reorganization.py`` and ``vit.py`` imported from ``folder``.

    Raises:
        ValueError: a file is missing, or importing it fails (naming the missing package).
    """
    modules = {}
    for name in ("feature_reorganization", "vit"):
        path = Path(folder).expanduser() / f"{name}.py"
        if not path.is_file():
            raise ValueError(f"--released-code: expected {path.name} in {folder} (a clone of "
                             f"xiaobai1217/Unseen-Modality-Interaction), it is missing")
        spec = importlib.util.spec_from_file_location(f"_released_{name}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError as err:
            raise ValueError(f"--released-code: importing {path} needs a package this environment lacks "
                             f"({err}); the transcription ('released') remains the baseline") from None
        modules[name] = module
    return modules


class ReleasedModel(nn.Module):
    """The released EPIC model: ``ViTReorganization`` + ``ViT`` (theirs) and the alignment tokens
    of ``train.py`` (a ``(1, 3806, 256)`` parameter), in one module for the optimizer."""

    def __init__(self, code: Mapping[str, Any], sizes: Mapping[str, Any], head_dim: int) -> None:
        super().__init__()
        dim, heads, slots = sizes["dim"], sizes["heads"], sizes["num_tokens"]
        self.reorganization = code["feature_reorganization"].ViTReorganization(
            dim=dim, depth=sizes["projection_depth"], heads=heads, mlp_dim=2 * dim, dim_head=head_dim,
            num_position=slots)
        self.vit = code["vit"].ViT(num_classes=sizes["classes"], dim=dim, depth=sizes["fusion_depth"], heads=heads,
                                   mlp_dim=2 * dim, dim_head=head_dim, num_position=slots,
                                   branch_num=sizes["branches"])
        self.base_vectors = nn.Parameter(torch.randn(1, sizes["classes"], dim))
        # The alignment loss reads the features in the common space: the ViT's embeddings of the
        # reorganised tokens (train.py applies it to the 768-d reorganised features, which does
        # not match its 256-d tokens: that script does not run as published).
        self.embedded: dict[str, Tensor] = {}
        for m, module in (("rgb", self.vit.rgb_embedding), ("audio", self.vit.audio_embedding)):
            module.register_forward_hook(lambda mod, args, out, m=m: self.embedded.__setitem__(m, out))

    def forward(self, rgb: Tensor, audio: Tensor, present: Mapping[str, Tensor]) -> Tensor:
        rgb, audio = self.reorganization(rgb, audio)
        masks = {m: p.to(rgb.dtype)[:, None, None] for m, p in present.items()}
        return self.vit(rgb, audio, masks["rgb"], masks["audio"])

    def alignment(self, features: Tensor) -> Tensor:
        """``(B, n, D)`` -> ``(B, C)``: mean squared distance of the mean feature to each token."""
        return (self.base_vectors - features.mean(dim=1, keepdim=True)).square().mean(dim=-1)


def released_code_loss(model: ReleasedModel, outputs: Tensor, labels: Tensor, pseudo: Tensor,
                       present: Mapping[str, Tensor]) -> Tensor:
    """``train.py``'s loss (label-smoothed CE on branch 0, KL on branch 1 as an element mean times
    3000, alignment times 0.001), on the rows that have each modality."""
    classes = outputs.shape[-1]
    log_prob = outputs[:, 0].log_softmax(dim=-1)
    weight = torch.full_like(log_prob, RELEASED_SMOOTHING / (classes - 1))
    weight.scatter_(-1, labels[:, None], 1.0 - RELEASED_SMOOTHING)
    supervised = -(weight * log_prob).sum(dim=-1).mean()
    log_pseudo = outputs[:, 1].log_softmax(dim=-1)
    kl = F.kl_div(log_pseudo, pseudo, reduction="none").mean(dim=-1)  # elementwise, then per row
    align = torch.stack([model.alignment(model.embedded[m]).gather(1, labels[:, None])[:, 0] * present[m]
                         for m in ("rgb", "audio")]).sum() / sum(p.sum() for p in present.values())
    return supervised + RELEASED_PSEUDO_WEIGHT * kl.mean() + RELEASED_ALIGN_WEIGHT * align


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def released_parameters(sizes: Mapping[str, Any], head_dim: int) -> int:
    """Parameters of the released EPIC model, counted from its architecture (no code needed).

    ``ViTReorganization`` (per modality: LayerNorm + Linear(768, D) + LayerNorm embedding, fixed
    positions of 784 rgb and 146 audio tokens, a ``depth``-layer transformer, LayerNorm +
    Linear(D, K) slot head), ``ViT`` (the same embeddings, K + G positions, G readout tokens,
    ``depth`` layers, LayerNorm + Linear(D, C) head) and ``train.py``'s C x D alignment tokens.
    A layer: two LayerNorms, QKV without bias (D -> 3 H h), output Linear(H h, D), MLP D -> 2D -> D.
    """
    d, f, k, c, g = sizes["dim"], sizes["feature_dim"], sizes["num_tokens"], sizes["classes"], sizes["branches"]
    inner, hidden = sizes["heads"] * head_dim, 2 * sizes["dim"]
    layer = 2 * 2 * d + d * 3 * inner + (inner * d + d) + (d * hidden + hidden) + (hidden * d + d)
    embedding = 2 * f + (f * d + d) + 2 * d
    tokens = sum(sizes["tokens"].values())
    reorganization = 2 * embedding + tokens * d + 2 * sizes["projection_depth"] * layer + 2 * (2 * d + d * k + k)
    vit = 2 * embedding + (k + g) * d + g * d + sizes["fusion_depth"] * layer + (2 * d + d * c + c)
    return reorganization + vit + c * d


# ----------------------------------------------------------------------------- the batch and steps


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
        fusion_depth=sizes["fusion_depth"], heads=sizes["heads"], head_dim=sizes.get("head_dim"),
        branches=sizes["branches"], device=device,
    )


def _region(name: str, enabled: bool) -> contextlib.AbstractContextManager:
    return torch.profiler.record_function(name) if enabled else contextlib.nullcontext()


def make_step(method: str, model: nn.Module, optimizer: torch.optim.Optimizer, data: dict,
              autocast: Optional[torch.dtype], regions: bool = False,
              used: Optional[dict] = None) -> Callable[[], float]:
    """A closure running one full training step of ``method``; returns the loss.

    ``method``: ``ours``, ``ours[<backend>]``, a key of :data:`TRANSCRIPTIONS` (with ``model`` ours) or
    ``released-code`` (with ``model`` a :class:`ReleasedModel`). ``regions`` marks forward, loss,
    backward and optimizer for the profiler.
    """
    device_type = data["labels"].device.type
    backend = method[len("ours["):-1] if method.startswith("ours[") else None

    def forward_and_loss() -> Tensor:
        if method == "released-code":
            with _region("step: forward", regions):
                out = model(data["full_inputs"]["rgb"], data["full_inputs"]["audio"], data["present"])
            with _region("step: loss", regions):
                return released_code_loss(model, out, data["labels"], data["pseudo"], data["present"])
        with _region("step: forward", regions):
            if method in TRANSCRIPTIONS:
                out = released_forward(model, data["full_inputs"], data["present"], TRANSCRIPTIONS[method])
            else:
                out = model(data["inputs"], present=data["present"])
        with _region("step: loss", regions):
            return model.loss(out, data["labels"], pseudo_targets=data["pseudo"]).total

    def step() -> float:
        chosen = forced_backend(model, backend) if backend else contextlib.nullcontext()
        with chosen, torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = forward_and_loss()
        with _region("step: backward", regions):
            loss.backward()
        if used is not None:
            used[method] = sum(p.numel() for p in model.parameters() if p.grad is not None)
        with _region("step: optimizer", regions):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def measure_peaks_here(steps: Mapping[str, Callable[[], float]], device: torch.device) -> dict[str, Optional[int]]:
    """Peak memory of one step of each method in this process, after one warm-up step of each
    (the optimizer's state then exists, as after the timed rounds)."""
    for step in steps.values():
        step()
    return {m: _common.peak_bytes(step, device) for m, step in steps.items()}


def measure_peaks(steps: Mapping[str, Callable[[], float]], device: torch.device,
                  argv: Sequence[str]) -> dict[str, Optional[int]]:
    """Peak memory of one step of each method: on CUDA here (the allocator's own peak); on the
    CPU in a fresh process with glibc's mmap threshold pinned (:func:`_common.peaks_in_fresh_process`),
    so that this process times the steps with glibc's defaults, as a user's training process runs."""
    if device.type == "cpu":
        peaks = _common.peaks_in_fresh_process(Path(__file__).resolve(), argv)
        if peaks is not None:
            return peaks
    return measure_peaks_here(steps, device)


def count_flops(step: Callable[[], float]) -> dict[str, int]:
    """Matrix-product FLOPs of one step (forward + backward), by kind: ``"linear"`` (``mm``,
    ``addmm``: the linear layers), ``"batched"`` (``bmm``: attention and the reorganisation) and
    ``"total"``.

    ``torch.utils.flop_counter`` counts matrix products; SDPA's fused CPU kernel is invisible to
    it, so the step runs with SDPA's math backend here (the FLOPs of attention without the fused
    kernel's recomputation in the backward pass, as explicit ``bmm``).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        step()
    by_op = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    linear = by_op.get("mm", 0) + by_op.get("addmm", 0)
    batched = by_op.get("bmm", 0) + by_op.get("baddbmm", 0)
    return {"linear": linear, "batched": batched, "total": counter.get_total_flops()}


def _cpu_seconds(fn: Callable[[], Any], repeats: int = 3) -> float:
    """The least CPU time of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def matmul_rates(sizes: Mapping[str, Any], batch: int, head: int) -> dict[str, float]:
    """This machine's GFLOP/s (CPU time) for the step's two kinds of matrix products, at the
    model's own shapes (the rgb projection's, the largest part of the step):

    - ``"linear"``: the forward and both backward products of the QKV map,
      ``(n, D) x (D, 3 H h)`` with ``n`` = rgb rows x tokens;
    - ``"batched"``: the attention's ``q k^T`` and ``p v`` as ``bmm`` of ``(B H, N, h)`` with
      ``h = head``, the scores written into an existing buffer (as a fused kernel does per block).
    """
    rows = batch // 2 * sizes["tokens"]["rgb"]
    dim, heads = sizes["dim"], sizes["heads"]
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, dim, generator=gen), torch.randn(3 * heads * head, dim, generator=gen)
    grad = torch.randn(rows, 3 * heads * head, generator=gen)

    def linear() -> None:
        F.linear(x, w), grad @ w, grad.t() @ x

    n, bh = sizes["tokens"]["rgb"], batch // 2 * heads
    q, k = torch.randn(bh, n, head, generator=gen), torch.randn(bh, n, head, generator=gen)
    scores = torch.empty(bh, n, n)

    def batched() -> None:
        torch.bmm(q, k.transpose(1, 2), out=scores), torch.bmm(scores, k)

    return {"linear": 3 * 2 * rows * dim * w.shape[0] / _cpu_seconds(linear) / 1e9,
            "batched": 2 * 2 * bh * n * n * head / _cpu_seconds(batched) / 1e9}


def matmul_floor(flops: Mapping[str, int], rates: Mapping[str, float]) -> float:
    """Seconds the step's matrix products alone take at ``rates`` (GFLOP/s by kind; FLOPs of
    neither kind at the slower rate): a lower bound of the step's time on this machine."""
    other = flops["total"] - flops["linear"] - flops["batched"]
    return (flops["linear"] / rates["linear"] + (flops["batched"] + other) / min(rates.values())) / 1e9


# ----------------------------------------------------------------------------- where the time goes

PART = "part: "
#: The parts of one step, in table order.
PART_ORDER = [f"{stage}: {kind}" for stage in ("projection rgb", "projection audio", "fusion")
              for kind in ("attention kernel", "attention linears (qkv, out)", "MLP",
                           "other (embed, norms, slot logits, reorganisation)")]
PART_ORDER += ["head, branch tokens, sum", "loss (Eq. 3)", "optimizer (AdamW step, zero_grad)",
               "backward: gradient accumulation", "backward: engine, unattributed"]


class _Regions:
    """Forward hooks that open a ``record_function`` region around a module's forward call."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.open: list[Any] = []

    def add(self, module: nn.Module, name: str) -> None:
        def enter(mod: nn.Module, args: Any) -> None:
            region = torch.profiler.record_function(PART + name)
            region.__enter__()
            self.open.append(region)

        def leave(mod: nn.Module, args: Any, out: Any) -> None:
            self.open.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _timed_kernel(backend: Any, name: str) -> Callable[..., Tensor]:
    """An attention kernel that runs a module's ``backend`` (its name or kernel) and marks the call."""
    run = backend if callable(backend) else _KERNELS[backend]

    def kernel(q: Tensor, k: Tensor, v: Tensor, group_sizes: Sequence[int], key_padding_mask: Optional[Tensor]):
        with torch.profiler.record_function(PART + name):
            return run(q, k, v, group_sizes, key_padding_mask)

    return kernel


def _in_region(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with every call inside a ``record_function`` region for :func:`time_breakdown`."""
    def marked(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(PART + name):
            return fn(*args, **kwargs)

    return marked


@contextlib.contextmanager
def _marked(model: UnseenModalityModel) -> Iterator[None]:
    """Mark every part of ``model`` for :func:`time_breakdown` (restored on exit)."""
    regions = _Regions()
    transformers, blocks = [], []
    other = "other (embed, norms, slot logits, reorganisation)"
    for stage, owner in [*((f"projection {m}", p) for m, p in model.projections.items()), ("fusion", model)]:
        encoder = owner.encoder if stage != "fusion" else owner.transformer
        regions.add(owner if stage != "fusion" else encoder, f"{stage}: {other}")
        if encoder is None:
            continue
        transformers.append((encoder, encoder.backend))
        encoder.backend = _timed_kernel(encoder.backend, f"{stage}: attention kernel")
        for block in encoder.blocks:
            # The blocks multiply by row blocks of qkv.weight (Block._qkv), not through the module.
            block._qkv = _in_region(block._qkv, f"{stage}: attention linears (qkv, out)")
            blocks.append(block)
            regions.add(block.proj, f"{stage}: attention linears (qkv, out)")
            regions.add(block.mlp, f"{stage}: MLP")
    regions.add(model.head, "head, branch tokens, sum")
    try:
        yield
    finally:
        regions.remove()
        for encoder, backend in transformers:
            encoder.backend = backend
        for block in blocks:
            del block._qkv


def _enclosing(event: Any, prefix: str) -> Optional[Any]:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(prefix):
        parent = parent.cpu_parent
    return parent


def time_breakdown(model: UnseenModalityModel, step: Callable[[], float]) -> dict[str, Any]:
    """Where one step of ``ours`` spends its time (CPU), by part, forward and backward.

    One step runs under ``torch.profiler``. Forward: each part's region time minus the regions
    nested in it (linears and MLP inside a transformer inside a projection); the forward time
    outside any part (the common-space sum, the branch tokens) goes to the head's row. Backward:
    each ``autograd::engine::evaluate_function`` event goes to the part whose forward op has its
    sequence number; gradient accumulation into the parameters has its own row, and the
    backward's wall time that no node accounts for is "engine, unattributed".

    Returns:
        ``{"parts": {name: {"forward_s", "backward_s"}}, "step_s": wall time under the
        profiler, "phases_s": forward/loss/backward/optimizer wall times}``.
    """
    from torch.profiler import ProfilerActivity, profile

    with _marked(model), profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        step()
        wall = time.perf_counter() - started
    forward: dict[str, float] = defaultdict(float)
    backward: dict[str, float] = defaultdict(float)
    phases: dict[str, float] = defaultdict(float)
    seq_part: dict[int, str] = {}
    events = list(prof.events())
    for e in events:
        seconds = e.time_range.elapsed_us() / 1e6
        if e.name.startswith("step: "):
            phases[e.name[len("step: "):]] += seconds
        elif e.name.startswith(PART):
            forward[e.name[len(PART):]] += seconds
            parent = _enclosing(e, PART)
            if parent is not None:
                forward[parent.name[len(PART):]] -= seconds
    for e in events:  # forward ops: their sequence number names the backward node they made
        if e.sequence_nr < 0 or e.name.startswith("autograd::") or _enclosing(e, "autograd::") is not None:
            continue
        part = _enclosing(e, PART)
        phase = _enclosing(e, "step: ")
        if part is not None:
            seq_part.setdefault(e.sequence_nr, part.name[len(PART):])
        elif phase is not None and phase.name == "step: loss":
            seq_part.setdefault(e.sequence_nr, "loss (Eq. 3)")
        else:
            seq_part.setdefault(e.sequence_nr, "head, branch tokens, sum")
    attributed = 0.0
    for e in events:
        if not e.name.startswith("autograd::engine::evaluate_function"):
            continue
        seconds = e.time_range.elapsed_us() / 1e6
        attributed += seconds
        if "AccumulateGrad" in e.name:
            backward["backward: gradient accumulation"] += seconds
        else:
            backward[seq_part.get(e.sequence_nr, "backward: engine, unattributed")] += seconds
    backward["backward: engine, unattributed"] += max(0.0, phases["backward"] - attributed)
    in_parts = sum(forward.values())
    forward["head, branch tokens, sum"] += max(0.0, phases["forward"] - in_parts)
    forward["loss (Eq. 3)"] += phases["loss"]
    forward["optimizer (AdamW step, zero_grad)"] += phases["optimizer"]
    parts = {name: {"forward_s": forward.get(name, 0.0), "backward_s": backward.get(name, 0.0)}
             for name in PART_ORDER if forward.get(name) or backward.get(name)}
    return {"parts": parts, "step_s": wall, "phases_s": dict(phases)}


def breakdown_table(breakdown: Mapping[str, Any]) -> str:
    total = sum(p["forward_s"] + p["backward_s"] for p in breakdown["parts"].values())
    rows = [["part of one step (ours)", "forward ms", "backward ms", "total ms", "share"]]
    for name, p in breakdown["parts"].items():
        both = p["forward_s"] + p["backward_s"]
        rows.append([name, f"{p['forward_s'] * 1e3:.0f}", f"{p['backward_s'] * 1e3:.0f}", f"{both * 1e3:.0f}",
                     f"{both / total:.1%}"])
    rows.append(["sum", "", "", f"{total * 1e3:.0f}", f"(step under the profiler: {breakdown['step_s'] * 1e3:.0f})"])
    return _common.table(rows)


def grouped_shares(breakdown: Mapping[str, Any]) -> dict[str, float]:
    """Shares of the step by kind across the transformers: attention kernel, its linears, MLP, ..."""
    total = sum(p["forward_s"] + p["backward_s"] for p in breakdown["parts"].values())
    groups: dict[str, float] = defaultdict(float)
    for name, p in breakdown["parts"].items():
        kind = name.split(": ", 1)[1] if name.startswith(("projection", "fusion")) else name
        groups[kind] += (p["forward_s"] + p["backward_s"]) / total
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------- report


def plot(path: Path, result: dict) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    methods = list(result["methods"])
    colors = ["C0" if m.startswith("ours") else "C3" for m in methods]
    panels = 3 if result.get("breakdown") else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    axes[0].bar(methods, [result["methods"][m]["cpu_median_s"] for m in methods], color=colors, label="CPU time")
    axes[0].plot(methods, [result["methods"][m]["median_s"] for m in methods], "k_", markersize=18,
                 label="wall time")
    axes[0].set_ylabel("median step time (s)")
    axes[0].legend(fontsize=7)
    axes[0].set_title(f"speed-up vs {result['baseline']}: {result['speedup']:.2f}x wall, "
                      f"{result['cpu_speedup']:.2f}x CPU (goal {GOAL_SPEEDUP}x)", fontsize=9)
    peaks = [result["methods"][m]["peak_bytes"] or 0 for m in methods]
    axes[1].bar(methods, [p / 2**20 for p in peaks], color=colors)
    axes[1].set_ylabel("peak memory of one step (MiB)")
    ratio = result["peak_ratio"]
    axes[1].set_title("ours / baseline: " + ("n/a" if ratio is None else f"{ratio:.2f}") + f" (goal <= {GOAL_PEAK})",
                      fontsize=9)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    if panels == 3:
        parts = result["breakdown"]["parts"]
        names = list(parts)[::-1]
        axes[2].barh(names, [parts[n]["forward_s"] for n in names], label="forward")
        axes[2].barh(names, [parts[n]["backward_s"] for n in names], left=[parts[n]["forward_s"] for n in names],
                     label="backward")
        axes[2].tick_params(axis="y", labelsize=6)
        axes[2].set_xlabel("seconds (one profiled step of ours)")
        axes[2].legend(fontsize=7)
    _common.finish_figure(fig, path, textwrap.fill(result["title"], 150))


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype; bfloat16/float16 run under torch.autocast with float32 parameters")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8; --quick: 4)")
    p.add_argument("--head-dim", type=int, default=None,
                   help="attention width per head (default: 64 at EPIC size, the released code's; 32 with "
                        "--quick; 0: dim // heads)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each runs every method once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    _common.add_threads_option(p)
    p.add_argument("--baselines", nargs="*", default=list(TRANSCRIPTIONS), choices=list(TRANSCRIPTIONS),
                   help="transcriptions of the released way to time (with our parameters)")
    p.add_argument("--released-code", type=Path, default=None, metavar="PATH",
                   help="a clone of the authors' repository: also time their own ViTReorganization + ViT "
                        "(EPIC size only)")
    p.add_argument("--backends", nargs="*", default=[], choices=BACKENDS[1:],
                   help="also time ours with each of these attention backends forced")
    p.add_argument("--no-flops", action="store_true", help="skip counting the FLOPs of one step of each")
    p.add_argument("--no-breakdown", action="store_true", help="skip the profile of where the time goes")
    p.add_argument("--quick", action="store_true", help="smoke size (small widths and tokens), < 30 s")
    p.add_argument("--out", type=Path, default=_common.ROOT / "results")
    p.add_argument("--name", default=None, help="results/<name>.json and .png (default train_step)")
    p.add_argument(_common.PEAKS_OUT, type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = dict(QUICK if args.quick else EPIC)
    if args.head_dim is not None:
        if args.head_dim < 0:
            p.error(f"--head-dim: expected an int >= 0, got {args.head_dim}")
        args.sizes["head_dim"] = args.head_dim or None
    args.batch = args.batch or (4 if args.quick else 8)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    if args.batch < 2 or args.batch % 2:
        p.error(f"--batch: expected an even number >= 2 (half rgb-only, half audio-only), got {args.batch}")
    if args.released_code is not None and args.quick:
        p.error("--released-code: the released modules have EPIC-Kitchens' token counts built in; drop --quick")
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    args.code = None
    if args.released_code is not None:
        try:
            args.code = load_released_code(args.released_code)
        except ValueError as err:
            p.error(str(err))
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    sizes, batch, device = args.sizes, args.batch, args.device
    threads = _common.set_threads(args.threads, device)
    name = args.name or ("train_step_quick" if args.quick else "train_step")
    autocast = None if args.dtype == "float32" else getattr(torch, args.dtype)

    head = sizes["head_dim"] or sizes["dim"] // sizes["heads"]
    model = build_model(sizes, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = make_batch(sizes, batch, device, torch.Generator().manual_seed(0))
    used: dict[str, int] = {}
    models: dict[str, nn.Module] = {}
    steps: dict[str, Callable[[], float]] = {}
    for method in ["ours", *(f"ours[{b}]" for b in args.backends), *args.baselines]:
        models[method] = model
        steps[method] = make_step(method, model, optimizer, data, autocast, used=used)
    if args.code is not None:
        torch.manual_seed(0)
        released = ReleasedModel(args.code, sizes, head).to(device)
        models["released-code"] = released
        steps["released-code"] = make_step("released-code", released, torch.optim.AdamW(released.parameters(), lr=1e-4),
                                           data, autocast, used=used)
    if args.peaks_out is not None:  # the fresh process of measure_peaks
        _common.write_json(args.peaks_out, measure_peaks_here(steps, device))
        return 0
    params = {m: parameter_count(mod) for m, mod in models.items()}
    released_count = released_parameters(sizes, head)
    baseline = "released-code" if "released-code" in steps else next((b for b in args.baselines), None)

    info = _common.machine_info(device)
    title = (f"UnseenModalityModel train step, B={batch} (half rgb-only, half audio-only), "
             f"rgb {sizes['tokens']['rgb']}x{sizes['feature_dim']}, audio {sizes['tokens']['audio']}x"
             f"{sizes['feature_dim']}, K={sizes['num_tokens']}, D={sizes['dim']}, {sizes['heads']} heads x {head}, "
             f"depth {sizes['projection_depth']}+{sizes['fusion_depth']}, C={sizes['classes']}, {args.dtype}, "
             f"{_common.describe_machine(info)}, median of {args.repeats}")
    print(title)
    print("parameters: " + ", ".join(f"{m} {n:,}" for m, n in params.items() if m in ("ours", "released-code"))
          + f"; the released architecture at this size, counted: {released_count:,} (ours / that: "
          f"{params['ours'] / released_count:.3f}); 'released' and 'released-sdpa' compute with ours")
    started = time.perf_counter()
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    cpu: dict[str, list[float]] = {}
    times = _common.interleaved_times(steps, args.warmup, args.repeats, sync, cpu_times=cpu)
    peaks = measure_peaks(steps, device, argv if argv is not None else sys.argv[1:])
    flop_kinds = None if args.no_flops else {m: count_flops(step) for m, step in steps.items()}
    flops = {m: f["total"] for m, f in flop_kinds.items()} if flop_kinds else None
    rates = matmul_rates(sizes, batch, head) if flop_kinds and device.type == "cpu" else None
    breakdown = None
    if not args.no_breakdown and device.type == "cpu":
        breakdown = time_breakdown(model, make_step("ours", model, optimizer, data, autocast, regions=True))
    info_after = _common.machine_info(device)

    methods = {
        m: {"median_s": statistics.median(times[m]), "times_s": times[m], "peak_bytes": peaks[m],
            "cpu_median_s": statistics.median(cpu[m]), "cpu_times_s": cpu[m],
            "parameters": params[m], "parameters_with_grad": used[m], "flops": flops[m] if flops else None,
            "speedup_vs_this": _common.median_ratio(times[m], times["ours"]),
            "cpu_speedup_vs_this": _common.median_ratio(cpu[m], cpu["ours"])}
        for m in steps
    }
    rows = [["method", "median step (s)", "steps (s)", "this / ours", "CPU s (this / ours)", "peak (MiB)",
             "GFLOP fwd+bwd", "parameters"]]
    for m, r in methods.items():
        rows.append([m, f"{r['median_s']:.3f}", " ".join(f"{t:.2f}" for t in r["times_s"]),
                     f"{r['speedup_vs_this']:.2f}", f"{r['cpu_median_s']:.2f} ({r['cpu_speedup_vs_this']:.2f})",
                     _common.mib(r["peak_bytes"]), f"{r['flops'] / 1e9:,.1f}" if r["flops"] else "-",
                     f"{r['parameters']:,}"])
    print(_common.table(rows))
    result: dict[str, Any] = {
        "title": title,
        "command": " ".join(["python", "benchmarks/train_step.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "config": {"batch": batch, "sizes": sizes, "dtype": args.dtype, "device": str(device),
                   "repeats": args.repeats, "warmup": args.warmup, "threads": threads,
                   "baselines": args.baselines, "backends": args.backends, "quick": args.quick,
                   "released_code": str(args.released_code) if args.released_code else None,
                   "optimizer": "AdamW"},
        "machine": info,
        "load_average_1min_after": info_after.get("load_average_1min"),
        "methods": methods,
        "released_architecture_parameters": released_count,
        "baseline": baseline,
        "speedup": None, "peak_ratio": None, "goal": None,
        "breakdown": breakdown,
    }
    if baseline is not None:
        speedup = methods[baseline]["speedup_vs_this"]
        measurable = all(peaks[m] is not None and peaks[m] > 0 for m in ("ours", baseline))
        peak_ratio = peaks["ours"] / peaks[baseline] if measurable else None
        size_ratio = params["ours"] / params[baseline]
        met = speedup >= GOAL_SPEEDUP and (peak_ratio is not None and peak_ratio <= GOAL_PEAK)
        verdict = ("quick size; the goals are for the EPIC size" if args.quick
                   else ("met" if met else "MISSED") + (" (stretch 4x met)" if speedup >= STRETCH_SPEEDUP else ""))
        cpu_speedup = methods[baseline]["cpu_speedup_vs_this"]
        print(f"baseline {baseline}: speed-up (median of per-round ratios) {speedup:.2f}x in wall time, "
              f"{cpu_speedup:.2f}x in CPU time; peak memory ours/baseline "
              + ("n/a" if peak_ratio is None else f"{peak_ratio:.2f}")
              + f"; parameters ours/baseline {size_ratio:.3f} [{verdict}: goal >= {GOAL_SPEEDUP}x "
              f"(stretch {STRETCH_SPEEDUP}x), peak <= {GOAL_PEAK}x, parameters within 5%]")
        result.update(speedup=speedup, cpu_speedup=cpu_speedup, peak_ratio=peak_ratio, parameter_ratio=size_ratio,
                      goal={"speedup": GOAL_SPEEDUP, "stretch": STRETCH_SPEEDUP, "peak": GOAL_PEAK, "met": met})
    if flops and baseline:
        result["flop_ratio"] = flops[baseline] / flops["ours"]
        print(f"FLOP ratio {baseline}/ours: {result['flop_ratio']:.2f} (the speed-up if time followed the arithmetic)")
    if rates and baseline:
        floor = matmul_floor(flop_kinds["ours"], rates)
        ours_cpu = methods["ours"]["cpu_median_s"]
        bound = methods[baseline]["cpu_median_s"] / floor
        result["floor"] = {"rates_gflops": rates, "flops": flop_kinds["ours"], "floor_s": floor,
                           "ours_cpu_s": ours_cpu, "ours_vs_floor": ours_cpu / floor, "speedup_at_floor": bound}
        print(f"floor: ours' matrix products alone ({flop_kinds['ours']['linear'] / 1e9:,.1f} GFLOP in linear "
              f"layers at {rates['linear']:.0f} GFLOP/s, {flop_kinds['ours']['batched'] / 1e9:,.1f} GFLOP batched at "
              f"{rates['batched']:.0f} GFLOP/s, this machine's rates at the model's shapes, measured now) take "
              f"{floor:.2f} s; ours took {ours_cpu:.2f} s of CPU time ({ours_cpu / floor:.2f}x the floor). If ours "
              f"ran at the floor, the speed-up over {baseline} would be {bound:.2f}x (CPU time).")
    if breakdown is not None:
        print(breakdown_table(breakdown))
        shares = grouped_shares(breakdown)
        result["breakdown_shares"] = shares
        print("by kind: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    result["seconds"] = time.perf_counter() - started
    _common.write_results(args.out, name, result, plot if baseline is not None else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
