"""Static speculation trees: EAGLE's tree-choices format -> fixed index tensors.

A tree is a list of paths; each path is a list of ranks (`[0, 1]` = the parent's top-1 child,
then that node's top-2 child). Node 0 is the root (the last accepted token); node i > 0 is
path i-1 after sorting by (depth, path). Everything the step graphs need is derived here at
compile time, so the graphs themselves contain no data-dependent control flow.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import SpecCompileError
from .fileio import read_json
from .kernels.limits import MAX_TREE_NODES  # plain constants: no triton import

# EAGLE-1's default static tree (26 nodes with the root, depth 5), from the reference code's
# choices.py.
MC_SIM_7B_63 = [
    [0], [1], [2], [3],
    [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [2, 1], [3, 0],
    [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 2, 1], [1, 0, 0],
    [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2],
    [0, 0, 0, 0, 0], [0, 0, 0, 0, 1],
]

NAMED_TREES = {"mc_sim_7b_63": MC_SIM_7B_63}


@dataclass(frozen=True)
class TreeSpec:
    """A validated static tree. `paths` exclude the root; node order is (depth, path)."""

    name: str
    paths: tuple[tuple[int, ...], ...]
    # Derived (filled in __post_init__), all plain Python so the spec serialises to JSON.
    parent: tuple[int, ...] = field(init=False)
    depth: tuple[int, ...] = field(init=False)
    rank: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        for p in self.paths:  # before hashing: a path may hold anything
            if (not isinstance(p, (list, tuple)) or not p
                    or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in p)):
                shown = list(p) if isinstance(p, (list, tuple)) else p
                raise SpecCompileError(f"tree {self.name!r}: path {shown!r} must be a non-empty list "
                                       "of integer ranks >= 0")
        paths = sorted({tuple(p) for p in self.paths}, key=lambda p: (len(p), p))
        if len(paths) != len(self.paths):
            raise SpecCompileError(f"tree {self.name!r}: duplicate paths; list each path once")
        index = {(): 0}
        parent, depth, rank = [0], [0], [0]
        for p in paths:
            if p[:-1] not in index:
                raise SpecCompileError(
                    f"tree {self.name!r}: path {list(p)} has no parent path {list(p[:-1])}; "
                    "every prefix of a path must itself be a path")
            index[p] = len(parent)
            parent.append(index[p[:-1]])
            depth.append(len(p))
            rank.append(p[-1])
        object.__setattr__(self, "paths", tuple(paths))
        object.__setattr__(self, "parent", tuple(parent))
        object.__setattr__(self, "depth", tuple(depth))
        object.__setattr__(self, "rank", tuple(rank))

    # ---- sizes ----
    @property
    def n_nodes(self) -> int:
        """T: nodes including the root."""
        return len(self.parent)

    @property
    def max_depth(self) -> int:
        """D: the deepest drafted level (0 for a root-only tree)."""
        return max(self.depth)

    @property
    def top_k(self) -> int:
        """How many top-k candidates the widest parent needs."""
        return max(self.rank[1:], default=-1) + 1

    def level_nodes(self, d: int) -> list[int]:
        return [n for n in range(self.n_nodes) if self.depth[n] == d]

    def ancestors(self, n: int) -> list[int]:
        """Node n's ancestors and itself, root first."""
        chain = [n]
        while chain[-1] != 0:
            chain.append(self.parent[chain[-1]])
        return chain[::-1]

    # ---- tensors used by the passes ----
    def tree_mask(self) -> torch.Tensor:
        """(T, T) bool: node i attends to node j iff j is i's ancestor or i itself."""
        m = torch.zeros(self.n_nodes, self.n_nodes, dtype=torch.bool)
        for n in range(self.n_nodes):
            m[n, self.ancestors(n)] = True
        return m

    def children_table(self) -> torch.Tensor:
        """(T, K) long: each node's children in rank order (column = rank), -1 where none."""
        out = torch.full((self.n_nodes, max(self.top_k, 1)), -1, dtype=torch.long)
        for n in range(1, self.n_nodes):
            out[self.parent[n], self.rank[n]] = n
        return out

    def leaf_paths(self) -> torch.Tensor:
        """(P, D+1) long: each root-to-leaf path as node indices, padded with -1."""
        children = set(self.parent[1:])
        leaves = [n for n in range(self.n_nodes) if n not in children]
        out = torch.full((len(leaves), self.max_depth + 1), -1, dtype=torch.long)
        for i, n in enumerate(leaves):
            a = self.ancestors(n)
            out[i, : len(a)] = torch.tensor(a)
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "paths": [list(p) for p in self.paths]}

    @classmethod
    def from_json(cls, d: dict) -> "TreeSpec":
        return cls(d["name"], tuple(tuple(p) for p in d["paths"]))


def check_tree_nodes(name: str, n_nodes: int) -> None:
    """The tree-attention kernels' bound on a tree's nodes (root included), on every device."""
    if n_nodes > MAX_TREE_NODES:
        raise SpecCompileError(
            f"--tree: tree {name!r} has {n_nodes} nodes, but the tree-attention kernels handle at "
            f"most {MAX_TREE_NODES} (with the root); use a smaller tree (spec-fit-tree --nodes "
            f"{MAX_TREE_NODES} or fewer)")


def chain(k: int) -> TreeSpec:
    """`chain-K`: K drafted tokens in a line, K+1 nodes with the root."""
    return TreeSpec(f"chain-{k}", tuple(tuple([0] * i) for i in range(1, k + 1)))


def resolve_tree(name_or_file: str) -> TreeSpec:
    """A tree name (`mc_sim_7b_63`, `chain-K`) or a JSON file holding a list of paths. Sizes are
    checked against the kernels' node limit before anything is built (a chain's paths and a
    tree's mask grow with the square of its nodes)."""
    if name_or_file in NAMED_TREES:
        return TreeSpec(name_or_file, tuple(tuple(p) for p in NAMED_TREES[name_or_file]))
    m = re.fullmatch(r"chain-([0-9]+)", name_or_file)
    if m:
        digits = m.group(1).lstrip("0") or "0"
        check_tree_nodes(name_or_file, int(digits) + 1 if len(digits) <= 100 else 10**100)
        return chain(int(digits))
    path = Path(name_or_file)
    if not os.path.isfile(path):
        raise SpecCompileError(
            f"--tree {name_or_file!r}: not a known tree name ({', '.join(NAMED_TREES)}, chain-K) "
            "and no such JSON file")
    paths = read_json(path, "--tree", fix="fix the file: a JSON list of paths such as [[0], [1], [0, 0]]")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, list) for p in paths):
        raise SpecCompileError(
            f"--tree {path}: expected a non-empty JSON list of paths such as [[0], [1], [0, 0]]")
    check_tree_nodes(path.stem, len(paths) + 1)
    return TreeSpec(path.stem, tuple(tuple(p) for p in paths))
