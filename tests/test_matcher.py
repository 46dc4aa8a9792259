"""Hungarian matcher and point-sampled mask losses (promptseg.layers.matching)."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from promptseg.layers.matching import (
    HungarianMatcher,
    batch_dice,
    dice_loss,
    point_sample,
    sigmoid_ce_loss,
)


def _halves(size: int = 32) -> torch.Tensor:
    """Two disjoint GT masks [2, size, size]: left half, right half."""
    gts = torch.zeros(2, size, size, dtype=torch.bool)
    gts[0, :, : size // 2], gts[1, :, size // 2 :] = True, True
    return gts


def _fit(gts: torch.Tensor, size: int = 8, margin: float = 6.0) -> torch.Tensor:
    """Mask logits [K, size, size] that fit `gts` (+margin inside, -margin outside)."""
    area = F.interpolate(gts[:, None].float(), size=(size, size), mode="area")[:, 0]
    return (2 * area - 1) * margin


# ---------------------------------------------------------------------------------------------
# class cost


def test_cost_matrix_by_hand() -> None:
    """Zero mask logits and empty GT masks sample exactly (zeros), so every term is known:
    BCE(0, 0) = log 2, dice = 1 - 1 / (P/2 + 1), class = -softmax prob of the GT label."""
    p = 16
    matcher = HungarianMatcher(cost_class=3.0, cost_mask=0.5, cost_dice=2.0, num_points=p)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # S = 2, K = 2 (+ no-object)
    labels = torch.tensor([1, 0, 1])  # T = 3
    cost = matcher.cost_matrix(logits, torch.zeros(2, 8, 8), labels, torch.zeros(3, 32, 32))
    mask_terms = 0.5 * math.log(2) + 2.0 * (1 - 1 / (p / 2 + 1))
    for s, t in itertools.product(range(2), range(3)):
        row = [math.exp(v) for v in logits[s].tolist()]
        prob = row[labels[t]] / sum(row)
        assert math.isclose(cost[s, t].item(), mask_terms - 3.0 * prob, rel_tol=1e-6), (s, t)


def test_class_cost_is_minus_weight_times_probability() -> None:
    """cost(w) - cost(0) = -w x softmax prob of the GT label, on the same points."""
    gen = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(5, 4, generator=gen), torch.randn(5, 8, 8, generator=gen)
    labels, gts = torch.tensor([2, 0, 2]), torch.rand(3, 32, 32, generator=gen) > 0.5

    def cost(w: float) -> torch.Tensor:
        matcher = HungarianMatcher(cost_class=w, num_points=128)
        return matcher.cost_matrix(logits, masks, labels, gts, torch.Generator().manual_seed(1))

    want = -2.5 * logits.softmax(-1)[:, labels]
    torch.testing.assert_close(cost(2.5) - cost(0.0), want, rtol=0, atol=1e-5)


def test_class_decides_between_identical_masks() -> None:
    """Two queries with the same mask: each goes to the target whose class it predicts."""
    gts = _halves()
    shared = torch.zeros(8, 8)  # uninformative, identical for both queries
    masks = shared.expand(2, 8, 8).clone()
    logits = torch.tensor([[-4.0, 4.0, 0.0], [4.0, -4.0, 0.0]])  # q0: class 1, q1: class 0
    rows, cols = HungarianMatcher(num_points=256)(logits, masks, torch.tensor([0, 1]), gts)
    assert dict(zip(rows.tolist(), cols.tolist(), strict=True)) == {0: 1, 1: 0}
    # one target of class 0: the query that predicts class 0 wins it
    rows, cols = HungarianMatcher(num_points=256)(logits, masks, torch.tensor([0]), gts[:1])
    assert rows.tolist() == [1] and cols.tolist() == [0]


def test_class_weight_trades_off_against_masks() -> None:
    """Masks favour q_t -> t, classes the swap; the class weight decides which wins."""
    gts = _halves()
    masks = _fit(gts)  # q0 fits t0, q1 fits t1
    logits = torch.tensor([[-4.0, 4.0, 0.0], [4.0, -4.0, 0.0]])  # q0: class 1, q1: class 0
    labels = torch.tensor([0, 1])

    def assignment(w: float) -> dict[int, int]:
        matcher = HungarianMatcher(cost_class=w, cost_mask=1.0, cost_dice=1.0, num_points=512)
        rows, cols = matcher(logits, masks, labels, gts, torch.Generator().manual_seed(0))
        return dict(zip(rows.tolist(), cols.tolist(), strict=True))

    assert assignment(0.5) == {0: 0, 1: 1}
    assert assignment(100.0) == {0: 1, 1: 0}


# ---------------------------------------------------------------------------------------------
# assignment and mask terms


def test_matcher_is_optimal() -> None:
    gen = torch.Generator().manual_seed(11)
    matcher = HungarianMatcher(num_points=256)
    logits, masks = torch.randn(5, 3, generator=gen), torch.randn(5, 8, 8, generator=gen)
    labels, gts = torch.tensor([0, 1, 1]), torch.rand(3, 32, 32, generator=gen) > 0.5
    cost = matcher.cost_matrix(logits, masks, labels, gts, torch.Generator().manual_seed(1))
    rows, cols = matcher(logits, masks, labels, gts, torch.Generator().manual_seed(1))
    best = min(
        sum(cost[r, c].item() for r, c in zip(perm, range(3), strict=True))
        for perm in itertools.permutations(range(5), 3)
    )
    assert len(rows) == 3 and math.isclose(cost[rows, cols].sum().item(), best, rel_tol=1e-6)


def test_matcher_recovers_planted_assignment() -> None:
    gts = torch.zeros(3, 32, 32, dtype=torch.bool)
    gts[0, :10], gts[1, 12:22], gts[2, 24:] = True, True, True
    order = [4, 0, 2]  # query order[t] predicts target t
    masks = torch.full((6, 8, 8), -8.0)
    logits = torch.zeros(6, 3)
    for t, q in enumerate(order):
        masks[q] = _fit(gts[t : t + 1], margin=8.0)[0]
        logits[q, t % 2] = 5.0
    rows, cols = HungarianMatcher(num_points=512)(logits, masks, torch.tensor([0, 1, 0]), gts)
    assert dict(zip(cols.tolist(), rows.tolist(), strict=True)) == {0: 4, 1: 0, 2: 2}
    # dice cost ~0 for a perfect pair
    pts = torch.rand(1, 64, 2)
    p, t = point_sample(masks[None, [4]] * 10, pts)[0], point_sample(gts[None, [0]].float(), pts)[0]
    assert batch_dice(p, t).item() < 0.05


def test_point_losses_by_hand() -> None:
    """Logit 0 against all-ones targets: BCE log 2; dice 1 - (P + 1) / (1.5 P + 1)."""
    p = 10
    inputs, targets = torch.zeros(3, p), torch.ones(3, p)
    assert math.isclose(
        sigmoid_ce_loss(inputs, targets, 2.0).item(), 3 * math.log(2) / 2, rel_tol=1e-6
    )
    assert math.isclose(
        dice_loss(inputs, targets, 2.0).item(), 3 * (1 - (p + 1) / (1.5 * p + 1)) / 2, rel_tol=1e-6
    )
