import numpy as np
import pytest

from umilayers.data import FeatureStore, SyntheticConfig, make_synthetic_store
from umilayers.data.synthetic import LAYOUTS, WEAK_MODALITY, _geometry

SMALL = dict(num_train=40, num_eval=30)


@pytest.mark.parametrize(
    "task, train_sets, all_mods",
    [
        ("classification", [("rgb",), ("audio",)], ("audio", "rgb")),
        ("regression", [("force", "image"), ("depth", "proprio")],
         ("depth", "force", "image", "proprio")),
        ("retrieval", [("audio", "ocr", "rgb", "speech"), ("face", "object", "rgb", "scene")],
         ("audio", "face", "object", "ocr", "rgb", "scene", "speech")),
    ],
)
def test_stores_validate_with_the_papers_modality_sets(tmp_path, task, train_sets, all_mods):
    make_synthetic_store(task, tmp_path / task, **SMALL)
    store = FeatureStore(tmp_path / task, deep=True)
    assert store.task == task
    train = [store.splits[s] for s in store.splits_with_role("train")]
    assert [s.modalities for s in train] == train_sets and all(s.size == 40 for s in train)
    for role in ("val", "test"):
        (name,) = store.splits_with_role(role)
        assert store.splits[name].modalities == all_mods and store.splits[name].size == 30
    if task == "retrieval":
        assert store.text == (8, 32) and store.num_outputs == 32
        assert (tmp_path / task / "test" / "targets.lengths.npy").is_file()
    if task == "classification":
        assert set(np.unique(store.targets("test"))) <= set(range(10))


def test_same_seed_same_store_other_seed_differs(tmp_path):
    a = make_synthetic_store("regression", tmp_path / "a", seed=3, **SMALL)
    b = make_synthetic_store("regression", tmp_path / "b", seed=3, **SMALL)
    c = make_synthetic_store("regression", tmp_path / "c", seed=4, **SMALL)
    np.testing.assert_array_equal(np.load(a.path / "val/image.npy"), np.load(b.path / "val/image.npy"))
    assert not np.array_equal(np.load(a.path / "val/image.npy"), np.load(c.path / "val/image.npy"))


def test_config_validation():
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticConfig(num_classes=5)
    with pytest.raises(ValueError, match="num_train"):
        SyntheticConfig(num_train=0)
    with pytest.raises(ValueError, match="task"):
        make_synthetic_store("segmentation", "/nonexistent")


def test_signal_tokens_cancel_in_the_mean(tmp_path):
    """With beta = 0 and no noise, the mean over valid tokens is exactly zero."""
    store = make_synthetic_store("classification", tmp_path / "s", mean_signal=0.0, noise=0.0,
                                 noise_weak=0.0, **SMALL)
    for m in ("rgb", "audio"):
        x = np.load(store.path / "test" / f"{m}.npy")
        assert np.abs(x).max() > 1.0  # the tokens themselves carry a signal
        np.testing.assert_allclose(x.sum(axis=1), 0.0, atol=1e-5)
    lengths = np.load(store.path / "test" / "audio.lengths.npy")
    audio = np.load(store.path / "test" / "audio.npy")
    padding = np.arange(audio.shape[1])[None, :] >= lengths[:, None]
    assert padding.any() and np.all(audio[padding] == 0)


def _probe_top1(x_fit, y_fit, x_test, y_test, classes=10):
    mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-8
    a = np.c_[(x_fit - mu) / sd, np.ones(len(x_fit))]
    b = np.c_[(x_test - mu) / sd, np.ones(len(x_test))]
    w = np.linalg.solve(a.T @ a + 10.0 * np.eye(a.shape[1]), a.T @ np.eye(classes)[y_fit])
    return float(((b @ w).argmax(1) == y_test).mean())


def _features(store, split, m, kind, marker):
    x = np.load(store.path / split / f"{m}.npy").astype(np.float64)
    if kind == "mean":
        return x.mean(1)
    proj = x @ marker
    keep = np.abs(proj) > 1.5
    return (x * (np.sign(proj) * keep)[..., None]).sum(1) / np.maximum(keep.sum(1), 1)[:, None]


def test_the_designed_phenomena_are_there(tmp_path):
    """Mean pooling ~ chance; token-level: each modality alone <= ~50%, both together far more."""
    cfg = SyntheticConfig(num_train=10, num_eval=1200, mean_signal=0.0, seed=1)
    store = make_synthetic_store("classification", tmp_path / "s", config=cfg)
    markers = {m: g.marker for m, g in _geometry("classification", cfg,
                                                 np.random.default_rng(cfg.seed)).items()}

    def score(mods, kind):
        def xs(split):
            return np.concatenate([_features(store, split, m, kind, markers[m]) for m in mods], 1)
        return _probe_top1(xs("val"), store.targets("val"), xs("test"), store.targets("test"))

    assert score(("rgb", "audio"), "mean") < 0.16  # chance is 0.10
    rgb, audio, both = (score(mods, "tokens") for mods in (("rgb",), ("audio",), ("rgb", "audio")))
    assert 0.40 < rgb < 0.56  # a code is shared by two classes: at most 50% (+ noise)
    assert audio < rgb - 0.05  # audio is the weak modality
    assert both > max(rgb, audio) + 0.2


def test_layout_constants_agree():
    assert set(LAYOUTS) == set(WEAK_MODALITY)
    for task, weak in WEAK_MODALITY.items():
        assert any(weak in mods for mods in LAYOUTS[task].values())


def test_caption_nuisance_touches_retrieval_only_and_makes_it_harder(tmp_path):
    for task in ("classification", "regression"):
        a = make_synthetic_store(task, tmp_path / f"{task}-0", caption_nuisance=0.0, **SMALL)
        b = make_synthetic_store(task, tmp_path / f"{task}-2", caption_nuisance=2.0, **SMALL)
        for f in sorted(a.path.rglob("*.npy")):
            np.testing.assert_array_equal(np.load(f), np.load(b.path / f.relative_to(a.path)))

    def text_fraction_explained(nuisance):
        # Ridge from the rectified video tokens (all seven modalities) to the mean caption
        # token, fit on 1500 rows and scored on 300: how much of a caption its video explains.
        cfg = SyntheticConfig(num_train=10, num_eval=1500, caption_nuisance=nuisance, seed=2)
        store = make_synthetic_store("retrieval", tmp_path / f"r{nuisance}", config=cfg)
        markers = {m: g.marker for m, g in _geometry("retrieval", cfg, np.random.default_rng(cfg.seed)).items()}
        x = np.concatenate([_features(store, "val", m, "tokens", markers[m]) for m in sorted(markers)], 1)
        lengths = np.load(store.path / "val" / "targets.lengths.npy")
        t = store.targets("val").sum(1) / lengths[:, None]
        a = np.c_[x, np.ones(len(x))]
        w = np.linalg.solve(a[:1200].T @ a[:1200] + np.eye(a.shape[1]), a[:1200].T @ t[:1200])
        residual = t[1200:] - a[1200:] @ w
        return 1.0 - residual.var() / t[1200:].var()

    clean, nuisance = text_fraction_explained(0.0), text_fraction_explained(1.0)
    assert clean > 0.6 and nuisance < clean - 0.25, (clean, nuisance)  # measured: 0.76, 0.40
