"""finelap: fine-grained language-audio pretraining (clip- and frame-level audio-text alignment).

Importing finelap is cheap: heavy and optional dependencies are imported where they are used.
"""
from __future__ import annotations

from ._version import __version__

__all__ = ["__version__", "Pipeline"]


def __getattr__(name: str):
    if name == "Pipeline":  # lazy: pulls in torch models and transformers
        from .infer import Pipeline

        return Pipeline
    raise AttributeError(f"module 'finelap' has no attribute {name!r}")
