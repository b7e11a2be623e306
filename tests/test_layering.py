"""Layers point one way: the library (`marscale/`) never imports the tools (`shards_tools/`).

The tools write shards in the format the library owns (`marscale.data.shards`); a library
that reached back into them would tie training to the converter's dependencies and let
the two ends of the format drift apart.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from helpers import REPO, subprocess_env

LIBRARY = os.path.join(REPO, "marscale")


def _python_files(root: str) -> list[str]:
    return sorted(
        os.path.join(d, name) for d, _, names in os.walk(root) for name in names if name.endswith(".py")
    )


def _imported_modules(path: str) -> list[str]:
    tree = ast.parse(open(path).read(), filename=path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            names += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return names


def test_no_library_module_imports_the_tools():
    offenders = [
        f"{os.path.relpath(path, REPO)}: {name}"
        for path in _python_files(LIBRARY)
        for name in _imported_modules(path)
        if name == "shards_tools" or name.startswith("shards_tools.")
    ]
    assert offenders == []


def test_no_library_file_names_the_tools_package():
    # Also catches module names built from strings (a COMMANDS table, a subprocess call).
    offenders = [
        os.path.relpath(path, REPO) for path in _python_files(LIBRARY) if "shards_tools" in open(path).read()
    ]
    assert offenders == []


def test_importing_the_library_loads_no_tool_module():
    modules = [
        "marscale.data.shards",
        "marscale.core.io",
        "marscale.data.loaders",
        "marscale.engine.trainer",
        "marscale.engine.plan",
        "marscale.cost.counting",
        "marscale.cli",
        "marscale.commands.demo",
        "marscale.commands.eval",
    ]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'shards_tools'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"  # after any line a library prints on import


def _library_modules() -> dict[str, str]:
    out = {}
    for path in _python_files(LIBRARY):
        name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def test_no_import_cycle_between_library_modules():
    modules = _library_modules()
    edges = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(open(path).read(), filename=path)):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                for alias in node.names:  # `from marscale.core import dist` names a module
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
        edges[name] = targets - {name}
    done, cycles = set(), []

    def visit(name, path):
        for nxt in sorted(edges[name]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, path + [nxt])
        done.add(name)

    for name in sorted(edges):
        if name not in done:
            visit(name, [name])
    assert cycles == []


def test_only_the_engine_builder_creates_a_deepspeed_engine():
    def calls_initialize(path: str) -> bool:
        return any(
            isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "initialize"
            and isinstance(n.func.value, ast.Name) and n.func.value.id == "deepspeed"
            for n in ast.walk(ast.parse(open(path).read(), filename=path))
        )

    callers = [os.path.relpath(path, REPO) for path in _python_files(LIBRARY) if calls_initialize(path)]
    assert callers == [os.path.join("marscale", "engine", "build.py")]
