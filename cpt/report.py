"""The report: tables (Table 3 / Table 2 style, per rubric, per level, confusion,
Best-of-N, judge failures) and PNG plots, from judged evaluation rows.

Pure rendering: callers pass DataFrames; this module computes metrics with `cpt.metrics`
and writes `report.md`, `metrics.json` and `plots/*.png` atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cpt import metrics, store

# The paper's Table 3 (METHOD.md): baseline -> CPT, by base model id.
PAPER_TABLE3: dict[str, dict[str, tuple[float, float]]] = {
    "TheDrummer/Rocinante-12B-v1.1": {
        "accuracy": (0.55, 0.76),
        "kendall_tau": (0.62, 0.76),
        "spearman_rho": (0.76, 0.88),
    },
    "Qwen/Qwen3-4B": {
        "accuracy": (0.63, 0.77),
        "kendall_tau": (0.78, 0.82),
        "spearman_rho": (0.90, 0.93),
    },
    "mistralai/Mistral-Nemo-Instruct-2407": {
        "accuracy": (0.60, 0.83),
        "kendall_tau": (0.62, 0.81),
        "spearman_rho": (0.74, 0.93),
    },
    "mistralai/Mistral-Small-24B-Instruct-2501": {
        "accuracy": (0.52, 0.78),
        "kendall_tau": (0.73, 0.80),
        "spearman_rho": (0.85, 0.92),
    },
    "microsoft/phi-4": {
        "accuracy": (0.68, 0.77),
        "kendall_tau": (0.79, 0.82),
        "spearman_rho": (0.92, 0.93),
    },
}
# The paper's Table 2: the teacher's mean judge score (0-100) with no rubric, asked for low
# and for extremely high adherence (METHOD.md).
PAPER_TABLE2: dict[str, dict[str, float]] = {
    "DeepSeek-R1": {"no_rubric": 80.1, "low": 14.1, "extremely_high": 96.3},
    "o3-mini": {"no_rubric": 71.0, "low": 23.1, "extremely_high": 97.9},
}
METRICS = ("accuracy", "kendall_tau", "spearman_rho")
LABELS = {"accuracy": "Acc", "kendall_tau": "Kendall τ", "spearman_rho": "Spearman ρ"}


def judged_frame(rows: pd.DataFrame, judge: str = "judge") -> pd.DataFrame:
    """Evaluation judgements -> the frame `cpt.metrics` expects (one row per rubric part),
    with the judge's name and the judged item (response x rubric part) kept for panels."""
    if "generation_ok" in rows:  # failed generations were never judged (counted apart)
        rows = rows[rows["generation_ok"].fillna(True).astype(bool)]
    return pd.DataFrame(
        {
            "student": rows["student"],
            "model": rows["model"],
            "task_id": rows["task_id"],
            "rubric": rows["part_rubric"],
            "target_level": rows["part_level"],
            "score": rows["score"].astype(float),
            "judge_ok": rows["ok"].astype(bool),
            "sample_idx": rows["sample_idx"],
            "judge": judge,
            "item": rows["gen_id"].astype(str) + "|" + rows["part_rubric"].astype(str),
        }
    )


def generation_failures(rows: pd.DataFrame) -> dict[str, int]:
    """model -> student generations that failed (counted per response, not per rubric part)."""
    if "generation_ok" not in rows or rows.empty:
        return {}
    failed = rows[~rows["generation_ok"].fillna(True).astype(bool)]
    per_model = failed.drop_duplicates("gen_id").groupby("model").size()
    models = sorted(rows["model"].unique())
    return {m: int(per_model.get(m, 0)) for m in models}


def panel_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per judged item: the mean score of the judges that judged it; a failure only
    when every judge of the panel failed on it."""
    valid = df[df["judge_ok"] & df["score"].notna()]
    means = valid.groupby("item")["score"].mean()
    out = df.drop_duplicates("item").drop(columns=["score", "judge_ok"]).copy()
    out["score"] = out["item"].map(means)
    out["judge_ok"] = out["score"].notna()
    out["judge"] = "panel mean"
    return out.reset_index(drop=True)


def score_matrix(df: pd.DataFrame) -> pd.DataFrame:
    """item x judge -> score (NaN where that judge failed), for `panel_agreement`."""
    valid = df[df["judge_ok"] & df["score"].notna()]
    return valid.pivot_table(index="item", columns="judge", values="score", aggfunc="first")


def per_judge_summaries(
    df: pd.DataFrame, scale: metrics.LevelScale, seed: int
) -> dict[str, dict[str, dict[str, Any]]]:
    """judge -> model -> summarize() on the first sample of each prompt (no intervals)."""
    return {
        judge: student_summary(sub, scale, n_boot=0, seed=seed)
        for judge, sub in df.groupby("judge", sort=False)
    }


def per_judge_table(by_judge: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| judge | judged (base / CPT) | "
        + " | ".join(f"{LABELS[m]} base → CPT" for m in METRICS)
        + " | mean score per level (CPT) |",
        "|---|---|" + "---|" * len(METRICS) + "---|",
    ]
    for judge, by_model in by_judge.items():
        base, cpt = by_model.get("base"), by_model.get("cpt")
        if cpt is None:
            continue
        cells = [f"{fmt(base[m]) if base else '-'} → {fmt(cpt[m])}" for m in METRICS]
        means = ", ".join(f"{k} {fmt(v, 1)}" for k, v in cpt["mean_score_by_level"].items())
        lines.append(
            f"| {judge} | {base['n'] if base else '-'} / {cpt['n']} | "
            + " | ".join(cells)
            + f" | {means} |"
        )
    return "\n".join(lines)


# What each shipped teacher-prompt variant (conf/prompts) tells the teacher about the target.
TEMPLATE_VARIANTS = {
    "default": "the target level in words plus the judge's score band, e.g. 92.5-100",
    "paper": "the target level in words only, as in the paper",
}


def tuned_text(tuned: str) -> str:
    return f"external, `{tuned}` (no train stage)" if tuned else "base + the adapter trained here"


def agreement_heading(infos: dict[str, dict[str, Any]]) -> str:
    """Says what the repeated judgements measure: with a greedy judge (temperature 0) the
    same prompt gives the same answer, so it is a determinism check, not agreement."""
    temps = {
        i["agreement_temperature"]
        if i["agreement_temperature"] is not None
        else i["judge_temperature"]
        for i in infos.values()
    }
    if temps and all(t == 0 for t in temps if t is not None):
        return (
            "Determinism check: a share of the judgements repeated with another seed at "
            "temperature 0 (greedy). Agreement near 1 is expected by construction; it is not "
            "evidence of a reliable judge (see the judge panel for that; set "
            "`evaluate.agreement_temperature` > 0 to sample the judge instead)."
        )
    shown = ", ".join(f"{t:g}" for t in sorted(t for t in temps if t is not None))
    return (
        f"A share of the judgements repeated with another seed at temperature {shown}: how "
        "often the judge agrees with itself when it samples."
    )


def training_runs(
    run_dir: Path, dirs: list[Path]
) -> dict[str, tuple[pd.DataFrame, dict[str, Any]]]:
    """student -> (its train metrics per logged step, recipe / pairs / steps)."""
    out = {}
    for d in dirs:
        m = store.read_json(d / "manifest.json")
        conf = m.get("config", {})
        student = conf.get("student", {}).get("name", d.name)
        path = d / "metrics.parquet"
        frame = pd.read_parquet(path) if path.is_file() else pd.DataFrame()
        out[student] = (
            frame,
            {
                "recipe": (conf.get("train") or {}).get("name", "?"),
                "pairs": m.get("rows", "-"),
                "steps": m.get("steps", "-"),
            },
        )
    return out


def headline(summaries: dict[str, dict[str, dict[str, Any]]], tasks: dict[str, int]) -> list[str]:
    """One line per student for the console: Table 3's numbers, base -> CPT."""
    lines = []
    for student, by_model in sorted(summaries.items()):
        base, cpt = by_model.get("base"), by_model.get("cpt")
        if cpt is None:
            continue
        cells = [f"{LABELS[m]} {fmt(base[m]) if base else '-'} -> {fmt(cpt[m])}" for m in METRICS]
        n = tasks.get(student, "-")
        lines.append(f"{student} ({n} test task{'' if n == 1 else 's'}): " + ", ".join(cells))
    return lines


def fmt(x: float | None, digits: int = 2) -> str:
    return "NaN" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_ci(value: float, ci: tuple[float, float]) -> str:
    return f"{fmt(value)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def student_summary(
    df: pd.DataFrame, scale: metrics.LevelScale, n_boot: int, seed: int
) -> dict[str, dict[str, Any]]:
    """model ("base" / "cpt") -> summarize() on its first sample of each prompt (N=1)."""
    first = df[df["sample_idx"] == 0]
    return {
        model: metrics.summarize(sub, scale, n_boot=n_boot, seed=seed)
        for model, sub in first.groupby("model", sort=True)
    }


def paper_row(paper_id: str) -> dict[str, tuple[float, float]] | None:
    """The paper's Table 3 row of a student, by its declared `paper_id` or hub id."""
    return PAPER_TABLE3.get(paper_id)


def table3(
    summaries: dict[str, dict[str, dict[str, Any]]],
    paper_ids: dict[str, str],
    tasks: dict[str, int] | None = None,
) -> str:
    """Baseline -> CPT per student, with the paper's numbers where the paper trained it.

    `paper_ids`: student -> the id its paper row is looked up by (`student.paper_id`, else
    its path); `tasks`: student -> test tasks behind the numbers.
    """
    lines = [
        "| student | tasks | judged (base / CPT) | "
        + " | ".join(f"{LABELS[m]} base → CPT" for m in METRICS)
        + " | paper (base → CPT) | judge failures (base / CPT) |",
        "|---|---|---|" + "---|" * len(METRICS) + "---|---|",
    ]
    for student, by_model in sorted(summaries.items()):
        base, cpt = by_model.get("base"), by_model.get("cpt")
        cells = []
        for m in METRICS:  # a model may have no judged rows (all cut at max_new_tokens)
            b = fmt_ci(base[m], base[f"{m}_ci"]) if base else "-"
            c = fmt_ci(cpt[m], cpt[f"{m}_ci"]) if cpt else "-"
            cells.append(f"{b} → {c}")
        paper = paper_row(paper_ids.get(student, ""))
        ptext = (
            "; ".join(f"{LABELS[m]} {paper[m][0]:.2f} → {paper[m][1]:.2f}" for m in METRICS)
            if paper
            else "not in the paper"
        )
        n_tasks = (tasks or {}).get(student, "-")
        judged = " / ".join(str(s["n"]) if s else "-" for s in (base, cpt))
        fails = " / ".join(str(s["judge_failures"]) if s else "-" for s in (base, cpt))
        lines.append(
            f"| {student} | {n_tasks} | {judged} | " + " | ".join(cells) + f" | {ptext} | {fails} |"
        )
    return "\n".join(lines)


def paper_table2_markdown() -> str:
    """The paper's Table 2, to read beside ours (its teachers were DeepSeek-R1 and o3-mini)."""
    lines = ["| paper teacher | no rubric | low | extremely high |", "|---|---|---|---|"]
    for teacher, row in PAPER_TABLE2.items():
        lines.append(
            f"| {teacher} | {row['no_rubric']:.1f} | {row['low']:.1f} | "
            f"{row['extremely_high']:.1f} |"
        )
    return "\n".join(lines)


def code_line(git: dict[str, Any]) -> str:
    """`{'commit': 'abc…', 'dirty': True}` -> "abc1234 (uncommitted changes)"."""
    commit = git.get("commit")
    if not commit:
        return "unknown (not a git checkout)"
    return commit[:12] + (" (with uncommitted changes)" if git.get("dirty") else "")


def frame_markdown(df: pd.DataFrame, digits: int = 2) -> str:
    if df.empty:
        return "_(no rows)_"
    cols = list(df.columns)
    lines = ["| " + " | ".join(str(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append(
            "| "
            + " | ".join(fmt(v, digits) if isinstance(v, float) else str(v) for v in row)
            + " |"
        )
    return "\n".join(lines)


def _last(m: pd.DataFrame, col: str) -> str:
    """A train metric at the last logged step / averaged over the last quarter of steps."""
    if col not in m or m[col].dropna().empty:
        return "-"
    vals = m[col].dropna()
    tail = vals.iloc[-max(1, len(vals) // 4) :]
    return f"{fmt(float(vals.iloc[-1]))} / {fmt(float(tail.mean()))}"


def training_table(runs: dict[str, tuple[pd.DataFrame, dict[str, Any]]]) -> str:
    """One row per student from its train metrics: steps, pairs, first -> last loss, reward
    accuracy and margin at the last logged step (and over its last quarter), the recipe."""
    lines = [
        "| student | recipe | pairs | steps | loss first → last | reward accuracy "
        "(last step / last quarter) | reward margin (last step / last quarter) |",
        "|---|---|---|---|---|---|---|",
    ]
    for student, (m, summary) in sorted(runs.items()):
        loss = m["loss"].dropna() if "loss" in m else pd.Series(dtype=float)
        loss_text = (
            f"{fmt(float(loss.iloc[0]))} → {fmt(float(loss.iloc[-1]))}" if len(loss) else "-"
        )
        lines.append(
            f"| {student} | {summary.get('recipe', '-')} | {summary.get('pairs', '-')} | "
            f"{summary.get('steps', '-')} | {loss_text} | {_last(m, 'rewards/accuracies')} | "
            f"{_last(m, 'rewards/margins')} |"
        )
    return "\n".join(lines)


def _kappa(a: np.ndarray, b: np.ndarray, names: Sequence[str]) -> float:
    observed = float((a == b).mean())
    expected = sum(float((a == lv).mean()) * float((b == lv).mean()) for lv in names)
    return (observed - expected) / (1 - expected) if expected < 1 else float("nan")


def panel_agreement(scores: pd.DataFrame, scale: metrics.LevelScale) -> pd.DataFrame:
    """Agreement between the judges of a panel on the same responses, one row per pair.

    `scores`: one row per judged item (response x rubric), one column per judge holding its
    score (NaN where that judgement failed). Columns: judge_a, judge_b, compared (items both
    judged), level_agreement (same binned level), cohen_kappa (on binned levels),
    spearman (on scores), mean_abs_diff (score points).
    """
    judges = list(scores.columns)
    rows = []
    for i, a in enumerate(judges):
        for b in judges[i + 1 :]:
            both = scores[[a, b]].dropna()
            row: dict[str, Any] = {"judge_a": a, "judge_b": b, "compared": len(both)}
            if len(both):
                la = metrics.bin_scores(both[a].to_numpy(float), scale)
                lb = metrics.bin_scores(both[b].to_numpy(float), scale)
                row.update(
                    level_agreement=float((la == lb).mean()),
                    cohen_kappa=_kappa(la, lb, scale.names),
                    spearman=metrics.spearman_rho(both[a].to_numpy(float), both[b].to_numpy(float)),
                    mean_abs_diff=float((both[a] - both[b]).abs().mean()),
                )
            else:
                row.update(
                    level_agreement=float("nan"),
                    cohen_kappa=float("nan"),
                    spearman=float("nan"),
                    mean_abs_diff=float("nan"),
                )
            rows.append(row)
    return pd.DataFrame(rows)


def judge_agreement(
    first: pd.DataFrame, second: pd.DataFrame, scale: metrics.LevelScale
) -> dict[str, Any]:
    """Agreement of the judge with itself on the same responses (two sampling seeds).

    `first` has columns id, score, ok; `second` has first_id, score, ok. Pairs where either
    judgement failed are counted, not compared.
    """
    merged = second.merge(first, left_on="first_id", right_on="id", suffixes=("_2", "_1"))
    both = merged[merged["ok_1"].astype(bool) & merged["ok_2"].astype(bool)]
    out: dict[str, Any] = {
        "pairs": len(merged),
        "compared": len(both),
        "failed_pairs": int(len(merged) - len(both)),
    }
    if len(both) == 0:
        return {
            **out,
            "level_agreement": float("nan"),
            "cohen_kappa": float("nan"),
            "mean_abs_diff": float("nan"),
            "spearman": float("nan"),
        }
    a = metrics.bin_scores(both["score_1"].to_numpy(float), scale)
    b = metrics.bin_scores(both["score_2"].to_numpy(float), scale)
    return {
        **out,
        "level_agreement": float((a == b).mean()),
        "cohen_kappa": _kappa(a, b, scale.names),
        "mean_abs_diff": float((both["score_1"] - both["score_2"]).abs().mean()),
        "spearman": metrics.spearman_rho(
            both["score_1"].to_numpy(float), both["score_2"].to_numpy(float)
        ),
    }
