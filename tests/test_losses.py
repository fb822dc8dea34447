import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from tests.tolerances import tol
from umilayers.losses import (
    AlignmentLoss,
    TaskLoss,
    alignment_loss,
    assign_tokens,
    classification_loss,
    classification_pseudo_loss,
    cosine_similarity_matrix,
    regression_loss,
    regression_pseudo_loss,
    triplet_loss,
)

# ----------------------------------------------------------------------------- alignment


@given(
    batch=st.integers(1, 6),
    tokens_k=st.integers(1, 5),
    dim=st.integers(1, 8),
    num_tokens=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_alignment_matches_explicit_formula(batch, tokens_k, dim, num_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, tokens_k, dim, generator=g)
    tokens = torch.randn(num_tokens, dim, generator=g)
    labels = torch.randint(0, num_tokens, (batch,), generator=g)
    expected = sum(
        float(((features[i].mean(0) - tokens[labels[i]]) ** 2).sum()) for i in range(batch)
    ) / batch
    got = alignment_loss(features, tokens, labels)
    assert math.isclose(float(got), expected, rel_tol=1e-5, abs_tol=1e-6)
    # a (B, D) input is the mean already
    got_2d = alignment_loss(features.mean(1), tokens, labels)
    torch.testing.assert_close(got_2d, got, **tol(torch.float32))


@given(batch=st.integers(1, 6), dim=st.integers(1, 8), num_tokens=st.integers(1, 7),
       seed=st.integers(0, 2**16))
def test_alignment_zero_when_means_equal_tokens(batch, dim, num_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(num_tokens, dim, generator=g)
    labels = torch.randint(0, num_tokens, (batch,), generator=g)
    offsets = torch.randn(batch, 4, dim, generator=g)
    features = tokens[labels][:, None, :] + offsets - offsets.mean(1, keepdim=True)
    assert float(alignment_loss(features, tokens, labels)) < 1e-10
    assert float(alignment_loss(features, tokens, assign="nearest")) < 1e-10


@given(batch=st.integers(1, 8), dim=st.integers(1, 6), num_tokens=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_nearest_assignment_picks_the_nearest(batch, dim, num_tokens, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, 3, dim, generator=g)
    tokens = torch.randn(num_tokens, dim, generator=g)
    distances = torch.cdist(features.mean(1).double(), tokens.double()) ** 2
    index = assign_tokens(features, tokens)
    chosen = distances.gather(1, index[:, None]).squeeze(1)
    assert torch.all(chosen <= distances.min(1).values + 1e-9)
    expected = distances.min(1).values.mean()
    got = alignment_loss(features, tokens, assign="nearest")
    assert math.isclose(float(got), float(expected), rel_tol=1e-5, abs_tol=1e-6)


def test_gradient_reaches_features_and_tokens():
    for assign in ("label", "nearest"):
        loss_fn = AlignmentLoss(num_tokens=5, dim=4, assign=assign)
        features = torch.randn(3, 6, 4, requires_grad=True)
        loss_fn(features, labels=torch.tensor([0, 2, 4])).backward()
        assert features.grad is not None and features.grad.abs().sum() > 0
        assert loss_fn.tokens.grad is not None and loss_fn.tokens.grad.abs().sum() > 0
        # only the chosen tokens receive gradient
        used = loss_fn.tokens.grad.abs().sum(1) > 0
        chosen = torch.tensor([0, 2, 4]) if assign == "label" else loss_fn.assign(features)
        assert used.nonzero().flatten().tolist() == sorted(set(chosen.tolist()))


def test_alignment_gradient_matches_autograd_of_reference():
    features = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 1, 5, 0])
    assert torch.autograd.gradcheck(
        lambda f, t: alignment_loss(f, t, labels).double(), (features, tokens)
    )


def test_alignment_module_init_and_repr():
    torch.manual_seed(0)
    module = AlignmentLoss(3806, 256)
    assert module.tokens.shape == (3806, 256)
    assert abs(float(module.tokens.detach().std()) - 0.02) < 1e-3
    assert "assign='label'" in repr(module)
    module = AlignmentLoss(4, 2, dtype=torch.float64)
    assert module.tokens.dtype == torch.float64


def test_alignment_empty_batch_is_zero_with_grad():
    module = AlignmentLoss(4, 3)
    features = torch.zeros(0, 5, 3, requires_grad=True)
    loss = module(features, labels=torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert features.grad.shape == features.shape
    assert torch.equal(module.tokens.grad, torch.zeros(4, 3))
    assert AlignmentLoss(4, 3, assign="nearest")(torch.zeros(0, 3)).item() == 0.0


def test_alignment_errors():
    module = functools.partial(AlignmentLoss(4, 3), check_values=True)  # range and NaN checks need the values
    with pytest.raises(ValueError, match='labels: required when assign="label"'):
        module(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 4\).*max 4"):
        module(torch.randn(2, 5, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 4\).*min -1"):
        module(torch.randn(2, 5, 3), torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="labels: expected an integer tensor"):
        module(torch.randn(2, 5, 3), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels: expected shape \(B=2\)"):
        module(torch.randn(2, 5, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"features: .*D=3.*got \(2, 5, 7\)"):
        module(torch.randn(2, 5, 7), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"features: expected a 2-d tensor"):
        module(torch.randn(2), torch.tensor([0, 1]))
    nan = torch.randn(2, 5, 3)
    nan[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="features: expected finite values, found 1"):
        module(nan, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="assign: expected one of"):
        AlignmentLoss(4, 3, assign="closest")
    with pytest.raises(ValueError, match="num_tokens"):
        AlignmentLoss(0, 3)


def test_alignment_under_autocast_and_compile():
    module = AlignmentLoss(5, 8)
    features = torch.randn(3, 4, 8)
    labels = torch.tensor([0, 1, 4])
    expected = module(features, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = module(features.bfloat16(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **tol(torch.bfloat16))
    compiled = torch.compile(module, backend="eager")
    torch.testing.assert_close(compiled(features, labels), expected, **tol(torch.float32))


# ----------------------------------------------------------------------------- task losses


def test_classification_losses_match_torch():
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 6, 3, 3, 1])
    torch.testing.assert_close(classification_loss(logits, labels), F.cross_entropy(logits, labels))
    pseudo = torch.softmax(torch.randn(5, 7), dim=-1)
    q = torch.softmax(logits, dim=-1)
    expected = (pseudo * (pseudo.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(classification_pseudo_loss(logits, pseudo), expected, **tol(torch.float32))
    assert float(classification_pseudo_loss(logits, q)) == pytest.approx(0.0, abs=1e-6)
    # zero entries of the pseudo-label contribute zero, not NaN
    one_hot = F.one_hot(labels, 7).float()
    torch.testing.assert_close(
        classification_pseudo_loss(logits, one_hot), F.cross_entropy(logits, labels)
    )


def test_alignment_reductions():
    g = torch.Generator().manual_seed(4)
    features, tokens = torch.randn(5, 3, 6, generator=g), torch.randn(4, 6, generator=g)
    labels = torch.tensor([0, 3, 1, 1, 2])
    distances = ((features.mean(1) - tokens[labels]) ** 2).sum(-1)
    torch.testing.assert_close(alignment_loss(features, tokens, labels), distances.mean())
    torch.testing.assert_close(alignment_loss(features, tokens, labels, reduction="sum"), distances.sum())
    # the released code: mean((u - x) ** 2) over the rows and the D features
    released = ((features.mean(1) - tokens[labels]) ** 2).mean()
    torch.testing.assert_close(alignment_loss(features, tokens, labels, reduction="elementwise_mean"), released)
    with pytest.raises(ValueError, match="reduction"):
        alignment_loss(features, tokens, labels, reduction="batchmean")


def _released_pseudo_term(probs_by_modality, pseudo_by_modality, batch, alpha):
    """The pseudo term of the authors' released ``train.py``, re-derived: per modality,
    ``KLDivLoss(reduce=False)`` gives ``p * (log p - log q)`` per element (0 where ``p = 0``);
    its mean over the modality's rows and classes is multiplied by the modality's row count;
    the sum over modalities is divided by the batch size and multiplied by alpha."""
    total = 0.0
    for m, q in probs_by_modality.items():
        p = pseudo_by_modality[m]
        elements = torch.xlogy(p, p) - p * q.log()
        total = total + elements.mean() * q.shape[0]
    return total / batch * alpha


def test_elementwise_mean_pseudo_term_reproduces_the_released_epic_weighting():
    # EPIC-Kitchens: 3,806 action classes, alpha = 3000, batches mixing RGB-only and audio-only
    # training samples (one modality per sample, as in the released training halves).
    from umilayers.model import UnseenModalityModel

    classes, alpha = 3806, 3000.0
    torch.manual_seed(0)
    model = UnseenModalityModel({"audio": 6, "rgb": 5}, num_outputs=classes, dim=16, num_tokens=4,
                                projection_depth=1, fusion_depth=1, heads=2, pseudo_weight=alpha,
                                pseudo_reduction="elementwise_mean", use_alignment=False)
    present = {"audio": torch.tensor([True, False, True, False, False, True, False]),
               "rgb": torch.tensor([False, True, False, True, True, False, True])}
    inputs = {"audio": torch.randn(3, 4, 6), "rgb": torch.randn(4, 3, 5)}
    out = model(inputs, present=present)
    pseudo = torch.softmax(4 * torch.randn(7, classes), dim=-1)
    pseudo[0, :100] = 0.0  # zero entries contribute 0 log 0 = 0 in both
    labels = torch.randint(0, classes, (7,))
    terms = model.loss(out, labels, pseudo)
    probs = out.branch_outputs[:, 1].softmax(-1)
    released = _released_pseudo_term({m: probs[mask] for m, mask in present.items()},
                                      {m: pseudo[mask] for m, mask in present.items()}, batch=7, alpha=alpha)
    torch.testing.assert_close(alpha * terms.pseudo, released, rtol=1e-4, atol=1e-6)
    # batchmean, the previous scale, is C = 3,806 times larger
    batchmean = classification_pseudo_loss(out.branch_outputs[:, 1], pseudo, reduction="batchmean")
    torch.testing.assert_close(batchmean / classes, terms.pseudo, rtol=1e-5, atol=0)
    assert float(alpha * batchmean.detach()) > 1000 * float(released.detach())


def test_regression_losses():
    pred, target = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(regression_loss(pred, target), ((pred - target) ** 2).mean())
    torch.testing.assert_close(regression_pseudo_loss(pred, target), ((pred - target) ** 2).mean())


def _triplet_reference(sim, margin):
    n = sim.shape[0]
    terms = []
    for i in range(n):
        for j in range(n):
            if i != j:
                terms.append(max(0.0, margin - float(sim[i, i]) + float(sim[i, j])))
                terms.append(max(0.0, margin - float(sim[i, i]) + float(sim[j, i])))
    return sum(terms) / len(terms)


def _collaborative_experts(x, margin):
    """Collaborative Experts' MaxMarginRankingLoss(fix_norm=True), restated as the oracle."""
    n = x.size(0)
    x1 = x.diag()[:, None].expand(n, n).reshape(-1, 1)
    x1 = torch.cat((x1, x1), 0)
    x2 = torch.cat((x.reshape(-1, 1), x.t().reshape(-1, 1)), 0)
    keep = (torch.ones(n, n) - torch.eye(n))
    keep = torch.cat((keep.reshape(-1, 1), keep.t().reshape(-1, 1)), 0).flatten().nonzero().flatten()
    return F.relu(margin - (x1[keep] - x2[keep])).mean()


@given(n=st.integers(2, 7), margin=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_triplet_matches_references(n, margin, seed):
    sim = torch.randn(n, n, generator=torch.Generator().manual_seed(seed))
    got = triplet_loss(sim, margin)
    assert math.isclose(float(got), _triplet_reference(sim, margin), rel_tol=1e-5, abs_tol=1e-6)
    torch.testing.assert_close(got, _collaborative_experts(sim, margin), **tol(torch.float32))


def test_triplet_zero_when_positives_win_by_margin_and_symmetric():
    sim = torch.full((4, 4), 0.1)
    sim.fill_diagonal_(0.5)
    assert float(triplet_loss(sim, 0.2)) == 0.0
    assert float(triplet_loss(sim, 0.5)) > 0.0
    asym = torch.randn(5, 5)
    torch.testing.assert_close(triplet_loss(asym), triplet_loss(asym.t()))


def test_triplet_small_batches():
    sim = torch.randn(1, 1, requires_grad=True)
    loss = triplet_loss(sim)
    assert loss.item() == 0.0
    loss.backward()
    assert sim.grad is not None


def test_empty_batches_are_zero():
    logits = torch.zeros(0, 3, requires_grad=True)
    assert classification_loss(logits, torch.zeros(0, dtype=torch.long)).item() == 0.0
    assert classification_pseudo_loss(logits, torch.zeros(0, 3)).item() == 0.0
    assert regression_loss(logits, torch.zeros(0, 3)).item() == 0.0
    assert triplet_loss(torch.zeros(0, 0)).item() == 0.0


def test_task_loss_errors():
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\).*max 3"):
        classification_loss(torch.randn(2, 3), torch.tensor([0, 3]), check_values=True)
    with pytest.raises(ValueError, match=r"labels: expected shape \(B=2\)"):
        classification_loss(torch.randn(2, 3), torch.tensor([0, 1, 2]), check_values=True)
    with pytest.raises(ValueError, match=r"pseudo_probs: expected shape \(B=2, C=3\)"):
        classification_pseudo_loss(torch.randn(2, 3), torch.rand(2, 4), check_values=True)
    with pytest.raises(ValueError, match="pseudo_probs: expected probabilities >= 0"):
        classification_pseudo_loss(torch.randn(2, 3), -torch.rand(2, 3), check_values=True)
    with pytest.raises(ValueError, match="logits: expected finite values"):
        classification_loss(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), check_values=True)
    with pytest.raises(ValueError, match="pseudo_target: expected finite values"):
        regression_pseudo_loss(torch.randn(1, 2), torch.tensor([[0.0, float("inf")]]), check_values=True)
    with pytest.raises(ValueError, match=r"target: expected shape \(B=2, C=3\)"):
        regression_loss(torch.randn(2, 3), torch.randn(2, 2), check_values=True)
    with pytest.raises(ValueError, match=r"sim: expected shape \(B=3, B=3\)"):
        triplet_loss(torch.randn(3, 4))
    with pytest.raises(ValueError, match="sim: expected finite values"):
        triplet_loss(torch.tensor([[0.0, float("nan")], [0.0, 0.0]]), check_values=True)
    with pytest.raises(ValueError, match="margin"):
        triplet_loss(torch.randn(2, 2), margin=-1.0)
    with pytest.raises(ValueError, match="task: expected one of"):
        TaskLoss("segmentation")


def test_task_loss_dispatch():
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    probs = torch.softmax(torch.randn(4, 5), -1)
    cls = TaskLoss("classification")
    torch.testing.assert_close(cls.supervised(logits, labels), classification_loss(logits, labels))
    torch.testing.assert_close(cls(logits, labels), classification_loss(logits, labels))
    torch.testing.assert_close(cls.pseudo(logits, probs), classification_pseudo_loss(logits, probs))
    reg = TaskLoss("regression")
    target = torch.randn(4, 5)
    torch.testing.assert_close(reg.supervised(logits, target), regression_loss(logits, target))
    torch.testing.assert_close(reg.pseudo(logits, target), regression_loss(logits, target))
    ret = TaskLoss("retrieval", margin=0.3)
    video, text = torch.randn(4, 8), torch.randn(4, 8)
    sim = F.normalize(text, dim=-1) @ F.normalize(video, dim=-1).t()
    torch.testing.assert_close(cosine_similarity_matrix(text, video), sim, **tol(torch.float32))
    torch.testing.assert_close(ret.supervised(video, text), triplet_loss(sim, 0.3), **tol(torch.float32))
    torch.testing.assert_close(ret.pseudo(video, text), triplet_loss(sim, 0.3), **tol(torch.float32))
    # embeddings identical to their own targets and orthogonal to the others: zero loss
    eye = torch.eye(4, 8)
    assert float(ret.pseudo(eye * 3.0, eye)) == 0.0
    with pytest.raises(ValueError, match=r"pseudo_target: expected shape \(B=4, E=8\)"):
        ret.pseudo(video, torch.randn(4, 7))


def test_task_loss_gradients_flow():
    for task, target in (("classification", torch.tensor([0, 2, 1])),
                         ("regression", torch.randn(3, 3)), ("retrieval", torch.randn(3, 3))):
        pred = torch.randn(3, 3, requires_grad=True)
        TaskLoss(task, margin=1.0).supervised(pred, target).backward()
        assert pred.grad.abs().sum() > 0, task


def test_task_loss_under_autocast_and_compile():
    logits, labels = torch.randn(4, 6), torch.tensor([0, 5, 2, 2])
    loss = TaskLoss("classification")
    expected = loss(logits, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(logits.bfloat16(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **tol(torch.bfloat16))
    compiled = torch.compile(triplet_loss, backend="eager")
    sim = torch.randn(5, 5)
    torch.testing.assert_close(compiled(sim, 0.2), triplet_loss(sim, 0.2))
