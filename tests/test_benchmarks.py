"""The released-code-style baseline of ``benchmarks/train_step.py`` computes what our model does.

The benchmark's ratio means something only if both ways compute the same step: the same
prediction, loss and gradients (the noise fed to the missing modality is multiplied by zero),
and the baseline really does the released code's extra work (every projection on every row).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.tolerances import tol

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common  # noqa: E402
import train_step  # noqa: E402

TINY = {"tokens": {"rgb": 9, "audio": 5}, "feature_dim": 12, "num_tokens": 8, "dim": 16,
        "projection_depth": 1, "fusion_depth": 2, "heads": 2, "classes": 7, "branches": 2}


def _setup(branches: int = 2, batch: int = 6, seed: int = 0):
    sizes = dict(TINY, branches=branches)
    model = train_step.build_model(sizes, "cpu")
    data = train_step.make_batch(sizes, batch, "cpu", torch.Generator().manual_seed(seed))
    return model, data


@pytest.mark.parametrize("branches", [1, 2, 4])
@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_released_forward_matches_model(branches, kernel):
    model, data = _setup(branches)
    ours = model(data["inputs"], present=data["present"])
    released = train_step.released_forward(model, data["full_inputs"], data["present"], kernel)
    torch.testing.assert_close(released.branch_outputs, ours.branch_outputs, **tol(torch.float32))
    torch.testing.assert_close(released.prediction, ours.prediction, **tol(torch.float32))
    for m in ours.modality_features:
        torch.testing.assert_close(released.modality_features[m], ours.modality_features[m], **tol(torch.float32))


def test_released_loss_and_gradients_match_model():
    model, data = _setup()
    grads = {}
    for method in ("ours", "released"):
        model.zero_grad(set_to_none=True)
        if method == "ours":
            out = model(data["inputs"], present=data["present"])
        else:
            out = train_step.released_forward(model, data["full_inputs"], data["present"])
        loss = model.loss(out, data["labels"], pseudo_targets=data["pseudo"]).total
        loss.backward()
        grads[method] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (loss_ours, g_ours), (loss_rel, g_rel) = grads["ours"], grads["released"]
    torch.testing.assert_close(loss_rel, loss_ours, **tol(torch.float32))
    assert g_rel.keys() == g_ours.keys() and len(g_ours) == len(list(model.parameters()))
    for name in g_ours:
        torch.testing.assert_close(g_rel[name], g_ours[name], **tol(torch.float32, "bwd"), msg=name)


def test_released_forward_ignores_the_stand_ins_but_runs_projections_on_every_row():
    model, data = _setup()
    seen = {}
    hooks = [proj.register_forward_hook(lambda mod, inp, out, m=m: seen.__setitem__(m, inp[0].shape[0]))
             for m, proj in model.projections.items()]
    first = train_step.released_forward(model, data["full_inputs"], data["present"])
    assert seen == {"audio": 6, "rgb": 6}  # the released way: every modality on every sample
    model(data["inputs"], present=data["present"])
    assert seen == {"audio": 3, "rgb": 3}  # ours: only the rows that have the modality
    for h in hooks:
        h.remove()
    other = {m: x.clone() for m, x in data["full_inputs"].items()}
    for m, x in other.items():
        x[~data["present"][m]] = torch.randn_like(x[~data["present"][m]]) * 100  # different noise
    second = train_step.released_forward(model, other, data["present"])
    torch.testing.assert_close(second.prediction, first.prediction, rtol=0, atol=0)


def test_batch_is_half_rgb_only_half_audio_only():
    _, data = _setup(batch=8)
    rgb, audio = data["present"]["rgb"], data["present"]["audio"]
    assert int(rgb.sum()) == int(audio.sum()) == 4 and not bool((rgb & audio).any())
    for m in ("rgb", "audio"):
        torch.testing.assert_close(data["full_inputs"][m][data["present"][m]], data["inputs"][m], rtol=0, atol=0)


def test_fits():
    assert _common.loglog_slope([1, 2, 4, 8], [3, 12, 48, 192]) == pytest.approx(2.0)
    fit = _common.linear_fit([1, 2, 3, 4], [5, 7, 9, 11])
    assert fit["slope"] == pytest.approx(2.0) and fit["intercept"] == pytest.approx(3.0)
    assert fit["r2"] == pytest.approx(1.0)
    assert _common.median_ratio([2, 9, 4], [1, 3, 1]) == 3.0


def test_atomic_write_json(tmp_path):
    path = tmp_path / "sub" / "x.json"
    _common.write_json(path, {"a": 1})
    _common.write_json(path, {"a": 2})
    assert path.read_text().strip().endswith("}") and '"a": 2' in path.read_text()
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
