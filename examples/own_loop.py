"""The five layers inside your own model and your own training loop, from raw inputs.

    python examples/own_loop.py                 # about 10 s of CPU time, one thread
    python examples/own_loop.py --out RUN       # also save the layers' state and reload it

Plain PyTorch, no umilayers trainer: copy this file and swap in your encoders and your data.
Each step is walked through, with the shape of every tensor, on the docs page
"Use the layers in your own model".

The data (made here, no download): every sample has a class ``y = 3 * a + b`` out of 9, where
``a`` is the orientation of a noisy grating in a 16x16 image and ``b`` the pitch of a noisy tone
of 96 to 160 samples. An image alone tells ``a`` but not ``b``, a tone alone ``b`` but not
``a``: with one modality a model can expect 1/3 top-1 at most (on a finite test set it lands a
few points either side: 28.7% to 36.5% over seeds 0-9 at the defaults); with both it can reach
100%. Training
has no sample with both (one half images only, the other half tones only, as the paper's
Table 1); the test set has both, so it asks for an interaction never seen in training.

The model: a small CNN (image -> 16 tokens) and a small 1-D CNN (tone -> a variable number of
tokens) trained jointly with the five layers of the paper (Zhang, Doughty, Snoek, NeurIPS 2023):

1. stage 1: a unimodal model per modality (its encoder + a linear head); its softmax outputs
   of the last ``--window`` epochs fill a ``PseudoLabelBank``;
2. stage 2: ``FeatureProjection`` per modality -> ``CommonSpaceSum`` -> a two-branch
   ``GroupMaskedTransformer``; loss of Eq. 3, ``lambda * L_align + L_sup + alpha * L_pseudo``,
   with ``AlignmentLoss`` and the bank's pseudo-labels; the encoders start from stage 1 and
   keep training (gradients flow into them);
3. test top-1 with every modality subset (image, audio, both), and stage 1's late fusion.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import time
from pathlib import Path
from typing import Optional

import torch
from einops import rearrange, repeat
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from umilayers import (
    AlignmentLoss,
    CommonSpaceSum,
    FeatureProjection,
    GroupMaskedTransformer,
    ModalityBatch,
    PseudoLabelBank,
    classification_loss,
    classification_pseudo_loss,
    collate_modalities,
)

MODALITIES = ("audio", "image")  # sorted, as the layers iterate them
ORIENTATIONS = PITCHES = 3  # factor a (image) and factor b (audio)
NUM_CLASSES = ORIENTATIONS * PITCHES


# ------------------------------------------------------------------------------------ data


def make_samples(n: int, generator: torch.Generator, noise: float = 1.0) -> dict:
    """``n`` samples with both modalities: images ``(n, 1, 16, 16)``, tones ``[(L_i, 1)]``, labels."""
    a = torch.randint(ORIENTATIONS, (n,), generator=generator)
    b = torch.randint(PITCHES, (n,), generator=generator)

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    # Image: a grating whose orientation (0, 60 or 120 degrees, +-8) is factor a.
    angle = a * torch.pi / ORIENTATIONS + uniform(-0.15, 0.15, n)
    freq, phase = uniform(0.6, 1.0, n), uniform(0, 2 * torch.pi, n)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    wave = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
    images = torch.sin(freq[:, None, None] * wave + phase[:, None, None])
    images = (images + noise * torch.randn(n, 16, 16, generator=generator))[:, None]
    # Audio: a tone whose pitch (0.3, 0.6 or 1.0 rad/sample, +-8%) is factor b; its length varies.
    pitch = torch.tensor([0.3, 0.6, 1.0])[b] * uniform(0.92, 1.08, n)
    lengths = torch.randint(96, 161, (n,), generator=generator)
    tones = []
    for i in range(n):
        t = torch.arange(int(lengths[i]), dtype=torch.float32)
        tone = uniform(0.5, 1.5, 1) * torch.sin(pitch[i] * t + uniform(0, 2 * torch.pi, 1))
        tones.append((tone + noise * torch.randn(len(t), generator=generator))[:, None])  # (L_i, 1)
    return {"image": images, "audio": tones, "label": a * PITCHES + b}


class IncompleteDataset(Dataset):
    """Items ``({modality: tensor} of the modalities the sample has, label, sample id)``.

    This is all ``collate_modalities`` asks of your data set: a dict that simply lacks the
    modalities a sample does not have (or maps them to None), then anything else.
    """

    def __init__(self, samples: dict, has: dict[str, Tensor]) -> None:
        self.samples, self.has = samples, has  # has[m]: (N,) bool

    def __len__(self) -> int:
        return len(self.samples["label"])

    def __getitem__(self, i: int):
        inputs = {m: self.samples[m][i] for m in MODALITIES if self.has[m][i]}
        return inputs, self.samples["label"][i], i  # the id indexes the PseudoLabelBank

    def with_modality(self, m: str) -> Subset:
        return Subset(self, self.has[m].nonzero().flatten().tolist())


def make_data(train_size: int, test_size: int, seed: int) -> tuple[IncompleteDataset, IncompleteDataset]:
    generator = torch.Generator().manual_seed(seed)
    half = torch.arange(train_size) < train_size // 2
    train = IncompleteDataset(make_samples(train_size, generator), {"image": half, "audio": ~half})
    every = torch.ones(test_size, dtype=torch.bool)
    test = IncompleteDataset(make_samples(test_size, generator), {"image": every, "audio": every})
    return train, test


# ------------------------------------------------------------------------------ encoders
# Your encoders: any nn.Module that returns tokens (B_m, k_m, d_m) and, for inputs of variable
# length, which of those tokens are padding.


class ImageEncoder(nn.Module):
    """``(B_m, 1, 16, 16)`` images -> ``(B_m, 16, 32)`` tokens (one per cell of a 4x4 grid)."""

    dim = 32

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.GELU(),
                                 nn.Conv2d(16, self.dim, 3, stride=2, padding=1), nn.GELU())

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> tuple[Tensor, None]:
        return rearrange(self.net(x), "b d h w -> b (h w) d"), None


class AudioEncoder(nn.Module):
    """``(B_m, L, 1)`` tones padded to the longest ``L`` -> ``(B_m, k, 24)`` tokens + padding.

    The tokens of a shorter tone that would read its padding are marked as padding in turn, so
    padding never reaches the layers.
    """

    dim = 24
    convs = ((8, 4), (4, 2))  # (kernel, stride) of the two convolutions

    def __init__(self) -> None:
        super().__init__()
        (k1, s1), (k2, s2) = self.convs
        self.net = nn.Sequential(nn.Conv1d(1, 16, k1, stride=s1), nn.GELU(),
                                 nn.Conv1d(16, self.dim, k2, stride=s2), nn.GELU())

    def tokens(self, length: Tensor) -> Tensor:
        """Tokens whose receptive field lies inside ``length`` samples (conv output length)."""
        for kernel, stride in self.convs:
            length = torch.div(length - kernel, stride, rounding_mode="floor") + 1
        return length

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> tuple[Tensor, Optional[Tensor]]:
        tokens = rearrange(self.net(rearrange(x, "b l c -> b c l")), "b d k -> b k d")
        if padding_mask is None:
            return tokens, None
        valid = self.tokens((~padding_mask).sum(dim=1))  # (B_m,) valid tokens per row
        return tokens, torch.arange(tokens.shape[1], device=tokens.device)[None, :] >= valid[:, None]


def make_encoders() -> nn.ModuleDict:
    return nn.ModuleDict({"audio": AudioEncoder(), "image": ImageEncoder()})


def encode(encoders: nn.ModuleDict, batch: ModalityBatch) -> dict[str, tuple[Tensor, Optional[Tensor]]]:
    """Each modality's encoder on the rows that have it: ``m -> ((B_m, k_m, d_m), (B_m, k_m) or None)``."""
    return {m: encoders[m](x, batch.padding_masks[m]) for m, x in batch.inputs.items()}


# --------------------------------------------------------------------- stage 1: unimodal


class Unimodal(nn.Module):
    """One modality's encoder + masked mean over its tokens + a linear head: ``(B_m, C)`` logits."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.dim, NUM_CLASSES)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        tokens, mask = self.encoder(x, padding_mask)  # (B_m, k_m, d_m), (B_m, k_m) or None
        if mask is not None:
            weight = (~mask).float()[..., None]
            return self.head((tokens * weight).sum(1) / weight.sum(1))
        return self.head(tokens.mean(1))


def train_unimodal(m: str, train: IncompleteDataset, bank: PseudoLabelBank, args) -> Unimodal:
    """Stage 1 for modality ``m``: train on the samples that have it; fill the bank."""
    model = Unimodal(make_encoders()[m]).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    subset = train.with_modality(m)
    loader = DataLoader(subset, batch_size=args.batch_size, shuffle=True, collate_fn=collate_modalities,
                        generator=torch.Generator().manual_seed(args.seed))
    for epoch in range(args.unimodal_epochs):
        model.train()
        for batch, label, _ in loader:
            batch, label = batch.to(args.device), label.to(args.device)
            loss = classification_loss(model(batch.inputs[m], batch.padding_masks[m]), label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch >= args.unimodal_epochs - args.window:  # the bank ignores earlier epochs anyway
            ids, probs = predict_unimodal(model, m, subset, args.batch_size, args.device)
            bank.update(m, ids, probs, epoch)  # running mean over the last `window` epochs
    return model


@torch.no_grad()
def predict_unimodal(model: Unimodal, m: str, data: Dataset, batch_size: int,
                     device: str) -> tuple[Tensor, Tensor]:
    """Softmax outputs ``(N_m, C)`` of ``model`` on every sample of ``data`` and their ids ``(N_m,)``."""
    model.eval()
    ids, probs = [], []
    for batch, _, index in DataLoader(data, batch_size=batch_size, collate_fn=collate_modalities):
        batch = batch.to(device)
        probs.append(model(batch.inputs[m], batch.padding_masks[m]).softmax(-1))
        ids.append(index)
    return torch.cat(ids), torch.cat(probs)


# -------------------------------------------------------------- stage 2: the five layers


class TwoBranchModel(nn.Module):
    """Your encoders + the paper's layers: projection, common-space sum, two branches in one pass."""

    def __init__(self, encoders: nn.ModuleDict, dim: int = 32, slots: int = 8, heads: int = 4) -> None:
        super().__init__()
        self.encoders = encoders
        self.project = nn.ModuleDict({  # d_m -> the common space (K=slots, D=dim)
            m: FeatureProjection(enc.dim, out_dim=dim, num_tokens=slots, depth=1, heads=heads)
            for m, enc in sorted(encoders.items())
        })
        self.fuse = CommonSpaceSum()
        self.positions = nn.Parameter(0.02 * torch.randn(slots, dim))
        self.readout = nn.Parameter(0.02 * torch.randn(2, dim))  # one readout token per branch
        self.branches = GroupMaskedTransformer(dim, depth=1, heads=heads, groups=2)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, NUM_CLASSES))
        self.align = AlignmentLoss(num_tokens=NUM_CLASSES, dim=dim)  # one token per class

    def forward(self, batch: ModalityBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Branch logits ``(B, 2, C)`` and each modality's projected features ``(B_m, K, D)``."""
        encoded = encode(self.encoders, batch)  # m -> tokens (B_m, k_m, d_m), padding (B_m, k_m)
        features = {m: self.project[m](tokens, padding_mask=mask)  # m -> (B_m, K, D)
                    for m, (tokens, mask) in encoded.items()}
        fused = self.fuse(features, batch.present) + self.positions  # (B, K, D)
        # Each branch gets half of the K slots after its own readout token:
        # [readout_0, slots 0..K/2-1, readout_1, slots K/2..K-1], (B, K + 2, D). The group mask
        # keeps each half to itself (Eq. 2), so both branches run in one pass.
        halves = rearrange(fused, "b (g n) d -> b g n d", g=2)  # (B, 2, K/2, D)
        readout = repeat(self.readout, "g d -> b g 1 d", b=fused.shape[0])  # (B, 2, 1, D)
        tokens = rearrange(torch.cat([readout, halves], dim=2), "b g n d -> b (g n) d")
        out = rearrange(self.branches(tokens), "b (g n) d -> b g n d", g=2)[:, :, 0]  # (B, 2, D)
        return self.head(out), features  # (B, 2, C)

    def loss(self, batch: ModalityBatch, label: Tensor, pseudo: Tensor, align_weight: float,
             pseudo_weight: float) -> Tensor:
        """Eq. 3: ``lambda * L_align + L_sup (branch 0) + alpha * L_pseudo (branch 1)``."""
        logits, features = self(batch)
        align = torch.stack([self.align(f, label[batch.present[m]]) for m, f in features.items()]).mean()
        supervised = classification_loss(logits[:, 0], label)
        distilled = classification_pseudo_loss(logits[:, 1], pseudo)  # KL(pseudo || softmax)
        return align_weight * align + supervised + pseudo_weight * distilled

    @torch.no_grad()
    def predict(self, batch: ModalityBatch) -> Tensor:
        """Class probabilities ``(B, C)``: the mean of the two branches' softmax."""
        self.eval()
        return self(batch)[0].softmax(-1).mean(1)


def train_multimodal(encoders: nn.ModuleDict, train: IncompleteDataset, bank: PseudoLabelBank,
                     args) -> TwoBranchModel:
    model = TwoBranchModel(encoders).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate_modalities,
                        generator=torch.Generator().manual_seed(args.seed + 1))
    for _ in range(args.epochs):
        model.train()
        for batch, label, index in loader:  # index: (B,) sample ids, kept on the CPU for the bank
            batch, label = batch.to(args.device), label.to(args.device)
            # (B, C): each sample's averaged unimodal prediction (with several modalities the
            # one closest to the ground truth; here every training sample has exactly one).
            pseudo = bank.targets(index, batch.present, ground_truth=label, device=args.device)
            loss = model.loss(batch, label, pseudo, args.align_weight, args.pseudo_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


# ----------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: TwoBranchModel, unimodal: dict[str, Unimodal], test: IncompleteDataset,
             batch_size: int, device: str) -> dict[str, float]:
    """Test top-1 of the model with every non-empty modality subset, and stage 1's late fusion."""
    subsets = [c for r in range(1, len(MODALITIES) + 1) for c in itertools.combinations(MODALITIES, r)]
    correct = {"+".join(s): 0 for s in subsets} | {"late fusion": 0}
    for batch, label, _ in DataLoader(test, batch_size=batch_size, collate_fn=collate_modalities):
        batch, label = batch.to(device), label.to(device)
        for subset in subsets:
            correct["+".join(subset)] += int((model.predict(batch.select(subset)).argmax(-1) == label).sum())
        for u in unimodal.values():
            u.eval()
        late = torch.stack([u(batch.inputs[m], batch.padding_masks[m]).softmax(-1)
                            for m, u in unimodal.items()]).mean(0)  # (B, C), every row has both
        correct["late fusion"] += int((late.argmax(-1) == label).sum())
    return {name: count / len(test) for name, count in correct.items()}


# ------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seeds the data, the initialisation and the sample order")
    p.add_argument("--train-size", type=int, default=1200, help="training samples, half per modality")
    p.add_argument("--test-size", type=int, default=600, help="test samples, all with both modalities")
    p.add_argument("--unimodal-epochs", type=int, default=6, help="stage 1 epochs per modality")
    p.add_argument("--window", type=int, default=3, help="last stage-1 epochs averaged into pseudo-labels (e)")
    p.add_argument("--epochs", type=int, default=6, help="stage 2 epochs")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of both stages")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of both stages")
    p.add_argument("--align-weight", type=float, default=1e-3, help="lambda of Eq. 3 (the paper's 0.001)")
    p.add_argument("--pseudo-weight", type=float, default=1.0, help="alpha of Eq. 3")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (the model is tiny, and on a busy 2-core machine a second thread made "
                        "the run several times slower)")
    p.add_argument("--device", default="cpu", help="where to train, e.g. cuda")
    p.add_argument("--out", type=Path, default=None, help="save the model and the bank here, then reload them")
    args = p.parse_args(argv)
    for name in ("train_size", "test_size", "unimodal_epochs", "window", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}")
    if args.train_size < 2:
        p.error(f"--train-size: expected at least 2 (one sample per modality), got {args.train_size}")
    if args.window > args.unimodal_epochs:
        p.error(f"--window: expected at most --unimodal-epochs={args.unimodal_epochs}, got {args.window}")
    if not 0 < args.lr < float("inf"):
        p.error(f"--lr: expected a finite number > 0, got {args.lr}")
    for name in ("align_weight", "pseudo_weight"):
        if not 0 <= getattr(args, name) < float("inf"):
            p.error(f"--{name.replace('_', '-')}: expected a finite number >= 0, got {getattr(args, name)}")
    if args.threads < 1:
        p.error(f"--threads: expected an int >= 1, got {args.threads}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device: {args.device} asked for, but torch sees no CUDA device")
    if args.out is not None and args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        p.error(f"--out: expected a new or empty folder, got {args.out} (exists and is not an empty folder)")
    return args


def save_and_reload(model: TwoBranchModel, bank: PseudoLabelBank, train: IncompleteDataset,
                    test: IncompleteDataset, out: Path) -> None:
    """Save the layers' state and the bank; reload them into fresh objects; check they match."""
    out.mkdir(parents=True, exist_ok=True)
    # Write to a temporary name, then rename: a crash never leaves a half-written model.pt.
    torch.save(model.state_dict(), out / "model.pt.tmp")  # encoders + the five layers
    os.replace(out / "model.pt.tmp", out / "model.pt")
    bank.save(out / "pseudo_labels")  # only needed to resume stage 2
    device = next(model.parameters()).device
    fresh = TwoBranchModel(make_encoders()).to(device)
    fresh.load_state_dict(torch.load(out / "model.pt", map_location=device, weights_only=True))
    loaded = PseudoLabelBank.load(out / "pseudo_labels")
    batch, _, _ = collate_modalities([test[i] for i in range(min(len(test), 64))])
    batch = batch.to(device)
    same = torch.equal(fresh.predict(batch), model.predict(batch))
    batch, _, ids = collate_modalities([train[i] for i in range(min(len(train), 64))])
    same_bank = torch.equal(loaded.targets(ids, batch.present), bank.targets(ids, batch.present))
    print(f"saved to {out}; reloaded model predicts identically: {same}, bank identical: {same_bank}")


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    train, test = make_data(args.train_size, args.test_size, args.seed)

    # Stage 1: one unimodal model per modality; the bank keeps the mean of its softmax outputs
    # over the last `window` epochs, O(N * C) memory whatever the window.
    bank = PseudoLabelBank(num_samples=len(train), num_outputs=NUM_CLASSES, modalities=MODALITIES,
                           window=args.window, total_epochs=args.unimodal_epochs)
    unimodal = {m: train_unimodal(m, train, bank, args) for m in MODALITIES}

    # Stage 2: the stage-1 encoders (a copy: late fusion below keeps the originals) keep
    # training inside the two-branch model.
    encoders = nn.ModuleDict({m: copy.deepcopy(unimodal[m].encoder) for m in MODALITIES})
    model = train_multimodal(encoders, train, bank, args)

    accuracy = evaluate(model, unimodal, test, args.batch_size, args.device)
    print(f"test top-1, {len(test)} samples with both modalities (chance {1 / NUM_CLASSES:.1%}; "
          f"the best one modality alone can expect: {1 / PITCHES:.1%}):")
    for name, value in accuracy.items():
        print(f"  {name:<12} {value:6.1%}")
    print(f"seed {args.seed}: {time.perf_counter() - start:.1f} s wall time, {time.process_time() - cpu_start:.1f} s "
          f"CPU time, {torch.get_num_threads()} thread(s)")
    if args.out is not None:
        save_and_reload(model, bank, train, test, args.out)
    return accuracy


if __name__ == "__main__":
    main()
