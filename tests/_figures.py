"""What a written figure shows, for plot tests: the PNG read back (a real picture of a sane size,
not a blank canvas) and the matplotlib Figure that was saved (see the `saved_figures` fixture in
conftest.py), whose axes hold the data drawn. A test of a plot checks these, not file bytes."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png_picture(path: str | Path, min_side: int = 100) -> np.ndarray:
    """Read the PNG at `path` back and check it is a picture: at least `min_side` pixels each way
    and not one flat colour. Returns its pixels (H, W, C) in [0, 1]."""
    import matplotlib.image as mpimg

    path = Path(path)
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    img = mpimg.imread(str(path))
    assert img.ndim == 3 and min(img.shape[:2]) >= min_side, f"{path}: image of shape {img.shape}"
    assert img[..., :3].std() > 0.01, f"{path}: a blank canvas"
    return img


def axes_titled(fig: Any, title: str) -> Any:
    """The one axes of `fig` whose title (centre or left) starts with `title`."""
    found = [ax for ax in fig.axes if any(ax.get_title(loc=loc).startswith(title) for loc in ("center", "left"))]
    assert len(found) == 1, f"{len(found)} axes titled {title!r}: {[ax.get_title() for ax in fig.axes]}"
    return found[0]


def tick_labels(ax: Any, axis: str = "y") -> list[str]:
    ticks = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    return [t.get_text() for t in ticks]


def texts(ax: Any) -> list[str]:
    return [t.get_text() for t in ax.texts]


def score_curves(fig: Any) -> dict[str, np.ndarray]:
    """{legend label: (T,) values} of the per-query score steps of a timeline figure (`fig.axes[1]`)."""
    from matplotlib.patches import StepPatch

    return {p.get_label(): np.asarray(p.get_data()[0]) for p in fig.axes[1].patches if isinstance(p, StepPatch)}


def lane_spans(fig: Any, label: str) -> np.ndarray:
    """(n, 2) sorted [onset_s, offset_s] rows of the bars named `label` ("detected: dog",
    "reference: dog") in the event lanes of a timeline figure (`fig.axes[2]`)."""
    bars = [p for c in fig.axes[2].collections if c.get_label() == label for p in c.get_paths()]
    return np.array(sorted((float(p.vertices[:, 0].min()), float(p.vertices[:, 0].max())) for p in bars)).reshape(-1, 2)
