"""From frame scores to events: which detection settings a Pipeline uses (given values, else the
checkpoint's calibration, else its eval defaults), the lines that say so, and events as
`detect`/`ground` return them. The post-processing itself is `finelap.scoring.PostProcess`."""
from __future__ import annotations

from typing import Any, Sequence

from ..errors import ConfigError, FinelapError
from ..scoring import DetectionSettings, fmt_threshold, nothing_found_advice, resolve_detection_settings
from ..utils import log

__all__ = ["resolve_settings", "announce_settings", "say_nothing_found", "event"]


def resolve_settings(eval_config: Any, queries: Sequence[str], threshold: float | None, median_filter_s: float | None,
                     min_duration_s: float | None, merge_gap_s: float | None) -> DetectionSettings:  # fmt: skip
    """`finelap.scoring.resolve_detection_settings` for a checkpoint's `eval` section; out-of-range
    values are ConfigErrors."""
    try:
        return resolve_detection_settings(eval_config, list(queries), threshold, median_filter_s, min_duration_s, merge_gap_s)
    except FinelapError as e:
        raise ConfigError(str(e)) from None


def announce_settings(st: DetectionSettings, said: set[str]) -> None:
    """One line on stderr naming the settings and where they come from, and one listing the
    queries that are not calibrated classes (they get the global threshold); `said` holds what
    was already said (lines and queries), so each is said once."""
    line = st.describe()
    if line not in said:
        said.add(line)
        log(line)
    new = [q for q in st.uncalibrated_queries if q not in said]
    if new:
        said.update(new)
        n = len((st.calibration or {}).get("classes") or [])
        log(f"not among the {n} calibrated classes, so using the global threshold {fmt_threshold(st.global_threshold)}: "
            + ", ".join(repr(q) for q in new[:8]) + (f" and {len(new) - 8} more" if len(new) > 8 else ""))  # fmt: skip


def say_nothing_found(peak: float, where: str, settings: DetectionSettings, query: str) -> None:
    """One line when nothing was detected: the peak (`where`: its query, file and time) and the
    threshold that was used for that query (its own or the global one, rounded)."""
    advice = nothing_found_advice(peak, settings, query, flag="threshold=")
    log(f"no detection above the threshold; the highest probability was {peak:.3g} ({where}), {advice} "
        "(or calibrate the checkpoint: `finelap calibrate`)")


def event(onset: float, offset: float, score: float, label: str) -> dict[str, Any]:
    """One detected event as `detect`/`ground` return it (seconds rounded to ms)."""
    return {"onset": round(float(onset), 3), "offset": round(float(offset), 3), "score": float(score), "label": str(label)}
