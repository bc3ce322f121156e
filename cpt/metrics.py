"""metrics: judge scores -> CPT evaluation numbers (accuracy, Kendall τ, Spearman ρ, Best-of-N).

Pure functions over numpy / pandas / scipy; no I/O. The level scale comes from `cpt.levels`.

Input rows (one per generated sample), as read from the judge stage:
    task_id, rubric, target_level, score (float 0-100, NaN when the judge failed),
    judge_ok (bool), and optionally model, sample_idx (0..N-1, for Best-of-N).

A row is *valid* when ``judge_ok`` is True and ``score`` is not NaN. Invalid rows are excluded
from every metric and reported as ``judge_failures`` (or ``groups_without_valid``): a failed
judgement is never read as a score of 0.

Paper settings (METHOD.md, "Evaluation"): levels low ≤ 40 < moderate ≤ 92.5 < extremely high,
i.e. ``LevelScale(("low", "moderate", "extremely high"), (40.0, 92.5, 100.0))``.

Example (``judged`` is a judged-samples frame)::

    scale = LevelScale(("low", "moderate", "extremely high"), (40.0, 92.5, 100.0))
    scale.bin(40.0), scale.bin(40.0001), scale.bin(100.0)  # low, moderate, extremely high
    summarize(judged, scale)  # {"n", "judge_failures", "accuracy", "accuracy_ci", ...}
    breakdown(judged, scale, by=["model", "rubric"])  # one summary row per group
    best_of_n(judged, scale, ns=[1, 2, 4, 8])  # judge-selected Best-of-N, per model
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse, stats

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
    lookup = {name: i for i, name in enumerate(scale.names)}
    levels = pd.Series(levels, dtype=object)
    idx = levels.map(lookup)
    if idx.isna().any():
        scale.index(levels[idx.isna()].iloc[0])  # raises with the allowed levels
    return idx.to_numpy(dtype=np.int64)


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
# Bootstrap over tasks
# --------------------------------------------------------------------------------------------


def _draw_groups(groups: Any, n_boot: int, seed: int) -> tuple[np.ndarray, int, np.ndarray]:
    """Group codes per row, number of groups, and the (n_boot, n_groups) group draws.

    The single source of randomness for every bootstrap here, so :func:`bootstrap_ci` and
    :func:`summarize` see the same resamples for the same rows and seed.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    codes, _ = pd.factorize(pd.Series(groups), use_na_sentinel=False)
    n_groups = int(codes.max()) + 1
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(n_boot, n_groups))
    return codes, n_groups, draws


def _group_resamples(groups: Any, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Yield ``n_boot`` row-index arrays, each a resample of whole groups with replacement.

    All rows of a drawn group come together (a group drawn twice appears twice).
    """
    codes, n_groups, draws = _draw_groups(groups, n_boot, seed)
    order = np.argsort(codes, kind="stable")  # rows sorted by group
    counts = np.bincount(codes, minlength=n_groups)
    starts = np.cumsum(counts) - counts  # first position of each group in `order`
    for sel in draws:
        lengths = counts[sel]
        # position k inside the concatenation -> starts[group] + (k - offset of that group)
        offsets = np.cumsum(lengths) - lengths
        pos = np.arange(lengths.sum()) + np.repeat(starts[sel] - offsets, lengths)
        yield order[pos]


def _bootstrap_rank_stats(
    groups: Any, target: np.ndarray, score: np.ndarray, pred: np.ndarray, n_boot: int, seed: int
) -> np.ndarray:
    """(n_boot, 3) accuracy, Kendall τ-b, Spearman ρ over task resamples, without copying rows.

    Exact, not approximate: a resample is fully described by the count of its rows in each
    (target level a, distinct score v) cell, C[a, v], and all three statistics are functions
    of C (ties included), so each costs O(levels x distinct scores) instead of a sort of
    the resampled rows. Tests check it equals scipy on the materialised resamples.
    """
    codes, n_groups, draws = _draw_groups(groups, n_boot, seed)
    k = int(target.max()) + 1
    uniq, value = np.unique(score, return_inverse=True)
    m = len(uniq)
    # rows per (cell, group); a resample's cell counts are this matrix times its group counts
    per_group = sparse.csr_matrix(
        (np.ones(len(score)), (target * m + value, codes)), shape=(k * m, n_groups)
    )
    correct = np.zeros((k, m))
    correct[target, value] = pred == target  # a cell's binned level depends only on its score
    out = np.empty((n_boot, 3))
    chunk = max(1, min(n_boot, 2_000_000 // (k * m)))  # bounds the (chunk, k, m) temporaries
    for start in range(0, n_boot, chunk):
        sel = draws[start : start + chunk]
        b = len(sel)
        times_drawn = np.zeros((b, n_groups))
        np.add.at(times_drawn, (np.repeat(np.arange(b), n_groups), sel.ravel()), 1.0)
        c = np.asarray(per_group @ times_drawn.T).T.reshape(b, k, m)
        n = c.sum(axis=(1, 2))
        w_level, w_value = c.sum(axis=2), c.sum(axis=1)
        # Kendall: for rows of level j, (# lower-level rows with a lower score) - (# with higher)
        cum = np.cumsum(c, axis=2)
        below_minus_above = (cum - c) - (w_level[:, :, None] - cum)
        from_lower_levels = np.cumsum(below_minus_above, axis=1) - below_minus_above
        s = np.einsum("bkm,bkm->b", c, from_lower_levels)
        n0 = n * (n - 1) / 2
        ties_x = (w_level * (w_level - 1) / 2).sum(axis=1)
        ties_y = (w_value * (w_value - 1) / 2).sum(axis=1)
        # Spearman: Pearson of average ranks; both rank vectors have mean (n + 1) / 2
        mid = (n[:, None] + 1) / 2
        rank_x = np.cumsum(w_level, axis=1) - w_level + (w_level + 1) / 2 - mid
        rank_y = np.cumsum(w_value, axis=1) - w_value + (w_value + 1) / 2 - mid
        cov = np.einsum("bkm,bk,bm->b", c, rank_x, rank_y)
        var_x = (w_level * rank_x**2).sum(axis=1)
        var_y = (w_value * rank_y**2).sum(axis=1)
        degenerate = (n < 2) | ((w_level > 0).sum(axis=1) < 2) | ((w_value > 0).sum(axis=1) < 2)
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = np.einsum("bkm,km->b", c, correct) / n
            tau = s / np.sqrt((n0 - ties_x) * (n0 - ties_y))
            rho = cov / np.sqrt(var_x * var_y)
        tau[degenerate] = np.nan
        rho[degenerate] = np.nan
        out[start : start + b] = np.column_stack([acc, tau, rho])
    return out


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]  # NaN statistics (degenerate resamples) are skipped
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def bootstrap_ci(
    df: pd.DataFrame,
    stat_fn: Callable[[pd.DataFrame], float],
    group_col: str = "task_id",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat_fn(df)``, resampling whole groups (tasks).

    Each of ``n_boot`` resamples draws ``n_groups`` values of ``group_col`` with replacement
    (seeded ``np.random.default_rng(seed)``) and keeps all rows of each drawn group, so rows
    of one task never separate. Resamples where ``stat_fn`` returns NaN are skipped.

    Returns:
        ``(lo, hi)`` at the ``alpha/2`` and ``1 - alpha/2`` quantiles; ``(nan, nan)`` if
        ``df`` is empty or no resample gave a finite statistic.
    """
    _check_alpha(alpha)
    if group_col not in df.columns:
        raise ValueError(f"bootstrap group column {group_col!r} not in columns {list(df.columns)}")
    if len(df) == 0:
        return float("nan"), float("nan")
    values = np.fromiter(
        (stat_fn(df.take(idx)) for idx in _group_resamples(df[group_col], n_boot, seed)),
        dtype=float,
        count=n_boot,
    )
    return _percentile_ci(values, alpha)


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
) -> dict[str, Any]:
    """Accuracy, Kendall τ-b and Spearman ρ of judged samples, with task-bootstrap CIs.

    ``df`` needs columns task_id, rubric, target_level, score, judge_ok. Rows with
    ``judge_ok`` False or a NaN score are excluded and counted in ``judge_failures``.
    The three CIs come from the same ``n_boot`` task resamples (``seed``), identical to
    calling :func:`bootstrap_ci` on the valid rows with the same seed.

    Returns:
        ``{"n": valid rows, "judge_failures": excluded rows, "accuracy": float,
        "accuracy_ci": (lo, hi), "kendall_tau": float, "kendall_tau_ci": (lo, hi),
        "spearman_rho": float, "spearman_rho_ci": (lo, hi),
        "mean_score_by_level": {level: mean score (NaN if no rows), in scale order}}``

    Raises:
        ValueError: a missing column, an unknown target level or a valid score outside [0, 100].
    """
    _require_columns(df, EVAL_COLUMNS, "summarize")
    _check_alpha(alpha)
    valid = _valid_mask(df)
    used = df.loc[valid]
    target = _level_indices(used["target_level"], scale)
    score = used["score"].to_numpy(dtype=float)
    pred = _bin_indices(score, scale)

    point = (accuracy(target, pred), kendall_tau(target, score), spearman_rho(target, score))
    if len(used) and n_boot > 0:  # n_boot=0: point estimates only, CIs reported as NaN
        boot = _bootstrap_rank_stats(used["task_id"], target, score, pred, n_boot, seed)
    else:
        boot = np.full((1, 3), np.nan)
    cis = [_percentile_ci(boot[:, k], alpha) for k in range(3)]
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


def best_of_n(df: pd.DataFrame, scale: LevelScale, ns: Sequence[int]) -> pd.DataFrame:
    """Best-of-N accuracy when the judge picks one of the first ``n`` samples per prompt.

    A prompt group is (task_id, rubric, target_level[, model]). For each ``n`` in ``ns``,
    among the group's valid samples (``judge_ok`` and a score) with ``sample_idx < n``
    the judge picks:

    * target = the top level (e.g. "extremely high"): the highest score;
    * any other target: the score closest to the centre ``(lo + hi) / 2`` of the target's
      bin (low: 20, moderate: 66.25 with the paper's edges);
    * ties: the lowest ``sample_idx``.

    Returns:
        One row per ``n`` (and per ``model`` when that column exists) with columns
        n, [model], groups (all prompt groups), groups_without_valid (groups with no valid
        sample among the first ``n``; left out of accuracy and mean_score, never read as 0),
        accuracy (binned picked score == target) and mean_score of the picked samples.

    Raises:
        ValueError: missing columns, ``ns`` values < 1, unknown target levels, scores outside
            [0, 100].
    """
    _require_columns(df, [*EVAL_COLUMNS, "sample_idx"], "best_of_n")
    ns = [int(n) for n in ns]
    if not ns or min(ns) < 1:
        raise ValueError(f"best_of_n: ns must be a non-empty list of integers >= 1, got {ns}")
    has_model = "model" in df.columns
    keys = [*BON_GROUP_COLUMNS, *(["model"] if has_model else [])]

    work = df[[*keys, "score", "sample_idx"]].copy()
    work["valid"] = _valid_mask(df)
    work["group"] = work.groupby(keys, sort=False, dropna=False).ngroup()
    target = _level_indices(work["target_level"], scale)
    score = work["score"].to_numpy(dtype=float)
    edges = np.asarray(scale.upper_edges)
    lows = np.concatenate([[SCORE_MIN], edges[:-1]])
    centre = (lows + edges)[target] / 2
    top = target == len(scale.names) - 1
    # smaller is better; NaN for invalid rows, which are filtered out before picking
    work["rank_key"] = np.where(top, -score, np.abs(score - centre))
    work["target_idx"] = target
    # sort once: best key first, then lowest sample_idx, so the first row per group is the pick
    work = work.sort_values(["group", "rank_key", "sample_idx"], kind="stable")
    pool = work.loc[work["valid"]]
    pred_all = np.full(len(pool), -1, dtype=np.int64)
    if len(pool):
        pred_all = _bin_indices(pool["score"].to_numpy(dtype=float), scale)
    pool = pool.assign(pred_idx=pred_all)

    model_groups = (
        work.groupby("model", sort=True, dropna=False)["group"].nunique()
        if has_model
        else pd.Series({None: work["group"].nunique()})
    )
    rows = []
    for n in ns:
        picked = pool.loc[pool["sample_idx"] < n].drop_duplicates("group", keep="first")
        for model, n_groups in model_groups.items():
            sub = picked.loc[picked["model"] == model] if has_model else picked
            row: dict[str, Any] = {"n": n}
            if has_model:
                row["model"] = model
            row["groups"] = int(n_groups)
            row["groups_without_valid"] = int(n_groups - len(sub))
            row["accuracy"] = accuracy(sub["target_idx"].to_numpy(), sub["pred_idx"].to_numpy())
            row["mean_score"] = float(sub["score"].mean()) if len(sub) else float("nan")
            rows.append(row)
    return pd.DataFrame(rows)
