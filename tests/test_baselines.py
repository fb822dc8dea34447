import json

import pytest
import torch
import torch.nn.functional as F

from tests.tolerances import tol
from umilayers.attention import GroupMaskedTransformer
from umilayers.baselines import (
    LateFusion,
    UnimodalModel,
    VanillaTransformer,
    build_model,
    model_from_spec,
    model_spec,
)
from umilayers.losses import triplet_loss
from umilayers.model import UnseenModalityModel
from umilayers.projection import PooledProjection

DIMS = {"audio": 4, "rgb": 6}
C = 5
TEXT_DIM = 7
PRESENT = {"audio": torch.tensor([True, False, True, True]), "rgb": torch.tensor([False, True, True, True])}
TASKS = ["classification", "regression", "retrieval"]


def text_dim(task):
    return TEXT_DIM if task == "retrieval" else None


def make_batch(present, tokens=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or {"audio": 3, "rgb": 5}
    inputs, masks = {}, {}
    for m, p in present.items():
        rows = int(p.sum())
        if rows:
            inputs[m] = torch.randn(rows, tokens[m], DIMS[m], generator=g)
            mask = torch.zeros(rows, tokens[m], dtype=torch.bool)
            mask[0, -1] = True
            masks[m] = mask
    return inputs, masks


def targets_for(task, batch, seed=2):
    g = torch.Generator().manual_seed(seed)
    if task == "classification":
        return torch.randint(0, C, (batch,), generator=g)
    if task == "regression":
        return torch.randn(batch, C, generator=g)
    return torch.randn(batch, 3, TEXT_DIM, generator=g)


# ---------------------------------------------------------------- unimodal


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("predictor", ["linear", "transformer"])
def test_unimodal_shapes_and_loss(task, predictor):
    torch.manual_seed(0)
    model = UnimodalModel("rgb", 6, C, task, predictor=predictor, dim=8, depth=1, heads=2, text_dim=text_dim(task))
    x = torch.randn(3, 5, 6)
    out = model({"rgb": x, "audio": torch.randn(2, 3, 4)})  # other modalities are ignored
    assert out.prediction.shape == (3, C) and out.branch_outputs.shape == (3, 1, C)
    torch.testing.assert_close(out.modality_outputs["rgb"], out.branch_outputs[:, 0])
    if task == "retrieval":
        torch.testing.assert_close(out.prediction.norm(dim=-1), torch.ones(3))
    losses = model.loss(out, targets_for(task, 3))
    assert losses.align.item() == 0 and losses.pseudo.item() == 0
    torch.testing.assert_close(losses.total, losses.supervised)
    losses.total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unimodal_linear_is_a_linear_map_of_the_masked_mean():
    model = UnimodalModel("rgb", 6, C)
    x = torch.randn(2, 5, 6)
    mask = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    x_nan = x.clone()
    x_nan[0, 3:] = float("nan")
    out = model({"rgb": x_nan}, padding_masks={"rgb": mask})
    pooled = torch.stack([x[0, :3].mean(0), x[1].mean(0)])
    torch.testing.assert_close(out.branch_outputs[:, 0], model.head(pooled))


def test_unimodal_needs_its_modality_on_every_row():
    model = UnimodalModel("rgb", 6, C)
    with pytest.raises(ValueError, match="needs modality 'rgb'"):
        model({"audio": torch.randn(2, 3, 4)})
    with pytest.raises(ValueError, match="1 of 2 rows lack it"):
        model({"rgb": torch.randn(1, 3, 6)}, present={"rgb": torch.tensor([True, False])}, check_values=True)
    with pytest.raises(ValueError, match="no pseudo branch"):
        model.loss(model({"rgb": torch.randn(2, 3, 6)}), torch.tensor([0, 1]), torch.rand(2, C))
    with pytest.raises(RuntimeError, match="no text side"):
        UnimodalModel("rgb", 6, C, "retrieval").encode_text(torch.randn(2, 3, TEXT_DIM))


# ---------------------------------------------------------------- late fusion


@pytest.mark.parametrize("task", TASKS)
def test_late_fusion_averages_unimodal_predictions_over_present_modalities(task):
    torch.manual_seed(0)
    model = LateFusion(DIMS, C, task, text_dim=text_dim(task))
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    assert out.prediction.shape == (4, C) and out.branch_outputs.shape == (4, 1, C)
    per_row = [[] for _ in range(4)]
    for m, member in model.members.items():
        unimodal = member({m: inputs[m]}, {m: masks[m]}).prediction  # probabilities / values / embeddings
        for r, i in enumerate(PRESENT[m].nonzero().flatten().tolist()):
            per_row[i].append(unimodal[r])
    expected = torch.stack([torch.stack(p).mean(0) for p in per_row])
    if task == "retrieval":
        expected = F.normalize(expected, dim=-1)
    torch.testing.assert_close(out.prediction, expected, **tol(torch.float32))
    if task == "classification":
        torch.testing.assert_close(out.branch_outputs[:, 0].softmax(-1), out.prediction, **tol(torch.float32))


@pytest.mark.parametrize("task", TASKS)
def test_late_fusion_loss_is_mean_of_member_losses(task):
    torch.manual_seed(0)
    model = LateFusion(DIMS, C, task, text_dim=text_dim(task))
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    targets = targets_for(task, 4)
    losses = model.loss(out, targets)
    text = model.encode_text(targets) if task == "retrieval" else None
    terms = []
    for m in sorted(DIMS):
        o, t = out.modality_outputs[m], targets[PRESENT[m]]
        if task == "classification":
            terms.append(F.cross_entropy(o, t))
        elif task == "regression":
            terms.append(F.mse_loss(o, t))
        else:
            terms.append(triplet_loss(o @ text[PRESENT[m]].T, margin=0.2))
    torch.testing.assert_close(losses.supervised, torch.stack(terms).mean())
    losses.total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_late_fusion_member_of_absent_modality_is_not_run():
    model = LateFusion(DIMS, C)
    present = {"audio": torch.tensor([True, True]), "rgb": torch.tensor([False, False])}
    inputs, masks = make_batch(present)
    out = model(inputs, masks, present)
    assert set(out.modality_outputs) == {"audio"}
    model.loss(out, torch.tensor([0, 1])).total.backward()
    assert all(p.grad is None for p in model.members["rgb"].parameters())


# ---------------------------------------------------------------- vanilla transformer


def make_vanilla(task="classification", **kw):
    torch.manual_seed(0)
    return VanillaTransformer(
        DIMS, C, task, dim=16, depth=1, heads=2, missing_tokens={"audio": 3, "rgb": 5},
        text_dim=text_dim(task), **kw,
    ).eval()


@pytest.mark.parametrize("task", TASKS)
def test_vanilla_shapes(task):
    model = make_vanilla(task)
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    assert out.prediction.shape == (4, C) and out.branch_outputs.shape == (4, 1, C)
    model.loss(out, targets_for(task, 4)).total.backward()


def test_vanilla_uses_learned_tokens_for_missing_modalities():
    model = make_vanilla()
    inputs, masks = make_batch(PRESENT)
    before = model(inputs, masks, PRESENT).prediction
    with torch.no_grad():
        model.missing["rgb"] += torch.randn(5, 16)  # not a constant shift: LayerNorm would erase it
    after = model(inputs, masks, PRESENT).prediction
    lacks_rgb = ~PRESENT["rgb"]
    assert (after[lacks_rgb] - before[lacks_rgb]).abs().max() > 1e-4
    torch.testing.assert_close(after[~lacks_rgb], before[~lacks_rgb], **tol(torch.float32))
    model.train()
    model.loss(model(inputs, masks, PRESENT), targets_for("classification", 4)).total.backward()
    assert model.missing["rgb"].grad.abs().sum() > 0  # row 0 lacks rgb
    assert model.missing["audio"].grad.abs().sum() > 0  # row 1 lacks audio


def test_vanilla_modality_absent_from_the_whole_batch_is_replaced():
    # No row has rgb: its learned stand-in tokens enter every row's sequence, so the loss reaches
    # them, and the rgb embedding is never used. (Not `prediction.sum()`: the class probabilities
    # of a row sum to 1, so that gradient is zero analytically and only rounding makes it not.)
    model = make_vanilla()
    present = {"audio": torch.tensor([True, True])}
    inputs, masks = make_batch(present)
    out = model(inputs, masks, present)
    model.loss(out, targets_for("classification", 2)).total.backward()
    stand_in, audio = model.missing["rgb"].grad, model.embed["audio"].weight.grad
    assert stand_in.norm() > 1e-3 * audio.norm()  # a real gradient, on the scale of a used input's
    assert model.embed["rgb"].weight.grad is None


def test_vanilla_sub_batch_equals_per_sample_and_padding_is_never_read():
    model = make_vanilla()
    inputs, masks = make_batch(PRESENT)
    inputs["rgb"][0, -1] = float("nan")  # a padding position
    out = model(inputs, masks, PRESENT).prediction
    row_of = {m: torch.cumsum(p.long(), 0) - 1 for m, p in PRESENT.items()}
    for i in range(4):
        single = {m: inputs[m][int(row_of[m][i])][None, ~masks[m][int(row_of[m][i])]] for m in DIMS if PRESENT[m][i]}
        torch.testing.assert_close(out[i : i + 1], model(single).prediction, **tol(torch.float32))


def test_vanilla_bad_missing_tokens():
    with pytest.raises(ValueError, match=r"no length for modalities \['rgb'\]"):
        VanillaTransformer(DIMS, C, missing_tokens={"audio": 3})


# ---------------------------------------------------------------- factory


def test_build_model_maps_methods_to_modules():
    kw = dict(modality_dims=DIMS, num_outputs=C, dim=16, projection_depth=1, fusion_depth=1, heads=2, num_tokens=4)
    umi = build_model("umi", **kw)
    assert isinstance(umi, UnseenModalityModel) and umi.config.projection == "feature"
    assert umi.config.projection_depth == 1 and umi.config.fusion_depth == 1 and umi.config.num_tokens == 4
    pooled = build_model("pooled", **kw)
    assert all(isinstance(p, PooledProjection) for p in pooled.projections.values())
    assert isinstance(build_model("late-fusion", **kw), LateFusion)
    vanilla = build_model("vanilla", modality_tokens={"audio": 3, "rgb": 5}, **kw)
    assert isinstance(vanilla, VanillaTransformer) and vanilla.missing["rgb"].shape == (5, 16)
    uni = build_model("unimodal", modality="rgb", **kw)
    assert isinstance(uni, UnimodalModel) and uni.modality == "rgb"
    assert build_model("umi", use_pseudo=False, **kw).needs_pseudo_labels is False
    with pytest.raises(ValueError, match="method"):
        build_model("mmt", **kw)
    with pytest.raises(ValueError, match="needs one of"):
        build_model("unimodal", **kw)


@pytest.mark.parametrize("method", ["umi", "pooled", "late-fusion", "vanilla", "unimodal"])
def test_model_spec_round_trip(method):
    kw = dict(modality_dims=DIMS, num_outputs=C, task="retrieval", text_dim=TEXT_DIM, dim=16, projection_depth=1,
              fusion_depth=1, heads=2, num_tokens=4)
    if method == "unimodal":
        kw["modality"] = "audio"
    model = build_model(method, **kw).eval()
    spec = json.loads(json.dumps(model_spec(model)))
    clone = model_from_spec(spec).eval()
    clone.load_state_dict(model.state_dict())
    present = {"audio": torch.ones(4, dtype=torch.bool), "rgb": PRESENT["rgb"]} if method == "unimodal" else PRESENT
    inputs, masks = make_batch(present)
    torch.testing.assert_close(clone(inputs, masks, present).prediction, model(inputs, masks, present).prediction)


@pytest.mark.parametrize("method", ["late-fusion", "vanilla", "unimodal"])
def test_baselines_take_head_dim(method):
    kw = dict(modality_dims=DIMS, num_outputs=C, dim=16, projection_depth=1, fusion_depth=1, heads=3, head_dim=8,
              num_tokens=4, predictor="transformer")
    if method == "unimodal":
        kw["modality"] = "audio"
    model = build_model(method, **kw)
    transformers = [m for m in model.modules() if isinstance(m, GroupMaskedTransformer)]
    assert transformers and all(t.head_dim == 8 and t.heads == 3 for t in transformers)
    clone = model_from_spec(json.loads(json.dumps(model_spec(model))))
    assert all(t.head_dim == 8 for t in clone.modules() if isinstance(t, GroupMaskedTransformer))


@pytest.mark.parametrize("method", ["vanilla", "unimodal"])
def test_baselines_read_the_first_token_through_the_fast_path(method):
    kw = dict(modality_dims=DIMS, num_outputs=C, dim=16, projection_depth=2, fusion_depth=2, heads=2, num_tokens=4,
              predictor="transformer", modality_tokens={"audio": 3, "rgb": 5})
    if method == "unimodal":
        kw["modality"] = "audio"
    torch.manual_seed(0)
    model = build_model(method, **kw)
    present = {"audio": torch.ones(4, dtype=torch.bool), "rgb": PRESENT["rgb"]} if method == "unimodal" else PRESENT
    inputs, masks = make_batch(present)
    outputs = {}
    for fast in (True, False):
        for t in model.modules():
            if isinstance(t, GroupMaskedTransformer):
                t.first_queries_only = fast
        outputs[fast] = model(inputs, masks, present).prediction
    torch.testing.assert_close(outputs[True], outputs[False], **tol(torch.float32, "fwd"))


def test_baselines_refuse_pseudo_targets():
    for model in (LateFusion(DIMS, C), make_vanilla()):
        assert model.needs_pseudo_labels is False
        out = model(*make_batch(PRESENT), PRESENT)
        with pytest.raises(ValueError, match="no pseudo branch"):
            model.loss(out, targets_for("classification", 4), torch.rand(4, C))


# ---------------------------------------------------------------- positions and the MLP predictor


@pytest.mark.parametrize("method", ["late-fusion", "vanilla", "unimodal"])
@pytest.mark.parametrize("positions", ["learned"])
def test_positions_change_the_prediction_and_round_trip(method, positions):
    kw = dict(modality_dims=DIMS, num_outputs=C, dim=16, projection_depth=1, fusion_depth=1, heads=2,
              modality_tokens={"audio": 3, "rgb": 5}, predictor="transformer")
    if method == "unimodal":
        kw["modality"] = "rgb"
    present = {"rgb": torch.ones(4, dtype=torch.bool)} if method == "unimodal" else PRESENT
    inputs, masks = make_batch(present)
    torch.manual_seed(0)
    model = build_model(method, positions=positions, **kw).eval()
    torch.manual_seed(0)
    plain = build_model(method, **kw).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "pos_embed" not in k})
    if positions == "learned":
        for p in (q for name, q in model.named_parameters() if "pos_embed" in name):
            torch.nn.init.normal_(p)  # make the tables matter
    assert not torch.allclose(model(inputs, masks, present).prediction, plain(inputs, masks, present).prediction)
    clone = model_from_spec(json.loads(json.dumps(model_spec(model)))).eval()
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(inputs, masks, present).prediction, model(inputs, masks, present).prediction)
    if positions == "learned":
        too_long = {m: torch.randn(int(present[m].sum()), 6, DIMS[m]) for m in present}
        with pytest.raises(ValueError, match="max_tokens="):
            model(too_long, present=present)


def test_mlp_predictor_sees_every_token_at_its_place_and_ignores_padding():
    model = UnimodalModel("rgb", DIMS["rgb"], C, predictor="mlp", dim=8, depth=2, max_tokens=5).eval()
    x = torch.randn(2, 5, DIMS["rgb"])
    shuffled = x[:, torch.tensor([1, 0, 2, 3, 4])]
    assert not torch.allclose(model({"rgb": x}).prediction, model({"rgb": shuffled}).prediction)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, 3:] = True
    noisy = x.clone()
    noisy[:, 3:] = float("nan")
    short = model({"rgb": x[:, :3]}).prediction  # fewer tokens = padding at the end
    torch.testing.assert_close(model({"rgb": noisy}, {"rgb": mask}).prediction, short)
    with pytest.raises(ValueError, match="max_tokens: required with predictor='mlp'"):
        UnimodalModel("rgb", DIMS["rgb"], C, predictor="mlp")
    with pytest.raises(ValueError, match="max_tokens=5 tokens, got k_m=6"):
        model({"rgb": torch.randn(2, 6, DIMS["rgb"])})
    members = build_model("late-fusion", DIMS, C, predictor="mlp", modality_tokens={"audio": 3, "rgb": 5}, dim=8,
                          heads=2, projection_depth=1)
    with pytest.raises(ValueError, match=r"inputs\['rgb'\]: expected at most max_tokens=5"):
        members({"audio": torch.randn(3, 3, 4), "rgb": torch.randn(3, 6, 6)}, present=PRESENT)


def test_ensemble_subsets_are_for_umi_only():
    with pytest.raises(ValueError, match="ensemble_subsets: only methods 'umi' and 'pooled'"):
        build_model("vanilla", DIMS, C, ensemble_subsets=[["rgb"]], dim=8, heads=2)


def test_baselines_take_their_config_fields_as_arguments():
    from umilayers._validation import InvalidArgument

    model = LateFusion(DIMS, C, "classification", "transformer", dim=8, depth=1, heads=2)  # fields in order
    assert model.config.predictor == "transformer" and model.config_dict()["depth"] == 1
    assert LateFusion.from_config(model.config).config == model.config
    with pytest.raises(TypeError, match="bogus"):
        UnimodalModel("rgb", 6, C, bogus=1)
    with pytest.raises(InvalidArgument, match=r"unknown keys \['bogus'\]"):
        VanillaTransformer.from_config({**make_vanilla().config_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="depth: expected an int >= 1, got 0"):
        UnimodalModel("rgb", 6, C, predictor="transformer", depth=0)
