"""Is the synthetic benchmark's design really there? Linear probes on the generated stores.

For each task, features per modality are either

- ``mean``: the mean over valid tokens (what mean pooling keeps), or
- ``tokens``: the marker-rectified mean ``mean_i x_i * sign(<x_i, e_m>)`` over the tokens whose
  marker component is large (an oracle read-out of the token-level signal; an attention layer
  can learn the same selection),

and a linear probe (ridge regression; one-hot targets and argmax for classification) is fit on
one split and scored on ``test``. ``alone`` probes use one modality (or one training split's
modality set), ``all`` uses every modality. Probes on the *multimodal* rows are fit on ``val``
(rows that have every modality), so they measure what the data holds, not what a model trained
on modality-incomplete data can learn.

Run: ``python benchmarks/synthetic_sanity.py [--beta 0.1] [--seed 0]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from umilayers.data import FeatureStore
from umilayers.data.synthetic import LAYOUTS, SyntheticConfig, _geometry, make_synthetic_store
from umilayers.metrics import mae, retrieval_metrics, top1


def features(store, split, modality, kind, marker, threshold=1.5):
    x = np.load(store.path / split / f"{modality}.npy").astype(np.float64)
    k = x.shape[1]
    lfile = store.path / split / f"{modality}.lengths.npy"
    lengths = np.load(lfile) if lfile.exists() else np.full(len(x), k)
    valid = (np.arange(k)[None] < lengths[:, None]).astype(np.float64)
    if kind == "mean":
        return (x * valid[..., None]).sum(1) / lengths[:, None]
    proj = x @ marker  # (n, k)
    keep = valid * (np.abs(proj) > threshold)
    rect = x * np.sign(proj)[..., None] * keep[..., None]
    return rect.sum(1) / np.maximum(keep.sum(1), 1)[:, None]


def ridge(x_train, y_train, x_test, lam=1.0):
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-8
    a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
    b = np.c_[(x_test - mu) / sd, np.ones(len(x_test))]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y_train)
    return b @ w


def markers(task, cfg):
    """The modalities' marker directions, rebuilt exactly as make_synthetic_store draws them."""
    geometry = _geometry(task, cfg, np.random.default_rng(cfg.seed))
    return {m: g.marker for m, g in geometry.items()}


def score(task, store, big, mods, kind, mk):
    def xs(st, split):
        return np.concatenate([features(st, split, m, kind, mk[m]) for m in mods], 1)

    y_fit, y_test = big.targets("val"), store.targets("test")
    if task == "classification":
        onehot = np.eye(store.num_outputs)[y_fit]
        return "top1", top1(ridge(xs(big, "val"), onehot, xs(store, "test"), lam=10.0), y_test)
    if task == "regression":
        return "mae", mae(ridge(xs(big, "val"), y_fit, xs(store, "test")), y_test)
    # retrieval: map video features to the caption's mean token, rank by cosine similarity
    def text_mean(st, split, y):
        lengths = np.load(st.path / split / "targets.lengths.npy")
        return y.sum(1) / lengths[:, None]
    pred = ridge(xs(big, "val"), text_mean(big, "val", y_fit), xs(store, "test"))
    text = text_mean(store, "test", y_test)
    pred /= np.linalg.norm(pred, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return "MnR", retrieval_metrics(text @ pred.T)["mean_rank"]


def learned_classification(store, seed, epochs=40, slots=8, width=64, pooled=False):
    """A tiny attention-pooling model trained on the modality-incomplete training splits.

    Per modality: slot logits from a 2-layer MLP over each token, softmax over the tokens, the
    attended tokens mapped to ``width``; modalities summed (as CommonSpaceSum); MLP head.
    ``pooled`` replaces attention by the mean over tokens. Returns test top-1 with every
    modality, and with each modality alone.
    """
    import torch
    from torch import nn

    from umilayers.data import collate

    torch.manual_seed(seed)
    mods = sorted(store.modalities)
    enc = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, slots))
                         for m, (k, d) in store.modalities.items()})
    proj = nn.ModuleDict({m: nn.Linear(d, width) for m, (k, d) in store.modalities.items()})
    head = nn.Sequential(nn.Flatten(), nn.LayerNorm(slots * width), nn.Linear(slots * width, width),
                         nn.GELU(), nn.Linear(width, store.num_outputs))
    params = [*enc.parameters(), *proj.parameters(), *head.parameters()]

    def forward(batch, use=None):
        total = 0
        for m in mods:
            if m not in batch.inputs or (use is not None and m not in use):
                continue
            x = batch.inputs[m]
            mask = batch.padding_masks[m]
            logits = enc[m](x) if not pooled else torch.zeros(*x.shape[:2], slots)
            if mask is not None:
                logits = logits.masked_fill(mask[..., None], float("-inf"))
            weights = logits.softmax(dim=1)  # over input tokens
            fm = proj[m](weights.transpose(1, 2) @ x)  # (B_m, slots, width)
            full = torch.zeros(batch.size, slots, width)
            full[batch.present[m]] = fm
            total = total + full
        return head(total)

    train = store.train_dataset()
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, collate_fn=collate)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-2)
    for _ in range(epochs):
        for batch in loader:
            loss = nn.functional.cross_entropy(forward(batch), batch.targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
    test = collate([store.dataset("test")[i] for i in range(len(store.dataset("test")))])
    with torch.no_grad():
        out = {"all": top1(forward(test), test.targets)}
        for m in mods:
            out[m] = top1(forward(test, use={m}), test.targets)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beta", type=float, default=SyntheticConfig.mean_signal)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fit-size", type=int, default=3000)
    parser.add_argument("--learned", action="store_true",
                        help="also train a tiny attention-pooling classifier on the training splits")
    parser.add_argument("--quick", action="store_true", help="smoke size (CI): --fit-size 300")
    parser.add_argument("--out", type=Path, default=None, help="accepted for a uniform CLI; prints only")
    _common.add_threads_option(parser)
    args = parser.parse_args()
    _common.set_threads(args.threads)
    if args.quick:
        args.fit_size = 300
    root = tempfile.mkdtemp()
    print(f"beta (mean_signal) = {args.beta}, seed = {args.seed}; linear probes fit on "
          f"{args.fit_size} fully-modal rows, scored on the default store's test split")
    print(f"{'task':15s} {'modalities':40s} {'mean-pooled':>12s} {'token-level':>12s}")
    for task in LAYOUTS:
        cfg = SyntheticConfig(seed=args.seed, mean_signal=args.beta)
        store = make_synthetic_store(task, f"{root}/{task}", config=cfg)
        # Same seed, same geometry (drawn before any sample): only the sample counts differ.
        big = make_synthetic_store(task, f"{root}/{task}-fit", config=cfg, num_eval=args.fit_size)
        mk = markers(task, cfg)
        rows = [tuple(sorted(mods)) for mods in LAYOUTS[task].values()]
        rows.append(tuple(sorted(store.modalities)))
        for mods in rows:
            results = [score(task, store, big, mods, kind, mk) for kind in ("mean", "tokens")]
            metric = results[0][0]
            print(f"{task:15s} {','.join(mods):40s} "
                  f"{metric + ' ' + format(results[0][1], '.3f'):>12s} "
                  f"{metric + ' ' + format(results[1][1], '.3f'):>12s}")
    if args.learned:
        store = FeatureStore(f"{root}/classification")
        for pooled in (False, True):
            res = learned_classification(store, args.seed, pooled=pooled)
            name = "mean-pooled" if pooled else "attention"
            print(f"learned {name:11s} model trained on train_rgb + train_audio, test top1: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    print("chance: top1 0.100 (one modality alone: at most 0.5); regression MAE of predicting "
          "the mean ~0.8; MnR of a random ranking ~100.5")


if __name__ == "__main__":
    main()
