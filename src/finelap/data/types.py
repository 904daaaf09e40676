"""Record types shared by every reader, writer, the curation pipeline and the trainer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """One strongly-labelled sound event, times in seconds from the start of its clip."""

    label: str
    onset: float
    offset: float

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "onset": round(float(self.onset), 6), "offset": round(float(self.offset), 6)}


@dataclass
class Clip:
    """One audio clip with optional supervision (the manifest's line).

    audio: path to the audio file (absolute once read from a manifest; relative paths in a
        manifest are resolved against the manifest's folder).
    captions: free-text descriptions; may be empty.
    events: strong labels; may be empty (caption-only clip).
    labels: weak (clip-level) labels, e.g. a classification target; may be empty.
    duration: seconds, if known.
    id: stable key (defaults to the audio file's stem).
    meta: anything else found on the line (kept on round trip).
    """

    audio: str
    captions: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    duration: float | None = None
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        if self.id:
            return self.id
        import os

        return os.path.splitext(os.path.basename(self.audio))[0]

    @property
    def has_events(self) -> bool:
        return bool(self.events)
