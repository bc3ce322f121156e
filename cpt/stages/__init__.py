"""One module per stage. `REGISTRY` lists them in pipeline order with what they need."""

from cpt.pipeline import StageSpec
from cpt.stages import tasks

REGISTRY: dict[str, StageSpec] = {
    spec.name: spec
    for spec in [
        StageSpec("tasks", (), tasks.params, tasks.run, tasks.plan),
    ]
}
