"""report: every finished evaluation (and teacher adherence) of the run -> report/.
Reads all finished evaluate/*/ and adherence/*/ folders under run_dir (so one report covers
every student of a sweep, and re-rendering needs no config but run_dir); writes
report/report.md, report/metrics.json and report/plots/*.png.
Run alone (re-render, nothing recomputed): python jobs/launch.py stage=report run_dir=<path>
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd

from cpt import metrics, report, store
from cpt.config import CptConfig
from cpt.graph import StageContext, StageSpec
from cpt.stages import STAGES


def params(cfg: CptConfig) -> dict[str, Any]:
    return {"report": cfg.report, "levels": cfg.levels}


def finished(run_dir: Path, stage: str) -> list[Path]:
    return sorted(d for d in (run_dir / stage).glob("*") if store.is_done(d))


def render(cfg: CptConfig, out: Path) -> dict[str, Any]:
    """Write report.md, metrics.json and plots under `out`; returns the metrics."""
    run_dir = Path(cfg.run_dir).absolute()
    scale = cfg.levels.scale
    evals = finished(run_dir, "evaluate")
    frames, paths, manifests, agreements, gen_failures = [], {}, {}, {}, {}
    for d in evals:
        m = store.read_json(d / "manifest.json")
        student = m["config"]["student"]["name"]
        paths[student] = m["config"]["student"]["path"]
        manifests[student] = d
        judged = store.read_table(d).to_pandas()
        frames.append(report.judged_frame(judged))
        gen_failures[student] = report.generation_failures(judged)
        n_agree = m.get("agreement", {}).get("n_shards", 0)
        if n_agree:
            again = store.read_shards(d / "agreement", n_agree).to_pandas()
            agreements[student] = report.judge_agreement(judged, again, scale)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    plots = out / "plots"
    summaries: dict[str, Any] = {}
    sections: list[str] = []
    ns = sorted({n for n in cfg.report.best_of_n if n <= cfg.evaluate.samples} | {1})
    for student, sdf in df.groupby("student", sort=True) if len(df) else []:
        summaries[student] = report.student_summary(sdf, scale, cfg.report.n_boot, cfg.seed)
        first = sdf[sdf["sample_idx"] == 0]
        per_rubric = metrics.breakdown(first, scale, ["model", "rubric"], n_boot=0)
        per_level = metrics.breakdown(first, scale, ["model", "target_level"], n_boot=0)
        bon = metrics.best_of_n(sdf, scale, ns)
        report.plot_score_distributions(
            first, scale, f"{student}: judge score by target level", plots / f"{student}_scores.png"
        )
        report.plot_best_of_n(
            bon, f"{student}: Best-of-N (judge as selector)", plots / f"{student}_best_of_n.png"
        )
        conf_md = []
        for model, mdf in first.groupby("model", sort=True):
            conf = metrics.confusion(mdf, scale)
            report.plot_confusion(
                conf,
                f"{student} / {model}: target vs judged level",
                plots / f"{student}_{model}_confusion.png",
            )
            conf_md += [
                f"**{model}**",
                "",
                report.frame_markdown(conf.reset_index()),
                "",
                f"![confusion {model}](plots/{student}_{model}_confusion.png)",
                "",
            ]
        keep = [
            "model",
            "rubric",
            "n",
            "judge_failures",
            "accuracy",
            "kendall_tau",
            "spearman_rho",
            *[c for c in per_rubric.columns if c.startswith("mean_score")],
        ]
        sections += [
            f"## {student}",
            "",
            f"Evaluation folder: `{manifests[student].relative_to(run_dir)}` "
            f"([manifest]({Path('..') / manifests[student].relative_to(run_dir) / 'manifest.json'}))",
            "",
            f"![scores](plots/{student}_scores.png)",
            "",
            "### Per rubric (first sample of each prompt)",
            "",
            report.frame_markdown(per_rubric[[c for c in keep if c in per_rubric.columns]]),
            "",
            "### Per target level",
            "",
            report.frame_markdown(
                per_level[["model", "target_level", "n", "judge_failures", "accuracy"]]
            ),
            "",
            "### Confusion (rows: target level, columns: judged level)",
            "",
            *conf_md,
            "### Best-of-N",
            "",
            "The judge picks one of the first N samples per prompt: the highest score for the "
            "top level, else the score closest to the centre of the target bin (ties: the "
            "first sample).",
            "",
            report.frame_markdown(bon),
            "",
            f"![best of n](plots/{student}_best_of_n.png)",
            "",
        ]
    table2 = [
        (d, (d / "table2.md").read_text())
        for d in finished(run_dir, "adherence")
        if (d / "table2.md").exists()
    ]
    failures = {s: {m: v["judge_failures"] for m, v in by.items()} for s, by in summaries.items()}
    md = [
        "# CPT report",
        "",
        f"Run: `{run_dir}`  ",
        f"Rendered: {time.strftime('%Y-%m-%d %H:%M:%S')}  ",
        f"Levels: {', '.join(f'{lv.name} ≤ {lv.upper:g}' for lv in cfg.levels.levels)}  ",
        f"Code: {store.git_commit()}",
        "",
        "## Students: baseline → CPT (Table 3)",
        "",
        "Metrics on the first sample of each (task, rubric, target level); 95 % bootstrap CIs "
        "over tasks. Judge failures are excluded from the metrics and counted here.",
        "",
        report.table3(summaries, paths) if summaries else "_No finished evaluation yet._",
        "",
        "## Teacher adherence (Table 2)",
        "",
        *[f"`{d.relative_to(run_dir)}`\n\n{text}" for d, text in table2],
        "",
        "## Judge failures",
        "",
        *[f"- {s}: " + ", ".join(f"{m} {n}" for m, n in by.items()) for s, by in failures.items()],
        "",
        "## Generation failures (student responses that failed; never judged, not in the metrics)",
        "",
        *[
            f"- {s}: " + ", ".join(f"{m} {n}" for m, n in by.items())
            for s, by in sorted(gen_failures.items())
        ],
        "",
        "## Judge agreement (same responses judged twice, another sampling seed)",
        "",
        report.frame_markdown(pd.DataFrame([{"student": s, **a} for s, a in agreements.items()]))
        if agreements
        else "_No repeated judgements (evaluate.agreement_fraction=0)._",
        "",
        *sections,
        "## Stage manifests",
        "",
        *[
            f"- [{d.relative_to(run_dir)}](../{d.relative_to(run_dir)}/manifest.json)"
            for stage in STAGES
            if stage != SPEC.name
            for d in finished(run_dir, stage)
        ],
    ]
    store.atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    clean = {
        s: {m: {k: v for k, v in r.items()} for m, r in by.items()} for s, by in summaries.items()
    }
    store.atomic_write_json(out / "metrics.json", clean)
    return {
        "students": sorted(summaries),
        "rows": len(df),
        "agreement": agreements,
        "judge_failures": failures,
        "generation_failures": gen_failures,
    }


def run(ctx: StageContext) -> dict[str, Any]:
    return render(ctx.cfg, ctx.out_dir)


def plan(cfg: CptConfig) -> dict[str, Any]:
    return {"renders": "all finished evaluations"}


SPEC = StageSpec("report", ("evaluate",), params, run, plan, always_run=True)
