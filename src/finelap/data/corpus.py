"""Moved to `finelap.demo.corpus` (the demo pool is not part of the data layer); this old path
re-exports its public names."""
from __future__ import annotations

from ..demo.corpus import (
    build_corpus,
    clip_rng,
    CORPUS_VERSION,
    CorpusResult,
    default_classes,
    detect_tools,
    energy_bounds,
    find_soundfont,
    MidiNote,
    notes_to_smf,
    procedural_classes,
    read_sf2_presets,
    render_midi,
    render_speech,
    smf_bytes,
    SoundClass,
    TOOLS,
    TOOLS_ENV,
    Toolset,
)

__all__ = [
    "CORPUS_VERSION",
    "TOOLS",
    "TOOLS_ENV",
    "SoundClass",
    "Toolset",
    "CorpusResult",
    "MidiNote",
    "smf_bytes",
    "notes_to_smf",
    "read_sf2_presets",
    "find_soundfont",
    "detect_tools",
    "default_classes",
    "procedural_classes",
    "render_midi",
    "render_speech",
    "energy_bounds",
    "build_corpus",
    "clip_rng",
]
