"""Training: the loop, checkpoints and optimisers (distributed helpers live in ``finelap.dist``).

Submodules are imported where they are used; importing this package has no side effects.
"""
