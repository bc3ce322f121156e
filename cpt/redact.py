"""Secrets never reach a file: redaction by key name and by value.

`redact` replaces, in a config, manifest or argv (any JSON-like value), the values of
secret-looking keys (`api_key`, `hf_token`, `password`..., not `max_new_tokens` or
`api_key_env`) and every secret found inside a string (`redact_text`): URL credentials,
`Bearer <token>`, well-known key formats, `NAME=value` with a secret-looking NAME, and the
values of the environment variables that hold secrets. `cpt.store` applies it to every
manifest and to Hydra's saved configs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "<redacted>"
# a key is secret when one of its words is one of these ("max_new_tokens" is not: "tokens")
_SECRET_WORDS = frozenset(
    {"token", "secret", "password", "passwd", "apikey", "credential", "credentials", "auth",
     "authorization", "cookie", "signature", "pat"}
)  # fmt: skip
_SECRET_PAIRS = ("api_key", "access_key", "private_key", "secret_key", "session_key")
_SECRET_VALUES = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"sk-[A-Za-z0-9_-]{16,}"  # OpenAI, Anthropic (sk-ant-...) and look-alikes
    r"|hf_[A-Za-z0-9]{16,}"  # Hugging Face
    r"|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}"  # GitHub
    r"|glpat-[A-Za-z0-9_-]{16,}"  # GitLab
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|AIza[0-9A-Za-z_-]{30,}"  # Google API keys
    r"|wandb_v1_[A-Za-z0-9_]{20,}"
    r")"
)
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")
_BEARER = re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9._~+/=-]{8,}")
_SECRET_ENV_NAME = re.compile(
    r"(?:TOKEN|API_?KEY|SECRET|SECRET_KEY|ACCESS_KEY|PRIVATE_KEY|PASSWORD|PASSWD)$"
)
_ASSIGNMENT = re.compile(r"([A-Za-z_][\w.-]*)(\s*[=:]\s*)([^\s,;&]+)")
DEFAULT_SECRETS_ENV = (
    "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY", "VLLM_API_KEY", "WANDB_API_KEY",
    "ANTHROPIC_API_KEY", "AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN", "RAY_AUTH_TOKEN",
)  # fmt: skip


def secret_name(name: str) -> bool:
    """Whether a key or variable name holds a secret (names ending in `_env` hold the
    *name* of a variable and are kept)."""
    low = str(name).lower().rsplit(".", 1)[-1]
    if low.endswith("_env"):
        return False
    words = set(re.split(r"[^a-z0-9]+", low))
    return bool(words & _SECRET_WORDS) or any(p in low for p in _SECRET_PAIRS)


def env_secrets(names: tuple[str, ...] | list[str] = ()) -> tuple[str, ...]:
    """Values of the environment variables that hold secrets: those in `names` (the config's
    `secrets_env`), `DEFAULT_SECRETS_ENV`, and any other named `*_TOKEN`, `*_API_KEY`,
    `*_SECRET`, `*_PASSWORD`... (values under 8 characters are too common to replace)."""
    wanted = set(names) | set(DEFAULT_SECRETS_ENV)
    values = {
        v
        for k, v in os.environ.items()
        if (k in wanted or _SECRET_ENV_NAME.search(k.upper())) and len(v) >= 8
    }
    return tuple(sorted(values, key=len, reverse=True))


def redact_text(text: str, values: tuple[str, ...] = ()) -> str:
    """`text` with secrets replaced by `<redacted>`: the given `values` wherever they occur,
    URL credentials (`https://user:key@host`), `Bearer <token>`, well-known key formats
    (sk-, hf_, ghp_, xox?-, AKIA...), and `NAME=value` where NAME looks secret."""
    for v in values:
        text = text.replace(v, REDACTED)
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    text = _BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{REDACTED}", text)
    text = _SECRET_VALUES.sub(REDACTED, text)
    return _ASSIGNMENT.sub(
        lambda m: (
            f"{m.group(1)}{m.group(2)}{REDACTED}"
            if secret_name(m.group(1)) and m.group(3) != REDACTED
            else m.group(0)
        ),
        text,
    )


def redact(obj: Any, secrets_env: tuple[str, ...] | list[str] = ()) -> Any:
    """Copy of a config, manifest or argv with secrets replaced by `<redacted>`: values of
    secret-looking keys (`api_key`, `hf_token`, `password`..., but not `max_new_tokens` or
    `api_key_env`), and secrets found in any string value (`redact_text`, including the
    values of the variables in `secrets_env`)."""
    return _redact(obj, env_secrets(tuple(secrets_env)))


def _redact(obj: Any, values: tuple[str, ...]) -> Any:
    if isinstance(obj, Mapping):
        return {
            k: REDACTED
            if secret_name(k) and v not in (None, "") and not isinstance(v, Mapping | list)
            else _redact(v, values)
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [_redact(v, values) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj, values)
    return obj
