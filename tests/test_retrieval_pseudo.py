"""The retrieval pseudo-label path: relational distillation of the unimodal teachers' caption
rankings (similarities, each in its own unimodal space) instead of a triplet loss on their
embeddings (which live in spaces foreign to the multimodal model's text encoder)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from umilayers.data.synthetic import make_synthetic_store
from umilayers.losses import TaskLoss, cosine_similarity_matrix, similarity_distillation_loss
from umilayers.model import UnseenModalityModel
from umilayers.pseudo_labels import PseudoLabelBank
from umilayers.train import fit


def _orthogonal(dim, seed):
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed)))
    return q


def test_distillation_is_zero_for_the_same_ranking_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    video, text = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    teacher = cosine_similarity_matrix(video, text)
    assert float(similarity_distillation_loss(video, text, teacher)) == pytest.approx(0.0, abs=1e-6)
    other = cosine_similarity_matrix(torch.randn(6, 8, generator=g), text)
    assert float(similarity_distillation_loss(video, text, other)) > 1e-3


def test_distillation_ignores_the_teacher_space_where_the_old_triplet_does_not():
    # The teacher (a unimodal model) has the same video/caption geometry as the student, but in
    # a rotated space (its own text encoder). The new loss sees no disagreement; the old pseudo
    # loss (triplet between the student's and the teacher's video embeddings) does.
    g = torch.Generator().manual_seed(1)
    video, text = (F.normalize(torch.randn(8, 16, generator=g), dim=-1),
                   F.normalize(torch.randn(8, 16, generator=g), dim=-1))
    q = _orthogonal(16, 2)
    teacher_video, teacher_text = video @ q, text @ q
    new = similarity_distillation_loss(video, text, cosine_similarity_matrix(teacher_video, teacher_text))
    assert float(new) == pytest.approx(0.0, abs=1e-5)
    old_same_space = TaskLoss("retrieval", margin=0.2).pseudo(video, video)
    old_rotated = TaskLoss("retrieval", margin=0.2).pseudo(video, teacher_video)
    assert float(old_rotated) > float(old_same_space) + 0.05


def test_distillation_gradients_reach_video_and_text_and_empty_batch_backprops():
    g = torch.Generator().manual_seed(3)
    video = torch.randn(5, 8, generator=g, requires_grad=True)
    text = torch.randn(5, 8, generator=g, requires_grad=True)
    teacher = cosine_similarity_matrix(torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g))
    similarity_distillation_loss(video, text, teacher, temperature=0.5).backward()
    assert video.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    empty_v, empty_t = torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 8, requires_grad=True)
    loss = similarity_distillation_loss(empty_v, empty_t, torch.zeros(0, 0))
    loss.backward()
    assert float(loss.detach()) == 0.0 and empty_v.grad is not None


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(4, 8), torch.randn(3, 8), torch.randn(4, 4)), "text"),
        ((torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 5)), "teacher_similarity"),
        ((torch.randn(4, 8), torch.randn(4, 8), torch.full((4, 4), float("nan"))), "teacher_similarity"),
    ],
)
def test_distillation_validation_names_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        similarity_distillation_loss(*args, check_values=True)


@pytest.mark.parametrize("temperature", [0, -1.0, True])
def test_distillation_temperature_must_be_positive(temperature):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="temperature"):
        similarity_distillation_loss(x, x, torch.zeros(3, 3), temperature=temperature)


def _retrieval_model(**overrides):
    torch.manual_seed(0)
    kwargs = dict(modality_dims={"audio": 4, "rgb": 6}, num_outputs=5, task="retrieval", dim=16, num_tokens=4,
                  projection_depth=1, fusion_depth=1, heads=2, text_dim=7, use_alignment=False)
    kwargs.update(overrides)
    return UnseenModalityModel(**kwargs)


def test_model_loss_takes_batch_by_batch_teacher_similarities_for_retrieval():
    model = _retrieval_model()
    present = {"audio": torch.ones(4, dtype=torch.bool), "rgb": torch.ones(4, dtype=torch.bool)}
    inputs = {"audio": torch.randn(4, 3, 4), "rgb": torch.randn(4, 2, 6)}
    out = model(inputs, None, present)
    text = torch.randn(4, 3, 7)
    with pytest.raises(ValueError, match=r"pseudo_targets: expected shape \(4, 4\)"):
        model.loss(out, text, torch.randn(4, 5))  # (B, C) embeddings: the old format
    teacher = cosine_similarity_matrix(torch.randn(4, 5), torch.randn(4, 5))
    losses = model.loss(out, text, teacher)
    # The pseudo term is the distillation of branch 2 against this model's own caption embeddings.
    expected = similarity_distillation_loss(out.branch_outputs[:, 1], model.encode_text(text), teacher)
    torch.testing.assert_close(losses.pseudo, expected)
    losses.total.backward()
    assert all(p.grad is not None for p in model.text_encoder.parameters())


@pytest.fixture(scope="module")
def retrieval_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    return str(make_synthetic_store("retrieval", root / "store", num_train=24, num_eval=10, tokens=4, dim=12).path)


def test_recipe_builds_teacher_similarities_in_each_unimodal_space(retrieval_store, tmp_path):
    seen = []  # (batch, pseudo-labels) of every multimodal step, as fit reports them

    def record(event):
        if event.kind == "step" and event.stage == "multimodal":
            seen.append((event.batch, event.pseudo_targets.cpu()))

    out_dir = tmp_path / "run"
    fit(retrieval_store, "umi", out_dir, dim=16, projection_depth=1, fusion_depth=1, heads=2, num_tokens=4, epochs=1,
        unimodal_epochs=2, pseudo_window=1, batch_size=8, lr=1e-3, quiet=True, device="cpu", callback=record)
    assert seen
    batch, out = seen[0]
    bank = PseudoLabelBank.load(out_dir / "pseudo_labels")
    text_embeddings = torch.load(out_dir / "pseudo_labels" / "text_embeddings.pt")
    indices = batch.indices.cpu()
    assert out.shape == (len(indices), len(indices))
    # Every unimodal text encoder embedded every train caption, not only those of its rows:
    # (N, K = 1, E) float16 tables.
    for table in text_embeddings.values():
        assert table.dtype == torch.float16 and table.shape[:2] == (24 * 2, 1)
        torch.testing.assert_close(table.float().norm(dim=-1), torch.ones(len(table), 1), atol=2e-3, rtol=0)
    # Row i is the mean over the modalities m of sample i of cos(p_i^m, t_j^m), each cosine in
    # unimodal model m's own space: neither the closest single modality nor a cross-space mix.
    for i in range(len(indices)):
        rows = []
        for m, mask in batch.present.items():
            if bool(mask[i]):
                p = bank.targets(indices[i : i + 1], {m: torch.ones(1, dtype=torch.bool)})
                captions = text_embeddings[m][indices, 0].float()
                rows.append((F.normalize(p, dim=-1) @ F.normalize(captions, dim=-1).T)[0])
        assert rows
        torch.testing.assert_close(out[i], torch.stack(rows).mean(0))
        if len(rows) > 1:  # differs from the single-teacher rows
            assert min(float((out[i] - r).abs().max()) for r in rows) > 1e-4
    assert out.abs().max() <= 1 + 1e-5


def _worker(rank, world, port, store, out):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fit(store, "umi", out, dim=16, projection_depth=1, fusion_depth=1, heads=2, num_tokens=4, epochs=1,
        unimodal_epochs=1, pseudo_window=1, batch_size=8, lr=1e-3, quiet=True, device="cpu")


@pytest.mark.slow
def test_two_process_gloo_gathers_every_caption_embedding(retrieval_store, tmp_path):
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, retrieval_store, str(tmp_path / "two")), nprocs=2, join=True)
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
    tables = torch.load(tmp_path / "two" / "pseudo_labels" / "text_embeddings.pt")
    for table in tables.values():  # rows of both ranks' shards, none left at zero
        torch.testing.assert_close(table.float().norm(dim=-1), torch.ones(len(table), 1), atol=2e-3, rtol=0)
