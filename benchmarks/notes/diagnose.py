"""Diagnosis of a finished umi run on a FeatureStore: per branch, per test-time modality subset,
statistics of the common-space sum, pseudo-label quality. Reads the arrays directly (no padding
in the Fashion-MNIST stores).
Recorded lines come from the pre-restructure layout (branch ``realdata`` at commit 6e67df5,
``umilayers.recipes``); the script now uses ``umilayers.train`` and today's option names.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch


def load_model(run: Path, **override):
    from umilayers.baselines import model_from_spec

    ck = torch.load(Path(run) / "model.pt", map_location="cpu", weights_only=False)
    config = {k: v for k, v in ck["spec"]["config"].items() if k != "unimodal_ensemble"}  # runs of an older draft
    spec = {**ck["spec"], "config": {**config, **override}}
    model = model_from_spec(spec)
    model.load_state_dict(ck["state_dict"])
    return model.eval()


def arrays(store: Path, split: str) -> tuple[dict, np.ndarray]:
    meta = json.loads((Path(store) / "store.json").read_text())["splits"][split]
    mods = meta["modalities"]
    feats = {m: np.load(Path(store) / split / f"{m}.npy", mmap_mode="r") for m in mods}
    return feats, np.load(Path(store) / split / "targets.npy")


@torch.no_grad()
def forward(model, feats: dict, subset, batch: int = 500):
    outs, stats = [], {"norm": {m: [] for m in subset}, "sum_norm": [], "cos": []}
    n = len(next(iter(feats.values())))
    for i in range(0, n, batch):
        x = {m: torch.from_numpy(np.asarray(feats[m][i:i + batch], dtype=np.float32)) for m in subset}
        out = model(x)
        outs.append(out.branch_outputs)
        f = out.modality_features
        for m in subset:
            stats["norm"][m].append(f[m].norm(dim=-1).mean(dim=1))  # mean token norm per sample
        total = sum(f[m] for m in subset)
        stats["sum_norm"].append(total.norm(dim=-1).mean(dim=1))
        if len(subset) == 2:
            a, b = (f[m].flatten(1) for m in subset)
            stats["cos"].append(torch.nn.functional.cosine_similarity(a, b, dim=1))
    summary = {"norm": {m: float(torch.cat(v).mean()) for m, v in stats["norm"].items()},
               "sum_norm": float(torch.cat(stats["sum_norm"]).mean())}
    if stats["cos"]:
        summary["cos"] = float(torch.cat(stats["cos"]).mean())
    return torch.cat(outs), summary


def branch_report(run: Path, store: Path, split: str = "test") -> dict:
    model = load_model(run)
    feats, y = arrays(store, split)
    y = torch.from_numpy(y)
    mods = sorted(feats)
    report = {}
    subsets = [s for k in range(1, len(mods) + 1) for s in itertools.combinations(mods, k)]
    if len(mods) > 2:  # quadrants: singles, the two training pairs' shapes, all
        subsets = [s for s in subsets if len(s) in (1, len(mods))]
    for subset in subsets:
        logits, summary = forward(model, feats, subset)
        row = {f"b{g}": float((logits[:, g].argmax(-1) == y).float().mean()) for g in range(logits.shape[1])}
        row["avg"] = float((logits.softmax(-1).mean(1).argmax(-1) == y).float().mean())
        row.update({k: (round(v, 3) if isinstance(v, float) else {a: round(b, 3) for a, b in v.items()})
                    for k, v in summary.items()})
        report["+".join(subset)] = row
    from umilayers.data import FeatureStore

    fs = FeatureStore(store)
    seen = sorted({fs.splits[s].modalities for s in fs.splits_with_role("train")})
    ensemble = load_model(run, ensemble_subsets=[list(s) for s in seen])
    logits_all = []
    with torch.no_grad():
        for i in range(0, len(y), 500):
            x = {m: torch.from_numpy(np.asarray(feats[m][i:i + 500], dtype=np.float32)) for m in mods}
            logits_all.append(ensemble(x).prediction)
    report["subset_ensemble"] = float((torch.cat(logits_all).argmax(-1) == y).float().mean())
    bank = Path(run) / "pseudo_labels"
    if bank.is_dir():
        report["pseudo"] = pseudo_quality(bank, store)
    return report


def pseudo_quality(bank_dir: Path, store: Path) -> dict:
    from umilayers.data import FeatureStore
    from umilayers.pseudo_labels import PseudoLabelBank

    bank = PseudoLabelBank.load(bank_dir)
    fs = FeatureStore(store)
    out = {}
    for name in fs.splits_with_role("train"):
        info = fs.splits[name]
        first = fs.train_index()[name]
        ids = torch.arange(first, first + info.size)
        y = torch.from_numpy(fs.targets(name))
        for m in info.modalities:
            p = bank.targets(ids, {m: torch.ones(info.size, dtype=torch.bool)})
            ent = -(p.clamp_min(1e-12).log() * p).sum(-1).mean()
            out[f"{name}/{m}"] = {"acc": round(float((p.argmax(-1) == y).float().mean()), 4),
                                  "p_true": round(float(p[torch.arange(len(y)), y].mean()), 4),
                                  "entropy": round(float(ent), 4)}
    return out
