"""JSON-schema helpers shared by the engines (constrained decoding and checking).

xgrammar (0.2.x) compiles `maxLength`/`minLength` on strings and `minimum`/`maximum` on
integers into the grammar, so the judge schema `{"critique": str <= 300 chars, "score": 0..100}`
is enforced token by token. `any_whitespace=False` makes the grammar emit compact JSON
(`{"a": 1, "b": 2}`); with free whitespace a random or weak model can spend every new token
on spaces and newlines between keys and never close the object.
"""

from __future__ import annotations

import json
from typing import Any


def schema_text(schema: dict[str, Any]) -> str:
    """Canonical JSON text of a schema (cache key, and what xgrammar compiles)."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def compile_json_schema(compiler: Any, schema: dict[str, Any]) -> Any:
    """`xgrammar.CompiledGrammar` for `schema` with compact whitespace (see module docstring)."""
    return compiler.compile_json_schema(schema_text(schema), any_whitespace=False, strict_mode=True)


def schema_problems(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Every way `value` breaks `schema` (the subset of JSON Schema the judge uses:
    type, properties, required, additionalProperties, min/maxLength, minimum/maximum, enum).
    Used by tests and by engines' callers to check outputs; empty list = valid."""
    problems: list[str] = []
    typ = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    if typ == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return [f"{where}: expected integer, got {value!r}"]
    elif typ == "number":
        if not isinstance(value, int | float) or isinstance(value, bool):
            return [f"{where}: expected number, got {value!r}"]
    elif typ in types and not isinstance(value, types[typ]):
        return [f"{where}: expected {typ}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)):
            problems.append(f"{where}: length {len(value)} > maxLength {schema['maxLength']}")
        if len(value) < schema.get("minLength", 0):
            problems.append(f"{where}: length {len(value)} < minLength {schema['minLength']}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{where}: {value} > maximum {schema['maximum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        problems += [
            f"{where}: missing required {k!r}" for k in schema.get("required", []) if k not in value
        ]
        for k, v in value.items():
            if k in props:
                problems += schema_problems(v, props[k], f"{where}.{k}")
            elif schema.get("additionalProperties", True) is False:
                problems.append(f"{where}: unexpected property {k!r}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            problems += schema_problems(v, schema["items"], f"{where}[{i}]")
    return problems
