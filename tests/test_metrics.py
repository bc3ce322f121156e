"""Tests for cpt.metrics: hand-computed values, failure handling, bootstrap, Best-of-N.

Run: PYTHONPATH=. .venv/bin/pytest tests/test_metrics.py -q
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from cpt.intervals import bootstrap_ci
from cpt.metrics import (
    LevelScale,
    accuracy,
    best_of_n,
    bin_scores,
    breakdown,
    confusion,
    kendall_tau,
    spearman_rho,
    summarize,
)

LEVELS = ("low", "moderate", "extremely high")
SCALE = LevelScale(
    LEVELS, (40.0, 92.5, 100.0)
)  # paper: low ≤ 40 < moderate ≤ 92.5 < extremely high


def eval_frame(rows: list[tuple]) -> pd.DataFrame:
    """(task_id, rubric, target_level, score, judge_ok) tuples -> judged-samples frame."""
    return pd.DataFrame(rows, columns=["task_id", "rubric", "target_level", "score", "judge_ok"])


def synthetic(n_tasks: int = 30, per_cell: int = 2, seed: int = 0) -> pd.DataFrame:
    """Judged samples whose scores rise with the target level, integer 0-100, some failures."""
    rng = np.random.default_rng(seed)
    centre = {"low": 25.0, "moderate": 65.0, "extremely high": 93.0}
    rows = []
    for t in range(n_tasks):
        for rubric in ("chaos", "rococo"):
            for level in LEVELS:
                for _ in range(per_cell):
                    score = float(np.clip(np.round(centre[level] + rng.normal(0, 12)), 0, 100))
                    ok = bool(rng.random() > 0.05)
                    rows.append((f"t{t}", rubric, level, score if ok else np.nan, ok))
    return eval_frame(rows)


# --------------------------------------------------------------------------------------------
# LevelScale and binning
# --------------------------------------------------------------------------------------------


def test_bin_edges_are_inclusive_upper_bounds():
    scores = [40, 40.0001, 92.5, 92.5001, 0, 100]
    expected = ["low", "moderate", "moderate", "extremely high", "low", "extremely high"]
    assert [SCALE.bin(s) for s in scores] == expected
    assert bin_scores(np.array(scores, dtype=float), SCALE).tolist() == expected


@pytest.mark.parametrize("bad", [-0.001, 100.001, float("nan"), float("inf")])
def test_bin_rejects_scores_outside_0_100(bad):
    with pytest.raises(ValueError, match=r"outside \[0, 100\]"):
        SCALE.bin(bad)
    with pytest.raises(ValueError, match=r"1 score\(s\) outside"):
        bin_scores(np.array([50.0, bad]), SCALE)


@pytest.mark.parametrize(
    ("names", "edges", "message"),
    [
        (("low", "high"), (40.0, 60.0, 100.0), "same length, got 2 names and 3 edges"),
        (("only",), (100.0,), "need at least 2 levels, got 1"),
        (("a", "b", "c"), (40.0, 40.0, 100.0), "strictly increasing"),
        (("a", "b", "c"), (60.0, 40.0, 100.0), "strictly increasing"),
        (("a", "b"), (40.0, 99.0), "last upper edge must be 100, got 99"),
        (("a", "b"), (0.0, 100.0), "first upper edge must be > 0, got 0"),
        (("a", "a"), (40.0, 100.0), r"unique, repeated: \['a'\]"),
    ],
)
def test_scale_validation_says_what_is_wrong(names, edges, message):
    with pytest.raises(ValueError, match=message):
        LevelScale(names, edges)


def test_scale_validation_reports_every_problem_at_once():
    with pytest.raises(ValueError) as err:
        LevelScale(("a", "b", "c"), (0.0, 50.0))
    assert "same length" in str(err.value)
    assert "first upper edge" in str(err.value)
    assert "last upper edge" in str(err.value)


def test_scale_index_and_target_interval():
    assert [SCALE.index(n) for n in LEVELS] == [0, 1, 2]
    assert SCALE.target("low") == (0.0, 40.0)
    assert SCALE.target("moderate") == (40.0, 92.5)
    assert SCALE.target("extremely high") == (92.5, 100.0)
    with pytest.raises(ValueError, match=r"unknown target level 'high'.*'low', 'moderate'"):
        SCALE.index("high")
    # lists from YAML are accepted and stored as tuples (scale stays hashable)
    assert hash(LevelScale(list(LEVELS), [40, 92.5, 100])) == hash(SCALE)


# --------------------------------------------------------------------------------------------
# Point metrics
# --------------------------------------------------------------------------------------------


def test_accuracy_small_example():
    targets = ["low", "low", "moderate", "extremely high"]
    predicted = ["low", "moderate", "moderate", "moderate"]  # rows 1 and 3 right
    assert accuracy(targets, predicted) == 0.5
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError, match="same length"):
        accuracy(["low"], ["low", "low"])


# Hand computation, target index x = [0, 0, 1, 1, 2, 2], score y = [10, 60, 30, 50, 90, 50].
# Kendall τ-b over the 15 pairs; pairs inside a level (x tied) count for neither C nor D.
#   level 0 vs 1: (10,30) C, (10,50) C, (60,30) D, (60,50) D         -> C 2, D 2
#   level 0 vs 2: (10,90) C, (10,50) C, (60,90) C, (60,50) D         -> C 3, D 1
#   level 1 vs 2: (30,90) C, (30,50) C, (50,90) C, (50,50) tied in y -> C 3, D 0
#   C = 8, D = 3; n0 = 15; ties in x n1 = 3 (one pair per level); ties in y n2 = 1 (50, 50)
#   τ_b = (C - D) / sqrt((n0 - n1)(n0 - n2)) = 5 / sqrt(12 * 14) = 5 / sqrt(168) = 0.385758
# Spearman ρ = Pearson of average ranks:
#   rank x = [1.5, 1.5, 3.5, 3.5, 5.5, 5.5], rank y = [1, 5, 2, 3.5, 6, 3.5], both mean 3.5
#   dx = [-2, -2, 0, 0, 2, 2], dy = [-2.5, 1.5, -1.5, 0, 2.5, 0]
#   Σ dx·dy = 5 - 3 + 0 + 0 + 5 + 0 = 7; Σ dx² = 16; Σ dy² = 6.25 + 2.25 + 2.25 + 6.25 = 17
#   ρ = 7 / sqrt(16 * 17) = 7 / sqrt(272) = 0.424437
HAND_X = [0, 0, 1, 1, 2, 2]
HAND_Y = [10.0, 60.0, 30.0, 50.0, 90.0, 50.0]


def test_kendall_tau_b_matches_hand_computation():
    assert kendall_tau(HAND_X, HAND_Y) == pytest.approx(0.385758, abs=1e-5)
    assert kendall_tau(HAND_X, HAND_Y) == pytest.approx(5 / math.sqrt(168), abs=1e-12)


def test_spearman_rho_matches_hand_computation():
    assert spearman_rho(HAND_X, HAND_Y) == pytest.approx(0.424437, abs=1e-5)
    assert spearman_rho(HAND_X, HAND_Y) == pytest.approx(7 / math.sqrt(272), abs=1e-12)


@pytest.mark.parametrize(
    ("x", "y"),
    [
        ([1, 1, 1], [10.0, 50.0, 90.0]),  # one target class
        ([0, 1, 2], [50.0, 50.0, 50.0]),  # all scores equal
        ([0], [10.0]),  # single row
        ([], []),  # empty
    ],
    ids=["one-class", "equal-scores", "single-row", "empty"],
)
def test_rank_correlations_degenerate_inputs_return_nan_silently(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning must not escape
        assert math.isnan(kendall_tau(x, y))
        assert math.isnan(spearman_rho(x, y))


# --------------------------------------------------------------------------------------------
# Judge failures
# --------------------------------------------------------------------------------------------


def test_judge_failures_are_excluded_and_counted_never_scored_zero():
    df = eval_frame(
        [
            ("t1", "chaos", "low", 80.0, True),  # wrong: 80 is moderate
            ("t1", "chaos", "low", np.nan, False),  # failed; as score 0 it would be a right "low"
            ("t2", "chaos", "low", 5.0, False),  # failed with a stale score: still excluded
            ("t2", "chaos", "moderate", np.nan, True),  # judge_ok but no score: a failure too
        ]
    )
    out = summarize(df, SCALE, n_boot=50)
    assert out["n"] == 1
    assert out["judge_failures"] == 3
    assert out["accuracy"] == 0.0  # treating NaN as 0 would give 2/3 here
    assert out["mean_score_by_level"]["low"] == 80.0
    assert math.isnan(out["mean_score_by_level"]["moderate"])
    assert confusion(df, SCALE).to_numpy().sum() == 1


def test_summarize_rejects_unknown_levels_and_missing_columns():
    with pytest.raises(ValueError, match=r"unknown target level 'high'"):
        summarize(eval_frame([("t1", "r", "high", 50.0, True)]), SCALE, n_boot=10)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['judge_ok'\]"):
        summarize(eval_frame([("t1", "r", "low", 5.0, True)]).drop(columns="judge_ok"), SCALE)


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def _acc(d: pd.DataFrame) -> float:
    return accuracy(d["target_level"].to_numpy(), bin_scores(d["score"].to_numpy(), SCALE))


def test_bootstrap_ci_contains_point_and_is_deterministic_per_seed():
    df = synthetic()
    df = df[df["judge_ok"]]
    point = _acc(df)
    ci = bootstrap_ci(df, _acc, n_boot=100, seed=7)
    assert ci[0] <= point <= ci[1]
    assert ci[0] < ci[1]
    assert bootstrap_ci(df, _acc, n_boot=100, seed=7) == ci
    assert bootstrap_ci(df, _acc, n_boot=100, seed=8) != ci


def test_bootstrap_resamples_whole_tasks():
    # task A: 3 right rows; task B: 1 wrong row. Drawing 2 tasks gives AA = 1, AB = 3/4, BB = 0;
    # resampling rows instead would also give 1/4 and 1/2.
    df = eval_frame([("A", "r", "low", 10.0, True)] * 3 + [("B", "r", "low", 80.0, True)])
    seen = []

    def stat(d: pd.DataFrame) -> float:
        sizes = d.groupby("task_id").size()
        assert sizes.get("A", 0) % 3 == 0  # rows of task A always move together
        seen.append(_acc(d))
        return seen[-1]

    lo, hi = bootstrap_ci(df, stat, n_boot=100, seed=0)
    assert set(seen) == {0.0, 0.75, 1.0}
    assert (lo, hi) == (0.0, 1.0)


def test_bootstrap_skips_nan_stats_and_handles_empty():
    df = eval_frame([("A", "r", "low", 10.0, True), ("B", "r", "moderate", 50.0, True)])
    # τ is NaN whenever only one task (one class) is drawn; those resamples are skipped
    lo, hi = bootstrap_ci(
        df, lambda d: kendall_tau(d["target_level"].map(SCALE.index), d["score"]), n_boot=100
    )
    assert (lo, hi) == (1.0, 1.0)
    nan_pair = bootstrap_ci(df, lambda d: float("nan"), n_boot=20)
    assert all(math.isnan(v) for v in nan_pair)
    assert all(math.isnan(v) for v in bootstrap_ci(df.iloc[:0], _acc, n_boot=20))


def test_summarize_cis_equal_bootstrap_ci_with_same_seed():
    # summarize computes its CIs without materialising resamples; it must agree with scipy
    # on the materialised resamples (same seed -> same task draws)
    df = synthetic(n_tasks=12, per_cell=1, seed=3)
    out = summarize(df, SCALE, n_boot=100, seed=11, ci="percentile")
    valid = df[df["judge_ok"]]

    def tau(d: pd.DataFrame) -> float:
        return kendall_tau(d["target_level"].map(SCALE.index), d["score"])

    def rho(d: pd.DataFrame) -> float:
        return spearman_rho(d["target_level"].map(SCALE.index), d["score"])

    for key, fn in [("accuracy_ci", _acc), ("kendall_tau_ci", tau), ("spearman_rho_ci", rho)]:
        assert out[key] == pytest.approx(bootstrap_ci(valid, fn, n_boot=100, seed=11), abs=1e-12)


def test_jackknife_rank_stats_equal_scipy_on_each_left_out_task():
    from cpt.intervals import rank_stats
    from cpt.metrics import _level_indices, bin_scores

    df = synthetic(n_tasks=6, per_cell=1, seed=5)
    df = df[df["judge_ok"]].reset_index(drop=True)
    target = _level_indices(df["target_level"], SCALE)
    score = df["score"].to_numpy(float)
    pred = _level_indices(bin_scores(score, SCALE), SCALE)
    jack = rank_stats(df["task_id"], target, score, pred).jackknife()
    for i, task in enumerate(pd.unique(df["task_id"])):
        rest = df[df["task_id"] != task]
        x, y = rest["target_level"].map(SCALE.index), rest["score"]
        assert jack[i] == pytest.approx([_acc(rest), kendall_tau(x, y), spearman_rho(x, y)])


def test_summarize_interval_methods():
    df = synthetic(n_tasks=15, seed=2)
    for method in ("jackknife-t", "bca", "percentile"):
        out = summarize(df, SCALE, n_boot=300, seed=1, ci=method)
        for key in ("accuracy", "kendall_tau", "spearman_rho"):
            lo, hi = out[f"{key}_ci"]
            assert lo < out[key] < hi, (method, key)
    # the default widens where the percentile bootstrap is too narrow (few tasks)
    default, pct = summarize(df, SCALE), summarize(df, SCALE, ci="percentile")
    assert np.diff(default["kendall_tau_ci"])[0] > np.diff(pct["kendall_tau_ci"])[0]
    with pytest.raises(ValueError, match="ci must be one of"):
        summarize(df, SCALE, ci="normal")


def test_bootstrap_ci_1000_resamples_of_10k_rows():
    """Vectorised resampling at scale gives finite intervals around the point estimates (its
    speed is measured by `python -m benchmarks --only data`, not asserted here)."""
    rng = np.random.default_rng(0)
    n = 10_000
    df = pd.DataFrame(
        {
            "task_id": rng.integers(0, 300, n).astype(str),
            "rubric": rng.choice(["chaos", "rococo"], n),
            "target_level": rng.choice(LEVELS, n),
            "score": rng.integers(0, 101, n).astype(float),
            "judge_ok": True,
        }
    )
    point = float(np.mean(df["score"].to_numpy() > 50))
    lo, hi = bootstrap_ci(df, lambda d: float(np.mean(d["score"].to_numpy() > 50)), n_boot=1000)
    assert lo <= point <= hi and hi - lo < 0.1
    out = summarize(df, SCALE, n_boot=1000)
    for key in ("accuracy", "kendall_tau", "spearman_rho"):
        assert np.isfinite(out[f"{key}_ci"]).all()


# --------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------


def test_summarize_keys_and_cis_contain_point_estimates():
    out = summarize(synthetic(), SCALE, n_boot=300)
    assert set(out) == {
        "n",
        "judge_failures",
        "accuracy",
        "accuracy_ci",
        "kendall_tau",
        "kendall_tau_ci",
        "spearman_rho",
        "spearman_rho_ci",
        "mean_score_by_level",
    }
    assert out["n"] + out["judge_failures"] == 30 * 2 * 3 * 2
    for key in ("accuracy", "kendall_tau", "spearman_rho"):
        lo, hi = out[f"{key}_ci"]
        assert lo <= out[key] <= hi
    assert list(out["mean_score_by_level"]) == list(LEVELS)
    means = list(out["mean_score_by_level"].values())
    assert means == sorted(means)  # synthetic scores rise with the level


def test_summarize_empty_frame():
    out = summarize(synthetic().iloc[:0], SCALE)
    assert out["n"] == 0
    assert math.isnan(out["accuracy"])
    assert all(math.isnan(v) for v in out["kendall_tau_ci"])


def test_breakdown_shapes_and_level_order():
    df = synthetic(n_tasks=10)
    by_rubric = breakdown(df, SCALE, by="rubric", n_boot=50)
    assert by_rubric["rubric"].tolist() == ["chaos", "rococo"]
    assert list(by_rubric.columns) == [
        "rubric",
        "n",
        "judge_failures",
        "accuracy",
        "accuracy_ci_lo",
        "accuracy_ci_hi",
        "kendall_tau",
        "kendall_tau_ci_lo",
        "kendall_tau_ci_hi",
        "spearman_rho",
        "spearman_rho_ci_lo",
        "spearman_rho_ci_hi",
        "mean_score[low]",
        "mean_score[moderate]",
        "mean_score[extremely high]",
    ]
    assert by_rubric["n"].sum() + by_rubric["judge_failures"].sum() == len(df)

    by_level = breakdown(df, SCALE, by="target_level", n_boot=50)
    assert by_level["target_level"].tolist() == list(LEVELS)  # scale order, not alphabetical
    assert by_level["kendall_tau"].isna().all()  # one class per group

    both = breakdown(df, SCALE, by=["rubric", "target_level"], n_boot=50)
    assert both.shape[0] == 6
    assert both[["rubric", "target_level"]].iloc[:3].values.tolist() == [
        ["chaos", level] for level in LEVELS
    ]


def test_confusion_keeps_all_levels_in_order_with_zero_rows():
    df = eval_frame(
        [
            ("t1", "r", "low", 10.0, True),
            ("t1", "r", "low", 50.0, True),
            ("t2", "r", "extremely high", 95.0, True),
            ("t2", "r", "extremely high", 92.5, True),
            ("t3", "r", "moderate", np.nan, False),  # failure: no row counted for moderate
        ]
    )
    table = confusion(df, SCALE)
    assert list(table.index) == list(LEVELS)
    assert list(table.columns) == list(LEVELS)
    assert table.to_numpy().tolist() == [
        [1, 1, 0],
        [0, 0, 0],
        [0, 1, 1],
    ]


# --------------------------------------------------------------------------------------------
# Best-of-N
# --------------------------------------------------------------------------------------------


def bon_frame() -> pd.DataFrame:
    # (task_id, target_level, sample_idx, score, judge_ok); one rubric
    samples = [
        # top level: highest score; the failed sample 3 (stale 100) is never picked
        ("g1", "extremely high", 0, 80.0, True),
        ("g1", "extremely high", 1, 97.0, True),
        ("g1", "extremely high", 2, 97.0, True),
        ("g1", "extremely high", 3, 100.0, False),
        # low: closest to centre 20; 25 and 15 tie at distance 5 -> sample 1 (25)
        ("g2", "low", 0, 45.0, True),
        ("g2", "low", 1, 25.0, True),
        ("g2", "low", 2, 15.0, True),
        ("g2", "low", 3, 0.0, True),
        # moderate: closest to centre 66.25; 60 and 72.5 tie at 6.25 -> sample 2 (60)
        ("g3", "moderate", 0, np.nan, False),
        ("g3", "moderate", 1, 95.0, True),
        ("g3", "moderate", 2, 60.0, True),
        ("g3", "moderate", 3, 72.5, True),
        # no valid sample at all
        ("g4", "low", 0, np.nan, False),
        ("g4", "low", 1, np.nan, False),
    ]
    df = pd.DataFrame(
        samples, columns=["task_id", "target_level", "sample_idx", "score", "judge_ok"]
    )
    df.insert(1, "rubric", "chaos")
    return df


def test_best_of_n_paper_rule_picks_the_highest_score():
    out = best_of_n(bon_frame(), SCALE, ns=[1, 2, 3, 4])
    assert list(out.columns) == ["n", "groups", "no_valid", "accuracy", "mean_score"]
    assert out["n"].tolist() == [1, 2, 3, 4]
    assert out["groups"].tolist() == [4, 4, 4, 4]
    # n=1: g3's only sample failed, g4 has none; they stay in the denominator
    assert out["no_valid"].tolist() == [2, 1, 1, 1]
    # n=1: 80 (wrong), 45 (wrong); g3, g4 no valid sample -> 0 of 4
    # n=2: 97 ✓, 45 (wrong for low), 95 (wrong for moderate) -> 1 of 4
    # n=3, 4: the same picks (97, 45, 95); g1's failed 100 is never picked
    assert out["accuracy"].tolist() == pytest.approx([0.0, 0.25, 0.25, 0.25])
    assert out["mean_score"].tolist() == pytest.approx(
        [(80 + 45) / 2, (97 + 45 + 95) / 3, (97 + 45 + 95) / 3, (97 + 45 + 95) / 3]
    )


def test_best_of_n_picked_score_never_falls_with_n():
    df = synthetic(n_tasks=20, per_cell=4, seed=9)
    df["sample_idx"] = df.groupby(["task_id", "rubric", "target_level"]).cumcount()
    out = best_of_n(df, SCALE, ns=[1, 2, 3, 4], per_level=True)
    for _, level in out.groupby("target_level"):
        assert level["no_valid"].is_monotonic_decreasing
        assert level["groups"].nunique() == 1  # fixed denominator
    top = out[out["target_level"] == "extremely high"]
    assert top["mean_score"].is_monotonic_increasing
    assert out["target_level"].iloc[:3].tolist() == list(LEVELS)  # scale order


def test_best_of_n_bin_centre_rule():
    out = best_of_n(bon_frame(), SCALE, ns=[1, 2, 3, 4], rule="bin_centre")
    # n=1: 80 (moderate, wrong), 45 (moderate, wrong)
    # n=2: 97 ✓, 25 ✓, 95 (wrong for moderate)
    # n=3: 97 ✓, 25 ✓ (tie with 15 -> lower sample_idx), 60 ✓
    # n=4: unchanged: g1's failed 100 and g2's 0 are not picked, g3 keeps 60 over tied 72.5
    # g4 never has a valid sample: its own outcome, in every denominator
    assert out["accuracy"].tolist() == pytest.approx([0.0, 2 / 4, 3 / 4, 3 / 4])
    assert out["mean_score"].tolist() == pytest.approx(
        [(80 + 45) / 2, (97 + 25 + 95) / 3, (97 + 25 + 60) / 3, (97 + 25 + 60) / 3]
    )
    with pytest.raises(ValueError, match="rule must be one of"):
        best_of_n(bon_frame(), SCALE, ns=[1], rule="closest")


def test_best_of_n_per_model_and_validation():
    base = bon_frame().assign(model="base")
    cpt = bon_frame().assign(model="cpt")
    cpt.loc[cpt["task_id"] == "g2", "score"] = 45.0  # every g2 sample is wrong for cpt
    both = pd.concat([base, cpt], ignore_index=True)
    out = best_of_n(both, SCALE, ns=[4], rule="bin_centre")
    assert out[["n", "model", "groups"]].values.tolist() == [[4, "base", 4], [4, "cpt", 4]]
    assert out["accuracy"].tolist() == pytest.approx([3 / 4, 2 / 4])
    with pytest.raises(ValueError, match="ns must be"):
        best_of_n(base, SCALE, ns=[0, 1])
    with pytest.raises(ValueError, match=r"missing column\(s\) \['sample_idx'\]"):
        best_of_n(base.drop(columns="sample_idx"), SCALE, ns=[1])
