"""Pairwise covering arrays: few rows in which every pair of option values appears at least once.

Testing every combination of a dozen options on nine grids would take thousands of models; most
bugs need only two options to interact, so a row set in which every allowed pair of values meets at
least once catches them at a few per cent of the cost (the AETG greedy construction). Constraints
are given as a predicate on a pair of (factor, level) assignments: rows never contain a pair it
refuses, and such pairs are not required.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Pair = tuple[str, Any, str, Any]


def required_pairs(factors: Mapping[str, Sequence[Any]], allowed: Callable[[str, Any, str, Any], bool]) -> set[Pair]:
    """Every pair of levels of two different factors that ``allowed`` accepts."""
    names = list(factors)
    return {(a, x, b, y) for a, b in itertools.combinations(names, 2) for x in factors[a] for y in factors[b]
            if allowed(a, x, b, y)}


def pairs_of(row: Mapping[str, Any], names: Sequence[str]) -> set[Pair]:
    """The pairs a row covers, in the factor order ``names``."""
    return {(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}


def _new_pairs(row: Mapping[str, Any], name: str, level: Any, names: Sequence[str], todo: set[Pair]) -> int:
    """How many pairs still to cover that setting ``name`` to ``level`` would cover in ``row``."""
    order = {n: i for i, n in enumerate(names)}
    return sum(1 for k, v in row.items()
               if ((k, v, name, level) if order[k] < order[name] else (name, level, k, v)) in todo)


def pairwise(factors: Mapping[str, Sequence[Any]], allowed: Callable[[str, Any, str, Any], bool],
             cost: Callable[[str, Any], float] = lambda name, level: 0.0, seed: int = 0,
             tries: int = 20) -> list[dict[str, Any]]:
    """A list of rows covering every allowed pair; among equally useful levels the cheapest is taken."""
    names = list(factors)
    rng = random.Random(seed)
    todo = required_pairs(factors, allowed)
    rows: list[dict[str, Any]] = []
    while todo:
        a, x, b, y = min(todo, key=lambda p: (names.index(p[0]), names.index(p[2]), repr(p[1]), repr(p[3])))
        best: tuple[int, float, dict[str, Any]] | None = None
        for _ in range(tries):
            row = {a: x, b: y}
            for name in rng.sample([n for n in names if n not in row], len(names) - 2):
                options = [lv for lv in factors[name] if all(allowed(name, lv, k, v) for k, v in row.items())]
                if not options:
                    break
                rng.shuffle(options)
                row[name] = max(options, key=lambda lv, n=name, r=row: (_new_pairs(r, n, lv, names, todo), -cost(n, lv)))
            else:
                covered = len(pairs_of(row, names) & todo)
                price = sum(cost(n, v) for n, v in row.items())
                if best is None or (covered, -price) > (best[0], -best[1]):
                    best = (covered, price, row)
        if best is None:
            raise ValueError(f"no row can hold the pair {a}={x!r}, {b}={y!r} under the constraints")
        rows.append({n: best[2][n] for n in names})
        todo -= pairs_of(best[2], names)
    return rows
