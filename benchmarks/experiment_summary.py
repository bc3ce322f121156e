"""The figures of a finished experiment run, as the RESULTS.md section (benchmarks/experiments.md).

    python -m benchmarks.experiment_summary outputs/runs/concision_cpu            # print
    python -m benchmarks.experiment_summary outputs/runs/concision_cpu --write    # + RESULTS.md

Reads only the run folder (stage manifests, shards, report/metrics.json), so the section can be
re-rendered without recomputing anything: sizes and time per stage, the teacher's spread per
level (the data CPT learns from), the pairs the adherence filter kept, the training curve, the
held-out preference accuracy, base → CPT accuracy / τ / ρ with 95 % CIs, and the words per
requested level before and after. `--write` replaces the experiments section of RESULTS.md
(its `## Experiments` heading); `python -m benchmarks` keeps it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from benchmarks import md_table
from benchmarks.run import EXPERIMENTS, HERE
from cpt import program_judges, store

STAGES = ("tasks", "generate", "sysprompts", "adherence", "pairs", "train", "evaluate", "report")
METRICS = (("accuracy", "Acc"), ("kendall_tau", "Kendall τ"), ("spearman_rho", "Spearman ρ"))


def stage_dirs(run: Path, stage: str) -> list[Path]:
    return sorted(d for d in (run / stage).glob("*") if store.is_done(d))


def one(run: Path, stage: str) -> Path:
    """The newest finished folder of `stage` (a run of one experiment has one)."""
    dirs = stage_dirs(run, stage)
    if not dirs:
        raise SystemExit(f"{run}: no finished {stage}/ folder; run the experiment first")
    return max(dirs, key=lambda d: store.read_json(d / "manifest.json").get("ended", 0))


def words(text: str | None) -> int:
    return len(program_judges.words(text or ""))


def timing(run: Path) -> tuple[str, float]:
    rows, total = [], 0.0
    for stage in STAGES:
        dirs = stage_dirs(run, stage) if stage != "report" else []
        for d in dirs:
            m = store.read_json(d / "manifest.json")
            rows.append([stage, m.get("rows", ""), f"{m.get('seconds', 0):.0f}"])
            total += float(m.get("seconds", 0))
    return md_table(["stage", "rows", "seconds"], rows), total


def level_table(frame: pd.DataFrame, by: list[str], levels: list[str]) -> str:
    """Mean words, mean score and the share of responses in each level's band, per level."""
    rows = []
    for key, sub in frame.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        ok = sub[sub["ok"]]
        rows.append(
            [
                *key,
                len(sub),
                f"{sub['words'].mean():.1f}",
                f"{ok['score'].mean():.1f}" if len(ok) else "-",
                *[f"{(ok['judged'] == lv).mean():.2f}" if len(ok) else "-" for lv in levels],
                int((~sub["ok"]).sum()),
                int((sub.get("finish_reason", pd.Series(dtype=str)) == "length").sum()),
            ]
        )
    head = [*by, "n", "mean words", "mean score", *[f"share {lv}" for lv in levels]]
    return md_table([*head, "judge failures", "cut at max_new_tokens"], rows)


def judged_levels(scores: pd.Series, cfg: dict) -> pd.Series:
    uppers = [(lv["name"], float(lv["upper"])) for lv in cfg["levels"]["levels"]]

    def level(s: float) -> str:
        return next((name for name, up in uppers if s <= up), uppers[-1][0]) if s == s else ""

    return scores.map(level)


def summary(run: Path) -> str:
    run = run.absolute()
    ev_dir = one(run, "evaluate")
    cfg = store.read_json(ev_dir / "manifest.json")["config"]
    levels = [lv["name"] for lv in cfg["levels"]["levels"]]
    order = {lv: i for i, lv in enumerate(levels)}

    gens = store.read_table(one(run, "generate")).to_pandas()
    adh = store.read_table(one(run, "adherence")).to_pandas()
    teacher = adh.merge(gens[["id", "text", "finish_reason"]], left_on="gen_id", right_on="id")
    teacher["words"] = teacher["text"].map(words)
    teacher["judged"] = judged_levels(teacher["score"], cfg)
    teacher = teacher.sort_values("part_level", key=lambda s: s.map(order))

    pairs_dir = one(run, "pairs")
    pm = store.read_json(pairs_dir / "manifest.json")
    train_dir = one(run, "train")
    tsum = store.read_json(train_dir / "train_summary.json")
    curve = pd.read_parquet(train_dir / "metrics.parquet")

    ev = store.read_table(ev_dir).to_pandas()
    n_resp = store.read_json(ev_dir / "manifest.json").get("responses", {}).get("n_shards", 0)
    if n_resp:  # the student's finish reasons live with its responses
        resp = store.read_shards(ev_dir / "responses", n_resp, ["id", "finish_reason"]).to_pandas()
        ev = ev.merge(resp.rename(columns={"id": "gen_id"}), on="gen_id", how="left")
    ev["words"] = ev["response"].map(words)
    ev["judged"] = judged_levels(ev["score"], cfg)
    first = ev[ev["sample_idx"] == 0].sort_values(
        ["model", "part_level"], key=lambda s: s.map(order) if s.name == "part_level" else s
    )
    metrics = store.read_json(run / "report" / "metrics.json")[cfg["student"]["name"]]
    stage_table, total = timing(run)

    def ci(m: dict, k: str) -> str:
        lo, hi = m[f"{k}_ci"]
        return f"{m[k]:.2f} [{lo:.2f}, {hi:.2f}]"

    table3 = md_table(
        ["model", "n", *[name for _, name in METRICS], "judge failures"],
        [
            [
                model,
                metrics[model]["n"],
                *[ci(metrics[model], k) for k, _ in METRICS],
                metrics[model]["judge_failures"],
            ]
            for model in ("base", "cpt")
            if model in metrics
        ],
    )
    base, cpt = metrics.get("base"), metrics.get("cpt")
    separated = base and cpt and cpt["accuracy_ci"][0] > base["accuracy_ci"][1]
    every = max(1, len(curve) // 12)
    curve_rows = [
        [
            int(r["step"]),
            f"{r['loss']:.4f}",
            f"{r.get('rewards/accuracies', float('nan')):.2f}",
            f"{r.get('rewards/margins', float('nan')):.3f}",
            f"{r.get('learning_rate', float('nan')):.2e}",
        ]
        for _, r in curve.iloc[::every].iterrows()
    ]
    ev_eval = tsum.get("eval") or {}
    filt = {k: v for k, v in pm.items() if k.startswith(("rows", "dropped"))}
    return "\n".join(
        [
            f"Run folder `{run.name}`; code `{store.read_json(ev_dir / 'manifest.json')['git']}`; "
            f"summarised {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            "**Base → CPT on held-out tasks** (program judge `concision-words`; first sample of "
            "each (task, level); 95 % bootstrap CIs over tasks):",
            "",
            table3,
            "",
            f"Success criterion (CPT accuracy CI entirely above the base CI): "
            f"**{'met' if separated else 'not met'}**.",
            "",
            "**Student responses per requested level** (judged level shares; words are exact):",
            "",
            level_table(first, ["model", "part_level"], levels),
            "",
            "**Teacher spread per requested level** (all samples; the data CPT learns from):",
            "",
            level_table(teacher, ["part_level"], levels),
            "",
            f"**Pairs after the adherence filter** (min_margin={cfg['pairs']['min_margin']}): "
            + ", ".join(f"{k} {v}" for k, v in sorted(filt.items())),
            "",
            f"**Training** ({tsum.get('steps', len(curve))} optimizer steps on "
            f"{tsum['data']['rows']} rows; held-out pairs: loss "
            f"{ev_eval.get('eval_loss', float('nan')):.4f}, preference accuracy "
            f"{ev_eval.get('eval_rewards/accuracies', float('nan')):.2f}, margin "
            f"{ev_eval.get('eval_rewards/margins', float('nan')):.3f}):",
            "",
            md_table(["step", "loss", "reward accuracy", "reward margin", "lr"], curve_rows),
            "",
            f"**Time per stage** (sum {total / 60:.1f} min):",
            "",
            stage_table,
            "",
            f"Plot of judge score vs requested level, base and CPT: "
            f"`{run.name}/report/plots/{cfg['student']['name']}_scores.png`.",
        ]
    )


def write_section(text: str, title: str, path: Path = HERE / "RESULTS.md") -> None:
    """Replace the experiments section of RESULTS.md (or append one) with `title` + `text`."""
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    section = "\n".join([EXPERIMENTS, "", f"### {title}", "", text, ""])
    start = old.find(f"\n{EXPERIMENTS}\n")
    if start < 0:
        path.write_text(old.rstrip("\n") + "\n\n" + section, encoding="utf-8")
        return
    end = old.find("\n## ", start + 1)
    rest = old[end + 1 :] if end >= 0 else ""
    path.write_text(old[: start + 1] + section + ("\n" + rest if rest else ""), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--write", action="store_true", help="replace the section in RESULTS.md")
    ap.add_argument("--title", default="concision_cpu: CPT on SmolLM2-135M, program judge")
    ns = ap.parse_args()
    text = summary(ns.run_dir)
    print(text)
    if ns.write:
        write_section(text, ns.title)


if __name__ == "__main__":
    main()
