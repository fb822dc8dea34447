import json

import pytest

from umilayers import demo


def test_format_table_layout_and_spread():
    results = {"late fusion": {"classification": [0.5, 0.7], "regression": [1.0, 1.0]},
               "ours (umi)": {"classification": [0.8, 0.8], "regression": [0.5, 0.7]}}
    table = demo.format_table(results, ["classification", "regression"], "method")
    lines = table.splitlines()
    assert lines[0].startswith("| method") and "top-1" in lines[0] and "MAE" in lines[0]
    assert "60.00 ± 14.14" in lines[2]  # top-1 as percent, mean ± sample std over seeds
    assert "0.60 ± 0.14" in lines[3]


def test_headline_metric_per_task():
    assert demo.headline_metric("classification", {"top1": 0.25}) == 0.25
    assert demo.headline_metric("regression", {"mae": 1.5}) == 1.5
    assert demo.headline_metric("retrieval", {"mean_rank": 7.0, "t2v": {}}) == 7.0


def test_run_grid_trains_each_row_on_each_task(tmp_path):
    size = demo.DemoSize(num_train=48, num_eval=24, epochs=1, unimodal_epochs=2, pseudo_window=1,
                         model=dict(dim=8, tokens=2, depth=1, heads=2, batch_size=16, lr=1e-3))
    rows = {"umi": {"method": "umi"}, "late": {"method": "late-fusion"}}
    logged = []
    results = demo.run_grid(tmp_path, ["classification", "regression"], rows, [0], size, log=logged.append)
    assert set(results) == {"umi", "late"}
    assert all(len(results[r][t]) == 1 for r in rows for t in ("classification", "regression"))
    assert 0.0 <= results["umi"]["classification"][0] <= 1.0
    assert len(logged) == 4


def test_main_rejects_bad_seeds(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--seeds", "0"])
