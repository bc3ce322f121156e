"""report: every finished evaluation (and teacher adherence) of the run -> report/.
Reads all finished evaluate/*/ and adherence/*/ folders under run_dir (so one report covers
every student of a sweep, and re-rendering needs no config but run_dir); writes
report/report.md, report/metrics.json and report/plots/*.png.
Run alone (re-render, nothing recomputed): python jobs/launch.py stage=report run_dir=<path>
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpt import store
from cpt.config import CptConfig
from cpt.graph import StageContext, StageSpec
from cpt.stages import STAGES

if TYPE_CHECKING:
    import pandas as pd

# pandas, scipy and matplotlib are imported where a report is rendered, not here: every
# launch imports this module for its SPEC, and those imports cost seconds.


def params(cfg: CptConfig) -> dict[str, Any]:
    return {"report": cfg.report, "levels": cfg.levels}


def finished(run_dir: Path, stage: str) -> list[Path]:
    return sorted(d for d in (run_dir / stage).glob("*") if store.is_done(d))


def _student_info(d: Path, m: dict[str, Any]) -> dict[str, Any]:
    """What the report says about one evaluation, from its manifest."""
    conf = m.get("config", {})
    student = conf.get("student", {})
    judge = conf.get("judge", {})
    panel = [judge.get("name", "judge"), *m.get("panel", {})]
    return {
        "dir": d,
        "path": student.get("path", ""),
        "paper_id": student.get("paper_id") or student.get("path", ""),
        "judges": panel,
        "judge_temperature": (judge.get("sampling") or {}).get("temperature"),
        "agreement_temperature": m.get("agreement_temperature"),
        "prompts": (conf.get("prompts") or {}).get("name", "?"),
        "recipe": (conf.get("train") or {}).get("name", "?"),
        "tuned": m.get("tuned", ""),
    }


def _not_truncated(rows: pd.DataFrame) -> pd.DataFrame:
    """Responses cut at max_new_tokens were not judged: they stay out of the metrics."""
    from cpt.judge import TRUNCATED

    return rows[rows["error"] != TRUNCATED] if "error" in rows else rows


def _judged(d: Path, m: dict[str, Any], info: dict[str, Any]) -> pd.DataFrame:
    """Every judgement of one evaluation: the main judge's, then each panel judge's."""
    import pandas as pd

    from cpt import report

    main = _not_truncated(store.read_table(d).to_pandas())
    frames = [report.judged_frame(main, info["judges"][0])]
    for name, meta in m.get("panel", {}).items():
        rows = store.read_shards(d / "panel" / name, meta["n_shards"]).to_pandas()
        frames.append(report.judged_frame(_not_truncated(rows), name))
    return pd.concat(frames, ignore_index=True)


def render(cfg: CptConfig, out: Path) -> dict[str, Any]:
    """Write report.md, metrics.json and plots under `out`; returns the metrics."""
    import pandas as pd

    from cpt import calibration, metrics, report
    from cpt import plots as plots_mod
    from cpt.judge import TRUNCATED

    run_dir = Path(cfg.run_dir).absolute()
    scale = cfg.levels.scale
    frames, infos, agreements, gen_failures, calibrations = [], {}, {}, {}, []
    truncated: dict[str, dict[str, int]] = {}  # student -> model -> responses not judged
    for d in finished(run_dir, "evaluate"):
        m = store.read_json(d / "manifest.json")
        student = m["config"]["student"]["name"]
        infos[student] = info = _student_info(d, m)
        frames.append(_judged(d, m, info))
        rows = store.read_table(d).to_pandas()
        if "error" in rows and (rows["error"] == TRUNCATED).any():
            cut = rows[rows["error"] == TRUNCATED]
            truncated[student] = cut.groupby("model").size().to_dict()
        gen_failures[student] = report.generation_failures(_not_truncated(rows))
        if m["config"].get("judge", {}).get("kind", "model") != "program":
            cal = calibration.program_calibration(_not_truncated(rows), scale)
            calibrations += [{"student": student, **r} for r in cal.to_dict("records")]
        n_agree = m.get("agreement", {}).get("n_shards", 0)
        if n_agree:
            again = store.read_shards(d / "agreement", n_agree).to_pandas()
            judged = store.read_table(d).to_pandas()
            agreements[student] = report.judge_agreement(judged, again, scale)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    plots = out / "plots"
    summaries: dict[str, Any] = {}
    per_judge: dict[str, dict[str, Any]] = {}
    panels: dict[str, pd.DataFrame] = {}
    tasks: dict[str, int] = {}
    bon_rows: dict[str, pd.DataFrame] = {}
    sections: list[str] = []
    for student, all_judges in df.groupby("student", sort=True) if len(df) else []:
        info = infos[student]
        sdf = report.panel_frame(all_judges) if len(info["judges"]) > 1 else all_judges
        if len(info["judges"]) > 1:
            per_judge[student] = report.per_judge_summaries(all_judges, scale, cfg.seed)
            panels[student] = report.panel_agreement(report.score_matrix(all_judges), scale)
        summaries[student] = report.student_summary(sdf, scale, cfg.report.n_boot, cfg.seed)
        samples = int(sdf["sample_idx"].max()) + 1  # from the data: re-rendering needs no config
        ns = sorted({n for n in cfg.report.best_of_n if n <= samples} | {1, samples})
        first = sdf[sdf["sample_idx"] == 0]
        tasks[student] = int(first["task_id"].nunique())
        per_rubric = metrics.breakdown(first, scale, ["model", "rubric"], n_boot=0)
        per_level = metrics.breakdown(first, scale, ["model", "target_level"], n_boot=0)
        bon = metrics.best_of_n(sdf, scale, ns)
        bon_levels = metrics.best_of_n(sdf, scale, ns, per_level=True)
        bon_centre = metrics.best_of_n(sdf, scale, ns, rule="bin_centre")
        bon_rows[student] = bon
        plots_mod.plot_score_distributions(
            first, scale, f"{student}: judge score by target level", plots / f"{student}_scores.png"
        )
        plots_mod.plot_best_of_n(
            bon_levels,
            bon,
            scale,
            f"{student}: Best-of-N, the judge picks the highest-scored of N samples",
            plots / f"{student}_best_of_n.png",
        )
        confusions = {model: metrics.confusion(mdf, scale) for model, mdf in first.groupby("model")}
        vmax = max([float(c.values.max()) for c in confusions.values()] + [1.0])
        conf_md = []
        for model, conf in sorted(confusions.items()):
            plots_mod.plot_confusion(
                conf,
                f"{student} / {plots_mod.MODEL_LABELS.get(model, model)}: target vs judged level",
                plots / f"{student}_{model}_confusion.png",
                vmax=vmax,
            )
            conf_md += [
                f"**{plots_mod.MODEL_LABELS.get(model, model)}** ({int(conf.values.sum())} judged "
                "responses)",
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
        prompts_n = len(first.drop_duplicates(["task_id", "rubric", "target_level"]))
        sections += [
            f"## {student}",
            "",
            f"Evaluation folder: `{info['dir'].relative_to(run_dir)}` "
            f"([manifest]({Path('..') / info['dir'].relative_to(run_dir) / 'manifest.json'}))  ",
            f"CPT model: {report.tuned_text(info['tuned'])}  ",
            f"Judge{'s' if len(info['judges']) > 1 else ''}: {', '.join(info['judges'])}"
            + (" (scores below: the panel mean)" if len(info["judges"]) > 1 else "")
            + "  ",
            f"Test set: {tasks[student]} task{'' if tasks[student] == 1 else 's'}, {prompts_n} "
            "prompts (task x rubric x target "
            f"level) per model, {samples} sample(s) each.",
            "",
            f"![scores](plots/{student}_scores.png)",
            "",
            "### Per rubric (first sample of each prompt)",
            "",
            "n = judged responses; rubrics differ in n when their genre tags leave out some "
            "tasks, and base / CPT differ by judge failures (excluded, counted).",
            "",
            report.frame_markdown(per_rubric[[c for c in keep if c in per_rubric.columns]]),
            "",
            "### Per target level",
            "",
            report.frame_markdown(
                per_level[["model", "target_level", "n", "judge_failures", "accuracy"]]
            ),
            "",
            "### Confusion (rows: target level, columns: judged level; one colour scale)",
            "",
            *conf_md,
            "### Best-of-N",
            "",
            "As in the paper's Figure 1, the judge picks the highest-scored of the first N "
            f"samples of each prompt (N = {', '.join(map(str, ns))}; at most "
            "`evaluate.samples`). Left: the mean judge score of the pick per target level; "
            "right: how often the pick's binned level is the target. A prompt whose first N "
            'samples all failed judging counts as "no valid sample" (never as a score) and '
            "as a miss, so every N has the same prompts (and N=1 can be below Table 3, which "
            "leaves failed judgements out).",
            "",
            report.frame_markdown(bon),
            "",
            f"![best of n](plots/{student}_best_of_n.png)",
            "",
            "Mean score of the pick per target level:",
            "",
            report.frame_markdown(
                bon_levels.pivot_table(
                    index=["model", "target_level"], columns="n", values="mean_score", sort=False
                )
                .rename(columns=lambda n: f"N={n}")
                .reset_index()
            ),
            "",
            "Alternative rule `bin_centre` (the pick aims at the target bin: highest score for "
            "the top level, else closest to the bin's centre):",
            "",
            report.frame_markdown(bon_centre[["n", "model", "groups", "no_valid", "accuracy"]]),
            "",
        ]
        if student in panels:
            sections += [
                "### Judge panel",
                "",
                "Each judge alone (first sample of each prompt), then how the judges agree on "
                "the same responses (all samples): Cohen's κ on binned levels, Spearman ρ on "
                "scores.",
                "",
                report.per_judge_table(per_judge[student]),
                "",
                report.frame_markdown(panels[student]),
                "",
            ]
    table2 = [
        (d, (d / "table2.md").read_text())
        for d in finished(run_dir, "adherence")
        if (d / "table2.md").exists()
    ]
    failures = {s: {m: v["judge_failures"] for m, v in by.items()} for s, by in summaries.items()}
    training = report.training_runs(run_dir, finished(run_dir, "train"))
    if training:
        plots_mod.plot_training({s: m for s, (m, _) in training.items()}, plots / "training.png")
    variants = sorted({i["prompts"] for i in infos.values()}) or [cfg.prompts.name]
    recipes = sorted({r["recipe"] for _, r in training.values()})
    md = [
        "# CPT report",
        "",
        f"Run: `{run_dir}`  ",
        f"Rendered: {time.strftime('%Y-%m-%d %H:%M:%S')}  ",
        f"Levels: {', '.join(f'{lv.name} ≤ {lv.upper:g}' for lv in cfg.levels.levels)}  ",
        f"Teacher prompt template: {', '.join(variants)} ("
        + "; ".join(report.TEMPLATE_VARIANTS.get(v, "custom") for v in variants)
        + ")  ",
        f"Training recipe: {', '.join(recipes) if recipes else 'none (no train stage)'}  ",
        f"Code: {report.code_line(store.git_commit())}",
        "",
        "## Students: baseline → CPT (Table 3)",
        "",
        "Metrics on the first sample of each (task, rubric, target level) prompt of the test "
        "split. tasks = test tasks; judged = prompts with a valid judgement (judge failures "
        "are excluded and counted in the last column, so base and CPT can differ). 95 % "
        "intervals over tasks (jackknife-t; Fisher z for τ and ρ; 93-97 % coverage at 10-30 "
        "tasks in simulation); with fewer than 10 tasks they are wide by necessity. The paper "
        "column is the paper's Table 3 for the same base model (looked up by "
        "`student.paper_id`, else the model id); the paper trained Rocinante-12B, Qwen3-4B, "
        "Mistral-Nemo-12B, Mistral-Small-24B and Phi-4 only.",
        "",
        report.table3(summaries, {s: i["paper_id"] for s, i in infos.items()}, tasks)
        if summaries
        else "_No finished evaluation yet._",
        "",
        "## Teacher adherence (Table 2)",
        "",
        "Mean judge score (0-100) of the teacher's responses, with the number of judged "
        "responses per cell. The paper's numbers, for reference:",
        "",
        report.paper_table2_markdown(),
        "",
        *[f"`{d.relative_to(run_dir)}`\n\n{text}" for d, text in table2],
        "",
        "## Training",
        "",
        *(
            [
                "DPO per student, from the train stage's metrics (reward = β x log-ratio to "
                "the reference; accuracy = share of pairs whose chosen reward is higher).",
                "",
                report.training_table(training),
                "",
                "![training](plots/training.png)",
            ]
            if training
            else ["_No finished train stage (external CPT models are evaluated as given)._"]
        ),
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
        "## Truncated responses (cut at max_new_tokens: not judged, not in the metrics)",
        "",
        *(
            [
                f"- {s}: " + ", ".join(f"{m} {n}" for m, n in by.items())
                for s, by in truncated.items()
            ]
            or ["none"]
        ),
        "",
        "## Judge self-agreement",
        "",
        report.agreement_heading(infos),
        "",
        report.frame_markdown(pd.DataFrame([{"student": s, **a} for s, a in agreements.items()]))
        if agreements
        else "_No repeated judgements (evaluate.agreement_fraction=0)._",
        "",
        "## Judge calibration against program judges",
        "",
        "On rubrics with a registered program judge (`cpt/program_judges.py`), the LLM "
        "judge's scores vs the program's exact scores on the same responses: Cohen's κ on "
        "the binned levels, Spearman ρ on the scores.",
        "",
        report.frame_markdown(pd.DataFrame(calibrations))
        if calibrations
        else "_No LLM-judged rubric with a program judge._",
        "",
        *sections,
        "## Planner: predicted vs actual per stage",
        "",
        "Predicted at launch from the throughput learnt from finished stages (`plan=true`, "
        "`cpt/planner.py`); actual as measured. Completion tokens are the models' output "
        "tokens (training: sequence tokens).",
        "",
        planner_markdown(run_dir),
        "",
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
        "headline": report.headline(summaries, tasks),
        "report": str(out / "report.md"),
        "generation_failures": gen_failures,
        "truncated_responses": truncated,
    }


def planner_markdown(run_dir: Path) -> str:
    """Each finished stage's predicted and actual wall time and tokens (its manifest)."""
    import pandas as pd

    from cpt import report

    rows = []
    for stage in STAGES:
        for d in finished(run_dir, stage) if stage != SPEC.name else []:
            m = store.read_json(d / "manifest.json")
            act, pred = m.get("actual"), m.get("predicted") or {}
            if act is None:
                continue
            p_s, a_s = pred.get("seconds"), act["seconds"]
            err = f"{100 * (p_s - a_s) / a_s:+.0f} %" if p_s is not None and a_s else "-"
            rows.append(
                {
                    "stage": str(d.relative_to(run_dir)),
                    "predicted s": "-" if p_s is None else f"{p_s:.1f}",
                    "actual s": f"{a_s:.1f}",
                    "error": err,
                    "predicted tokens": pred.get("completion_tokens", "-"),
                    "actual tokens": act["completion_tokens"],
                    "device": m.get("device", "?"),
                }
            )
    if not rows:
        return "_No stage of this run recorded a prediction._"
    return report.frame_markdown(pd.DataFrame(rows))


def run(ctx: StageContext) -> dict[str, Any]:
    return render(ctx.cfg, ctx.out_dir)


def plan(cfg: CptConfig) -> dict[str, Any]:
    return {"renders": "all finished evaluations"}


SPEC = StageSpec("report", ("evaluate",), params, run, plan, always_run=True)
