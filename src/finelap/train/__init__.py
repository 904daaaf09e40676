"""Training: the loop, distributed helpers (``finelap.train.dist``), checkpoints and optimisers.

Submodules are imported where they are used; importing this package has no side effects.
"""
