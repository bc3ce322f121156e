"""The report's PNG plots: judge scores per target level, confusion heatmaps, the
Best-of-N curves (the paper's Figure 1) and the training curves. Legends sit off the
data, bin edges are labelled, and heatmaps of one student share a colour scale.
Files are written atomically through `cpt.store`.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from cpt import store
from cpt.levels import LevelScale


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    store.atomic_write_bytes(path, buf.getvalue())


MODEL_LABELS = {"base": "baseline", "cpt": "CPT"}
MODEL_COLORS = {"base": "#8c8c8c", "cpt": "#1f77b4"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bin_lines(ax, scale: LevelScale, outside: bool = True) -> None:
    """Dotted lines at the bin edges, each labelled with its value and the two levels it
    separates: right of the axes (`outside`), or inside at the right end."""
    for i, edge in enumerate(scale.upper_edges[:-1]):
        ax.axhline(edge, color="k", ls=":", lw=0.8)
        below, above = (scale.names[i], scale.names[i + 1])
        ax.annotate(
            f"{edge:g}: {below.replace('_', ' ')} | {above.replace('_', ' ')}",
            xy=(1.0 if outside else 0.99, edge),
            xycoords=("axes fraction", "data"),
            xytext=(4, 0) if outside else (0, 2),
            textcoords="offset points",
            ha="left" if outside else "right",
            va="center" if outside else "bottom",
            fontsize=8,
        )


def plot_score_distributions(df: pd.DataFrame, scale: LevelScale, title: str, path: Path) -> None:
    """Box plots of the judge score per target level, baseline beside CPT; the bin edges
    are labelled on the right and the legend sits below the axes, off the data."""
    plt = _pyplot()
    valid = df[df["judge_ok"]]
    models = sorted(valid["model"].unique())
    fig, ax = plt.subplots(figsize=(2.6 + 2.2 * len(scale.names), 4.6))
    width = 0.8 / max(len(models), 1)
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
            patch.set_facecolor(MODEL_COLORS.get(model, "#ff7f0e"))
            patch.set_alpha(0.7)
        n = sum(len(d) for d in data)
        ax.plot(
            [],
            [],
            color=MODEL_COLORS.get(model, "#ff7f0e"),
            lw=8,
            alpha=0.7,
            label=f"{MODEL_LABELS.get(model, model)} (n = {n})",
        )
    _bin_lines(ax, scale)
    ax.set_xticks(range(len(scale.names)), [n.replace("_", " ") for n in scale.names])
    ax.set_xlabel("target level (system prompt)")
    ax.set_ylabel("judge score (0-100)")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=max(len(models), 1))
    _save(fig, path)
    plt.close(fig)


def plot_confusion(conf: pd.DataFrame, title: str, path: Path, vmax: float | None = None) -> None:
    """Target x judged level counts. Pass the same `vmax` to every model's heatmap so their
    colours mean the same count."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    top = float(vmax if vmax is not None else max(conf.values.max(), 1))
    im = ax.imshow(conf.values, cmap="Blues", vmin=0, vmax=top)
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
                color="white" if conf.values[i, j] > top / 2 else "black",
            )
    ax.set_xlabel("judged level (binned score)")
    ax.set_ylabel("target level")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="responses")
    _save(fig, path)
    plt.close(fig)


def plot_best_of_n(
    per_level: pd.DataFrame,
    overall: pd.DataFrame,
    scale: LevelScale,
    title: str,
    path: Path,
) -> None:
    """Figure 1 of the paper: the judge score of the judge's pick among N samples, per
    target level (left), and the accuracy of the pick over all prompts (right); baseline
    dashed, CPT solid; legend below the axes."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 4.2))
    cmap = plt.get_cmap("viridis")
    colors = {lv: cmap(i / max(len(scale.names) - 1, 1)) for i, lv in enumerate(scale.names)}
    order = {lv: i for i, lv in enumerate(scale.names)}
    pairs = sorted(
        per_level.groupby(["model", "target_level"]), key=lambda kv: (kv[0][0], order[kv[0][1]])
    )
    for (model, level), sub in pairs:
        left.plot(
            sub["n"],
            sub["mean_score"],
            marker="o",
            ls="--" if model == "base" else "-",
            color=colors.get(level, "k"),
            label=f"{MODEL_LABELS.get(model, model)}, {str(level).replace('_', ' ')}",
        )
    _bin_lines(left, scale, outside=False)
    left.set_ylabel("judge score of the pick (0-100)")
    left.set_ylim(-2, 102)
    left.set_title("score of the best of N")
    for model, sub in overall.groupby("model", sort=True):
        right.plot(
            sub["n"],
            sub["accuracy"],
            marker="o",
            ls="--" if model == "base" else "-",
            color=MODEL_COLORS.get(model, "#ff7f0e"),
            label=MODEL_LABELS.get(model, model),
        )
    right.set_ylabel("accuracy of the pick (binned level = target)")
    right.set_ylim(0, 1.02)
    right.set_title("accuracy of the best of N")
    ns = [int(n) for n in sorted(per_level["n"].unique())] or [1]
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlim(ns[0] / 1.25, ns[-1] * 1.25)  # explicit: one N (or no data) is valid too
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("N (samples per prompt; the judge picks one)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8)
    fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


TRAIN_CURVES = (
    ("loss", "DPO loss"),
    ("rewards/accuracies", "reward accuracy (chosen > rejected)"),
    ("rewards/margins", "reward margin (chosen - rejected)"),
)


def plot_training(runs: dict[str, pd.DataFrame], path: Path) -> None:
    """Loss, reward accuracy and reward margin per logged step, one line per student."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TRAIN_CURVES), figsize=(4.2 * len(TRAIN_CURVES), 3.8))
    for ax, (col, label) in zip(axes, TRAIN_CURVES):
        for student, m in sorted(runs.items()):
            if col in m and "step" in m and m[col].notna().any():
                ax.plot(m["step"], m[col], marker=".", label=student)
        ax.set_xlabel("optimizer step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if col == "loss":
            ax.axhline(0.6931, color="k", ls=":", lw=0.8)
            ax.annotate(
                "ln 2 (no preference)",
                xy=(0.02, 0.6931),
                xycoords=("axes fraction", "data"),
                xytext=(0, -10),
                textcoords="offset points",
                fontsize=8,
            )
        if col == "rewards/accuracies":
            ax.set_ylim(-0.02, 1.02)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), title="student")
    _save(fig, path)
    plt.close(fig)
