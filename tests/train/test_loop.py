"""One training step reads no tensor value back to the host (a pipeline stall on a GPU).

The step of :mod:`umilayers.train.loop` (forward, the losses, backward, clipping, AdamW, the
schedule) runs under a ``TorchFunctionMode`` that records every call that needs a tensor's value
on the host: ``item``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``tolist``,
``numpy``, ``nonzero`` and friends, and indexing with a boolean mask (a hidden ``nonzero``).
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from umilayers.baselines import METHODS
from umilayers.data.synthetic import make_synthetic_store
from umilayers.losses import TASKS
from umilayers.train.config import FitConfig
from umilayers.train.distributed import DistContext
from umilayers.train.loop import KeepModalities, Phase, concat, splits, train_step
from umilayers.train.run import model_for_store

PACKAGE = str(Path(__file__).resolve().parents[2] / "umilayers")
READS = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "nonzero", "argwhere",
         "masked_select", "unique", "unique_consecutive"}


class HostReads(TorchFunctionMode):
    """Records each host read as ``(what, the package line behind it, the line that made it)``."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        read = name in READS
        if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1:
            index = args[1] if isinstance(args[1], (tuple, list)) else (args[1],)
            read = any(isinstance(i, Tensor) and i.dtype == torch.bool for i in index)
            name += "[bool mask]"
        if read:
            stack = traceback.extract_stack()[:-1]
            ours = [f for f in stack if f.filename.startswith(PACKAGE)]
            where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "-"
            self.reads.append((name, where, f"{stack[-1].filename}:{stack[-1].lineno}"))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    return {task: make_synthetic_store(task, root / task, num_train=16, num_eval=8, tokens=4, dim=12)
            for task in TASKS}


def _step_reads(store, method: str, check_values: bool = False, device: str = "cpu") -> list[tuple[str, str, str]]:
    options = dict(method=method, dim=16, num_tokens=4, projection_depth=1, fusion_depth=1, heads=2, batch_size=8,
                   device=device, quiet=True)
    if method == "unimodal":
        options["modality"] = sorted(store.modalities)[0]
    cfg = FitConfig.from_options(**options)
    torch.manual_seed(0)
    model = model_for_store(cfg, store)
    ctx = DistContext(device=torch.device(device))
    phase = Phase(model, cfg, ctx, steps_per_epoch=2, epochs=1)
    keep = (cfg.modality,) if method == "unimodal" else None
    dataset = concat(store, splits(store, "train", keep))
    batch = KeepModalities(keep)([dataset[i] for i in range(len(dataset) - 8, len(dataset))])  # mixed splits
    batch = batch.to(device)
    pseudo = None
    if model.needs_pseudo_labels:
        shape = (8, 8) if store.task == "retrieval" else (8, store.num_outputs)
        pseudo = torch.softmax(torch.randn(shape), dim=-1).to(device)
    if check_values:  # the instrument itself: the opt-in value checks must show up
        model.train()
        with HostReads() as counter:
            model.loss(model(batch.inputs, batch.padding_masks, batch.present, check_values=True), batch.targets,
                       pseudo, text_padding_mask=batch.text_padding_mask, check_values=True)
        return counter.reads
    with HostReads() as counter:
        terms = train_step(phase, batch, pseudo, 1.0, cfg, ctx)
    assert terms.shape == (4,) and bool(torch.isfinite(terms).all())
    return counter.reads


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
def test_one_training_step_reads_nothing_back(stores, task, method):
    _assert_no_reads_but_adamw_counters(_step_reads(stores[task], method))


@pytest.mark.cuda
@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", ["umi", "vanilla", "late-fusion"])
def test_one_training_step_on_cuda_reads_nothing_back(stores, task, method):
    _assert_no_reads_but_adamw_counters(_step_reads(stores[task], method, device="cuda"))


def _assert_no_reads_but_adamw_counters(reads: list[tuple[str, str, str]]) -> None:
    ours = [r for r in reads if r[2].startswith(PACKAGE)]
    assert not ours, f"host reads made by the package: {Counter(ours).most_common()}"
    # What torch itself reads: AdamW's step counters (0-d tensors that stay on the CPU even for a
    # model on a GPU, unless capturable/fused), not a device stall.
    others = Counter((name, Path(line).parent.name) for name, _, line in reads)
    assert set(others) <= {("item", "optim")}, f"unexpected host reads: {others.most_common()}"


def test_the_counter_sees_the_opt_in_value_checks(stores):
    reads = _step_reads(stores["classification"], "umi", check_values=True)
    where = {line for _, line, _ in reads}
    assert any(line.startswith("model.py") for line in where) and any(line.startswith("_validation.py")
                                                                       for line in where)


@pytest.mark.parametrize("task", TASKS)
def test_predict_on_no_rows(stores, task):
    """An empty selection (as a rank with no rows sees it) gives empty parts shaped like rows."""
    from umilayers.train.loop import predict

    store = stores[task]
    cfg = FitConfig.from_options(dim=16, num_tokens=4, heads=2, projection_depth=1, fusion_depth=1, quiet=True)
    model = model_for_store(cfg, store)
    ctx = DistContext()
    out = predict(model, model, store, ["test"], None, cfg, ctx, only=[])
    assert out["prediction"].shape == (0, store.num_outputs) and out["indices"].shape == (0,)
    if task == "retrieval":
        assert out["text"].shape == (0, 1, store.num_outputs) and out["caption_counts"].dtype == torch.long
        full = predict(model, model, store, ["test"], None, cfg, ctx)
        assert out["text"].shape[1:] == full["text"].shape[1:]
    else:
        assert out["targets"].shape[1:] == predict(model, model, store, ["test"], None, cfg, ctx)["targets"].shape[1:]
