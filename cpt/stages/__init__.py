"""One module per stage, each exporting `SPEC` (a `cpt.graph.StageSpec`: what it needs,
what determines its output, how it runs). `STAGES` is the registry's index: the stage
modules in pipeline order (inputs first). The `stage=` choices (`cpt.config.StageName`),
the report's manifest list and the plan are all derived from it; nothing else lists
stages. This file imports nothing, so the config can read the names without pulling in a
stage (and stages never import each other).
"""

STAGES: tuple[str, ...] = (
    "tasks",
    "generate",
    "sysprompts",
    "adherence",
    "pairs",
    "train",
    "evaluate",
    "report",
)
