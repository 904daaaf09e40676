"""Shared test fixtures. Tests run on CPU with tiny models; real-audio tests use ../shared/data
(relative to the repository, or $FINELAP_SHARED_DATA, e.g. from a git worktree elsewhere) and
skip with a reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FINELAP_NO_PROGRESS", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
ESC50 = Path(os.environ.get("FINELAP_SHARED_DATA") or REPO.parent / "shared" / "data") / "esc50-dev"


@pytest.fixture(scope="session")
def esc50_dir() -> Path:
    """The real ESC-50 subset shipped to developers; users and CI elsewhere may not have it."""
    if not (ESC50 / "meta" / "esc50.csv").exists():
        pytest.skip(f"real ESC-50 data not found at {ESC50} (only present on the developers' machines)")
    return ESC50


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def record_statistics_sizes(monkeypatch, module) -> list[int]:
    """Wrap sed_scores_eval's `module.statistics_fn` (intersection- or collar-based) so each call's
    number of candidate detections is appended to the returned list: the size of the arrays the
    statistics see, which bounded-memory paths must keep small."""
    seen: list[int] = []
    original = module.statistics_fn

    def recording(**kw):
        seen.append(kw["detection_onset_times"].size)
        return original(**kw)

    monkeypatch.setattr(module, "statistics_fn", recording)
    return seen


@pytest.fixture
def saved_figures(monkeypatch) -> list:
    """Every matplotlib Figure saved while the test runs, in order: what a written PNG shows can
    then be read from its axes (lines, bars, images, labels) instead of from PNG bytes."""
    from matplotlib.figure import Figure

    saved: list = []
    original = Figure.savefig

    def recording(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return saved
