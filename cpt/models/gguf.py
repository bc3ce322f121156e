"""GGUF files as model sources: converted once into a cached safetensors model folder.

`path: some/model.gguf` (or `path: <folder>` plus `gguf_file: <name>.gguf`) works for every
engine and for training because the file is turned into an ordinary transformers folder
before anything loads it: transformers (with the `gguf` package) reads the file and
dequantises it to float32, the weights are copied into a model built from the same config
(transformers refuses to `save_pretrained` a GGUF-loaded model) and saved as safetensors next
to the tokenizer and its chat template. hf, vLLM and the trainer then all see the same folder.

The folder is keyed by the file's sha256 and the versions of the libraries that shape it, so
the same file converts once per cache (`cpt.models.cache`), whatever its name or location.
Quantisation is not kept: a Q4 file becomes a float32 model (~4 bytes per parameter).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

from cpt.models.cache import build_once, cache_root
from cpt.store import content_hash, file_sha256

log = logging.getLogger(__name__)

CONVERTER_VERSION = 1  # bump when _convert changes, so cached folders are rebuilt


class GGUFError(ValueError):
    """A GGUF source that cannot be used; the message names the file and the fix."""


def is_gguf(path: str) -> bool:
    return path.lower().endswith(".gguf")


def gguf_model_dir(path: str | Path, gguf_file: str = "") -> Path:
    """The converted folder of the GGUF file `path` (or `path/gguf_file`), built on first use."""
    file = Path(path).expanduser() / gguf_file if gguf_file else Path(path).expanduser()
    if not file.is_file():
        raise GGUFError(f"{file}: no such GGUF file (path / gguf_file of the model config)")
    stat = file.stat()
    sha256 = _sha256(str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    return converted_dir(sha256, file.name, lambda: file)


def converted_dir(sha256: str, name: str, locate: Callable[[], Path]) -> Path:
    """The folder converted from the GGUF file with this `sha256` (file name `name`).

    `locate()` is called only when the folder is not cached yet; the file it returns must
    have the expected checksum (a pinned download is verified here).
    """

    def build(out: Path) -> None:
        file = locate()
        actual = file_sha256(file)
        if actual != sha256:
            raise GGUFError(
                f"{file}: sha256 is {actual}, expected {sha256} (corrupt or wrong file)"
            )
        _convert(file, out)

    return build_once(converted_target(sha256, name), build, "model.safetensors")


def converted_target(sha256: str, name: str) -> Path:
    """Where the conversion of that file lives: keyed by its sha256 and the library versions
    that shape the converted files (read from package metadata: importing torch and
    transformers here would cost every launch seconds before anything runs)."""
    versions = {name: _dist_version(name) for name in ("transformers", "gguf", "torch")}
    key = content_hash({"v": CONVERTER_VERSION, "sha256": sha256, **versions}, 12)
    return cache_root() / f"gguf-{Path(name).stem}-{key}"


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the cache key only: a rewritten file is hashed again
    return file_sha256(path)


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def _convert(file: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("gguf: converting %s to a safetensors folder (once per cache)", file)
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        file.parent, gguf_file=file.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: a plain float32 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
