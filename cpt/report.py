"""The report: tables (Table 3 / Table 2 style, per rubric, per level, confusion,
Best-of-N, judge failures) and PNG plots, from judged evaluation rows.

Pure rendering: callers pass DataFrames; this module computes metrics with `cpt.metrics`
and writes `report.md`, `metrics.json` and `plots/*.png` atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

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
METRICS = ("accuracy", "kendall_tau", "spearman_rho")
LABELS = {"accuracy": "Acc", "kendall_tau": "Kendall τ", "spearman_rho": "Spearman ρ"}


def judged_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Evaluation judgements -> the frame `cpt.metrics` expects (one row per rubric part).

    Rows of failed student generations are left out: they were never judged, so they are
    neither a score nor a judge failure (`generation_failures` counts them)."""
    if "generation_ok" in rows:
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


def table3(summaries: dict[str, dict[str, dict[str, Any]]], paths: dict[str, str]) -> str:
    lines = [
        "| student | n | "
        + " | ".join(f"{LABELS[m]} base → CPT" for m in METRICS)
        + " | paper (base → CPT) | judge failures (base / CPT) |",
        "|---|---|" + "---|" * len(METRICS) + "---|---|",
    ]
    for student, by_model in sorted(summaries.items()):
        base, cpt = by_model.get("base"), by_model.get("cpt")
        cells = []
        for m in METRICS:
            b = fmt_ci(base[m], base[f"{m}_ci"]) if base else "-"
            cells.append(f"{b} → {fmt_ci(cpt[m], cpt[m + '_ci'])}")
        paper = PAPER_TABLE3.get(paths.get(student, ""))
        ptext = (
            "; ".join(f"{LABELS[m]} {paper[m][0]:.2f} → {paper[m][1]:.2f}" for m in METRICS)
            if paper
            else "-"
        )
        fails = f"{base['judge_failures'] if base else '-'} / {cpt['judge_failures']}"
        lines.append(f"| {student} | {cpt['n']} | " + " | ".join(cells) + f" | {ptext} | {fails} |")
    return "\n".join(lines)


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


# ---------------------------------------------------------------------------------- plots


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    store.atomic_write_bytes(path, buf.getvalue())


def plot_score_distributions(
    df: pd.DataFrame, scale: metrics.LevelScale, title: str, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid = df[df["judge_ok"]]
    models = sorted(valid["model"].unique())
    fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(scale.names), 4.2))
    width = 0.8 / max(len(models), 1)
    colors = {"base": "#8c8c8c", "cpt": "#1f77b4"}
    for j, model in enumerate(models):
        data = [
            valid[(valid["model"] == model) & (valid["target_level"] == lv)]["score"].values
            for lv in scale.names
        ]
        pos = [i + (j - (len(models) - 1) / 2) * width for i in range(len(scale.names))]
        box = ax.boxplot(
            [d if len(d) else [float("nan")] for d in data],
            positions=pos,
            widths=width * 0.9,
            patch_artist=True,
            manage_ticks=False,
        )
        for patch in box["boxes"]:
            patch.set_facecolor(colors.get(model, "#ff7f0e"))
            patch.set_alpha(0.7)
        ax.plot(
            [],
            [],
            color=colors.get(model, "#ff7f0e"),
            lw=8,
            alpha=0.7,
            label={"base": "baseline", "cpt": "CPT"}.get(model, model),
        )
    for edge in scale.upper_edges[:-1]:
        ax.axhline(edge, color="k", ls=":", lw=0.8)
    ax.set_xticks(range(len(scale.names)), [n.replace("_", " ") for n in scale.names])
    ax.set_xlabel("target level (system prompt)")
    ax.set_ylabel("judge score (0-100)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.legend(loc="upper left")
    _save(fig, path)
    plt.close(fig)


def plot_confusion(conf: pd.DataFrame, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    im = ax.imshow(conf.values, cmap="Blues")
    names = [str(n).replace("_", " ") for n in conf.index]
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            ax.text(
                j,
                i,
                int(conf.values[i, j]),
                ha="center",
                va="center",
                color="white" if conf.values[i, j] > conf.values.max() / 2 else "black",
            )
    ax.set_xlabel("judged level (binned score)")
    ax.set_ylabel("target level")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="responses")
    _save(fig, path)
    plt.close(fig)


def plot_best_of_n(bon: pd.DataFrame, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    for model, sub in bon.groupby("model"):
        ax.plot(
            sub["n"],
            sub["accuracy"],
            marker="o",
            label={"base": "baseline", "cpt": "CPT"}.get(model, model),
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(bon["n"].unique()), [str(n) for n in sorted(bon["n"].unique())])
    ax.set_xlabel("N (samples; the judge picks the best)")
    ax.set_ylabel("accuracy of the picked sample")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


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
    observed = float((a == b).mean())
    expected = sum(float((a == lv).mean()) * float((b == lv).mean()) for lv in scale.names)
    kappa = (observed - expected) / (1 - expected) if expected < 1 else float("nan")
    return {
        **out,
        "level_agreement": observed,
        "cohen_kappa": kappa,
        "mean_abs_diff": float((both["score_1"] - both["score_2"]).abs().mean()),
        "spearman": metrics.spearman_rho(
            both["score_1"].to_numpy(float), both["score_2"].to_numpy(float)
        ),
    }
