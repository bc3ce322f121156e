"""A program judge behind the engine interface (`judge.kind=program`).

The judging stages build the same judge prompts, shards and retries for every judge; this
engine answers a judge prompt by running a registered program (`cpt.program_judges`) on the
response and returning the JSON an LLM judge would (`{"critique": ..., "score": ...}`), so
stages never know which judge ran. It reads the response between the judge template's
`<<<RESPONSE <nonce>` / `RESPONSE <nonce>>>>` markers, the nonce taken from the first
`<<<RESPONSE <nonce>` marker after the task block (which ends at `TASK <task nonce>>>>`, the
task nonce taken from the first `<<<TASK <nonce>` marker): neither the task nor the response
can know a nonce, so text inside them that imitates a marker stays part of them. It reads the
rubric from the template's first line, `Rubric "<name>"`, to pick the rubric's own program
when `judge.program` is empty.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from cpt import program_judges
from cpt.engines.base import Completion, Request, error_completion

if TYPE_CHECKING:
    from cpt.config import EngineConfig, ModelConfig

_TASK_MARK = re.compile(r"<<<TASK (\w+)\n")
_RESPONSE_MARK = re.compile(r"<<<RESPONSE (\w+)\n")
_RUBRIC = re.compile(r'^Rubric "([^"\n]+)"')


def response_of(prompt: str) -> str:
    """The graded response inside a judge prompt; ValueError when the markers are missing."""
    task = _TASK_MARK.search(prompt)
    if not task:
        raise ValueError("no <<<TASK <nonce> marker in the judge prompt (prompts.judge)")
    task_end = prompt.find(f"\nTASK {task.group(1)}>>>", task.end())
    opening = _RESPONSE_MARK.search(prompt, task_end) if task_end >= 0 else None
    if not opening:
        raise ValueError("no <<<RESPONSE <nonce> marker after the task in the judge prompt")
    nonce = opening.group(1)
    end = prompt.rfind(f"\nRESPONSE {nonce}>>>")
    if end < opening.end():
        raise ValueError(f"no RESPONSE {nonce} markers in the judge prompt (prompts.judge)")
    return prompt[opening.end() : end]


def rubric_of(prompt: str) -> str:
    """The rubric name on the judge prompt's first line; ValueError when it is not there."""
    found = _RUBRIC.match(prompt)
    if not found:
        raise ValueError('the judge prompt does not start with Rubric "<name>" (prompts.judge)')
    return found.group(1)


class ProgramEngine:
    """Answers judge requests with a program's verdict as JSON; no model, no sampling.

    `model.program` names the program for every rubric; empty: each rubric's own program
    (the one registered under the rubric's name). A request that cannot be judged (no
    markers, no program for its rubric, an empty response) becomes an error completion,
    which the judging code counts as a failure after its retries, never as a score.
    """

    def __init__(self, model: ModelConfig, engine: EngineConfig, **options: Any) -> None:
        del engine, options  # nothing to load or reserve
        self.program = model.program
        if self.program:
            program_judges.get(self.program)  # an unknown name fails at once, not per row

    def generate(self, requests: list[Request]) -> list[Completion]:
        return [self._one(r) for r in requests]

    def _one(self, request: Request) -> Completion:
        prompt = next(
            (m["content"] for m in request.messages if "<<<TASK " in m.get("content", "")), ""
        )
        try:
            name = self.program or rubric_of(prompt)
            verdict = program_judges.judge(name, response_of(prompt))
        except ValueError as exc:
            return error_completion(request, str(exc))
        text = json.dumps({"critique": verdict.critique, "score": verdict.score})
        return Completion(request.id, text, 0, 0, "stop")

    def close(self) -> None:
        pass
