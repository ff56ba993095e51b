"""No module of the project is part of an import circle: shared pieces live below the modules
that use them (mean ± sd, Fig. 1's curve and Fig. 3's tower gap in reproduction/stats.py, under
cifar, experiments and report; parse_devices in reproduction/training/distributed.py, under train,
evaluate, visualize and the main job).

The import graph is read from the source, function-local imports included, so a circle hidden
inside a function still counts."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reproduction", "data_prep")
CHECKED = ("reproduction.cifar", "reproduction.experiments", "reproduction.report", "reproduction.stats")


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


FILES = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}  # module -> file
MODULES = sorted(FILES)


@functools.cache  # the same source for every parametrised test: parse it once
def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source."""
    files, graph = FILES, {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # from . import x / from .x import y
                    up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{up}.{base}" if base else up
                for alias in node.names:  # `from reproduction import cifar` imports reproduction.cifar
                    deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def circle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """An import path from `start` back to itself, if there is one."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for dep in sorted(graph.get(node, ())):
            if dep == start:
                return path + [start]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, path + [dep]))
    return None


def test_import_graph_reader_sees_function_local_imports():
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert circle_through(graph, "a") == ["a", "b", "a"] and circle_through(graph, "c") is None
    found = import_graph()
    assert "reproduction.training.runfolder" in found["reproduction.report"]  # imported inside find_runs
    assert "reproduction.stats" in found["reproduction.cifar"]
    assert "data_prep.stats" in found["data_prep.pack"]              # from . import image, stats
    assert "reproduction.training.distributed" in found["reproduction.evaluate"]
    assert "reproduction.train" not in found["reproduction.evaluate"]


@pytest.mark.parametrize("module", MODULES)
def test_no_import_circle_through(module):
    assert circle_through(import_graph(), module) is None


def test_each_module_imports_alone_and_the_command_modules_without_torch():
    """A fresh interpreter per module: each imports on its own; the report and the experiments'
    command load torch only when they run (so their --help is quick)."""
    for module in CHECKED:
        code = f"import sys, {module}; print('torch' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{module}: {out.stderr}"
        if module != "reproduction.cifar":
            assert out.stdout.strip() == "False", f"{module} imports torch"


@pytest.mark.parametrize("command", ["reproduction", "reproduction.experiments", "reproduction.report", "data_prep"])
def test_help_answers_before_torch_loads(command):
    """--help of the main job (and of the commands built the same way) never imports torch,
    which takes 2-4 s warm and far longer from a cold disk."""
    code = ("import runpy, sys; sys.argv = ['x', '--help']\n"
            f"try: runpy.run_module({command!r}, run_name='__main__', alter_sys=True)\n"
            "except SystemExit as e: assert e.code == 0, e.code\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("False"), f"python -m {command} --help imported torch"

