"""Evaluation: pure metrics (`metrics`), evaluators and reports.

Importing this package is cheap: `metrics` needs only numpy at import time; sed_scores_eval,
scipy and pandas are imported inside the functions that use them.
"""
from __future__ import annotations

from .metrics import (
    GROUNDING_PSDS_PARAMS,
    PSDS1_PARAMS,
    PSDS2_PARAMS,
    PSDSResult,
    average_precision,
    binarize_and_segment,
    classification_metrics,
    collar_f1,
    frame_auroc,
    grounding_metrics,
    median_filter_seconds,
    psds,
    psds1,
    psds2,
    retrieval_metrics,
    retrieval_ranks,
    roc_auc,
    scores_to_dataframe,
    sed_frame_auroc,
    segment_f1,
)

__all__ = [
    "GROUNDING_PSDS_PARAMS",
    "PSDS1_PARAMS",
    "PSDS2_PARAMS",
    "PSDSResult",
    "average_precision",
    "binarize_and_segment",
    "classification_metrics",
    "collar_f1",
    "frame_auroc",
    "grounding_metrics",
    "median_filter_seconds",
    "psds",
    "psds1",
    "psds2",
    "retrieval_metrics",
    "retrieval_ranks",
    "roc_auc",
    "scores_to_dataframe",
    "sed_frame_auroc",
    "segment_f1",
]
