import numpy as np
import pytest
import torch

from umilayers.metrics import caption_owners, mae, rank_summary, retrieval_metrics, retrieval_ranks, top1

# sim[i, j]: text i vs video j; ground truth on the diagonal.
SIM = torch.tensor(
    [
        [0.9, 0.1, 0.5, 0.2],  # text 0: its video scores best            -> t2v rank 1
        [0.3, 0.2, 0.8, 0.1],  # text 1: 0.3 and 0.8 beat 0.2             -> rank 3
        [0.1, 0.6, 0.7, 0.0],  # text 2: best                             -> rank 1
        [0.4, 0.4, 0.4, 0.4],  # text 3: tied with all three (pessimistic)-> rank 4
    ]
)


def test_retrieval_ranks_hand_computed():
    ranks = retrieval_ranks(SIM)
    assert ranks["t2v"].tolist() == [1, 3, 1, 4]
    # video 0 column [.9,.3,.1,.4]: text 0 best -> 1; video 1 column [.1,.2,.6,.4]: 0.2 beaten by
    # 0.6 and 0.4 -> 3; video 2 column [.5,.8,.7,.4]: 0.7 beaten by 0.8 -> 2; video 3 column
    # [.2,.1,0,.4]: 0.4 best -> 1
    assert ranks["v2t"].tolist() == [1, 3, 2, 1]


def test_retrieval_metrics_hand_computed():
    m = retrieval_metrics(SIM)
    assert m["t2v"] == {"r1": 0.5, "r5": 1.0, "r10": 1.0, "median_rank": 2.0, "mean_rank": 2.25}
    assert m["v2t"] == {"r1": 0.5, "r5": 1.0, "r10": 1.0, "median_rank": 1.5, "mean_rank": 1.75}
    assert m["mean_rank"] == pytest.approx(2.0)


def test_constant_similarity_gets_the_worst_rank():
    m = retrieval_metrics(torch.zeros(5, 5))
    assert m["t2v"]["r1"] == 0.0 and m["t2v"]["mean_rank"] == 5.0 and m["v2t"]["median_rank"] == 5.0


def test_rank_summary_recall_thresholds():
    s = rank_summary(torch.tensor([1, 2, 5, 6, 10, 11, 100, 1]))
    assert s["r1"] == 2 / 8 and s["r5"] == 4 / 8 and s["r10"] == 6 / 8
    assert s["median_rank"] == 5.5 and s["mean_rank"] == 136 / 8


def test_several_captions_per_video():
    # texts 0, 1 -> video 0; text 2 -> video 1
    sim = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    ranks = retrieval_ranks(sim, text_to_video=[0, 0, 1])
    assert ranks["t2v"].tolist() == [2, 1, 1]
    # video 0 column [.1,.8,.3]: best own caption is text 1 at rank 1; video 1 column [.9,.2,.7]:
    # its caption text 2 (0.7) is beaten by 0.9 -> 2
    assert ranks["v2t"].tolist() == [1, 2]


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="square"):
        retrieval_metrics(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan"), 0.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="caption"):
        retrieval_ranks(torch.zeros(2, 3), text_to_video=[0, 1])


def test_top1_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [5.0, 1.0, 9.0], [1.0, 1.0, 0.0]])
    # row 3 is a tie between classes 0 and 1: argmax takes the lowest index (0)
    assert top1(logits, torch.tensor([0, 1, 1, 0])) == 0.75
    assert top1(np.asarray(logits), np.array([1, 1, 2, 1])) == 0.5


def test_top1_rejects_bad_input():
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\)"):
        top1(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="expected scores"):
        top1(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


def test_mae_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.5], [3.0, 1.0]])
    assert mae(pred, target) == pytest.approx((1 + 0.5 + 0 + 3) / 4)
    with pytest.raises(ValueError, match="same shape"):
        mae(pred, target[:1])


# ------------------------------------------------------------------ several captions per video (CE)

def test_caption_owners():
    assert caption_owners(torch.tensor([2, 1, 3])).tolist() == [0, 0, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="positive caption counts"):
        caption_owners([2, 0])


def test_average_ties_hand_computed():
    # text 3 of SIM ties with all four videos: positions 1..4 -> 2.5 (pessimistic: 4)
    ranks = retrieval_ranks(SIM, ties="average")
    assert ranks["t2v"].tolist() == [1.0, 3.0, 1.0, 2.5]
    # video 1 column [.1,.2,.6,.4]: 0.2 beaten by 0.6 and 0.4, no tie -> 3
    assert ranks["v2t"].tolist() == [1.0, 3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="ties"):
        retrieval_ranks(SIM, ties="optimistic")


def _ce_ranks(sims, query_mask):
    """Collaborative Experts' evaluation (``model/metric.py``), restated: ``sims`` holds one row
    per (video, caption slot), ``caps`` slots per video, ``query_mask`` marks the real captions.
    t2v: position of the video among the row's sorted distances, ties averaged; v2t: per video,
    the best averaged position of its captions among every caption (missing ones pushed last).
    Returns 1-based ranks of the real queries, and of the videos."""
    num_queries, num_videos = sims.shape
    caps = num_queries // num_videos
    dists = -sims
    t2v = []
    for q in range(num_queries):
        if query_mask.reshape(-1)[q]:
            ordered = np.sort(dists[q])
            t2v.append(np.where(ordered == dists[q, q // caps])[0].mean() + 1)
    v2t = []
    for v in range(num_videos):
        row = dists[:, v].copy()
        row[~query_mask.reshape(-1).astype(bool)] = 1e8
        ordered = np.sort(row)
        v2t.append(min(np.where(ordered == row[j])[0].mean() + 1
                       for j in range(v * caps, (v + 1) * caps) if row[j] != 1e8))
    return np.array(t2v), np.array(v2t)


def test_several_captions_match_collaborative_experts():
    rng = np.random.default_rng(0)
    counts = np.array([4, 3, 4, 2, 4, 1, 4])
    caps, videos = counts.max(), len(counts)
    # coarse similarities: many ties, within and across videos
    sims = np.round(rng.uniform(size=(videos * caps, videos)), 1)
    mask = np.arange(caps)[None, :] < counts[:, None]
    expected_t2v, expected_v2t = _ce_ranks(sims, mask)
    ours = retrieval_ranks(torch.tensor(sims[mask.reshape(-1)]), caption_owners(counts), ties="average")
    np.testing.assert_allclose(ours["t2v"].numpy(), expected_t2v)
    np.testing.assert_allclose(ours["v2t"].numpy(), expected_v2t)
    metrics = retrieval_metrics(torch.tensor(sims[mask.reshape(-1)]), caption_owners(counts), ties="average")
    assert metrics["t2v"]["mean_rank"] == pytest.approx(expected_t2v.mean())
    assert metrics["t2v"]["median_rank"] == pytest.approx(np.median(expected_t2v))
    assert metrics["v2t"]["r1"] == pytest.approx(np.mean(expected_v2t <= 1))
