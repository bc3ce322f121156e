"""The shape of the code, kept true: imports drawn from the source with `ast` have no
circle, no stage imports another stage, Slurm never imports the pipeline back, no module
grows past ~500 lines without saying why at its top, and one launch resolves each stage's
key and done-state once."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, compose

from cpt import graph, pipeline, store

CPT = REPO / "cpt"
MAX_LINES = 520
LONG_REASON = "Why one module:"  # a module longer than MAX_LINES says why, in its docstring


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(CPT.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """cpt modules `path` imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            for a in node.names:  # `from cpt import store` imports the module cpt.store
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, name, set(mods)) for name, path in mods.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_imports_have_no_circle():
    assert _cycles(import_graph()) == []


def test_no_stage_imports_another_stage():
    stages = {m for m in _modules() if m.startswith("cpt.stages.")}
    bad = {m: sorted(import_graph()[m] & (stages - {m})) for m in stages}
    assert {m: deps for m, deps in bad.items() if deps} == {}


def test_lower_floors_never_import_upper_ones():
    edges = import_graph()
    assert edges["cpt.graph"] <= {"cpt.store", "cpt.config", "cpt.warm"}  # config, warm: types
    assert edges["cpt.stages"] == set()  # the registry's index: read by the config
    for name in (m for m in edges if m.startswith(("cpt.slurm", "cpt.commands"))):
        assert not edges[name] & {"cpt.pipeline", *(m for m in edges if "stages." in m)}, name


def test_no_module_is_long_without_a_reason():
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
        and LONG_REASON not in (ast.get_docstring(ast.parse(path.read_text())) or "")
    }
    assert long == {}


def test_import_circle_detection_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.fixture
def counted(monkeypatch):
    """Counts of stage_key per stage and of is_done per folder, over the real functions."""
    keys: Counter[str] = Counter()
    done: Counter[Path] = Counter()
    real_key, real_done = graph.stage_key, store.is_done

    def stage_key(spec, *args, **kwargs):
        keys[spec.name] += 1
        return real_key(spec, *args, **kwargs)

    def is_done(folder):
        done[Path(folder)] += 1
        return real_done(folder)

    monkeypatch.setattr(graph, "stage_key", stage_key)
    monkeypatch.setattr(store, "is_done", is_done)
    return keys, done


def test_one_key_and_one_done_check_per_stage_per_launch(tmp_path, counted, capsys):
    keys, done = counted
    names = list(pipeline.stage_specs())
    over = [f"run_dir={tmp_path}", "tasks.num_tasks=4"]
    plan = pipeline.resolve(compose(*over))
    folders = [node.folder for node in plan.nodes.values()]
    for extra in (["plan=true"], ["stage=status"], ["cluster=ci", "plan=true"]):
        keys.clear(), done.clear()
        pipeline.run(compose(*over, *extra))
        assert keys == Counter(dict.fromkeys(names, 1)), extra
        assert done == Counter(dict.fromkeys(folders, 1)), extra
    capsys.readouterr()
    keys.clear(), done.clear()
    pipeline.run(compose(*over, "stage=tasks"))  # runs tasks: re-checked once, under its lock
    assert keys == Counter(dict.fromkeys(names, 1))
    assert done == Counter({**dict.fromkeys(folders, 1), plan["tasks"].folder: 2})
    keys.clear(), done.clear()
    pipeline.run(compose(*over, "stage=tasks"))  # done now: skipped, nothing re-checked
    assert keys == Counter(dict.fromkeys(names, 1))
    assert done == Counter(dict.fromkeys(folders, 1))


MODEL_LIBS = ("torch", "transformers", "vllm", "ray", "gguf")
HEAVY = (*MODEL_LIBS, "pandas", "scipy", "matplotlib")
PROBE = """
import atexit, runpy, sys
atexit.register(lambda: print("HEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules)))
sys.argv = ["jobs/launch.py", *{args!r}]
runpy.run_path("jobs/launch.py", run_name="__main__")
"""


@pytest.mark.parametrize(
    ("args", "heavy"),
    [
        (["plan=true"], HEAVY),  # the default: the real model (a GGUF file), train=auto, vLLM
        (["plan=true", "cluster=ci"], HEAVY),  # the Slurm plan: jobs, GPU-hours
        (["stage=status"], HEAVY),
        (["stage=tasks"], MODEL_LIBS),  # a stage without a model (its tables: pandas)
    ],
    ids=["plan", "plan-slurm", "status", "tasks"],
)
def test_a_launch_imports_no_model_library_before_a_stage_needs_one(tmp_path, args, heavy):
    """torch, transformers and pandas cost a launch ~10 s before any stage ran (the GGUF
    cache key, train=auto's GPU check, the planner's judge tokenizer, the report module):
    outside-stage time of every run and every Slurm stage job. Only stages load them.
    (The built-in model's one-time GGUF conversion does import them: it is done first, here,
    as any earlier run on the machine would have.)"""
    import subprocess
    import sys

    from cpt.models.smollm2 import smollm2_dir

    smollm2_dir()  # converted once per cache (a fresh CI machine: now)

    code = PROBE.format(heavy=heavy, args=[f"run_dir={tmp_path / 'run'}", *args])
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    heavy = proc.stdout.strip().splitlines()[-1]
    assert heavy == "HEAVY=", f"{' '.join(args)} imported {heavy.removeprefix('HEAVY=')}"
