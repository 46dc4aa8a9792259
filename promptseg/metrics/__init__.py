"""One metric implementation per benchmark family, numerically identical to the reference tools.

Pure numpy with integer accumulators (pycocotools for COCO AP). Units follow each reference tool:
few-shot mIoU / FB-IoU, semantic mIoU and COCO AP in percent; PQ, DAVIS J/F and CLIPSeg's
fixed-interval metrics as fractions.
"""

from . import clipseg, coco_ap, davis, fss, panoptic, perseg, semseg
from .clipseg import FixedIntervalMetrics
from .coco_ap import coco_mask_ap
from .davis import evaluate_davis, f_measure, j_measure
from .fss import FewShotSegEvaluator
from .panoptic import PQStat, pq_compute
from .perseg import PerSegEvaluator, evaluate_perseg
from .semseg import SemSegEvaluator

__all__ = [
    "FewShotSegEvaluator",
    "FixedIntervalMetrics",
    "PQStat",
    "PerSegEvaluator",
    "SemSegEvaluator",
    "clipseg",
    "coco_ap",
    "coco_mask_ap",
    "davis",
    "evaluate_davis",
    "evaluate_perseg",
    "f_measure",
    "fss",
    "j_measure",
    "panoptic",
    "perseg",
    "pq_compute",
    "semseg",
]
