"""CLIPSeg's fixed-interval metrics, pure numpy.

Per sample, tp/fp/fn/tn are counted at the 49 thresholds `np.linspace(0, 1, 51)[1:-1]` with a strict
`p > t`. From the int64 sums: IoU_FG, per-"class" mIoU and IoU_BIN (all with +1 in every
denominator), and AP integrated with SciPy < 1.11's Simpson rule (`even='avg'`), re-implemented here
as `simpson_avg`.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from ._arrays import as_binary, as_int, as_numeric, to_numpy

__all__ = [
    "FixedIntervalMetrics",
    "THRESHOLDS",
    "resize_bilinear_align_corners",
    "sigmoid",
    "simpson_avg",
]

#: The reference's threshold grid 0.02, 0.04, ..., 0.98 (49 float64 values, as np.linspace gives).
THRESHOLDS: np.ndarray = np.linspace(0, 1, 51)[1:-1]

# The reference's probability maps are float32 torch tensors, and torch compares a float32 tensor
# with a float64 threshold in float32; so maps and thresholds are compared in float32 here too.
_DTYPE = np.float32


def sigmoid(x: Any) -> np.ndarray:
    """Logistic function in float32, 1 / (1 + exp(-x)) as torch.sigmoid computes it on fp32 logits.

    numpy's and torch's float32 exp differ in the last bit for some inputs, so values can differ by
    1 ulp from torch; for bit-parity pass torch's own sigmoid output with `sigmoid=False`.
    """
    z = as_numeric(x, "x").astype(_DTYPE)
    with np.errstate(over="ignore"):
        return (_DTYPE(1) / (_DTYPE(1) + np.exp(-z))).astype(_DTYPE)


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of 1-D linear interpolation, align_corners=True (torch CPU)."""
    scale = _DTYPE(n_in - 1) / _DTYPE(n_out - 1) if n_out > 1 else _DTYPE(0)
    src = scale * np.arange(n_out, dtype=_DTYPE)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    w1 = np.clip(src - i0.astype(_DTYPE), 0, 1).astype(_DTYPE)
    w0 = (_DTYPE(1) - w1).astype(_DTYPE)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, w0, w1


def _fma_lerp(a0: np.ndarray, w0: np.ndarray, a1: np.ndarray, w1: np.ndarray) -> np.ndarray:
    """float32 a0*w0 + a1*w1 as fma(a0, w0, a1*w1), the order torch's CPU kernel compiles to.

    The fused multiply-add is emulated in float64 (a float32 product is exact there).
    """
    b = (a1 * w1).astype(_DTYPE)
    return (a0.astype(np.float64) * w0 + b).astype(_DTYPE)


def resize_bilinear_align_corners(x: Any, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes to `size` = (H, W) with align_corners=True, in float32.

    Same sampling rule and arithmetic order as torch's CPU `interpolate(mode='bilinear',
    align_corners=True)`, which CLIPSeg's evaluation applies to the sigmoid map before thresholding:
    bit-identical to torch 2.x on x86 for e.g. 88 -> 352, within 1 ulp otherwise. Leading axes are
    kept.
    """
    a = as_numeric(x, "x").astype(_DTYPE)
    if a.ndim < 2 or 0 in a.shape[-2:]:
        raise ValueError(f"expected a non-empty array [..., H, W] (H, W >= 1), got shape {a.shape}")
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size)
        or min(size) < 1
    ):
        raise ValueError(f"size must be (H, W), two ints >= 1, got {size!r}")
    h_out, w_out = int(size[0]), int(size[1])
    r0, r1, hw0, hw1 = _linear_taps(a.shape[-2], h_out)
    c0, c1, ww0, ww1 = _linear_taps(a.shape[-1], w_out)
    top = a[..., r0, :]
    bot = a[..., r1, :]
    top = _fma_lerp(top[..., c0], ww0, top[..., c1], ww1)
    bot = _fma_lerp(bot[..., c0], ww0, bot[..., c1], ww1)
    return _fma_lerp(top, hw0[:, None], bot, hw1[:, None])


def _simpson_basic(y: np.ndarray, x: np.ndarray, start: int, stop: int) -> float:
    """Composite Simpson over panels k = start, start+2, ... < stop; division by 0 gives 0."""
    k = np.arange(start, stop, 2)
    if k.size == 0:
        return 0.0
    h = np.diff(x)
    h0, h1 = h[k], h[k + 1]
    hsum = h0 + h1
    hprod = h0 * h1
    r = np.divide(h0, h1, out=np.zeros_like(h0), where=h1 != 0)
    inv_r = np.divide(1.0, r, out=np.zeros_like(r), where=r != 0)
    mid = hsum * np.divide(hsum, hprod, out=np.zeros_like(hsum), where=hprod != 0)
    terms = hsum / 6.0 * (y[k] * (2.0 - inv_r) + y[k + 1] * mid + y[k + 2] * (2.0 - r))
    return float(np.sum(terms))


def simpson_avg(y: Any, x: Any) -> float:
    """Integral of y over x as SciPy < 1.11 `simps(y, x)` (even='avg') computed it for CLIPSeg's AP.

    Odd N: composite Simpson. Even N: mean of (Simpson on the first N-1 points + trapezoid on the
    last interval) and (trapezoid on the first interval + Simpson on the last N-1 points). N = 0 or
    1 gives 0. SciPy >= 1.11 changed the even-N rule and 1.14 removed `simps`, hence this
    re-implementation.
    """
    yy = np.asarray(y, dtype=np.float64).ravel()
    xx = np.asarray(x, dtype=np.float64).ravel()
    if yy.shape != xx.shape:
        raise ValueError("x and y must have the same length")
    n = yy.size
    if n < 2:
        return 0.0
    if n % 2 == 1:
        return _simpson_basic(yy, xx, 0, n - 2)
    trap_last = 0.5 * (xx[-1] - xx[-2]) * (yy[-1] + yy[-2])
    trap_first = 0.5 * (xx[1] - xx[0]) * (yy[1] + yy[0])
    simpson_part = _simpson_basic(yy, xx, 0, n - 3) + _simpson_basic(yy, xx, 1, n - 2)
    return simpson_part / 2.0 + (trap_last + trap_first) / 2.0


def _iou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """CLIPSeg's smoothed IoU tp / (1 + tp + fp + fn), elementwise."""
    return tp / (1 + tp + fp + fn)


class FixedIntervalMetrics:
    """Accumulates CLIPSeg's per-threshold tp/fp/fn/tn (int64); derives IoU_FG, mIoU, IoU_BIN, AP.

    `update` takes probabilities (or logits with `sigmoid=True`) and a binary GT. With
    `resize_pred=True` the probability map is resized bilinearly (align_corners=True, numpy
    implementation in this module) to the GT size after the sigmoid, as the reference does;
    otherwise shapes must already match. Maps are compared with the thresholds in float32, like the
    reference's torch tensors.
    """

    def __init__(
        self, sigmoid: bool = False, resize_pred: bool = False, n_values: int = 51
    ) -> None:
        if as_int(n_values, "n_values") < 3:
            raise ValueError(f"n_values must be >= 3, got {n_values}")
        self.sigmoid = bool(sigmoid)
        self.resize_pred = bool(resize_pred)
        self.n_values = int(n_values)
        self.thresholds: np.ndarray = np.linspace(0, 1, self.n_values)[1:-1]
        self._thr = self.thresholds.astype(_DTYPE)
        n_t = self.thresholds.size
        #: Summed counts over all samples, shape [T, 4], columns tp, fp, fn, tn.
        self.total = np.zeros((n_t, 4), dtype=np.int64)
        self._class_ids: list[Hashable] = []
        self._class_index: dict[Hashable, int] = {}
        self._class_counts: list[np.ndarray] = []
        self._sample_counts: list[np.ndarray] = []
        #: Number of samples added.
        self.n_samples = 0

    # ------------------------------------------------------------------ accumulation

    def sample_counts(self, pred: Any, gt: Any, ignore: Any | None = None) -> np.ndarray:
        """Counts of one sample, int64 [T, 4] (tp, fp, fn, tn per threshold), not accumulated."""
        p = as_numeric(pred, "pred")
        if self.sigmoid:
            p = sigmoid(p)
        p = p.astype(_DTYPE, copy=False)
        if np.isnan(p).any():
            raise ValueError("pred contains NaN")
        if not self.sigmoid and p.size and (p.min() < 0 or p.max() > 1):
            raise ValueError(
                f"pred values must be probabilities in [0, 1], got {p.min()}..{p.max()}; "
                "pass sigmoid=True for logits"
            )
        g = as_binary(gt, "gt")
        if p.shape != g.shape:
            if not self.resize_pred:
                raise ValueError(
                    f"pred shape {p.shape} != gt shape {g.shape} (use resize_pred=True)"
                )
            if p.ndim != 2 or g.ndim != 2:
                raise ValueError("resize_pred needs 2-D pred and gt")
            p = resize_bilinear_align_corners(p, g.shape)
        if ignore is not None:
            ign = as_binary(ignore, "ignore")
            if ign.shape != g.shape:
                raise ValueError(f"ignore shape {ign.shape} != gt shape {g.shape}")
            keep = ~ign
            p, g = p[keep], g[keep]
        pos = np.sort(p[g], axis=None)
        neg = np.sort(p[~g], axis=None)
        # Number of values > t = n - (number <= t); strict comparison as in the reference.
        tp = pos.size - np.searchsorted(pos, self._thr, side="right")
        fp = neg.size - np.searchsorted(neg, self._thr, side="right")
        fn = pos.size - tp
        tn = neg.size - fp
        return np.stack([tp, fp, fn, tn], axis=1).astype(np.int64)

    def update(
        self,
        pred: Any,
        gt: Any,
        class_id: Hashable | None = None,
        ignore: Any | None = None,
    ) -> None:
        """Add one sample: probability (or logit) map `pred`, binary `gt`, optional `ignore` mask.

        `class_id` groups samples for mIoU (Pascal/COCO: the episode class). None makes the sample a
        class of its own, which is PhraseCut's convention (mIoU = mean per-phrase IoU).
        """
        counts = self.sample_counts(pred, gt, ignore)
        self._add(counts, class_id)

    def update_batch(
        self,
        preds: Any,
        gts: Any,
        class_ids: Sequence[Hashable | None] | None = None,
        ignores: Any | None = None,
    ) -> None:
        """Add a batch [B, H, W] sample by sample (same rules as `update`)."""
        p = to_numpy(preds)
        g = to_numpy(gts)
        if p.ndim < 1 or g.ndim < 1:
            raise ValueError(f"expected batches [B, H, W], got shapes {p.shape} and {g.shape}")
        if len(p) != len(g):
            raise ValueError("preds and gts have different batch sizes")
        ids = [None] * len(p) if class_ids is None else list(class_ids)
        if len(ids) != len(p):
            raise ValueError("class_ids length differs from the batch size")
        ign = [None] * len(p) if ignores is None else to_numpy(ignores)
        for i in range(len(p)):
            self.update(p[i], g[i], ids[i], ign[i])

    def _add(self, counts: np.ndarray, class_id: Hashable | None) -> None:
        try:
            hash(class_id)
        except TypeError:
            raise TypeError(f"class_id must be hashable (int or str), got {class_id!r}") from None
        self.total += counts
        self.n_samples += 1
        if class_id is None:
            self._sample_counts.append(counts)
            return
        if isinstance(class_id, np.generic):
            class_id = class_id.item()
        k = self._class_index.get(class_id)
        if k is None:
            self._class_index[class_id] = len(self._class_ids)
            self._class_ids.append(class_id)
            self._class_counts.append(counts.copy())
        else:
            self._class_counts[k] += counts

    # ------------------------------------------------------------------ curves over thresholds

    def _group_counts(self) -> np.ndarray:
        """Counts per mIoU group [G, T, 4]: explicit classes first, then anonymous samples."""
        groups = self._class_counts + self._sample_counts
        if not groups:
            return np.zeros((0, self.thresholds.size, 4), dtype=np.int64)
        return np.stack(groups)

    def fg_iou(self) -> np.ndarray:
        """IoU_FG per threshold: TP / (1 + TP + FP + FN) on the summed counts (cumulative IoU)."""
        tp, fp, fn, _ = self.total.T
        return _iou(tp, fp, fn)

    def bin_iou(self) -> np.ndarray:
        """IoU_BIN per threshold: mean of the smoothed foreground and background IoU."""
        tp, fp, fn, tn = self.total.T
        return 0.5 * _iou(tp, fp, fn) + 0.5 * _iou(tn, fn, fp)

    def mean_iou(self) -> np.ndarray:
        """mIoU per threshold: mean over classes of TP_c / (1 + TP_c + FP_c + FN_c), NaN if none."""
        g = self._group_counts()
        if g.shape[0] == 0:
            return np.full(self.thresholds.size, np.nan)
        return _iou(g[..., 0], g[..., 1], g[..., 2]).mean(axis=0)

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """(recall, precision, ties): unique pairs of thresholds with TP + FP > 0, sorted by recall.

        Pairs with equal recall are ordered by precision ascending (the reference leaves this to set
        order); `ties` says whether that happened, in which case AP may differ from the reference in
        rare cases.
        """
        tp, fp, fn, _ = self.total.T
        made = (tp + fp) > 0
        prec = tp[made] / (1 + tp[made] + fp[made])
        rec = tp[made] / (1 + tp[made] + fn[made])
        pairs = sorted(set(zip(rec.tolist(), prec.tolist(), strict=True)))
        if not pairs:
            return np.zeros(0), np.zeros(0), False
        r = np.array([q[0] for q in pairs])
        p = np.array([q[1] for q in pairs])
        ties = bool(np.any(np.diff(r) == 0))
        return r, p, ties

    def ap(self) -> float:
        """Area under the PR curve by the old SciPy Simpson rule (0.0 if nothing is predicted)."""
        r, p, _ = self.pr_curve()
        return simpson_avg(p, r)

    # ------------------------------------------------------------------ summaries

    def _index_of(self, t: float) -> int:
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise TypeError(f"threshold must be a number, got {t!r}")
        hits = np.flatnonzero(np.abs(self.thresholds - float(t)) < 1e-9)
        if hits.size == 0:
            raise ValueError(
                f"threshold {t} is not on the grid {self.thresholds[0]}..{self.thresholds[-1]}"
            )
        return int(hits[0])

    def value_at(self, t: float) -> dict[str, float]:
        """IoU_FG, mIoU and IoU_BIN at a fixed grid threshold t (paper settings: 0.3 or 0.1)."""
        i = self._index_of(t)
        return {
            "threshold": float(self.thresholds[i]),
            "fgiou": float(self.fg_iou()[i]),
            "miou": float(self.mean_iou()[i]),
            "biniou": float(self.bin_iou()[i]),
        }

    def best(self) -> dict[str, float | bool]:
        """ORACLE numbers: each metric's maximum over thresholds and the first threshold for it.

        The threshold is chosen on the evaluated data itself, so these are not fair test numbers;
        the dict carries `oracle: True` so reports can label them.
        """
        out: dict[str, float | bool] = {"oracle": True}
        for name, curve in (
            ("fgiou", self.fg_iou()),
            ("miou", self.mean_iou()),
            ("biniou", self.bin_iou()),
        ):
            if np.all(np.isnan(curve)):
                out[f"{name}_best"] = float("nan")
                out[f"{name}_best_t"] = float("nan")
                continue
            i = int(np.nanargmax(curve))
            out[f"{name}_best"] = float(curve[i])
            out[f"{name}_best_t"] = float(self.thresholds[i])
        return out

    def compute(self, thresholds: Sequence[float] = (0.1, 0.2, 0.3, 0.5)) -> dict[str, Any]:
        """All summary numbers (fractions): ap, ap_ties, <metric>_<t> per fixed t, oracle bests."""
        _, _, ties = self.pr_curve()
        res: dict[str, Any] = {"ap": self.ap(), "ap_ties": ties, "n_samples": self.n_samples}
        for t in thresholds:
            v = self.value_at(t)
            for name in ("fgiou", "miou", "biniou"):
                res[f"{name}_{t:g}"] = v[name]
        res.update(self.best())
        return res

    # ------------------------------------------------------------------ raw accumulators

    def state_dict(self) -> dict[str, Any]:
        """Raw int64 counts: totals [T, 4], per class [C, T, 4], per anonymous sample [N, T, 4]."""
        n_t = self.thresholds.size
        return {
            "n_values": self.n_values,
            "sigmoid": self.sigmoid,
            "resize_pred": self.resize_pred,
            "n_samples": self.n_samples,
            "total": self.total.copy(),
            "class_ids": list(self._class_ids),
            "class_counts": np.array(self._class_counts, dtype=np.int64).reshape(-1, n_t, 4),
            "sample_counts": np.array(self._sample_counts, dtype=np.int64).reshape(-1, n_t, 4),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace all accumulators by those of `state` (the threshold grid must match)."""
        if int(state["n_values"]) != self.n_values:
            raise ValueError("state n_values differs from this evaluator's")
        n_t = self.thresholds.size
        total = np.asarray(state["total"], dtype=np.int64).reshape(n_t, 4)
        cc = np.asarray(state["class_counts"], dtype=np.int64).reshape(-1, n_t, 4)
        sc = np.asarray(state["sample_counts"], dtype=np.int64).reshape(-1, n_t, 4)
        ids = [c.item() if isinstance(c, np.generic) else c for c in state["class_ids"]]
        if len(ids) != cc.shape[0] or len(set(ids)) != len(ids):
            raise ValueError("class_ids do not match class_counts")
        self.total = total.copy()
        self._class_ids = ids
        self._class_index = {c: i for i, c in enumerate(ids)}
        self._class_counts = [a.copy() for a in cc]
        self._sample_counts = [a.copy() for a in sc]
        self.n_samples = int(state["n_samples"])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> FixedIntervalMetrics:
        """Build an evaluator holding the accumulators of `state`."""
        ev = cls(
            bool(state.get("sigmoid", False)),
            bool(state.get("resize_pred", False)),
            int(state["n_values"]),
        )
        ev.load_state_dict(state)
        return ev

    def merge(self, other: FixedIntervalMetrics) -> FixedIntervalMetrics:
        """Add another shard's counts into self (equal class ids are summed, samples appended)."""
        if other.n_values != self.n_values:
            raise ValueError("cannot merge metrics with different threshold grids")
        self.total += other.total
        for cid, counts in zip(other._class_ids, other._class_counts, strict=True):
            k = self._class_index.get(cid)
            if k is None:
                self._class_index[cid] = len(self._class_ids)
                self._class_ids.append(cid)
                self._class_counts.append(counts.copy())
            else:
                self._class_counts[k] += counts
        self._sample_counts.extend(c.copy() for c in other._sample_counts)
        self.n_samples += other.n_samples
        return self
