"""Training-free visual token pruning on the device: token scores, the joint selector, baseline pruners.

``build_pruner(cfg.pruning, seed)`` gives the configured ``Pruner`` (None for ``method: none``); the Device calls
``pruner.select(draft, inputs)`` before the draft's prefill. See docs/pruning.md.
"""

from covspec.pruning.pruners import (
    PRUNERS,
    AttentionPruner,
    DiversityPruner,
    JointPruner,
    Pruner,
    RandomPruner,
    UniformPruner,
    build_pruner,
    choose,
)

__all__ = [
    "PRUNERS",
    "AttentionPruner",
    "DiversityPruner",
    "JointPruner",
    "Pruner",
    "RandomPruner",
    "UniformPruner",
    "build_pruner",
    "choose",
]
