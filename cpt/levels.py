"""The ordinal target levels on the judge's 0-100 scale: one `LevelScale`, built from the
config (`LevelsConfig.scale`) and used by prompts, metrics, the report and the benchmarks.
Plain Python (no numpy), so the config can validate its levels with it.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

SCORE_MIN = 0.0
SCORE_MAX = 100.0  # judge scores live in [SCORE_MIN, SCORE_MAX]


def out_of_range(n: int, examples: list[float]) -> str:
    """The error for scores outside [0, 100] (or NaN), as `bin` and `metrics.bin_scores` say it."""
    return (
        f"{n} score(s) outside [{SCORE_MIN:g}, {SCORE_MAX:g}] or NaN, "
        f"e.g. {examples}; drop judge failures (judge_ok False) before binning"
    )


@dataclass(frozen=True)
class LevelScale:
    """Ordered target levels and the upper bin edge of each on the 0-100 judge scale.

    A score ``s`` falls in the first level whose upper edge is >= ``s``; the first level
    also holds 0. With names ``("low", "moderate", "extremely high")`` and edges
    ``(40.0, 92.5, 100.0)``: 40 -> low, 40.0001 -> moderate, 92.5 -> moderate,
    92.5001 -> extremely high.

    Parameters:
        names (`tuple[str, ...]`): level names, lowest adherence first; unique, at least 2.
        upper_edges (`tuple[float, ...]`): one inclusive upper edge per level, strictly
            increasing, first > 0, last == 100.

    Raises:
        ValueError: listing every problem found with ``names`` / ``upper_edges``.
    """

    names: tuple[str, ...]
    upper_edges: tuple[float, ...]

    def __post_init__(self) -> None:
        # accept lists from YAML, store tuples so the scale stays hashable
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "upper_edges", tuple(float(e) for e in self.upper_edges))
        names, edges = self.names, self.upper_edges
        problems = []
        if len(names) < 2:
            problems.append(f"need at least 2 levels, got {len(names)} ({list(names)})")
        if len(names) != len(edges):
            problems.append(
                f"names and upper_edges must have the same length, "
                f"got {len(names)} names and {len(edges)} edges"
            )
        if len(set(names)) != len(names):
            dupes = sorted({n for n in names if names.count(n) > 1})
            problems.append(f"level names must be unique, repeated: {dupes} (duplicate names)")
        if any(not isinstance(n, str) or not n for n in names):
            problems.append(f"level names must be non-empty strings, got {list(names)}")
        if any(not math.isfinite(e) for e in edges):
            problems.append(f"upper_edges must be finite numbers, got {list(edges)}")
        if any(b <= a for a, b in itertools.pairwise(edges)):
            problems.append(f"upper edges must increase (strictly increasing), got {list(edges)}")
        if edges and not edges[0] > SCORE_MIN:
            problems.append(
                f"first upper edge must be > {SCORE_MIN:g}, got {edges[0]:g} (bins cover 0-100)"
            )
        if edges and edges[-1] != SCORE_MAX:
            problems.append(
                f"last upper edge must be {SCORE_MAX:g}, got {edges[-1]:g} (bins cover 0-100)"
            )
        if problems:
            raise ValueError("invalid LevelScale: " + "; ".join(problems))

    def bin(self, score: float) -> str:
        """Level name of one score in [0, 100]; ValueError if outside or NaN."""
        s = float(score)
        if not SCORE_MIN <= s <= SCORE_MAX:  # also catches NaN
            raise ValueError(out_of_range(1, [s]))
        # first edge >= score, so a score equal to an edge stays in the lower level
        return self.names[bisect.bisect_left(self.upper_edges, s)]

    def index(self, name: str) -> int:
        """Position of level ``name`` in the scale (0 = lowest); ValueError if unknown."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ValueError(
                f"unknown target level {name!r}; allowed levels: {list(self.names)}"
            ) from None

    def target(self, name: str) -> tuple[float, float]:
        """Score interval ``(lo, hi]`` of level ``name`` (the first level also includes 0)."""
        i = self.index(name)
        lo = SCORE_MIN if i == 0 else self.upper_edges[i - 1]
        return lo, self.upper_edges[i]

    @property
    def top(self) -> str:
        """Highest level (e.g. "extremely high")."""
        return self.names[-1]

    def band(self, name: str) -> str:
        """The score interval of level ``name`` as text for prompts, e.g. ``40-92.5``."""
        lo, hi = self.target(name)
        return f"{lo:g}-{hi:g}"
