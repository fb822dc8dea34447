import dataclasses
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tolerances import tol
from umilayers.losses import triplet_loss
from umilayers.model import UMIConfig, UMIOutput, UnseenModalityModel, masked_mean
from umilayers.projection import FeatureProjection, PooledProjection

DIMS = {"audio": 4, "rgb": 6}
C = 5
TEXT_DIM = 7


def make_model(task="classification", **overrides):
    torch.manual_seed(0)
    kwargs = dict(
        modality_dims=DIMS, num_outputs=C, task=task, dim=16, num_tokens=4, projection_depth=1,
        fusion_depth=1, heads=2, text_dim=TEXT_DIM if task == "retrieval" else None,
    )
    kwargs.update(overrides)
    return UnseenModalityModel(**kwargs).eval()


def make_batch(present, tokens=None, seed=1):
    """Inputs in the sub-batch layout for a dict of (B,) bool masks; padding on some rows."""
    g = torch.Generator().manual_seed(seed)
    tokens = tokens or {"audio": 3, "rgb": 5}
    inputs, masks = {}, {}
    for m, p in present.items():
        rows = int(p.sum())
        if rows == 0:
            continue
        inputs[m] = torch.randn(rows, tokens[m], DIMS[m], generator=g)
        mask = torch.zeros(rows, tokens[m], dtype=torch.bool)
        mask[0, tokens[m] - 1:] = True  # the first row of every modality has one padding token
        masks[m] = mask
    return inputs, masks


def targets_for(task, batch, seed=2):
    g = torch.Generator().manual_seed(seed)
    if task == "classification":
        return torch.randint(0, C, (batch,), generator=g)
    if task == "regression":
        return torch.randn(batch, C, generator=g)
    return torch.randn(batch, 3, TEXT_DIM, generator=g)


def pseudo_for(task, batch, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, C, generator=g)
    if task == "classification":
        return x.softmax(-1)
    if task == "retrieval":  # (B, B) teacher similarities cos(video_i, caption_j)
        return F.normalize(x, dim=-1) @ F.normalize(torch.randn(batch, C, generator=g), dim=-1).T
    return x


PRESENT = {"audio": torch.tensor([True, False, True, True]), "rgb": torch.tensor([False, True, True, True])}


@pytest.mark.parametrize("task", ["classification", "regression", "retrieval"])
def test_output_shapes_per_task(task):
    model = make_model(task)
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    assert isinstance(out, UMIOutput)
    assert out.prediction.shape == (4, C)
    assert out.branch_outputs.shape == (4, 2, C)
    assert out.modality_features["audio"].shape == (3, 4, 16)
    assert out.modality_features["rgb"].shape == (3, 4, 16)
    assert set(out.present) == {"audio", "rgb"}
    if task == "classification":
        torch.testing.assert_close(out.prediction, out.branch_outputs.softmax(-1).mean(1))
        torch.testing.assert_close(out.prediction.sum(-1), torch.ones(4))
    elif task == "regression":
        torch.testing.assert_close(out.prediction, out.branch_outputs.mean(1))
    else:
        torch.testing.assert_close(out.branch_outputs.norm(dim=-1), torch.ones(4, 2))
        torch.testing.assert_close(out.prediction, F.normalize(out.branch_outputs.mean(1), dim=-1))


def _per_sample(model, inputs, masks, present):
    """Run every sample alone, with only its modalities and its valid tokens."""
    batch = next(iter(present.values())).shape[0]
    row_of = {m: torch.cumsum(p.long(), 0) - 1 for m, p in present.items()}
    preds, branches = [], []
    for i in range(batch):
        single = {}
        for m, p in present.items():
            if p[i]:
                r = int(row_of[m][i])
                valid = ~masks[m][r]
                single[m] = inputs[m][r : r + 1, valid]
        out = model(single)
        preds.append(out.prediction)
        branches.append(out.branch_outputs)
    return torch.cat(preds), torch.cat(branches)


@pytest.mark.parametrize("projection", ["feature", "pooled"])
def test_sub_batch_equals_per_sample(projection):
    model = make_model(projection=projection)
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    pred, branches = _per_sample(model, inputs, masks, PRESENT)
    torch.testing.assert_close(out.branch_outputs, branches, **tol(torch.float32))
    torch.testing.assert_close(out.prediction, pred, **tol(torch.float32))


@settings(max_examples=10)
@given(st.lists(st.sampled_from([(True, False), (False, True), (True, True)]), min_size=1, max_size=5))
def test_sub_batch_equals_per_sample_property(pattern):
    model = _PROPERTY_MODEL
    present = {
        "audio": torch.tensor([a for a, _ in pattern]),
        "rgb": torch.tensor([r for _, r in pattern]),
    }
    inputs, masks = make_batch(present)
    out = model(inputs, masks, {m: present[m] for m in inputs})
    _, branches = _per_sample(model, inputs, masks, present)
    torch.testing.assert_close(out.branch_outputs, branches, **tol(torch.float32))


_PROPERTY_MODEL = make_model()


def test_absent_modality_projection_never_runs():
    model = make_model()
    calls = {m: [] for m in DIMS}
    for m, proj in model.projections.items():
        # the model calls the projection's unchecked path: count the rows its token embedding sees
        proj.embed.register_forward_hook(lambda mod, args, out, m=m: calls[m].append(args[0].shape[0]))
    present = {"audio": torch.tensor([True, True, True]), "rgb": torch.tensor([False, False, False])}
    inputs, masks = make_batch(present)
    model(inputs, masks, present)
    assert calls == {"audio": [3], "rgb": []}
    present = {"audio": torch.tensor([True, False, True]), "rgb": torch.tensor([False, True, False])}
    inputs, masks = make_batch(present)
    model(inputs, masks, present)
    assert calls == {"audio": [3, 2], "rgb": [1]}  # only the rows that have the modality


def test_branches_do_not_see_each_other():
    model = make_model(num_tokens=6, branches=2)
    inputs, masks = make_batch(PRESENT)
    before = model(inputs, masks, PRESENT).branch_outputs
    with torch.no_grad():
        model.positions[3:] += torch.randn(3, 16)  # group 1's slots
        model.readout[1] += torch.randn(16)  # branch 1's readout
    after = model(inputs, masks, PRESENT).branch_outputs
    torch.testing.assert_close(after[:, 0], before[:, 0], atol=1e-6, rtol=0)
    assert (after[:, 1] - before[:, 1]).abs().max() > 1e-3


def test_token_layout_is_contiguous_per_branch():
    model = make_model(num_tokens=6, branches=3)
    fused = torch.randn(2, 6, 16)
    tokens = model.branch_tokens(fused)
    assert tokens.shape == (2, 9, 16)
    for g in range(3):
        torch.testing.assert_close(tokens[:, 3 * g], model.readout[g].expand(2, -1))
        slots = fused[:, 2 * g : 2 * g + 2] + model.positions[2 * g : 2 * g + 2]
        torch.testing.assert_close(tokens[:, 3 * g + 1 : 3 * g + 3], slots)
    assert model.transformer.groups == 3


@pytest.mark.parametrize("task", ["classification", "regression", "retrieval"])
def test_loss_terms_follow_eq3(task):
    model = make_model(task, align_weight=0.5, pseudo_weight=2.0)
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    targets, pseudo = targets_for(task, 4), pseudo_for(task, 4)
    losses = model.loss(out, targets, pseudo)
    for term in (losses.total, losses.align, losses.supervised, losses.pseudo):
        assert term.dim() == 0 and term.item() >= 0
    assert losses.align.item() > 0 and losses.supervised.item() > 0 and losses.pseudo.item() > 0
    torch.testing.assert_close(losses.total, 0.5 * losses.align + losses.supervised + 2.0 * losses.pseudo)
    b0, b1 = out.branch_outputs[:, 0], out.branch_outputs[:, 1]
    if task == "classification":
        torch.testing.assert_close(losses.supervised, F.cross_entropy(b0, targets))
        # the default reduction: each sample's KL, averaged over the batch
        torch.testing.assert_close(losses.pseudo, (pseudo * (pseudo.log() - b1.log_softmax(-1))).sum(-1).mean())
    elif task == "regression":
        torch.testing.assert_close(losses.supervised, F.mse_loss(b0, targets))
        torch.testing.assert_close(losses.pseudo, F.mse_loss(b1, pseudo))
    else:
        text = model.encode_text(targets)
        torch.testing.assert_close(losses.supervised, triplet_loss(b0 @ text.T, margin=0.2))
        # relational distillation: KL(softmax(teacher / T) || softmax(cos(b1, text) / T)), T = 0.1
        student = (b1 @ text.T / 0.1).log_softmax(-1)
        teacher = (pseudo / 0.1).log_softmax(-1)
        torch.testing.assert_close(losses.pseudo, (teacher.exp() * (teacher - student)).sum(-1).mean())
    # alignment (default): per modality on its rows, averaged over modalities
    terms = []
    for m, feats in out.modality_features.items():
        labels = targets[PRESENT[m]] if task == "classification" else None
        terms.append(model.alignment(feats, labels))
    torch.testing.assert_close(losses.align, torch.stack(terms).mean())


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_released_alignment_reduction(task):
    # the released code: the squared difference of each (sample, modality) pair's mean feature
    # and its token, averaged over the pairs and the D features
    model = make_model(task, align_reduction="elementwise_mean")
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    targets = targets_for(task, 4)
    losses = model.loss(out, targets, pseudo_for(task, 4))
    differences = []
    for m, feats in out.modality_features.items():
        mean = feats.mean(1)
        tokens = model.alignment.tokens
        if task == "classification":
            chosen = tokens[targets[PRESENT[m]]]
        else:
            chosen = tokens[torch.cdist(mean, tokens).argmin(1)]
        differences.append((mean - chosen) ** 2)
    torch.testing.assert_close(losses.align, torch.cat(differences).mean())


@pytest.mark.parametrize("reduction", ["modality_sum", "modality_mean"])
def test_alignment_reductions_over_modalities(reduction):
    # modality_sum is Eq. 1 as the paper writes it: per modality the batch mean of the squared
    # Euclidean distance, summed over modalities; modality_mean averages instead.
    model = make_model(align_reduction=reduction)
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    targets = targets_for("classification", 4)
    losses = model.loss(out, targets, pseudo_for("classification", 4))
    per_modality = torch.stack([
        ((feats.mean(1) - model.alignment.tokens[targets[PRESENT[m]]]) ** 2).sum(-1).mean()
        for m, feats in out.modality_features.items()
    ])
    expected = per_modality.sum() if reduction == "modality_sum" else per_modality.mean()
    torch.testing.assert_close(losses.align, expected)


def test_elementwise_mean_pseudo_reduction_is_the_mean_over_every_element():
    model = make_model(pseudo_reduction="elementwise_mean")
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    pseudo = pseudo_for("classification", 4)
    losses = model.loss(out, targets_for("classification", 4), pseudo)
    elements = pseudo * (pseudo.log() - out.branch_outputs[:, 1].log_softmax(-1))  # (B, C)
    torch.testing.assert_close(losses.pseudo, elements.mean())


def test_alignment_uses_label_tokens_for_classes_and_nearest_otherwise():
    model = make_model()
    assert model.config.align_assign == "label" and model.alignment.tokens.shape[0] == C
    model = make_model("regression")
    assert model.config.align_assign == "nearest" and model.alignment.tokens.shape[0] == 128
    assert make_model("regression", num_align_tokens=7).alignment.tokens.shape[0] == 7


def test_disabled_terms_are_zero_and_structure_changes():
    model = make_model(use_alignment=False, use_pseudo=False)
    assert model.alignment is None and not model.needs_pseudo_labels
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    targets = targets_for("classification", 4)
    losses = model.loss(out, targets)
    assert losses.align.item() == 0 and losses.pseudo.item() == 0
    b0, b1 = out.branch_outputs[:, 0], out.branch_outputs[:, 1]
    expected = (F.cross_entropy(b0, targets) + F.cross_entropy(b1, targets)) / 2
    torch.testing.assert_close(losses.supervised, expected)  # both branches supervised by ground truth
    torch.testing.assert_close(losses.total, losses.supervised)
    with pytest.raises(ValueError, match="use_pseudo=False"):
        model.loss(out, targets, pseudo_for("classification", 4))


def test_one_branch_puts_both_losses_on_the_single_readout():
    model = make_model(branches=1)
    assert model.readout.shape == (1, 16) and model.transformer.groups == 1
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    assert out.branch_outputs.shape == (4, 1, C)
    targets, pseudo = targets_for("classification", 4), pseudo_for("classification", 4)
    losses = model.loss(out, targets, pseudo)
    b = out.branch_outputs[:, 0]
    torch.testing.assert_close(losses.supervised, F.cross_entropy(b, targets))
    torch.testing.assert_close(losses.pseudo, (pseudo * (pseudo.log() - b.log_softmax(-1))).sum(-1).mean())


def test_pooled_projection_switch():
    model = make_model(projection="pooled")
    assert all(isinstance(p, PooledProjection) for p in model.projections.values())
    assert all(isinstance(p, FeatureProjection) for p in make_model().projections.values())
    assert list(model.projections) == sorted(DIMS)


@pytest.mark.parametrize("task", ["classification", "regression", "retrieval"])
def test_gradients_reach_every_parameter(task):
    model = make_model(task).train()
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    model.loss(out, targets_for(task, 4), pseudo_for(task, 4)).total.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing


def test_absent_modality_gets_no_gradient():
    model = make_model().train()
    present = {"audio": torch.tensor([True, True, True]), "rgb": torch.tensor([False, False, False])}
    inputs, masks = make_batch(present)
    out = model(inputs, masks, present)
    model.loss(out, targets_for("classification", 3), pseudo_for("classification", 3)).total.backward()
    assert all(p.grad is None for p in model.projections["rgb"].parameters())
    assert all(p.grad is not None for p in model.projections["audio"].parameters())


def test_config_round_trip_rebuilds_the_same_model():
    model = make_model("retrieval", branches=1, use_alignment=False)
    data = json.loads(json.dumps(model.config_dict()))
    clone = UnseenModalityModel.from_config(data).eval()
    assert clone.config == model.config
    clone.load_state_dict(model.state_dict())
    inputs, masks = make_batch(PRESENT)
    torch.testing.assert_close(clone(inputs, masks, PRESENT).prediction, model(inputs, masks, PRESENT).prediction)
    with pytest.raises(ValueError, match="unknown keys"):
        UMIConfig.from_dict({**data, "bogus": 1})


def test_encode_text_shape_normalisation_and_padding():
    model = make_model("retrieval")
    text = torch.randn(3, 4, TEXT_DIM)
    emb = model.encode_text(text)
    assert emb.shape == (3, C)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[:, 2:] = True
    padded = text.clone()
    padded[:, 2:] = float("nan")
    torch.testing.assert_close(model.encode_text(padded, mask), model.encode_text(text[:, :2]))
    out = model(*make_batch(PRESENT)[:2], PRESENT)
    losses = model.loss(out, torch.randn(4, 4, TEXT_DIM), pseudo_for("retrieval", 4),
                        text_padding_mask=torch.zeros(4, 4, dtype=torch.bool))
    assert torch.isfinite(losses.total)
    with pytest.raises(RuntimeError, match="text side"):
        make_model().encode_text(text)


def test_present_entry_without_input_is_allowed_when_all_false():
    model = make_model()
    present = {"audio": torch.tensor([True, True]), "rgb": torch.tensor([False, False])}
    inputs, masks = make_batch(present)
    assert "rgb" not in inputs
    assert model(inputs, masks, present).prediction.shape == (2, C)


def test_no_present_means_every_modality_on_every_row():
    model = make_model()
    full = {"audio": torch.ones(3, dtype=torch.bool), "rgb": torch.ones(3, dtype=torch.bool)}
    inputs, masks = make_batch(full)
    torch.testing.assert_close(model(inputs, masks).prediction, model(inputs, masks, full).prediction)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"branches": 3}, ValueError, "branches must divide num_tokens"),
        ({"task": "retrieval", "text_dim": None}, ValueError, "text_dim: required"),
        ({"text_dim": 4}, ValueError, "only used by task='retrieval'"),
        ({"num_align_tokens": 3}, ValueError, "must equal"),
        ({"task": "ranking"}, ValueError, "task"),
        ({"projection": "linear"}, ValueError, "projection"),
        ({"modality_dims": {}}, ValueError, "modality_dims"),
        ({"use_pseudo": 1}, TypeError, "use_pseudo"),
        ({"fusion_depth": 0}, ValueError, "fusion_depth"),
        ({"positions": "rotary"}, ValueError, "positions"),
        ({"positions": "learned"}, ValueError, "modality_tokens: learned positions need"),
        ({"modality_tokens": {"rgb": 5}}, ValueError, r"modality_tokens: no length for modalities \['audio'\]"),
        ({"feature_norm": 1}, TypeError, "feature_norm"),
        ({"ensemble_subsets": [["rgb", "smell"]]}, ValueError, "ensemble_subsets: expected non-empty sets"),
        ({"ensemble_subsets": [[]]}, ValueError, "ensemble_subsets"),
    ],
)
def test_bad_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_model(**kwargs)


def test_bad_inputs_raise_clear_errors():
    # check_values=True adds the checks that read the masks' values; the rest run always.
    model = functools.partial(make_model(), check_values=True)
    x = {"audio": torch.randn(2, 3, 4), "rgb": torch.randn(2, 5, 6)}
    with pytest.raises(ValueError, match=r"unknown modality \['depth'\]"):
        model({**x, "depth": torch.randn(2, 3, 1)})
    with pytest.raises(ValueError, match=r"inputs\['rgb'\]: expected shape .*got \(2, 5, 7\)"):
        model({"audio": x["audio"], "rgb": torch.randn(2, 5, 7)})
    with pytest.raises(ValueError, match="empty mapping"):
        model({})
    with pytest.raises(ValueError, match=r"expected 1 rows \(present\['rgb'\].sum\(\)"):
        model(x, present={"audio": torch.tensor([True, True]), "rgb": torch.tensor([True, False])})
    with pytest.raises(ValueError, match=r"no modality at all: rows \[1\]"):
        model({"audio": x["audio"][:1]}, present={"audio": torch.tensor([True, False])})
    with pytest.raises(ValueError, match="missing"):
        model(x, present={"audio": torch.tensor([True, True])})
    with pytest.raises(ValueError, match="has no 'rgb'"):
        model({"audio": x["audio"]}, present={"audio": torch.tensor([True, True]), "rgb": torch.tensor([True, False])})
    with pytest.raises(ValueError, match="without present"):
        model({"audio": x["audio"], "rgb": x["rgb"][:1]})
    with pytest.raises(ValueError, match=r"padding_masks\['rgb'\]"):
        model(x, padding_masks={"rgb": torch.zeros(2, 4, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        model(x, present={"audio": torch.ones(2), "rgb": torch.ones(2)})
    # what the projections checked is now checked once, here, in the model's own names
    empty = torch.zeros(2, 5, dtype=torch.bool)
    empty[1] = True
    with pytest.raises(ValueError, match=r"padding_masks\['rgb'\]: every token is padding in 1 row\(s\) \[1\]"):
        model(x, padding_masks={"rgb": empty})
    make_model()(x, padding_masks={"rgb": empty})  # without check_values nothing reads the mask
    with pytest.raises(ValueError, match=r"inputs\['rgb'\]: expected at least one token per sample"):
        model({"audio": x["audio"], "rgb": torch.randn(2, 0, 6)})


def test_bad_loss_arguments():
    model = make_model()
    out = model({"audio": torch.randn(2, 3, 4)})
    with pytest.raises(ValueError, match="pseudo_targets: required"):
        model.loss(out, torch.tensor([0, 1]))
    pseudo = pseudo_for("classification", 2)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        model.loss(out, torch.tensor([0, 5]), pseudo, check_values=True)
    with pytest.raises(TypeError, match="targets: expected an integer tensor"):
        model.loss(out, torch.tensor([0.0, 1.0]), pseudo)
    with pytest.raises(ValueError, match="pseudo_targets: expected shape"):
        model.loss(out, torch.tensor([0, 1]), torch.rand(2, 4))
    with pytest.raises(ValueError, match="finite"):
        model.loss(out, torch.tensor([0, 1]), torch.full((2, C), float("nan")), check_values=True)
    with pytest.raises(ValueError, match="targets: expected"):
        model.loss(out, torch.tensor([0, 1, 2]), pseudo)


def test_masked_mean_ignores_padding_values():
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[False, False, True, True], [False, False, False, False]])
    y = x.clone()
    y[0, 2:] = float("nan")
    torch.testing.assert_close(masked_mean(y, mask)[0], x[0, :2].mean(0))
    torch.testing.assert_close(masked_mean(y, mask)[1], x[1].mean(0))


def test_accepts_a_collated_batch():
    from umilayers.data.dataset import collate

    g = torch.Generator().manual_seed(0)
    items = [
        {"index": 0, "split_id": 0, "inputs": {"rgb": torch.randn(5, 6, generator=g)}, "lengths": {"rgb": 4},
         "target": torch.tensor(1)},
        {"index": 7, "split_id": 1, "inputs": {"audio": torch.randn(3, 4, generator=g)}, "lengths": {"audio": 3},
         "target": torch.tensor(3)},
        {"index": 9, "split_id": 1, "inputs": {"audio": torch.randn(3, 4, generator=g)}, "lengths": {"audio": 3},
         "target": torch.tensor(0)},
    ]
    batch = collate(items)
    model = make_model()
    out = model(batch.inputs, batch.padding_masks, batch.present)
    assert out.prediction.shape == (3, C)
    losses = model.loss(out, batch.targets, pseudo_for("classification", 3))
    assert torch.isfinite(losses.total)


def test_model_config_fields_are_the_constructor_arguments():
    # One spelling and one default per hyper-parameter: every model's arguments are the fields of
    # its config_class (ModelConfig's are UMIConfig's); the baselines have ModelConfig's defaults.
    from umilayers.baselines import LateFusion, UnimodalModel, VanillaTransformer
    from umilayers.model import ModelConfig

    defaults = {field.name: field.default for field in dataclasses.fields(ModelConfig)}
    assert set(defaults) <= {field.name for field in dataclasses.fields(UMIConfig)}
    for cls in (UnimodalModel, LateFusion, VanillaTransformer):
        shared = {f.name: f.default for f in dataclasses.fields(cls.config_class) if f.name in defaults}
        assert {"dim", "heads", "head_dim", "margin"} <= set(shared)
        assert shared == {name: defaults[name] for name in shared}, cls.__name__
    with pytest.raises(TypeError, match="bogus"):
        make_model(bogus=1)
    config = make_model().config
    assert UMIConfig.from_dict(config.to_dict()) == config
    resolved = ModelConfig(dim=16, num_tokens=4, projection_depth=1, fusion_depth=1, heads=2, num_align_tokens=C)
    assert config.hyperparameters == resolved  # the default n_u resolved: one token per class


def test_head_dim_reaches_every_transformer_of_the_model():
    model = make_model(heads=3, head_dim=8)  # 3 heads do not divide dim=16: allowed with head_dim
    transformers = [model.transformer, *(p.encoder for p in model.projections.values())]
    assert all(t.head_dim == 8 and t.blocks[0].qkv.weight.shape == (72, 16) for t in transformers)
    out = model(*make_batch(PRESENT), PRESENT)
    model.loss(out, targets_for("classification", 4), pseudo_for("classification", 4)).total.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert UnseenModalityModel.from_config(model.config).config.head_dim == 8
    with pytest.raises(ValueError, match="heads"):
        make_model(heads=3)


def test_default_head_dim_builds_the_model_of_dim_over_heads():
    # The default is today's model: the same parameters from the same random draws as head_dim = dim // heads.
    default, explicit = make_model(), make_model(head_dim=8)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    assert default.state_dict().keys() == explicit.state_dict().keys()
    inputs, masks = make_batch(PRESENT)
    assert torch.equal(default(inputs, masks, PRESENT).prediction, explicit(inputs, masks, PRESENT).prediction)


@pytest.mark.parametrize("task", ["classification", "retrieval"])
def test_readout_queries_only_equals_the_full_fusion(task):
    # The fusion's last layer computes the readouts' queries only; flipping the fast path off
    # computes every token and reads the readouts: the same outputs, loss and gradients.
    model = make_model(task, fusion_depth=2, branches=2).train()
    inputs, masks = make_batch(PRESENT)
    results = {}
    for fast in (True, False):
        model.transformer.first_queries_only = fast
        out = model(inputs, masks, PRESENT)
        loss = model.loss(out, targets_for(task, 4), pseudo_for(task, 4)).total
        loss.backward()
        results[fast] = (out.branch_outputs.detach(), loss.detach(),
                         {n: p.grad.clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[True][0], results[False][0], **tol(torch.float32, "fwd"))
    torch.testing.assert_close(results[True][1], results[False][1], **tol(torch.float32, "fwd"))
    for name, grad in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], grad, **tol(torch.float32, "bwd"), msg=name)


def test_the_batch_is_checked_once(monkeypatch):
    # The model checks `present` at its boundary and fuses with the unchecked kernel; the checked
    # CommonSpaceSum path is not taken again inside.
    import umilayers.fusion as fusion
    import umilayers.model as model_module

    calls = []
    real = model_module.check_present
    monkeypatch.setattr(model_module, "check_present", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))

    def refuse(*args, **kwargs):
        raise AssertionError("the model re-checked its batch in the fusion")

    monkeypatch.setattr(fusion, "check_present", refuse)
    present = {"audio": torch.tensor([True, False, True]), "rgb": torch.tensor([False, True, True])}
    inputs, masks = make_batch(present)
    make_model()(inputs, masks, present)
    assert calls == [1]


# ---------------------------------------------------------------- options beyond the paper


@pytest.mark.parametrize("positions", ["learned"])
def test_positions_reach_the_projections_and_survive_the_config(positions):
    model = make_model(positions=positions, modality_tokens={"audio": 3, "rgb": 5})
    assert all(p.positions == positions for p in model.projections.values())
    assert model.projections["rgb"].max_tokens == 5
    inputs, masks = make_batch(PRESENT)
    clone = UnseenModalityModel.from_config(json.loads(json.dumps(model.config_dict()))).eval()
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(inputs, masks, PRESENT).prediction, model(inputs, masks, PRESENT).prediction)
    if positions == "learned":
        too_long = {"audio": torch.randn(3, 4, DIMS["audio"]), "rgb": torch.randn(3, 5, DIMS["rgb"])}
        with pytest.raises(ValueError, match="max_tokens=3"):
            model(too_long, present=PRESENT)


def test_feature_norm_normalises_each_modality_before_the_sum():
    model = make_model(feature_norm=True)
    out = model(*make_batch(PRESENT), PRESENT)
    for feats in out.modality_features.values():
        torch.testing.assert_close(feats.mean(-1), torch.zeros(feats.shape[:2]), atol=1e-5, rtol=0)
    assert set(dict(model.named_parameters())) >= {"feature_norms.audio.weight", "feature_norms.rgb.weight"}


@pytest.mark.parametrize("task", ["classification", "regression", "retrieval"])
def test_subset_ensemble_averages_fused_and_single_modality_predictions(task):
    model = make_model(task, ensemble_subsets=[["rgb"], ["audio"]])
    inputs, masks = make_batch(PRESENT)
    out = model(inputs, masks, PRESENT)
    plain = make_model(task)  # same seed, same parameters, option off
    plain.load_state_dict(model.state_dict())
    fused = plain(inputs, masks, PRESENT).prediction
    alone = {m: torch.zeros(4, C) for m in inputs}
    for m in inputs:
        rows = PRESENT[m].nonzero().flatten()
        alone[m][rows] = plain({m: inputs[m]}, {m: masks[m]}).prediction
    both = PRESENT["audio"] & PRESENT["rgb"]
    expected = torch.where(both[:, None], (fused + alone["audio"] + alone["rgb"]) / 3, fused)
    if task == "retrieval":
        expected = F.normalize(expected, dim=-1)
    torch.testing.assert_close(out.prediction, expected, **tol(torch.float32))
    torch.testing.assert_close(out.branch_outputs, plain(inputs, masks, PRESENT).branch_outputs)
    model.train()  # training is unchanged: the fused prediction
    torch.testing.assert_close(model(inputs, masks, PRESENT).prediction, fused)


def test_subset_ensemble_uses_only_the_subsets_a_row_has_more_than():
    dims = {"a": 3, "b": 3, "c": 3, "d": 3}
    torch.manual_seed(0)
    model = UnseenModalityModel(dims, C, dim=16, num_tokens=4, projection_depth=1, fusion_depth=1, heads=2,
                                ensemble_subsets=[["a", "d"], ["b", "c"]]).eval()
    plain = UnseenModalityModel(dims, C, dim=16, num_tokens=4, projection_depth=1, fusion_depth=1, heads=2).eval()
    plain.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    x = {m: torch.randn(3, 2, 3, generator=g) for m in dims}
    # row 0: all four; row 1: a + d only (a listed subset itself: nothing to add); row 2: a, b, d
    present = {"a": torch.tensor([True, True, True]), "b": torch.tensor([True, False, True]),
               "c": torch.tensor([True, False, False]), "d": torch.tensor([True, True, True])}
    inputs = {m: x[m][present[m]] for m in dims}
    out = model(inputs, present=present).prediction
    fused = plain(inputs, present=present).prediction
    ad = plain({"a": x["a"], "d": x["d"]}).prediction
    bc = plain({"b": x["b"][:1], "c": x["c"][:1]}).prediction
    torch.testing.assert_close(out[0], (fused[0] + ad[0] + bc[0]) / 3, **tol(torch.float32))
    torch.testing.assert_close(out[1], fused[1], **tol(torch.float32))
    torch.testing.assert_close(out[2], (fused[2] + ad[2]) / 2, **tol(torch.float32))
