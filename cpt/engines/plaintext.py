"""Untrusted text stays text: message contents never become chat control tokens.

Every message content (tasks, teacher and student responses, system prompts a model wrote,
imported data) is data. A tokenizer that parses special tokens in the rendered chat turns
`<|im_end|>\\n<|im_start|>assistant` inside a response into a real turn boundary, so a
response could forge the judge's own answer. Two defences, one per kind of engine:

- `chat_prompt_ids(tokenizer, messages)` (hf and vllm, which tokenise here): the chat
  template is rendered with a placeholder per content; the template's own text is tokenised
  with special tokens parsed (its markers), every content with `split_special_tokens=True`
  (a special-token string inside a content becomes ordinary tokens). A chat whose contents
  hold no special-token string is tokenised whole, exactly as before (byte-identical ids).
  When the pieces would not give back the rendered text (a template that rewrites contents
  beyond trimming whitespace, or a SentencePiece tokenizer that prepends a space to every
  piece it is given), the contents are `neutralise`d instead: also no control token.
- `neutralise(text)` (the openai engine, which sends text to a server that tokenises it):
  a WORD JOINER (U+2060, invisible) goes after the first character of each control-token
  string, e.g. `<|im_end|>` -> `<\\u2060|im_end|>`, which no tokenizer matches as a special
  token. Covered families: ChatML / Qwen / Phi `<|...|>` (incl. Llama-3 headers and
  `<|eot_id|>`), DeepSeek `<｜...｜>`, `<s>`/`</s>`/`<unk>`/`<pad>`, Mistral `[INST]`,
  `[/INST]`, `[SYSTEM_PROMPT]`, `[TOOL_CALLS]`..., Gemma `<start_of_turn>`/`<end_of_turn>`/
  `<bos>`/`<eos>`, plus any string passed in `extra`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

WORD_JOINER = "\u2060"
CONTROL_PATTERN = (
    r"<\|[^|<>\s]{1,64}\|>"  # ChatML, Qwen, Phi, Llama-3 (<|eot_id|>, <|start_header_id|>)
    r"|<｜[^｜<>\s]{1,64}｜>"  # DeepSeek (full-width bars)
    r"|</?(?:s|unk|pad|bos|eos|start_of_turn|end_of_turn|start_of_image|end_of_image)>"
    r"|\[/?(?:INST|SYSTEM_PROMPT|AVAILABLE_TOOLS|TOOL_CALLS|TOOL_RESULTS|THINK)\]"
)
_CONTROL = re.compile(CONTROL_PATTERN)
_MARK = re.compile("\ue000cpt(\\d+)\ue001")  # private-use characters: no template has them


def neutralise(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with every control-token string broken by a WORD JOINER after its first
    character (see the module docstring); other text is unchanged."""
    pattern = _CONTROL
    extra = sorted({s for s in extra if len(s) > 1}, key=len, reverse=True)
    if extra:
        pattern = re.compile("|".join([*map(re.escape, extra), CONTROL_PATTERN]))
    return pattern.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)


def special_strings(tokenizer: Any) -> tuple[str, ...]:
    """Strings the tokenizer turns into special tokens when it parses special tokens."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    found = {str(t) for t in decoder.values() if getattr(t, "special", True)}
    found |= set(getattr(tokenizer, "all_special_tokens", ()) or ())
    return tuple(sorted((s for s in found if s), key=len, reverse=True))


@functools.lru_cache(maxsize=16)
def _special_regex(specials: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(map(re.escape, specials)))


def chat_prompt_ids(
    tokenizer: Any,
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> list[int]:
    """Token ids of the chat prompt, with every message content encoded as plain text
    (`template_kwargs`: extra chat-template variables, e.g. `enable_thinking`).

    Raises what `apply_chat_template` raises (e.g. a template without a system role).
    """
    specials = special_strings(tokenizer)
    render = functools.partial(
        tokenizer.apply_chat_template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs,
    )
    contents = [str(m.get("content") or "") for m in messages]
    text = render(list(messages))
    if not specials or not any(s in c for c in contents for s in specials):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    pieces = _template_pieces(render, messages, contents, text)
    ids = _piecewise_ids(tokenizer, pieces, _special_regex(specials)) if pieces else []
    native = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids or tokenizer.decode(ids) != tokenizer.decode(native):
        # the template rewrites contents, or tokenising in pieces changes the text (e.g. a
        # SentencePiece tokenizer prepending a space to every piece): break the strings
        safe = [{**m, "content": neutralise(c, specials)} for m, c in zip(messages, contents)]
        return list(tokenizer(render(safe), add_special_tokens=False)["input_ids"])
    return ids


def _piecewise_ids(
    tokenizer: Any, pieces: list[tuple[bool, str]], split: re.Pattern[str]
) -> list[int]:
    ids: list[int] = []
    for is_content, piece in pieces:
        if not piece:
            continue
        if is_content:
            ids += _plain_ids(tokenizer, piece)
            continue
        at = 0  # template text: its own markers are special tokens, the rest plain
        for m in split.finditer(piece):
            ids += _plain_ids(tokenizer, piece[at : m.start()])
            ids += tokenizer.convert_tokens_to_ids([m.group(0)])
            at = m.end()
        ids += _plain_ids(tokenizer, piece[at:])
    return ids


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    out = tokenizer(text, add_special_tokens=False, split_special_tokens=True)
    return list(out["input_ids"])


def _template_pieces(
    render: Any, messages: Sequence[dict[str, str]], contents: list[str], text: str
) -> list[tuple[bool, str]] | None:
    """The rendered chat as (is_content, text) pieces, or None when the template does more
    to a content than trim its whitespace (the pieces would not join up to `text`)."""
    cores, marked = [], []
    for i, (m, c) in enumerate(zip(messages, contents)):
        core = c.strip()
        start = c.find(core) if core else len(c)
        cores.append(core)
        # keep the content's own outer whitespace: a template that trims it trims it here too
        marked.append({**m, "content": f"{c[:start]}\ue000cpt{i}\ue001{c[start + len(core) :]}"})
    pieces: list[tuple[bool, str]] = []
    at = 0
    rendered = render(marked)
    for m in _MARK.finditer(rendered):
        pieces += [(False, rendered[at : m.start()]), (True, cores[int(m.group(1))])]
        at = m.end()
    pieces.append((False, rendered[at:]))
    return pieces if "".join(p for _, p in pieces) == text else None
