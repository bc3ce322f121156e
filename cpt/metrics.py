"""metrics: judge scores -> CPT evaluation numbers (accuracy, Kendall τ, Spearman ρ, Best-of-N).

Pure functions over numpy / pandas / scipy; no I/O. The level scale comes from `cpt.levels`.

Input rows (one per generated sample), as read from the judge stage:
    task_id, rubric, target_level, score (float 0-100, NaN when the judge failed),
    judge_ok (bool), and optionally model, sample_idx (0..N-1, for Best-of-N).

A row is *valid* when ``judge_ok`` is True and ``score`` is not NaN. Invalid rows are excluded
from every metric and reported as ``judge_failures`` (Best-of-N: ``no_valid``, its own
outcome): a failed judgement is never read as a score of 0. Intervals: `cpt.intervals`.

Paper settings (METHOD.md, "Evaluation"): levels low ≤ 40 < moderate ≤ 92.5 < extremely high,
i.e. ``LevelScale(("low", "moderate", "extremely high"), (40.0, 92.5, 100.0))``.

Example (``judged`` is a judged-samples frame)::

    scale = LevelScale(("low", "moderate", "extremely high"), (40.0, 92.5, 100.0))
    scale.bin(40.0), scale.bin(40.0001), scale.bin(100.0)  # low, moderate, extremely high
    summarize(judged, scale)  # {"n", "judge_failures", "accuracy", "accuracy_ci", ...}
    breakdown(judged, scale, by=["model", "rubric"])  # one summary row per group
    best_of_n(judged, scale, ns=[1, 2, 4, 8])  # the paper's Best-of-N (highest score), per model
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from cpt import intervals
from cpt.levels import SCORE_MAX, SCORE_MIN, LevelScale, out_of_range

__all__ = ["SCORE_MAX", "SCORE_MIN", "LevelScale"]  # the scale lives in cpt.levels (no numpy)

EVAL_COLUMNS = ("task_id", "rubric", "target_level", "score", "judge_ok")
BON_GROUP_COLUMNS = ("task_id", "rubric", "target_level")  # plus "model" when present


# --------------------------------------------------------------------------------------------
# Level scale and binning
# --------------------------------------------------------------------------------------------


def _check_scores(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores, dtype=float)
    bad = ~((scores >= SCORE_MIN) & (scores <= SCORE_MAX))  # also catches NaN
    if bad.any():
        raise ValueError(out_of_range(int(bad.sum()), scores[bad][:5].tolist()))
    return scores


def _bin_indices(scores: np.ndarray, scale: LevelScale) -> np.ndarray:
    # side="left": first edge >= score, so a score equal to an edge stays in the lower level
    return np.searchsorted(np.asarray(scale.upper_edges), _check_scores(scores), side="left")


def bin_scores(scores: np.ndarray, scale: LevelScale) -> np.ndarray:
    """Vectorised :meth:`LevelScale.bin`: level names (object array of str) for 0-100 scores.

    Raises:
        ValueError: if any score is NaN or outside [0, 100].
    """
    return np.asarray(scale.names, dtype=object)[_bin_indices(scores, scale)]


def _level_indices(levels: Any, scale: LevelScale) -> np.ndarray:
    """Target level names -> scale indices; ValueError naming the first unknown level."""
    values = np.asarray(levels, dtype=object)
    codes = pd.Categorical(values, categories=list(scale.names)).codes.astype(np.int64)
    if (codes < 0).any():
        scale.index(values[codes < 0][0])  # raises with the allowed levels
    return codes


# --------------------------------------------------------------------------------------------
# Point metrics
# --------------------------------------------------------------------------------------------


def accuracy(targets: Sequence | np.ndarray, predicted: Sequence | np.ndarray) -> float:
    """Share of rows whose predicted (binned) level equals the target level; NaN if empty."""
    targets, predicted = np.asarray(targets), np.asarray(predicted)
    if targets.shape != predicted.shape:
        raise ValueError(
            f"targets and predicted must have the same length, "
            f"got {targets.shape[0]} and {predicted.shape[0]}"
        )
    if targets.size == 0:
        return float("nan")
    return float(np.mean(targets == predicted))


def _degenerate(x: np.ndarray, y: np.ndarray) -> bool:
    """True when a rank correlation is undefined: < 2 rows, one target class, or constant scores."""
    if x.shape != y.shape:
        raise ValueError(
            f"target_idx and scores must have the same length, got {x.shape[0]} and {y.shape[0]}"
        )
    if np.isnan(y).any() or np.isnan(x).any():
        raise ValueError("rank correlation got NaN values; drop judge failures first")
    return x.size < 2 or x.min() == x.max() or y.min() == y.max()


def kendall_tau(target_idx: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float:
    """Kendall τ-b (tie-corrected) between target level index and judge score.

    Returns NaN, without warnings, for fewer than 2 rows, a single target level or
    constant scores.
    """
    x, y = np.asarray(target_idx, dtype=float), np.asarray(scores, dtype=float)
    if _degenerate(x, y):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.kendalltau(x, y, variant="b").statistic)


def spearman_rho(target_idx: Sequence | np.ndarray, scores: Sequence | np.ndarray) -> float:
    """Spearman ρ (average ranks for ties) between target level index and judge score.

    Returns NaN, without warnings, for fewer than 2 rows, a single target level or
    constant scores.
    """
    x, y = np.asarray(target_idx, dtype=float), np.asarray(scores, dtype=float)
    if _degenerate(x, y):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(x, y).statistic)


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def _require_columns(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what}: missing column(s) {missing}; got {list(df.columns)}")


def _valid_mask(df: pd.DataFrame) -> np.ndarray:
    """Rows the metrics may use: the judge succeeded and produced a score."""
    ok = df["judge_ok"].fillna(False).astype(bool).to_numpy()
    return ok & df["score"].notna().to_numpy()


def summarize(
    df: pd.DataFrame,
    scale: LevelScale,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    ci: str = "jackknife-t",
) -> dict[str, Any]:
    """Accuracy, Kendall τ-b and Spearman ρ of judged samples, with task-bootstrap CIs.

    ``df`` needs columns task_id, rubric, target_level, score, judge_ok. Rows with
    ``judge_ok`` False or a NaN score are excluded and counted in ``judge_failures``.
    CIs leave out or resample whole tasks, never single rows. ``ci="jackknife-t"`` (default;
    :func:`intervals.jackknife_t_ci`): 93-97 % coverage at 10-30 tasks in ``tests/test_coverage.py``.
    ``ci="bca"``: BCa bootstrap (``n_boot`` resamples, ``seed``), widened for few tasks.
    ``ci="percentile"``: the plain percentile bootstrap (too narrow with few tasks),
    identical to :func:`intervals.bootstrap_ci` on the valid rows with the same seed.
    ``n_boot=0`` skips the intervals (NaN).

    Returns:
        ``{"n": valid rows, "judge_failures": excluded rows, "accuracy": float,
        "accuracy_ci": (lo, hi), "kendall_tau": float, "kendall_tau_ci": (lo, hi),
        "spearman_rho": float, "spearman_rho_ci": (lo, hi),
        "mean_score_by_level": {level: mean score (NaN if no rows), in scale order}}``

    Raises:
        ValueError: a missing column, an unknown target level or a valid score outside [0, 100].
    """
    _require_columns(df, EVAL_COLUMNS, "summarize")
    intervals.check_alpha(alpha)
    if ci not in intervals.CI_METHODS:
        raise ValueError(f"summarize: ci must be one of {list(intervals.CI_METHODS)}, got {ci!r}")
    valid = _valid_mask(df)
    used = df.loc[valid]
    target = _level_indices(used["target_level"], scale)
    score = used["score"].to_numpy(dtype=float)
    pred = _bin_indices(score, scale)

    core = intervals.rank_stats(used["task_id"], target, score, pred) if len(used) else None
    point = tuple(core.full()) if core else (float("nan"),) * 3
    if core is None or n_boot == 0:  # n_boot=0: point estimates only, CIs reported as NaN
        cis = [(float("nan"), float("nan"))] * 3
    elif ci == "jackknife-t":
        jack = core.jackknife()
        cis = [
            intervals.jackknife_t_ci(point[k], jack[:, k], alpha, fisher=k > 0) for k in range(3)
        ]
    else:
        boot, jack = intervals.bootstrap_rank_stats(
            used["task_id"], target, score, pred, n_boot, seed
        )
        if ci == "bca":
            cis = [intervals.bca_ci(boot[:, k], point[k], jack[:, k], alpha) for k in range(3)]
        else:
            cis = [intervals.percentile_ci(boot[:, k], alpha) for k in range(3)]
    means = {
        name: float(score[target == i].mean()) if (target == i).any() else float("nan")
        for i, name in enumerate(scale.names)
    }
    return {
        "n": int(valid.sum()),
        "judge_failures": int((~valid).sum()),
        "accuracy": point[0],
        "accuracy_ci": cis[0],
        "kendall_tau": point[1],
        "kendall_tau_ci": cis[1],
        "spearman_rho": point[2],
        "spearman_rho_ci": cis[2],
        "mean_score_by_level": means,
    }


def _flatten_summary(summary: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key, value in summary.items():
        if key.endswith("_ci"):
            row[f"{key}_lo"], row[f"{key}_hi"] = value
        elif key == "mean_score_by_level":
            row.update({f"mean_score[{level}]": m for level, m in value.items()})
        else:
            row[key] = value
    return row


def breakdown(df: pd.DataFrame, scale: LevelScale, by: str | list[str], **kw: Any) -> pd.DataFrame:
    """:func:`summarize` per group of ``by`` (e.g. "rubric", "target_level", ["model", "rubric"]).

    ``kw`` goes to :func:`summarize` (n_boot, seed, alpha). One row per group, columns:
    the ``by`` columns, n, judge_failures, accuracy, accuracy_ci_lo, accuracy_ci_hi,
    kendall_tau(_ci_lo/_ci_hi), spearman_rho(_ci_lo/_ci_hi), and ``mean_score[<level>]``
    per level. Target levels are ordered as in the scale. Within one target level τ and ρ
    are NaN (a single class).
    """
    keys = [by] if isinstance(by, str) else list(by)
    _require_columns(df, [*EVAL_COLUMNS, *keys], "breakdown")
    rows = []
    for group, sub in df.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, group))
        row.update(_flatten_summary(summarize(sub, scale, **kw)))
        rows.append(row)
    if not rows:
        empty = _flatten_summary(summarize(df.iloc[:0], scale, n_boot=1))
        return pd.DataFrame(columns=[*keys, *empty])
    out = pd.DataFrame(rows)
    if "target_level" in keys:
        out = out.sort_values(
            keys,
            key=lambda col: col.map(scale.index) if col.name == "target_level" else col,
            kind="stable",
        )
    return out.reset_index(drop=True)


def confusion(df: pd.DataFrame, scale: LevelScale) -> pd.DataFrame:
    """Counts of target level (rows) x binned judge level (columns) over valid rows.

    Every level of the scale appears on both axes, in scale order, even with zero counts.
    Judge failures are left out.
    """
    _require_columns(df, ["target_level", "score", "judge_ok"], "confusion")
    used = df.loc[_valid_mask(df)]
    k = len(scale.names)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(
        counts,
        (_level_indices(used["target_level"], scale), _bin_indices(used["score"], scale)),
        1,
    )
    return pd.DataFrame(
        counts,
        index=pd.Index(scale.names, name="target_level"),
        columns=pd.Index(scale.names, name="binned_level"),
    )


# --------------------------------------------------------------------------------------------
# Best-of-N with the judge as selector
# --------------------------------------------------------------------------------------------


BON_RULES = ("score", "bin_centre")


def best_of_n(
    df: pd.DataFrame,
    scale: LevelScale,
    ns: Sequence[int],
    rule: str = "score",
    per_level: bool = False,
) -> pd.DataFrame:
    """Best-of-N when the judge picks one of the first ``n`` samples per prompt.

    A prompt group is (task_id, rubric, target_level[, model]). For each ``n`` in ``ns``,
    among the group's valid samples (``judge_ok`` and a score) with ``sample_idx < n``
    the judge picks, by ``rule``:

    * ``"score"`` (default; the paper's Figure 1): the highest judge score, whatever the
      target, so the picked score never falls as ``n`` grows;
    * ``"bin_centre"``: the highest score for the top level, else the score closest to the
      centre ``(lo + hi) / 2`` of the target's bin (low: 20, moderate: 66.25 with the
      paper's edges); it aims the pick at the target level instead of at the maximum.

    Ties go to the lowest ``sample_idx``. Every group counts at every ``n``: a group whose
    first ``n`` samples all failed to be judged is its own outcome, "no valid sample"
    (column ``no_valid``), counted as not accurate and never read as a score of 0. So the
    denominator of ``accuracy`` is fixed and failures cannot make the curve jump when a
    group enters at a larger ``n``.

    Returns:
        One row per ``n`` (and per ``model`` when that column exists; per ``target_level``
        too with ``per_level``), columns: n, [model], [target_level], groups, no_valid,
        accuracy (picked sample's binned level == target, over all groups) and mean_score
        (of the picked samples, over the groups that have one).

    Raises:
        ValueError: missing columns, ``ns`` values < 1, an unknown ``rule``, unknown target
            levels, scores outside [0, 100].
    """
    _require_columns(df, [*EVAL_COLUMNS, "sample_idx"], "best_of_n")
    ns = [int(n) for n in ns]
    if not ns or min(ns) < 1:
        raise ValueError(f"best_of_n: ns must be a non-empty list of integers >= 1, got {ns}")
    if rule not in BON_RULES:
        raise ValueError(f"best_of_n: rule must be one of {list(BON_RULES)}, got {rule!r}")
    has_model = "model" in df.columns
    keys = [*BON_GROUP_COLUMNS, *(["model"] if has_model else [])]
    out_keys = [*(["model"] if has_model else []), *(["target_level"] if per_level else [])]

    work = df[[*keys, "score", "sample_idx"]].copy()
    work["valid"] = _valid_mask(df)
    work["group"] = work.groupby(keys, sort=False, dropna=False).ngroup()
    target = _level_indices(work["target_level"], scale)
    score = work["score"].to_numpy(dtype=float)
    if rule == "score":
        rank_key = -score
    else:
        edges = np.asarray(scale.upper_edges)
        centre = (np.concatenate([[SCORE_MIN], edges[:-1]]) + edges)[target] / 2
        rank_key = np.where(target == len(scale.names) - 1, -score, np.abs(score - centre))
    # smaller is better; NaN for invalid rows, which are filtered out before picking
    work["rank_key"] = rank_key
    work["target_idx"] = target
    # sort once: best key first, then lowest sample_idx, so the first row per group is the pick
    work = work.sort_values(["group", "rank_key", "sample_idx"], kind="stable")
    pool = work.loc[work["valid"]]
    pred_all = np.full(len(pool), -1, dtype=np.int64)
    if len(pool):
        pred_all = _bin_indices(pool["score"].to_numpy(dtype=float), scale)
    pool = pool.assign(pred_idx=pred_all, hit=pred_all == pool["target_idx"].to_numpy())

    groups = work.drop_duplicates("group")
    if out_keys:
        sizes = groups.groupby(out_keys, sort=True, dropna=False)["group"].size()
    else:
        sizes = pd.Series({(): len(groups)})
    rows = []
    for n in ns:
        picked = pool.loc[pool["sample_idx"] < n].drop_duplicates("group", keep="first")
        for key, n_groups in sizes.items():
            key = key if isinstance(key, tuple) else (key,)
            sub = picked
            for col, value in zip(out_keys, key):
                sub = sub.loc[sub[col] == value]
            row: dict[str, Any] = {"n": n, **dict(zip(out_keys, key))}
            row["groups"] = int(n_groups)
            row["no_valid"] = int(n_groups - len(sub))
            row["accuracy"] = float(sub["hit"].sum() / n_groups) if n_groups else float("nan")
            row["mean_score"] = float(sub["score"].mean()) if len(sub) else float("nan")
            rows.append(row)
    out = pd.DataFrame(rows)
    if per_level:
        order = {name: i for i, name in enumerate(scale.names)}
        out = out.sort_values(
            ["n", *out_keys],
            key=lambda c: c.map(order) if c.name == "target_level" else c,
            kind="stable",
        ).reset_index(drop=True)
    return out
