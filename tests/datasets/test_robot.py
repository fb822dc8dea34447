"""Robot adapter: fixtures in the dataset's real HDF5 layout (one file per episode)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

h5py = pytest.importorskip("h5py", reason="the robot adapter reads HDF5 with h5py (umilayers[datasets])")

from umilayers.datasets import robot  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def write_episode(path: Path, steps: int = 6, size: int = 128, seed: int = 0, drop=(), chw=False):
    """One episode with the keys and shapes of the release (README of multimodal_representation)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "action": rng.normal(size=(steps, 4)).astype(np.float32),
        "contact": (rng.random((steps, 50)) > 0.9).astype(np.float32),
        "depth_data": rng.uniform(0, 2.5, size=(steps, size, size, 1)).astype(np.float32),
        "ee_forces_continuous": rng.normal(size=(steps, 50, 6)).astype(np.float32),
        "ee_ori": rng.normal(size=(steps, 4)).astype(np.float32),
        "ee_pos": rng.normal(size=(steps, 3)).astype(np.float32),
        "ee_vel": rng.normal(size=(steps, 3)).astype(np.float32),
        "ee_vel_ori": rng.normal(size=(steps, 3)).astype(np.float32),
        "ee_yaw": rng.normal(size=(steps, 4)).astype(np.float32),
        "ee_yaw_delta": rng.normal(size=(steps, 4)).astype(np.float32),
        "image": rng.integers(0, 256, size=(steps, size, size, 3), dtype=np.uint8),
        "joint_pos": rng.normal(size=(steps, 7)).astype(np.float32),
        "joint_vel": rng.normal(size=(steps, 7)).astype(np.float32),
        "optical_flow": np.zeros((steps, size, size, 2), np.float32),
        "proprio": rng.normal(size=(steps, 8)).astype(np.float32),
    }
    if chw:
        arrays["image"] = arrays["image"].transpose(0, 3, 2, 1).copy()
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if key not in drop:
                f.create_dataset(key, data=value)
    return arrays


@pytest.fixture
def h5_dir(tmp_path):
    folder = tmp_path / "triangle_real_data"
    folder.mkdir()
    for i in range(8):
        write_episode(folder / f"peg_{i}_1000.h5", steps=5, size=32, seed=i)
    return folder


def test_read_episode_targets_and_preprocessing(tmp_path):
    arrays = write_episode(tmp_path / "e_1_1000.h5", steps=5, size=128)
    ep = robot.read_episode(tmp_path / "e_1_1000.h5")
    assert len(ep) == 4
    # ee_yaw_next = proprio[t + 1][:4] for t in 0 .. T-2
    np.testing.assert_array_equal(ep.targets, arrays["proprio"][1:, :4])
    np.testing.assert_array_equal(ep.inputs["proprio"], arrays["proprio"][:-1, :8])
    np.testing.assert_allclose(ep.inputs["image"][2], arrays["image"][2].transpose(2, 0, 1) / 255.0,
                               rtol=0, atol=1e-6)
    depth = arrays["depth_data"][:-1, ..., 0]
    expected = np.where((depth > 1e-7) & (depth < 2), depth, 0)
    np.testing.assert_array_equal(ep.inputs["depth"][:, 0], expected)
    force = np.tanh(arrays["ee_forces_continuous"][:-1, -32:]).transpose(0, 2, 1)
    np.testing.assert_allclose(ep.inputs["force"], force, rtol=0, atol=1e-6)
    assert ep.inputs["force"].shape == (4, 6, 32)


def test_channel_first_image_is_transposed_back(tmp_path):
    arrays = write_episode(tmp_path / "e_1_1000.h5", steps=3, size=32, chw=True)
    ep = robot.read_episode(tmp_path / "e_1_1000.h5", ["image"], image_size=32)
    # The loader turns a (3, W, H) step into (H, W, 3) with transpose (2, 1, 0).
    hwc = arrays["image"][0].transpose(2, 1, 0)
    np.testing.assert_allclose(ep.inputs["image"][0], hwc.transpose(2, 0, 1) / 255.0, atol=1e-6)


def test_resize(tmp_path):
    write_episode(tmp_path / "e_1_1000.h5", steps=3, size=128)
    ep = robot.read_episode(tmp_path / "e_1_1000.h5", ["image", "depth"], image_size=32)
    assert ep.inputs["image"].shape == (2, 3, 32, 32)
    assert ep.inputs["depth"].shape == (2, 1, 32, 32)


def test_missing_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad_3_1000.h5"
    write_episode(path, drop=("depth_data",))
    with pytest.raises(robot.RobotDataError, match=r"bad_3_1000\.h5.*'depth_data'"):
        robot.read_episode(path)
    with pytest.raises(robot.RobotDataError, match=r"bad_3_1000\.h5.*'depth_data'.*--skip-missing"):
        robot.check_episodes([path])
    kept, dropped = robot.check_episodes([path], skip_missing=True, log=lambda s: None)
    assert kept == [] and len(dropped) == 1


def test_bad_shape_is_reported(tmp_path):
    path = tmp_path / "e_1_1000.h5"
    write_episode(path, steps=4, size=16)
    with h5py.File(path, "a") as f:
        del f["ee_forces_continuous"]
        f.create_dataset("ee_forces_continuous", data=np.zeros((4, 50, 5), np.float32))
    with pytest.raises(robot.RobotDataError, match="ee_forces_continuous.*got \\(4, 50, 5\\)"):
        robot.read_episode(path, ["force"])


def test_splits_are_disjoint_episodes_with_table1_modalities():
    paths = [Path(f"ep_{i}_1000.h5") for i in range(23)]
    s = robot.split_robot_episodes(paths, seed=3)
    seen = [p for eps in s.episodes.values() for p in eps]
    assert sorted(seen) == sorted(paths) and len(set(seen)) == len(seen)
    assert s.modalities["train_image_depth"] == ("image", "depth")
    assert s.modalities["train_proprio_force"] == ("proprio", "force")
    assert s.modalities["val"] == s.modalities["test"] == robot.ROBOT_MODALITIES
    assert s.roles == {"train_image_depth": "train", "train_proprio_force": "train",
                       "val": "val", "test": "test"}
    assert abs(len(s.episodes["train_image_depth"]) - len(s.episodes["train_proprio_force"])) <= 1
    # deterministic with a seed, different across seeds
    assert robot.split_robot_episodes(paths, seed=3).episodes == s.episodes
    assert robot.split_robot_episodes(paths, seed=4).episodes != s.episodes
    with pytest.raises(ValueError, match="at least 4 episodes"):
        robot.split_robot_episodes(paths[:3])


def test_split_fractions_are_the_standard_held_out_share_and_named():
    """Test = the dataset's standard held-out 20 % of the episode files (``val_ratio: 0.20`` of Lee
    et al.'s and MultiBench's configs); val = 10 % from the standard training part. The same in
    the adapter, the example's defaults and under ``--preset paper``."""
    from umilayers.cli import preset_defaults

    assert robot.STANDARD_HELD_OUT == 0.2
    assert robot.SPLIT_FRACTIONS == {"val": 0.1, "test": robot.STANDARD_HELD_OUT}
    s = robot.split_robot_episodes([Path(f"ep_{i}_1000.h5") for i in range(50)], seed=0)
    assert (len(s.episodes["test"]), len(s.episodes["val"])) == (10, 5)
    example = _example()
    for extra in ([], ["--preset", "paper"]):
        argv = ["--data", "H5", "--out", "RUN", *extra]
        args = example.build_parser(preset_defaults(argv, "robot")).parse_args(argv)
        assert (args.val_fraction, args.test_fraction) == (0.1, 0.2)
    help_text = " ".join(example.build_parser().format_help().split())
    assert "standard held-out share" in help_text and "val_ratio 0.20" in help_text


def test_encoders_token_shapes():
    z = 8
    assert robot.RobotImageEncoder(z)(torch.rand(2, 3, 128, 128)).shape == (2, 4, z)
    assert robot.RobotDepthEncoder(z)(torch.rand(2, 1, 128, 128)).shape == (2, 4, z)
    assert robot.RobotProprioEncoder(z)(torch.rand(2, 8)).shape == (2, 2, z)
    assert robot.RobotForceEncoder(z)(torch.rand(2, 6, 32)).shape == (2, 4, 2 * z)
    with pytest.raises(ValueError, match="x: expected shape"):
        robot.RobotImageEncoder(z)(torch.rand(2, 1, 64, 64))


def test_stage1_training_reduces_loss():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = (x[:, :4] * 0.5).astype(np.float32)
    hist = robot.train_unimodal_encoder(robot.RobotProprioEncoder(8), x, y, epochs=8, lr=3e-3, batch_size=16)
    assert hist[-1] < 0.5 * hist[0]


def test_build_store(h5_dir, tmp_path):
    from umilayers.data.store import FeatureStore

    out = tmp_path / "store"
    summary = robot.build_robot_store(h5_dir, out, z_dim=8, image_size=32, epochs=1, seed=1,
                                      log=lambda s: None)
    store = FeatureStore(out)
    assert store.task == "regression" and store.num_outputs == 4
    assert {n: store.splits[n].modalities for n in store.splits} == {
        "train_image_depth": ("depth", "image"), "train_proprio_force": ("force", "proprio"),
        "val": ("depth", "force", "image", "proprio"), "test": ("depth", "force", "image", "proprio")}
    assert store.modalities["image"] == (1, 8) and store.modalities["force"] == (4, 16)
    # 8 episodes x 4 samples; targets are the episodes' next poses, in episode order
    assert sum(store.splits[n].size for n in store.splits) == 32
    test_eps = summary["splits"]["test"]["episodes"]
    expected = np.concatenate([
        np.asarray(h5py.File(h5_dir / e, "r")["proprio"])[1:, :4] for e in test_eps])
    np.testing.assert_allclose(store.targets("test"), expected, rtol=0, atol=1e-6)
    assert (out / "robot_extraction.json").is_file() and (out / "robot_encoders.pt").is_file()
    # deterministic with a seed
    again = robot.build_robot_store(h5_dir, tmp_path / "store2", z_dim=8, image_size=32, epochs=1,
                                    seed=1, log=lambda s: None)
    assert again["stage1_train_mse"] == summary["stage1_train_mse"]


def test_skip_missing_drops_and_counts(h5_dir, tmp_path):
    write_episode(h5_dir / "peg_9_1000.h5", steps=5, size=32, drop=("ee_forces_continuous",))
    with pytest.raises(robot.RobotDataError, match="peg_9_1000.h5.*ee_forces_continuous"):
        robot.build_robot_store(h5_dir, tmp_path / "s", z_dim=8, image_size=32, epochs=1,
                                log=lambda s: None)
    logs = []
    summary = robot.build_robot_store(h5_dir, tmp_path / "s2", z_dim=8, image_size=32, epochs=1,
                                      skip_missing=True, log=logs.append)
    assert len(summary["dropped_episodes"]) == 1
    assert any("skipped 1 episode" in line for line in logs)


def _example():
    spec = importlib.util.spec_from_file_location("robot_train", ROOT / "examples" / "robot_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_extract_only(h5_dir, tmp_path, capsys):
    run = tmp_path / "run"
    main = _example().main
    assert main(["--data", str(h5_dir), "--out", str(run), "--extract-only",
                 "--z-dim", "8", "--image-size", "32", "--encoder-epochs", "1"]) == 0
    assert (run / "store" / "store.json").is_file()
    assert main(["--data", str(h5_dir / "nope"), "--out", str(tmp_path / "r2"), "--extract-only"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()


def test_example_end_to_end(h5_dir, tmp_path):
    run = tmp_path / "run"
    assert _example().main(["--data", str(h5_dir), "--out", str(run), "--z-dim", "8",
                            "--image-size", "32", "--encoder-epochs", "1", "--epochs", "1",
                            "--unimodal-epochs", "1", "--pseudo-window", "1", "--dim", "16",
                            "--projection-depth", "1", "--fusion-depth", "1", "--heads", "2", "--num-tokens", "4",
                            "--quiet", "--device", "cpu"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert "test" in metrics
    subsets = json.loads((run / "subsets.json").read_text())
    assert len(subsets["rows"]) == 15
    if importlib.util.find_spec("matplotlib") is not None:  # the plot needs umilayers[train]
        assert (run / "subsets.png").stat().st_size > 0


def test_example_preset_paper(h5_dir, tmp_path):
    """``--preset paper``: the paper's robot schedule and sizes (written out here), then end to
    end with tiny sizes given as flags."""
    from umilayers.cli import parse_fit_args, preset_defaults

    example = _example()
    argv = ["--data", str(h5_dir), "--out", str(tmp_path / "unused"), "--preset", "paper"]
    _, config = parse_fit_args(example.build_parser(preset_defaults(argv, "robot")), argv)
    train, model = config.train, config.model
    assert (train.epochs, train.lr, train.schedule, train.batch_size, train.pseudo_window) == \
        (50, 1e-2, "constant", 128, 20)
    assert (train.optimizer, train.momentum, train.weight_decay) == ("sgd", 0.9, 5e-4)
    assert (model.pseudo_weight, model.num_tokens, model.num_align_tokens, model.dim, model.align_weight) == \
        (1.0, 16, 128, 256, 0.001)
    assert (model.heads, model.head_dim) == (8, 64)  # the paper gives no head width: the released code's
    run = tmp_path / "run"
    assert example.main(["--data", str(h5_dir), "--out", str(run), "--preset", "paper", "--z-dim", "8",
                         "--image-size", "32", "--encoder-epochs", "1", "--epochs", "1", "--unimodal-epochs", "1",
                         "--pseudo-window", "1", "--dim", "16", "--projection-depth", "1", "--fusion-depth", "1",
                         "--heads", "2", "--head-dim", "none", "--num-tokens", "4", "--batch-size", "16", "--quiet",
                         "--device", "cpu"]) == 0
    saved = json.loads((run / "config.json").read_text())["config"]
    assert (saved["train"]["optimizer"], saved["train"]["lr"], saved["model"]["num_align_tokens"]) == ("sgd", 1e-2, 128)
    assert saved["model"]["head_dim"] is None  # "--head-dim none" gives back dim // heads over the preset's 64
    assert "mae" in json.loads((run / "metrics.json").read_text())["test"]
