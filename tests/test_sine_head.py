"""SINE head (neck, fusion, M-Former), its numerics and the training criterion, on tiny configs.

The shared layers are tested in test_layers.py, the Hungarian matcher in test_matcher.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from promptseg.heads.mask_inference import instance_topk, mask_prob_mean, semantic_map
from promptseg.heads.mformer import (
    MFormerHead,
    gaussian_prior,
    group_attention_mask,
    id_position_embedding,
    id_scores,
    tokens_from_sums,
    unbatch,
)
from promptseg.heads.mformer_loss import SINECriterion, match_ids
from promptseg.layers.attention import cross_attention_mask
from promptseg.layers.position import sine_position_embedding
from promptseg.registry import HEADS

C, G, S, LAYERS = 32, 8, 10, 2  # tiny: dim 32, 8x8 grid, 10 queries, 2 layers


@pytest.fixture(scope="module")
def head() -> MFormerHead:
    torch.manual_seed(0)
    return MFormerHead(in_channels=24, dim=C, heads=4, ffn=64, layers=LAYERS, queries=S).eval()


def _inputs(n: int = 2, m: int = 3, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, C, G, G, generator=gen)
    return feats, torch.randn(n, C, generator=gen), torch.randn(m, C, generator=gen)


# ---------------------------------------------------------------------------------------------
# shapes and checkpoint layout


def test_registered() -> None:
    assert HEADS["mformer"] is MFormerHead


def test_output_shapes(head: MFormerHead) -> None:
    feats, ids, sems = _inputs(n=2, m=3)
    tokens = head.neck(torch.randn(2, 24, G, G))
    assert tokens.shape == (2, C, G, G)
    mfeat = head.mask_features(feats)
    assert mfeat.shape == (1, C, 4 * G, 4 * G)
    with torch.no_grad():
        out = head(feats, mfeat, ids, sems)
    expected = {
        "pred_id_logits": (1, 2, 2),
        "pred_id_masks": (1, 2, 4 * G, 4 * G),
        "pred_logits": (1, S, 4),
        "pred_masks": (1, S, 4 * G, 4 * G),
    }
    assert {k: tuple(v.shape) for k, v in out.items() if k != "aux_outputs"} == expected
    assert len(out["aux_outputs"]) == LAYERS  # stages 0..L-1; final = stage L
    for aux in out["aux_outputs"]:
        assert {k: tuple(v.shape) for k, v in aux.items()} == expected
    (item,) = unbatch(out)
    assert {k: tuple(v.shape) for k, v in item.items() if k != "aux_outputs"} == {
        k: v[1:] for k, v in expected.items()
    }
    assert len(item["aux_outputs"]) == LAYERS
    assert torch.equal(item["aux_outputs"][1]["pred_masks"], out["aux_outputs"][1]["pred_masks"][0])


def test_no_id_tokens(head: MFormerHead) -> None:
    feats, _, sems = _inputs(m=4)
    mfeat = head.mask_features(feats)
    with torch.no_grad():
        a = head(feats, mfeat, None, sems)
        b = head(feats, mfeat, torch.zeros(0, C), sems)
    assert a["pred_id_logits"].shape == (1, 0, 2) and a["pred_id_masks"].shape == (1, 0, 32, 32)
    assert a["pred_logits"].shape == (1, S, 5) and torch.isfinite(a["pred_masks"]).all()
    assert torch.equal(a["pred_masks"], b["pred_masks"])


def test_caching_paths_agree(head: MFormerHead) -> None:
    """Cached image self-attention and aux=False give the same outputs."""
    feats, ids, sems = _inputs()
    mfeat = head.mask_features(feats)
    with torch.no_grad():
        ref = head(feats, mfeat, ids, sems)
        cached = head(feats, mfeat, ids, sems, image_sa=head.image_self_attention(feats))
        lean = head(feats, mfeat, ids, sems, aux=False)
    for k in ("pred_id_logits", "pred_logits", "pred_masks"):
        torch.testing.assert_close(cached[k], ref[k], rtol=0, atol=1e-5)
        assert torch.equal(lean[k], ref[k])
    assert lean["aux_outputs"] == []


def _batch(b: int, n: int, m: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, C, G, G, generator=gen)
    return feats, torch.randn(b, n, C, generator=gen), torch.randn(b, m, C, generator=gen)


def _assert_items_equal(batched: dict, singles: list[dict]) -> None:
    """Batched output == the B = 1 outputs stacked, final and every auxiliary stage."""
    stages = [(batched, singles)] + [
        (aux, [o["aux_outputs"][i] for o in singles])
        for i, aux in enumerate(batched["aux_outputs"])
    ]
    assert len(batched["aux_outputs"]) == len(singles[0]["aux_outputs"])
    for got, ones in stages:
        for k in ("pred_id_logits", "pred_id_masks", "pred_logits", "pred_masks"):
            want = torch.cat([o[k] for o in ones])
            torch.testing.assert_close(got[k], want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [2, 0])
def test_batch_equals_single_calls_shared_tokens(head: MFormerHead, n: int) -> None:
    feats, ids, sems = _batch(3, n, 3, seed=20)
    ids, sems = ids[0], sems[0]  # [N, C], [M, C] shared by the 3 targets
    mfeat = head.mask_features(feats)
    with torch.no_grad():
        batched = head(feats, mfeat, ids if n else None, sems)
        singles = [
            head(feats[j : j + 1], mfeat[j : j + 1], ids if n else None, sems) for j in range(3)
        ]
        cached = head(feats, mfeat, ids, sems, image_sa=head.image_self_attention(feats))
    assert batched["pred_id_masks"].shape == (3, n, 4 * G, 4 * G)
    _assert_items_equal(batched, singles)
    _assert_items_equal(cached, singles)


@pytest.mark.parametrize("n", [2, 0])
def test_batch_equals_single_calls_per_item_tokens(head: MFormerHead, n: int) -> None:
    feats, ids, sems = _batch(3, n, 2, seed=21)
    mfeat = head.mask_features(feats)
    with torch.no_grad():
        batched = head(feats, mfeat, ids, sems)
        singles = [
            head(feats[j : j + 1], mfeat[j : j + 1], ids[j], sems[j], aux=True) for j in range(3)
        ]
        lean = head(feats, mfeat, ids, sems, aux=False)
    assert batched["pred_logits"].shape == (3, S, 3)
    _assert_items_equal(batched, singles)
    torch.testing.assert_close(lean["pred_masks"], batched["pred_masks"], rtol=0, atol=0)
    items = unbatch(batched)
    assert len(items) == 3
    torch.testing.assert_close(
        items[2]["pred_logits"], singles[2]["pred_logits"][0], atol=1e-5, rtol=0
    )


def _fill(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights from the state-dict keys and shapes only (sorted keys, one seeded generator)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, t in sorted(module.state_dict().items()):
            r = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            t.copy_(r / t.shape[1:].numel() ** 0.5 if t.dim() > 1 else 0.5 * r)


def test_outputs_match_stored_regression() -> None:
    """The head's numbers (float64, tiny config, 4x4 grid, N = 2, M = 3) equal those stored from
    the hand-written attention / LayerNorm2d implementation it replaced; masks are stored as a
    fixed random projection of their 16x16 pixels to keep the file at 4 KB."""
    stored = safetensors.torch.load_file(
        Path(__file__).parent / "data/mformer_tiny_outputs.safetensors"
    )
    torch.manual_seed(0)
    head = MFormerHead(in_channels=32, dim=32, heads=4, ffn=64, layers=2, queries=10).eval()
    _fill(head)
    head = head.double()
    gen = torch.Generator().manual_seed(1)
    raw = torch.randn(1, 32, 4, 4, generator=gen, dtype=torch.float64)
    ids = torch.randn(2, 32, generator=gen, dtype=torch.float64)
    sems = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    proj = torch.randn(256, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        feats = head.neck(raw)
        (out,) = unbatch(head(feats, head.mask_features(feats), ids, sems))
    stages = {"final": out} | {f"aux{i}": a for i, a in enumerate(out["aux_outputs"])}
    got = {
        f"{name}.{k}": (v.flatten(1) @ proj if k.endswith("masks") else v)
        for name, stage in stages.items()
        for k, v in stage.items()
        if k != "aux_outputs"
    }
    assert set(got) == set(stored)
    for k, v in stored.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-9, msg=k)


def _spec_shapes(L: int = 6, cin: int = 1024, d: int = 256, f: int = 2048, q: int = 200) -> dict:
    """Spec §5 keys (minus `image_encoder.` / `transformer_decoder.`) -> shapes."""
    attn = {"in_proj_weight": [3 * d, d], "in_proj_bias": [3 * d]}
    attn |= {"out_proj.weight": [d, d], "out_proj.bias": [d]}
    norm = {"norm.weight": [d], "norm.bias": [d]}
    ffn = {"linear1.weight": [f, d], "linear1.bias": [f], "linear2.weight": [d, f]}
    ffn |= {"linear2.bias": [d]} | norm

    def sub(prefix: str, params: dict) -> dict:
        return {f"{prefix}.{k}": v for k, v in params.items()}

    def sa(p: str) -> dict:
        return sub(f"{p}.transformer_self_attention_layer.self_attn", attn) | sub(
            f"{p}.transformer_self_attention_layer", norm
        )

    def ca(p: str) -> dict:
        return sub(f"{p}.transformer_cross_attention_layer.multihead_attn", attn) | sub(
            f"{p}.transformer_cross_attention_layer", norm
        )

    out = {
        "neck.0.weight": [d, cin, 1, 1],
        "neck.1.weight": [d],
        "neck.1.bias": [d],
        "neck.2.weight": [d, d, 3, 3],
        "neck.3.weight": [d],
        "neck.3.bias": [d],
        "temp": [],
        "logit_scale": [],
    }
    out |= sa("fusion_layers.0") | ca("fusion_layers.0")
    out |= sub("fusion_layers.0.transformer_ffn_layer", ffn)
    for i in range(L):
        p = f"transformer_layers.{i}"
        out |= sa(p) | ca(p)
        out |= sub(f"{p}.transformer_ffn_layer1", ffn) | sub(f"{p}.transformer_ffn_layer2", ffn)
    out |= {
        "decoder_norm.weight": [d],
        "decoder_norm.bias": [d],
        "mask_feat_layer.0.weight": [d, d // 2, 2, 2],
        "mask_feat_layer.0.bias": [d // 2],
        "mask_feat_layer.1.weight": [d // 2],
        "mask_feat_layer.1.bias": [d // 2],
        "mask_feat_layer.3.weight": [d // 2, d, 2, 2],
        "mask_feat_layer.3.bias": [d],
        "query_feat.weight": [q, d],
        "query_embed.weight": [q, d],
        "query_grained_embed.weight": [3, d],
        "neg_class_embed.weight": [1, d],
        "id_class_embed.weight": [2, d],
        "id_class_embed.bias": [2],
    }
    for i in range(3):
        out |= {f"mask_embed.layers.{i}.weight": [d, d], f"mask_embed.layers.{i}.bias": [d]}
    return out


def test_released_state_dict_matches_spec() -> None:
    full = MFormerHead()  # in 1024, dim 256, 8 heads, ffn 2048, 6 layers, 200 queries
    got = {k: list(v.shape) for k, v in full.state_dict().items()}
    want = _spec_shapes()
    assert set(got) == set(want), (sorted(set(got) - set(want)), sorted(set(want) - set(got)))
    assert got == want
    n_params = sum(p.numel() for p in full.parameters())
    assert n_params == 18_777_220  # spec §2.8: decoder 17,924,228 + neck 852,992
    assert full.temp.item() == 30.0
    assert math.isclose(full.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


# ---------------------------------------------------------------------------------------------
# attention masks


def test_group_attention_mask_layout() -> None:
    n, rest = 3, S + 4 + 1
    m = group_attention_mask(n, rest)
    assert m.dtype == torch.bool and m.shape == (n + rest, n + rest)
    assert not m[:n, :n].any() and not m[n:, n:].any()  # True = blocked
    assert m[:n, n:].all() and m[n:, :n].all()


def test_id_group_isolated_and_semantic_never_cross_attends(head: MFormerHead) -> None:
    """Changing ID query rows leaves instance + semantic rows of an M-Former layer unchanged."""
    n, m = 2, 3
    layer = head.transformer_layers[0]
    gen = torch.Generator().manual_seed(3)
    q, pos = torch.randn(1, n + S + m + 1, C, generator=gen), torch.randn(1, n + S + m + 1, C)
    mem, mem_pos = torch.randn(1, G * G, C), torch.randn(1, G * G, C)
    ca = torch.rand(1, n + S, G * G, generator=gen) > 0.5
    seen = []
    hook = layer.transformer_cross_attention_layer.multihead_attn.register_forward_pre_hook(
        lambda mod, args: seen.append(args[0].shape[1])
    )
    sa = group_attention_mask(n, S + m + 1)
    with torch.no_grad():
        a = layer(q, pos, mem, mem_pos, n + S, sa, ca)
        q2 = q.clone()
        q2[:, :n] = torch.randn(1, n, C)
        b = layer(q2, pos, mem, mem_pos, n + S, sa, ca)
        mem2 = mem + torch.randn_like(mem)  # semantic rows do not read the image
        c = layer(q, pos, mem2, mem_pos, n + S, sa, ca)
    hook.remove()
    assert seen == [n + S] * 3  # only ID + instance queries reach the cross-attention
    assert torch.equal(a[:, n:], b[:, n:]) and not torch.equal(a[:, :n], b[:, :n])
    assert torch.equal(a[:, n + S :], c[:, n + S :]) and not torch.equal(a[:, :n], c[:, :n])


def test_stage0_mask_used_by_all_layers(head: MFormerHead) -> None:
    feats, ids, sems = _inputs(n=2, m=2, seed=5)
    mfeat = head.mask_features(feats)
    captured = []
    hooks = [
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs: captured.append(kwargs["ca_mask"].clone()), with_kwargs=True
        )
        for layer in head.transformer_layers
    ]
    with torch.no_grad():
        out = head(feats, mfeat, ids, sems)
    for h in hooks:
        h.remove()
    stage0 = out["aux_outputs"][0]
    want = cross_attention_mask(
        torch.cat([stage0["pred_id_masks"], stage0["pred_masks"]], dim=1), (G, G)
    )
    assert len(captured) == LAYERS
    for mask in captured:
        assert torch.equal(mask, want)
    stage1 = out["aux_outputs"][1]  # the per-layer (Mask2Former) rule would give this one
    per_layer = cross_attention_mask(
        torch.cat([stage1["pred_id_masks"], stage1["pred_masks"]], dim=1), (G, G)
    )
    assert not torch.equal(captured[1], per_layer)


# ---------------------------------------------------------------------------------------------
# mask pooling


def test_pooling_binarises_any_positive_weight(head: MFormerHead) -> None:
    feats = torch.randn(1, C, 2, 2)  # pooling grid 8 x 8
    mask = torch.zeros(1, 16, 16)
    mask[0, 5, 9] = 1  # one pixel of a 2x downsample: bilinear weight 0.25 -> counts
    sums, counts = head.pool_sums(feats, [mask])
    assert counts[0].tolist() == [1.0]
    up = F.interpolate(feats, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(sums[0][0], up[0, :, 2, 4])
    empty = head.pool_tokens(feats, [torch.zeros(1, 16, 16)])
    assert torch.equal(empty.id_tokens, torch.zeros(1, C))  # 0 / (0 + 1e-8)


def test_pooled_sums_compose_across_shots(head: MFormerHead) -> None:
    gen = torch.Generator().manual_seed(7)
    refs = torch.randn(3, C, G, G, generator=gen)
    masks = torch.rand(3, 1, 56, 56, generator=gen) > 0.7
    sums, counts = head.pool_sums(refs, masks)  # cache: per reference mask
    for shots in ([0], [1, 2], [0, 2], [0, 1, 2]):
        joint = head.pool_tokens(refs[shots], masks[shots], ids=[torch.tensor([0])] * len(shots))
        combined = tokens_from_sums(
            sum(sums[i][0] for i in shots), sum(counts[i][0] for i in shots)
        )
        torch.testing.assert_close(joint.sem_tokens[0], combined, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(joint.id_tokens[0], combined, rtol=1e-5, atol=1e-6)
    # k-shot FSS layout: one ID token per shot, one semantic token pooled over all shots
    pt = head.pool_tokens(refs, masks, ids=[torch.tensor([i]) for i in range(3)])
    for i in range(3):
        torch.testing.assert_close(pt.id_tokens[i], tokens_from_sums(sums[i][0], counts[i][0]))
    assert pt.ids.tolist() == [0, 1, 2] and pt.classes.tolist() == [0]


def test_semantic_token_is_union_of_class_masks(head: MFormerHead) -> None:
    refs = torch.randn(1, C, G, G)
    m = torch.zeros(3, 32, 32, dtype=torch.bool)
    m[0, 2:20, 2:20], m[1, 10:30, 10:30], m[2, 0:5, 25:32] = True, True, True
    pt = head.pool_tokens(refs, [m], classes=[torch.tensor([4, 4, 9])])
    assert pt.ids.tolist() == [0, 1, 2] and pt.classes.tolist() == [4, 9]
    union = head.pool_tokens(refs, [(m[0] | m[1])[None]])
    torch.testing.assert_close(pt.sem_tokens[0], union.id_tokens[0])
    torch.testing.assert_close(pt.sem_tokens[1], pt.id_tokens[2])


# ---------------------------------------------------------------------------------------------
# positional encodings


def test_id_positional_prior_gaussian_around_argmax() -> None:
    h = w = 16
    corr = torch.full((1, 1, h * w), 0.5)
    corr[0, 0, 5 * w + 9] = 0.9
    out = gaussian_prior(corr, h, w, sigma=10.0).view(h, w)
    assert math.isclose(out[5, 9].item(), 0.9, rel_tol=1e-6)
    assert math.isclose(out[8, 13].item(), 0.5 * math.exp(-25 / 200), rel_tol=1e-5)
    assert math.isclose(out[15, 0].item(), 0.5 * math.exp(-(100 + 81) / 200), rel_tol=1e-5)
    # a very sharp softmax turns the ID PE into the image PE of the best-matching cell
    image = torch.randn(1, h * w, 8)
    pe = sine_position_embedding(h, w, 8)[None]
    query = image[:, [3 * w + 7]] * 2.0
    got = id_position_embedding(query, image, pe, torch.tensor(1e4), (h, w))
    torch.testing.assert_close(got[0, 0], pe[0, 3 * w + 7], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# inference numerics


def test_semantic_map_formula_and_can_exceed_one() -> None:
    logits = torch.tensor([[5.0, 0.0, -5.0]] * 4)  # 4 queries, M = 2
    masks = torch.full((4, 3, 3), 6.0)
    sem = semantic_map(logits, masks)
    p = logits.softmax(-1)[:, :-1]
    assert sem.shape == (2, 3, 3)
    torch.testing.assert_close(sem[:, 0, 0], (p * torch.sigmoid(torch.tensor(6.0))).sum(0))
    assert sem[0].min() > 1.0  # a sum over queries, not a probability


def test_instance_and_id_scores() -> None:
    logits = torch.tensor([[0.0, 3.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 4.0]])  # S=3, M=2
    masks = torch.tensor(
        [[[1.0, -1.0], [2.0, -3.0]], [[-1.0, -1.0], [-2.0, -3.0]], [[4.0] * 2] * 2]
    )
    scores, classes, query, top_masks = instance_topk(logits, masks, k=3)
    probs = logits.softmax(-1)[:, :-1]
    # ranked over all S*M pairs: (q0, c1) .91 > (q1, c0) .79 > (q1, c1) .11 > ...
    assert query.tolist() == [0, 1, 1] and classes.tolist() == [1, 0, 1]
    mean0 = (torch.sigmoid(torch.tensor(1.0)) + torch.sigmoid(torch.tensor(2.0))) / (2 + 1e-6)
    torch.testing.assert_close(scores[0], probs[0, 1] * mean0)
    assert scores[1] == 0  # no positive pixel -> mask mean 0 (eps 1e-6)
    assert torch.equal(top_masks, masks[query])
    assert torch.equal(mask_prob_mean(masks)[1], torch.tensor(0.0))
    upsized = instance_topk(logits, masks, k=2, resize=lambda m: m.repeat_interleave(2, -1))[3]
    assert upsized.shape == (2, 2, 4)

    id_logits = torch.tensor([[1.0, 0.0], [-1.0, 2.0]])
    torch.testing.assert_close(
        id_scores(id_logits, masks[:2]), id_logits.softmax(-1)[:, 0] * mask_prob_mean(masks[:2])
    )


# ---------------------------------------------------------------------------------------------
# ID matching and criterion


def test_id_matching_by_identity() -> None:
    src, tgt = match_ids(torch.tensor([10, 11, 12]), torch.tensor([11, 10, 13]))
    assert src.tolist() == [0, 1] and tgt.tolist() == [1, 0]
    src, tgt = match_ids(torch.tensor([], dtype=torch.long), torch.tensor([1]))
    assert src.numel() == tgt.numel() == 0


def _toy_target() -> dict:
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[0, 4:30, 4:30], masks[1, 36:60, 20:56] = True, True
    return {
        "labels": torch.tensor([0, 1]),
        "masks": masks,
        "ids": torch.tensor([7, 3]),
        "ref_ids": torch.tensor([3, 5]),
    }


def test_criterion_keys_and_finite(head: MFormerHead) -> None:
    feats, ids, sems = _inputs(n=2, m=2, seed=9)
    out = head(feats, head.mask_features(feats), ids, sems)
    crit = SINECriterion(num_points=256)
    losses = crit(out, _toy_target(), generator=torch.Generator().manual_seed(0))
    base = ["loss_ce_ins", "loss_ce_id", "loss_mask", "loss_dice"]
    assert set(losses) == set(base) | {f"{k}_{i}" for k in base for i in range(LAYERS)}
    assert all(torch.isfinite(v) for v in losses.values())
    # FSOD-style: no ID tokens at all still gives finite losses
    out0 = head(feats, head.mask_features(feats), None, sems)
    tgt0 = {k: v for k, v in _toy_target().items() if k != "ref_ids"}
    losses0 = crit(out0, tgt0, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses0.values()) and losses0["loss_ce_id"] == 0


def test_criterion_takes_a_batch(head: MFormerHead) -> None:
    """One target dict per batch item; ID CE runs over the batch's ID queries concatenated."""
    feats, ids, sems = _batch(2, 2, 2, seed=22)
    with torch.no_grad():
        out = head(feats, head.mask_features(feats), ids, sems)
    crit = SINECriterion(num_points=256)
    target = _toy_target()  # ref_ids [3, 5] vs ids [7, 3]: ID query 0 matched, 1 not
    losses = crit(out, [target, target], generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses.values()) and len(losses) == 4 * (LAYERS + 1)
    want = F.cross_entropy(
        out["pred_id_logits"].flatten(0, 1), torch.tensor([0, 1, 0, 1]), torch.tensor([1.0, 0.1])
    )
    torch.testing.assert_close(losses["loss_ce_id"], 2.0 * want)
    with pytest.raises(ValueError, match="one per batch item"):
        crit(out, target)


def test_few_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    head = MFormerHead(in_channels=8, dim=C, heads=4, ffn=64, layers=LAYERS, queries=S)
    tokens = torch.randn(2, 8, G, G)  # [target, reference]
    target = _toy_target()
    crit = SINECriterion(num_points=256)
    opt = torch.optim.AdamW(head.parameters(), lr=2e-3)

    def loss() -> torch.Tensor:
        f = head.neck(tokens)
        pt = head.pool_tokens(
            f[1:], [target["masks"]], ids=[torch.tensor([3, 5])], classes=[torch.tensor([0, 1])]
        )
        out = head(f[:1], head.mask_features(f[:1]), pt.id_tokens, pt.sem_tokens)
        return sum(crit(out, target, generator=torch.Generator().manual_seed(0)).values())

    first = loss()
    for _ in range(8):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert torch.isfinite(first) and loss().item() < 0.8 * first.item()
