"""Program judges: rubric dimensions scored by a registered Python function, not a model.

Some style dimensions can be verified exactly (length in words, reading ease, a lexicon rate,
required or forbidden format elements). Scoring them with a program gives a judge with no
sampling noise, no parse failures and no bias towards its own family, so an effect of CPT on
those dimensions is measured, not estimated; and when an LLM judge scores the same rows, the
program is the reference it is calibrated against (`cpt.metrics.judge_agreement`).

A program maps the response text to a `Verdict`: an integer score 0-100 (higher = stronger
adherence to its rubric, like the LLM judge's score) and a one-line critique that states the
measured quantity. Each program is registered under the name of the rubric it verifies
(`rubrics/<name>.yaml`), whose level descriptors name the same bands, so the LLM judge and the
program read one definition. `judge.kind=program` serves them through the engine interface
(`cpt.engines.program.ProgramEngine`); `judge.program=<name>` picks one program for every
rubric, empty picks each rubric's own.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")


@dataclass(frozen=True)
class Verdict:
    """A program's judgement: `score` 0-100 (int), `critique` says what was measured."""

    score: int
    critique: str


@dataclass(frozen=True)
class ProgramJudge:
    """A registered program: `name` (= the rubric it verifies) and its scoring function."""

    name: str
    description: str
    score: Callable[[str], Verdict]


def words(text: str) -> list[str]:
    """Words: runs of letters/digits, joined by inner apostrophes or hyphens (don't, well-known)."""
    return _WORD.findall(text)


def _interpolate(x: float, points: tuple[tuple[float, float], ...]) -> float:
    """Piecewise-linear y(x) through `points` (x increasing), flat beyond both ends."""
    xs = [p[0] for p in points]
    if x <= xs[0]:
        return points[0][1]
    if x >= xs[-1]:
        return points[-1][1]
    i = bisect.bisect_right(xs, x)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


# concision-words: the rubric's five descriptors as word-count bands, each mapped onto a score
# band: the score falls linearly inside a band, and a band's scores never overlap the next.
# With the paper's levels (low <= 40 < moderate <= 92.5 < extremely high) this reads:
# extremely high <= 10 words, moderate 11-30 words, low > 30 words. The bands are short so
# that every level fits under a small generation cap (64 tokens, ~45 words) on CPU.
CONCISION_BANDS: tuple[tuple[int, int, int, str], ...] = (
    # (last word count of the band, score at its first word count, score at its last, descriptor)
    (10, 100, 93, "excellent"),
    (20, 92, 70, "good"),
    (30, 69, 41, "fair"),
    (60, 40, 15, "poor"),
    (120, 14, 0, "unsatisfactory"),
)


def concision_words(text: str) -> Verdict:
    """Score from the number of words: fewer words, higher adherence to concision."""
    n = len(words(text))
    first = 0
    for end, top, bottom, name in CONCISION_BANDS:
        if n <= end:
            score = round(top + (bottom - top) * (n - first) / (end - first))
            return Verdict(score, f"{n} words: the {name} band ({first}-{end} words).")
        first = end + 1
    return Verdict(0, f"{n} words: more than {first - 1}, beyond every band.")


def syllables(word: str) -> int:
    """Syllables of an English word by vowel groups (a silent final e dropped); at least 1."""
    w = word.lower()
    groups = len(_VOWEL_GROUPS.findall(w))
    if w.endswith("e") and not w.endswith(("le", "ee")) and groups > 1:
        groups -= 1
    return max(groups, 1)


def reading_ease(text: str) -> float:
    """Flesch reading ease: 206.835 - 1.015 words/sentence - 84.6 syllables/word."""
    ws = words(text)
    sentences = max(len(_SENTENCE_END.findall(text.strip() + " ")), 1)
    return 206.835 - 1.015 * len(ws) / sentences - 84.6 * sum(map(syllables, ws)) / len(ws)


def plain_reading_ease(text: str) -> Verdict:
    """Score = Flesch reading ease clamped to 0-100: plainer text, higher adherence."""
    ws = words(text)
    ease = reading_ease(text)
    score = round(min(max(ease, 0.0), 100.0))
    sentences = max(len(_SENTENCE_END.findall(text.strip() + " ")), 1)
    return Verdict(
        score,
        f"Flesch reading ease {ease:.1f}: {len(ws) / sentences:.1f} words per sentence, "
        f"{sum(map(syllables, ws)) / len(ws):.2f} syllables per word.",
    )


# no-filler: a fixed lexicon of filler and throat-clearing phrases; the score falls with
# their rate per 100 words (0 per 100 words -> 100; 5 or more per 100 words -> 0).
FILLERS: tuple[str, ...] = (
    "actually",
    "basically",
    "certainly",
    "clearly",
    "essentially",
    "really",
    "very",
    "just",
    "quite",
    "literally",
    "obviously",
    "of course",
    "in conclusion",
    "in summary",
    "it is worth noting",
    "it's worth noting",
    "it is important to note",
    "needless to say",
    "at the end of the day",
    "in today's world",
    "i hope this helps",
    "let me know if",
    "feel free to",
)
_FILLER = re.compile(r"\b(" + "|".join(re.escape(f) for f in FILLERS) + r")\b", re.IGNORECASE)


def no_filler(text: str) -> Verdict:
    """Score from the rate of filler phrases per 100 words: fewer fillers, higher adherence."""
    n = len(words(text))
    found = [m.group(1).lower() for m in _FILLER.finditer(text)]
    rate = 100.0 * len(found) / n
    score = round(_interpolate(rate, ((0.0, 100.0), (5.0, 0.0))))
    shown = ", ".join(sorted(set(found))[:5]) or "none"
    return Verdict(
        score, f"{len(found)} filler phrases in {n} words ({rate:.1f} per 100 words): {shown}."
    )


REGISTRY: dict[str, ProgramJudge] = {
    p.name: p
    for p in (
        ProgramJudge("concision-words", "word count against the rubric's bands", concision_words),
        ProgramJudge("plain-reading-ease", "Flesch reading ease, 0-100", plain_reading_ease),
        ProgramJudge("no-filler", "filler phrases per 100 words", no_filler),
    )
}


class ProgramError(ValueError):
    """An unknown program name or a response a program cannot score."""


def get(name: str) -> ProgramJudge:
    """The registered program `name`; a one-line error lists the known ones."""
    if name not in REGISTRY:
        raise ProgramError(
            f"judge.program: unknown program judge {name!r} (known: {', '.join(sorted(REGISTRY))})"
        )
    return REGISTRY[name]


def judge(name: str, text: str) -> Verdict:
    """Score `text` with program `name`. An empty response (no words) cannot be judged: it
    raises, and the caller records a counted failure, never a score."""
    program = get(name)
    if not words(text or ""):
        raise ProgramError(f"program judge {name}: the response has no words to judge")
    return program.score(text)
