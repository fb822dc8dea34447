"""The released-code-style baseline of ``benchmarks/train_step.py`` computes what our model does.

The benchmark's ratio means something only if both ways compute the same step: the same
prediction, loss and gradients (the noise fed to the missing modality is multiplied by zero),
and the baseline really does the released code's extra work (every projection on every row).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.tolerances import tol

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common  # noqa: E402
import attention as attention_benchmark  # noqa: E402  (benchmarks/attention.py)
import train_step  # noqa: E402

TINY = {"tokens": {"rgb": 9, "audio": 5}, "feature_dim": 12, "num_tokens": 8, "dim": 16,
        "projection_depth": 1, "fusion_depth": 2, "heads": 2, "head_dim": 12, "classes": 7, "branches": 2}


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
    # the rows each projection's token embedding sees (the model calls the unchecked forward_checked)
    hooks = [proj.embed.register_forward_hook(lambda mod, inp, out, m=m: seen.__setitem__(m, inp[0].shape[0]))
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


def test_the_released_matmul_kernel_is_attention():
    q, k, v = (torch.randn(2, 3, 7, 4) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(train_step.released_matmul(q, k, v, [7]), expected, **tol(torch.float32))


def test_the_equal_size_model_matches_the_released_parameter_count():
    # The released architecture, counted from its description, against ours at the paper's EPIC
    # size with the released attention width (8 heads x 64): within 5%, the equal-size goal.
    ours = sum(p.numel() for p in train_step.build_model(train_step.EPIC, "meta").parameters())
    released = train_step.released_parameters(train_step.EPIC, 64)
    assert abs(ours / released - 1) <= 0.05
    narrow = sum(p.numel() for p in train_step.build_model(dict(train_step.EPIC, head_dim=None), "meta").parameters())
    assert abs(narrow / released - 1) > 0.05  # the default width is not the released size


def _fake_released_code(folder: Path) -> Path:
    """Modules with the interface of the authors' feature_reorganization.py and vit.py (written
    here for the test: the real ones come from a clone the user points to, never from this repo)."""
    folder.mkdir()
    (folder / "feature_reorganization.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class ViTReorganization(nn.Module):
            def __init__(self, dim, depth, heads, mlp_dim, dim_head=64, num_position=512):
                super().__init__()
                self.rgb, self.audio = nn.Linear(12, num_position), nn.Linear(12, num_position)

            def forward(self, rgb_inputs, audio_inputs):
                rgb = torch.softmax(self.rgb(rgb_inputs), dim=-1).transpose(1, 2) @ rgb_inputs
                audio = torch.softmax(self.audio(audio_inputs), dim=-1).transpose(1, 2) @ audio_inputs
                return rgb, audio
    '''))
    (folder / "vit.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn

        class ViT(nn.Module):
            def __init__(self, num_classes, dim, depth, heads, mlp_dim, dim_head=64, num_position=512, branch_num=2):
                super().__init__()
                self.rgb_embedding, self.audio_embedding = nn.Linear(12, dim), nn.Linear(12, dim)
                self.head = nn.Linear(dim, num_classes * branch_num)
                self.branch_num = branch_num

            def forward(self, rgb, audio, rgb_mask, audio_mask):
                x = (self.rgb_embedding(rgb) * rgb_mask + self.audio_embedding(audio) * audio_mask).mean(1)
                return self.head(x).unflatten(1, (self.branch_num, -1))
    '''))
    return folder


def test_released_code_is_imported_from_the_folder_given_and_its_loss_trains(tmp_path):
    with pytest.raises(ValueError, match="feature_reorganization.py"):
        train_step.load_released_code(tmp_path)
    code = train_step.load_released_code(_fake_released_code(tmp_path / "clone"))
    model = train_step.ReleasedModel(code, TINY, head_dim=12)
    data = train_step.make_batch(TINY, 6, "cpu", torch.Generator().manual_seed(0))
    outputs = model(data["full_inputs"]["rgb"], data["full_inputs"]["audio"], data["present"])
    assert outputs.shape == (6, 2, TINY["classes"]) and set(model.embedded) == {"rgb", "audio"}
    loss = train_step.released_code_loss(model, outputs, data["labels"], data["pseudo"], data["present"])
    loss.backward()
    assert torch.isfinite(loss) and model.base_vectors.grad is not None


def test_time_breakdown_attributes_every_part():
    model, data = _setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = train_step.make_step("ours", model, optimizer, data, None, regions=True)
    found = train_step.time_breakdown(model, step)
    parts = found["parts"]
    for stage in ("projection rgb", "projection audio", "fusion"):
        for kind in ("attention kernel", "attention linears (qkv, out)", "MLP"):
            assert parts[f"{stage}: {kind}"]["forward_s"] > 0 and parts[f"{stage}: {kind}"]["backward_s"] > 0
    assert parts["loss (Eq. 3)"]["forward_s"] > 0 and parts["optimizer (AdamW step, zero_grad)"]["forward_s"] > 0
    assert all(p["forward_s"] >= 0 and p["backward_s"] >= 0 for p in parts.values())
    total = sum(p["forward_s"] + p["backward_s"] for p in parts.values())
    assert total <= found["step_s"] * 1.001
    # the hooks and wrapped kernels are gone afterwards
    layers = (model.transformer, *(p.encoder for p in model.projections.values()))
    assert all(isinstance(t.backend, str) for t in layers)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any("_qkv" in vars(m) for m in model.modules())


def test_time_breakdown_marks_the_qkv_products():
    # The blocks multiply by row blocks of qkv.weight, which no module hook sees: the QKV products
    # must still land in "attention linears", not in "other".
    from torch.profiler import profile

    model, _ = _setup()
    block = model.projections["rgb"].encoder.blocks[0]
    h = torch.randn(2, 9, block.qkv.in_features)
    with train_step._marked(model), profile() as prof:
        block._qkv(h)
    regions = [e for e in prof.events() if e.name.startswith(train_step.PART)]
    assert [e.name for e in regions] == [train_step.PART + "projection rgb: attention linears (qkv, out)"]
    assert any(e.name in ("aten::linear", "aten::addmm") and train_step._enclosing(e, train_step.PART) is not None
               for e in prof.events())


def test_threads_option_is_one_definition(monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    _common.add_threads_option(parser)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert parser.parse_args([]).threads is None and _common.default_threads("cpu") == 1  # the library's rule
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _common.default_threads("cpu") == 0  # an explicit environment is left to torch
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert parser.parse_args(["--threads", "0"]).threads == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--threads", "-1"])
    torch_threads = torch.get_num_threads()
    try:
        assert _common.set_threads(None) == _common.default_threads()
        assert _common.set_threads(2) == 2
    finally:
        torch.set_num_threads(torch_threads)
    # threads.py measures thread counts themselves (it sets them per worker): no --threads there.
    for script in sorted((Path(_common.ROOT) / "benchmarks").glob("*.py")):
        if script.name.startswith("_") or script.name == "threads.py":
            continue
        text = script.read_text()
        assert "add_threads_option" in text, f"{script.name}: no --threads option through _common"
        assert "set_num_threads" not in text, f"{script.name}: sets threads itself"


def test_fit_benchmark_summary():
    import fit as fit_bench

    rounds = [{"fit_train_s": 1.2, "bare_train_s": 1.0, "fit_end_of_epoch_s": 0.3, "validated": True,
               "bare_validation_s": 0.1}] + [
              {"fit_train_s": 1.1 * t, "bare_train_s": t, "fit_end_of_epoch_s": 0.1 * t, "validated": True,
               "bare_validation_s": 0.05 * t} for t in (1.0, 2.0, 1.5)]
    summary = fit_bench.summarise(rounds, samples=300, warmup=1)
    assert summary["overhead"] == pytest.approx(0.1) and summary["rounds_timed"] == 3
    assert summary["bare_validation_share"] == pytest.approx(0.05)
    assert summary["end_of_epoch_share"] == pytest.approx(0.1 / 1.1)
    assert summary["fit_samples_per_s"] == pytest.approx(300 / 1.65)


def test_gpu_script_parses_and_refuses_bad_arguments(tmp_path):
    script = Path(_common.ROOT) / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    bad = subprocess.run(["bash", str(script), "--fast"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--fast'" in bad.stderr
    assert not list(tmp_path.iterdir())


def test_gpu_check_runs_on_cpu(tmp_path, capsys):
    import gpu_check

    assert gpu_check.main(["host-reads", "machine", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0 by umilayers" in out and (tmp_path / "gpu_host_reads.json").is_file()
    with pytest.raises(SystemExit):
        gpu_check.main(["bogus", "--device", "cpu", "--out", str(tmp_path)])
    # On a GPU an xformers case fails unless the backend served it; on the CPU (the dry run) none can.
    cases = {"cases": [{"dtype": "torch.float16", "head_dim": 32, "served": True},
                       {"dtype": "torch.float32", "head_dim": 64, "served": False}]}
    assert gpu_check.failures("xformers", cases, torch.device("cuda")) == [
        "xformers did not serve torch.float32 head_dim 64"]
    assert gpu_check.failures("xformers", cases, torch.device("cpu")) == []


def test_peaks_are_measured_in_a_fresh_process_with_the_mmap_threshold_pinned(tmp_path):
    """The timed process keeps glibc's defaults; the peaks come from a second process that has the
    threshold pinned and answers through ``--peaks-out``; a failing child is reported with its output."""
    if not sys.platform.startswith("linux"):
        assert _common.peaks_in_fresh_process(tmp_path / "none.py", []) is None
        return
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent("""
        import json, os, sys
        if sys.argv[1] == "fail":
            print("the child's own words")
            sys.exit(3)
        out = sys.argv[sys.argv.index("--peaks-out") + 1]
        with open(out, "w") as f:
            json.dump({"threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "argv": sys.argv[1:-2]}, f)
    """))
    got = _common.peaks_in_fresh_process(script, ["ok", "--x", "1"])
    assert got == {"threshold": str(_common.PEAKS_MMAP_THRESHOLD), "argv": ["ok", "--x", "1"]}
    with pytest.raises(RuntimeError, match=r"exit 3\)") as failed:
        _common.peaks_in_fresh_process(script, ["fail"])
    assert "the child's own words" in str(failed.value)


def test_the_peaks_process_runs_on_glibc_malloc_whatever_the_user_preloaded(tmp_path, monkeypatch):
    """A preloaded tcmalloc keeps freed memory mapped (the released code's peak read 29 MiB instead
    of 2527): the timed process keeps it and names it, the peaks process drops it, other
    preloads stay."""
    tc, je, other = "/usr/lib/libtcmalloc_minimal.so.4", "libjemalloc.so.2", "/opt/libprofiler_hook.so"
    assert _common.preloaded_allocators(f"{tc}:{other} {je}") == [tc, je]
    assert _common._without_allocators({"LD_PRELOAD": f"{tc} {other}", "A": "1"}) == {"LD_PRELOAD": other, "A": "1"}
    assert _common._without_allocators({"LD_PRELOAD": tc}) == {}
    monkeypatch.setenv("LD_PRELOAD", tc)
    info = _common.machine_info()
    assert info["allocator"] == "libtcmalloc_minimal.so.4"
    assert _common.describe_machine(info).endswith(", malloc libtcmalloc_minimal.so.4")
    monkeypatch.delenv("LD_PRELOAD")
    assert _common.machine_info()["allocator"] == _common.system_allocator()  # "glibc" on glibc Linux
    assert "malloc" not in _common.describe_machine(_common.machine_info())
    if not sys.platform.startswith("linux"):
        return
    seen = {}  # the child's environment (not started: the preloads named here do not exist)

    def fake_run(cmd, env, **kwargs):
        seen.update(env)
        Path(cmd[-1]).write_text("{}")
        return subprocess.CompletedProcess(cmd, 0, "", None)

    monkeypatch.setenv("LD_PRELOAD", f"{tc} {other}")
    monkeypatch.setattr(subprocess, "run", fake_run)
    assert _common.peaks_in_fresh_process(tmp_path / "child.py", []) == {}
    assert seen["LD_PRELOAD"] == other and seen["MALLOC_MMAP_THRESHOLD_"] == str(_common.PEAKS_MMAP_THRESHOLD)


def test_attention_benchmark_times_here_and_takes_its_cpu_peaks_from_the_fresh_process(tmp_path, monkeypatch):
    """attention.py no longer pins glibc's mmap threshold in the timed process: its CPU peaks come
    from :func:`_common.peaks_in_fresh_process`, one per (size, level, method), which the child
    computes with ``measure_peaks_here`` under the same names."""
    argv = ["--batch", "1", "--dim", "8", "--heads", "2", "--tokens", "6", "--groups", "2", "--repeats", "1",
            "--warmup", "0", "--out", str(tmp_path), "--name", "a"]
    asked = []

    def child(script, child_argv):
        asked.append((Path(script).name, list(child_argv)))
        child_out = tmp_path / "peaks.json"
        assert attention_benchmark.main([*child_argv, _common.PEAKS_OUT, str(child_out)]) == 0
        peaks = json.loads(child_out.read_text())
        return {key: 1000 + i for i, key in enumerate(sorted(peaks))}  # marked: they must be these

    monkeypatch.setattr(_common, "peaks_in_fresh_process", child)
    assert attention_benchmark.main(argv) == 0
    assert asked == [("attention.py", argv)]
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    seen = {attention_benchmark.peak_key(r["N"], r["G"], level, method): m["peak_bytes"]
            for r in rows for level, ms in r["levels"].items() for method, m in ms.items()}
    assert sorted(seen) and seen == {key: 1000 + i for i, key in enumerate(sorted(seen))}
    assert {"op dense", "layer auto"} <= {key.split(" ", 2)[2] for key in seen}


def test_flops_by_kind_add_up_and_the_floor_is_their_time_at_the_given_rates():
    model, data = _setup()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    flops = train_step.count_flops(train_step.make_step("ours", model, optimizer, data, None))
    assert flops["linear"] > 0 and flops["batched"] > 0  # the attention is counted as bmm
    assert flops["linear"] + flops["batched"] == flops["total"]  # matrix products are all of them
    floor = train_step.matmul_floor({"linear": 4e9, "batched": 1e9, "total": 6e9}, {"linear": 100.0, "batched": 50.0})
    assert floor == pytest.approx(4 / 100 + 2 / 50)  # the 1e9 of neither kind at the slower rate
    rates = train_step.matmul_rates(TINY, 4, TINY["head_dim"])
    assert set(rates) == {"linear", "batched"} and all(r > 0 for r in rates.values())
