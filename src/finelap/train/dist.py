"""Compatibility alias: the distributed helpers live in ``finelap.dist`` (below losses, models
and training, so losses can use them without importing upward). Import from there."""
from __future__ import annotations

from ..dist import *  # noqa: F401,F403
from ..dist import __all__  # noqa: F401
