"""One module per stage. `REGISTRY` lists them in pipeline order with what they need."""

from cpt.pipeline import StageSpec
from cpt.stages import adherence, evaluate, generate, pairs, report, sysprompts, tasks, train

REGISTRY: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec("tasks", (), tasks.params, tasks.run, tasks.plan),
        StageSpec("generate", ("tasks",), generate.params, generate.run, generate.plan, gpu=True),
        StageSpec("sysprompts", (), sysprompts.params, sysprompts.run, sysprompts.plan, gpu=True),
        StageSpec(
            "adherence",
            ("tasks", "generate"),
            adherence.params,
            adherence.run,
            adherence.plan,
            gpu=True,
        ),
        StageSpec(
            "pairs",
            ("tasks", "generate", "sysprompts", "adherence"),
            pairs.params,
            pairs.run,
            pairs.plan,
        ),
        StageSpec(
            "train", ("pairs",), train.params, train.run, train.plan, per_student=True, gpu=True
        ),
        StageSpec(
            "evaluate",
            ("tasks", "sysprompts", "train"),
            evaluate.params,
            evaluate.run,
            evaluate.plan,
            per_student=True,
            gpu=True,
        ),
        StageSpec("report", ("evaluate",), report.params, report.run, report.plan, always_run=True),
    ]
}
