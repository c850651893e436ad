"""Token-tree verification: a block with alternative branches, verified in one target forward (greedy).

Pure functions, no model and no I/O; the edge (``covspec.runtime.edge``) and the device's pipelined loop
(``covspec.runtime.pipeline``) use them, and the adapters build the attention mask from :func:`ancestors`.

Words. A *tree* of k drafted tokens is given by ``parents``: ``parents[i]`` is the index of node i's parent
(``parents[i] < i``), or -1 when node i follows the committed prefix directly. A chain is ``[-1, 0, 1, ...]``.
Node i sits at depth ``depth(i)`` (0 for a root): its position id is the prefix length plus its depth, and it
attends to the prefix, its ancestors and itself, so its target logits are those of the chain from the prefix to
it. Siblings carry distinct tokens (two equal siblings would be one node).

Greedy verification walks the tree from the prefix: at each node the target's argmax picks the child holding that
token, if any. The walk ends at the first node without such a child (or on EOS): the path's tokens are accepted
and the argmax after its last node is the correction (or bonus). This is exactly what greedy decoding of the
target emits, so the output is token-identical to target-only whatever the tree holds. Under sampling the main chain
is verified as a chain and the alternatives are guesses of the correction (``covspec.runtime.edge``,
``Edge._verify_sampling_tree``; docs/drafting.md, "Token trees under sampling").
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch


def chain(k: int) -> list[int]:
    """The parents of a chain of k tokens."""
    return list(range(-1, k - 1))


def is_chain(parents: Sequence[int]) -> bool:
    return all(p == i - 1 for i, p in enumerate(parents))


def parents_from_branches(k: int, branches: Sequence[int]) -> list[int]:
    """The parents of the k-node tree that the wire's ``branches`` describe.

    ``branches`` is flat pairs ``[attach_1, length_1, attach_2, length_2, ...]``. The first
    k − Σ length_i nodes are the main chain (from the prefix); then each branch's nodes follow in order, the
    first attached to node ``attach_i`` (−1: the prefix; else a node before the branch), the others a chain.
    Every tree with parents before children has this form (a node that does not continue the node before it starts
    a branch); a block with a few alternatives costs 2 bytes per alternative on the wire instead of one per node.
    Raises ``ValueError`` naming the bad entry.
    """
    if len(branches) % 2:
        raise ValueError(f"branches must be (attach, length) pairs, got {len(branches)} numbers")
    lengths = list(branches[1::2])
    if any(n < 1 for n in lengths):
        raise ValueError(f"branches: every length must be >= 1, got {lengths}")
    start = k - sum(lengths)
    if start < 1:
        raise ValueError(f"branches hold {sum(lengths)} nodes of {k}: the main chain needs at least one")
    parents = chain(start)
    for i in range(0, len(branches), 2):
        attach, n = branches[i], branches[i + 1]
        if not -1 <= attach < len(parents):
            raise ValueError(f"branches[{i}] = {attach}: a branch attaches to -1 or an earlier node (< {len(parents)})")
        parents += [attach, *range(len(parents), len(parents) + n - 1)]
    return parents


def branches_from_parents(parents: Sequence[int]) -> list[int]:
    """The wire form of ``parents`` (parents before children; see :func:`parents_from_branches`)."""
    start = next((i for i, p in enumerate(parents) if p != i - 1), len(parents))
    out: list[int] = []
    for i in range(start, len(parents)):
        if parents[i] != i - 1 or i == start:
            out += [parents[i], 1]
        else:
            out[-1] += 1
    return out


def check_tree(ids: Sequence[int], parents: Sequence[int], eos: Collection[int] = ()) -> None:
    """Raise ``ValueError`` naming the first problem: lengths, a parent not before its child, equal siblings,
    or a node after EOS."""
    if len(parents) != len(ids):
        raise ValueError(f"parents has {len(parents)} entries for {len(ids)} drafted tokens")
    seen: set[tuple[int, int]] = set()
    for i, (tok, p) in enumerate(zip(ids, parents, strict=True)):
        if not -1 <= p < i:
            raise ValueError(f"parents[{i}] = {p}: a parent must be -1 or an earlier node (0..{i - 1})")
        if (p, tok) in seen:
            raise ValueError(f"node {i} repeats token {tok} of a sibling under parent {p}")
        seen.add((p, tok))
        if p >= 0 and ids[p] in eos:
            raise ValueError(f"node {i} continues after EOS (its parent {p} is EOS)")


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of each node (0 for a node right after the prefix)."""
    out: list[int] = []
    for p in parents:
        out.append(0 if p < 0 else out[p] + 1)
    return out


def path_to(parents: Sequence[int], leaf: int) -> list[int]:
    """Node indices from a root down to ``leaf`` (empty for -1)."""
    path: list[int] = []
    while leaf >= 0:
        path.append(leaf)
        leaf = parents[leaf]
    return path[::-1]


def ancestors(parents: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Bool ``[k, k]``: entry (i, j) is True when node j is node i or one of its ancestors (the tree's causal
    mask among the new tokens; a chain gives the lower triangle)."""
    rows: list[list[bool]] = []
    for i, p in enumerate(parents):  # plain Python: one tensor at the end, not two tensor ops per node
        row = list(rows[p]) if p >= 0 else [False] * len(parents)
        row[i] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool, device=device).view(len(parents), len(parents))


def verify_greedy_tree(ids: Sequence[int], parents: Sequence[int], rows: torch.Tensor,
                       eos: Collection[int] = ()) -> tuple[list[int], int]:  # fmt: skip
    """Greedy verification of a tree.

    Args:
        ids: ``[k]`` drafted tokens.
        parents: their parents (see the module docstring).
        rows: ``[k + 1, V]`` target logits: row 0 after the prefix, row i + 1 after node i.
        eos: end-of-sequence ids (an accepted EOS ends the walk).

    Returns:
        The accepted path (node indices, root first) and the target's argmax after it.
    """
    best = rows.argmax(-1).tolist()  # the one host sync
    children: dict[tuple[int, int], int] = {(p, t): i for i, (t, p) in enumerate(zip(ids, parents, strict=True))}
    path: list[int] = []
    node = -1
    while True:
        child = children.get((node, best[node + 1]))
        if child is None:
            return path, best[node + 1]
        path.append(child)
        node = child
        if ids[child] in eos:
            return path, best[node + 1]
