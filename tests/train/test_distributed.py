"""Multi-process training: the global batches do not depend on the world size, and a 2-process
gloo run reaches the metrics of a 1-process run.

Tolerance: the 2-process run computes the same global batches and (with each rank's loss
scaled by its share) the same mean gradient, so it differs from the 1-process run only by float
rounding (summation order of the all-reduce) and by the loss terms that are not per-sample
means (the alignment loss averages over each modality's rows of a rank's sub-batch). We require
the test predictions to agree within 1e-3 absolute and top-1 within one sample (a rounding
difference can flip the argmax of a near tie, so equal top-1 would hold only by luck).
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from umilayers.data.synthetic import make_synthetic_store
from umilayers.train import fit
from umilayers.train.distributed import GlobalBatchSampler, shard_rows

TINY = dict(dim=16, projection_depth=1, fusion_depth=1, heads=2, num_tokens=4, epochs=2, unimodal_epochs=2,
            pseudo_window=1, batch_size=8, lr=1e-3, quiet=True, device="cpu")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_global_batches_do_not_depend_on_world_size(world):
    single = GlobalBatchSampler(21, 8, seed=5)
    single.set_epoch(3)
    reference = [list(b) for b in single]
    samplers = [GlobalBatchSampler(21, 8, seed=5, rank=r, world_size=world) for r in range(world)]
    for s in samplers:
        s.set_epoch(3)
    per_rank = [list(s) for s in samplers]
    scales = [s.loss_scales() for s in samplers]
    assert all(len(batches) == len(reference) for batches in per_rank)
    for step, batch in enumerate(reference):
        real = [per_rank[r][step] for r in range(world) if scales[r][step] > 0]
        assert sum(real, []) == batch  # the ranks' slices, in rank order, are the global batch
        assert sum(scales[r][step] for r in range(world)) == pytest.approx(world)
    other = GlobalBatchSampler(21, 8, seed=5)
    other.set_epoch(4)
    assert [list(b) for b in other] != reference  # a new epoch, a new order


def test_shards_cover_rows_in_order():
    for n, world in [(10, 3), (2, 4), (0, 2)]:
        rows = [r for rank in range(world) for r in shard_rows(n, rank, world)]
        assert rows == list(range(n))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, store, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fit(store, "umi", out, **TINY)


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    store = str(make_synthetic_store("classification", tmp_path / "store", num_train=20, num_eval=12,
                                     tokens=4, dim=12).path)
    single = fit(store, "umi", tmp_path / "one", **TINY)
    mp.spawn(_worker, args=(2, _free_port(), store, str(tmp_path / "two")), nprocs=2, join=True)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2 and single["world_size"] == 1
    for split in ("test", "val"):
        one_sample = 1.0 / single[split]["num_samples"]
        assert abs(two[split]["top1"] - single[split]["top1"]) <= one_sample + 1e-12
    np.testing.assert_allclose(np.load(tmp_path / "two" / "test_predictions.npy"),
                               np.load(tmp_path / "one" / "test_predictions.npy"), atol=1e-3)
    # Stage 1 gathered every rank's predictions: both banks hold every training sample.
    from umilayers.pseudo_labels import PseudoLabelBank

    one_bank = PseudoLabelBank.load(tmp_path / "one" / "pseudo_labels")
    two_bank = PseudoLabelBank.load(tmp_path / "two" / "pseudo_labels")
    for m in one_bank.modalities:
        assert torch.equal(one_bank.counts(m), two_bank.counts(m))
