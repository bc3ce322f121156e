"""Judge calibration: how far an LLM judge agrees with an exact program judge.

On a rubric with a registered program (`cpt.program_judges`), the program's score is the
measured truth of that dimension (a word count, a reading-ease formula). When an LLM judge
scored the same responses, its agreement with the program (Cohen's κ on the binned levels,
Spearman ρ on the scores) is a measured quality of the LLM judge on verifiable criteria,
which neither self-agreement nor anchors give. The program is run here, on the stored
responses, so calibration needs no second judging pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from cpt import metrics, program_judges


def judge_agreement(
    scores_a: np.ndarray | pd.Series | list[float],
    scores_b: np.ndarray | pd.Series | list[float],
    scale: metrics.LevelScale,
) -> dict[str, Any]:
    """Agreement of two judges' scores on the same responses (paired, both valid).

    Returns n, level_agreement (same binned level), cohen_kappa (on the binned levels),
    spearman_rho (on the scores) and mean_abs_diff (score points); NaN where undefined.
    """
    a = np.asarray(scores_a, dtype=float)
    b = np.asarray(scores_b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"judge_agreement: {a.shape} scores vs {b.shape}; pass paired scores")
    if len(a) == 0:
        nan = float("nan")
        return dict(n=0, level_agreement=nan, cohen_kappa=nan, spearman_rho=nan, mean_abs_diff=nan)
    la, lb = metrics.bin_scores(a, scale), metrics.bin_scores(b, scale)
    observed = float((la == lb).mean())
    expected = sum(float((la == lv).mean()) * float((lb == lv).mean()) for lv in scale.names)
    return {
        "n": len(a),
        "level_agreement": observed,
        "cohen_kappa": (observed - expected) / (1 - expected) if expected < 1 else float("nan"),
        "spearman_rho": metrics.spearman_rho(a, b),
        "mean_abs_diff": float(np.abs(a - b).mean()),
    }


def program_calibration(judged: pd.DataFrame, scale: metrics.LevelScale) -> pd.DataFrame:
    """Per rubric with a program: the LLM judge's agreement with the program on the rows both
    scored. `judged` has columns part_rubric, response, score, ok (evaluate judgements).
    Rows the judge failed on, or the program cannot score (no words), are counted, not compared.
    """
    out = []
    for rubric, rows in judged.groupby("part_rubric", sort=True):
        if rubric not in program_judges.REGISTRY:
            continue
        llm, prog = [], []
        for response, score, ok in zip(rows["response"], rows["score"], rows["ok"]):
            if not ok or not program_judges.words(response or ""):
                continue
            llm.append(float(score))
            prog.append(program_judges.judge(str(rubric), response).score)
        out.append(
            {
                "rubric": rubric,
                "rows": len(rows),
                "not_compared": len(rows) - len(llm),
                **judge_agreement(llm, prog, scale),
                "mean_llm_score": float(np.mean(llm)) if llm else float("nan"),
                "mean_program_score": float(np.mean(prog)) if prog else float("nan"),
            }
        )
    return pd.DataFrame(out)
