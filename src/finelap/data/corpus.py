"""Moved to `finelap.demo.corpus` (the demo pool is not part of the data layer); this old path
re-exports its public names (its `__all__`)."""
from __future__ import annotations

from ..demo import corpus as _corpus
from ..demo.corpus import *  # noqa: F401,F403  (the names listed in finelap.demo.corpus.__all__)

__all__ = list(_corpus.__all__)
