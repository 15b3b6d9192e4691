"""The package's import graph, read from its source, has no circles.

Every `import` / `from ... import` anywhere in a file counts (inside
functions and under `if TYPE_CHECKING:` too): an import hidden in a function
still ties the two modules together. Nothing of the project is imported
here; the files are parsed with `ast`.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "brorl_jax"


def module_files(root: pathlib.Path) -> dict[str, tuple[pathlib.Path, bool]]:
  """Dotted module name -> (file, is a package's __init__)."""
  out = {}
  for path in sorted((root / PACKAGE).rglob("*.py")):
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
      parts = parts[:-1]
    out[".".join(parts)] = (path, is_pkg)
  return out


def _resolve(name: str, modules) -> str | None:
  """The project module `name` refers to (its longest existing prefix)."""
  while name not in modules and "." in name:
    name = name.rsplit(".", 1)[0]
  return name if name in modules else None


def imported_modules(node: ast.AST, module: str, is_pkg: bool,
                     modules) -> set[str]:
  """The project modules one Import / ImportFrom node brings in."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  else:
    if node.level:  # relative: from the module's package, up level - 1
      base = module.split(".") if is_pkg else module.split(".")[:-1]
      base = base[:len(base) - (node.level - 1)]
      prefix = ".".join(base + ([node.module] if node.module else []))
    else:
      prefix = node.module or ""
    # `from pkg import sub` imports the submodule when there is one, else a
    # name defined in pkg.
    names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules
             else prefix for a in node.names]
  found = {_resolve(n, modules) for n in names
           if n == PACKAGE or n.startswith(PACKAGE + ".")}
  return {m for m in found if m is not None and m != module}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
  return {child: node for node in ast.walk(tree)
          for child in ast.iter_child_nodes(node)}


def _in_function(node, parents) -> bool:
  while node in parents:
    node = parents[node]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                         ast.Lambda)):
      return True
  return False


def scan(root: pathlib.Path):
  """(file graph, [(module, line, source) of imports inside functions])."""
  modules = module_files(root)
  graph: dict[str, set[str]] = {m: set() for m in modules}
  local = []
  for module, (path, is_pkg) in modules.items():
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path))
    lines = text.splitlines()
    parents = _parents(tree)
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        graph[module] |= imported_modules(node, module, is_pkg, modules)
        if _in_function(node, parents):
          local.append((module, node.lineno, lines))
  return graph, local


def coarse(graph: dict[str, set[str]]) -> dict[str, set[str]]:
  """Top-level modules and subpackages as one node each.

  The package's own `__init__` is left out: importing any submodule runs it,
  so it is not a layer.
  """
  def node(m):
    return ".".join(m.split(".")[:2])
  out: dict[str, set[str]] = {}
  for a, targets in graph.items():
    if a == PACKAGE:
      continue
    out.setdefault(node(a), set())
    out[node(a)] |= {node(b) for b in targets
                     if b != PACKAGE and node(b) != node(a)}
  return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
  state: dict[str, int] = {}  # 1 = on the current path, 2 = done
  for start in sorted(graph):
    if state.get(start):
      continue
    path, stack = [start], [iter(sorted(graph[start]))]
    state[start] = 1
    while stack:
      nxt = next(stack[-1], None)
      if nxt is None:
        state[path.pop()] = 2
        stack.pop()
      elif state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      elif not state.get(nxt):
        state[nxt] = 1
        path.append(nxt)
        stack.append(iter(sorted(graph.get(nxt, ()))))
  return None


def _reason(line: str) -> str:
  """A line's comment, less lint directives (they say what, not why)."""
  if "#" not in line:
    return ""
  comment = line.split("#", 1)[1]
  comment = re.sub(r"(pylint|type|noqa)\s*:[^#]*|noqa\b", "", comment)
  return comment.strip(" #")


def _has_reason(lines: list[str], lineno: int) -> bool:
  """A comment saying why on the import's line, or on the block of imports
  it belongs to, or on the comment lines just above that block."""
  k = lineno - 1
  while True:
    if _reason(lines[k]):
      return True
    above = lines[k - 1].strip() if k >= 1 else ""
    if above.startswith(("import ", "from ")):
      k -= 1
    elif above.startswith("#"):
      k -= 1
      if _reason(lines[k]):
        return True
    else:
      return False


# ---- the checks on this repository ------------------------------------------

def test_no_cycle_among_files():
  graph, _ = scan(ROOT)
  assert len(graph) > 50  # the scan found the package
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_cycle_among_top_level_modules_and_subpackages():
  graph = coarse(scan(ROOT)[0])
  assert {"brorl_jax.rl", "brorl_jax.train", "brorl_jax.model"} <= set(graph)
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# The stages of the data flow: they know nothing of the run that drives them.
STAGES = ("data", "model", "rollout", "rewards", "rl")
# The run's host side (tests/loop mirrors it).
RUN = f"{PACKAGE}.loop"
# Modules the package root may hold (entry points, persistence, config,
# the interchange and the simulator): the rest lives in folders.
MAX_ROOT_MODULES = 18


def stage_imports_of_the_run(graph: dict[str, set[str]]) -> list[str]:
  """`module -> target` for every import of `loop/` from a stage folder."""
  return sorted(f"{a} -> {b}" for a, targets in graph.items()
                for b in targets
                if a.split(".")[1:2] and a.split(".")[1] in STAGES
                and (b == RUN or b.startswith(RUN + ".")))


def test_stage_folders_never_import_the_run():
  graph, _ = scan(ROOT)
  assert any(m.startswith(RUN + ".") for m in graph)
  bad = stage_imports_of_the_run(graph)
  assert not bad, "stage folders import loop/:\n" + "\n".join(bad)


def test_the_package_root_holds_at_most_18_modules():
  root = sorted(p.name for p in (ROOT / PACKAGE).glob("*.py")
                if p.name != "__init__.py")
  assert len(root) <= MAX_ROOT_MODULES, root


def test_imports_inside_functions_say_why():
  _, local = scan(ROOT)
  bare = [f"{m}:{n}: {lines[n - 1].strip()}" for m, n, lines in local
          if not _has_reason(lines, n)]
  assert not bare, "imports inside functions without a comment:\n" + "\n".join(
      bare)


# ---- the checker itself, on a small package written here -------------------

def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  for name, text in files.items():
    path = root / PACKAGE / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return root


@pytest.mark.parametrize("b_text", [
    "def f():\n  from brorl_jax import a\n",          # hidden in a function
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n  from . import a\n",
    "from .sub import c\n",                             # via a subpackage
])
def test_checker_finds_hidden_cycles(tmp_path, b_text):
  root = _write(tmp_path, {
      "__init__.py": "", "a.py": "from brorl_jax import b\n", "b.py": b_text,
      "sub/__init__.py": "", "sub/c.py": "from brorl_jax.a import x\n"})
  graph, _ = scan(root)
  assert find_cycle(graph) is not None
  assert find_cycle(coarse(graph)) is not None


def test_checker_finds_cycle_only_in_coarse_graph(tmp_path):
  # sub.c -> d -> sub.e: no file cycle, but sub -> d -> sub.
  root = _write(tmp_path, {
      "__init__.py": "", "d.py": "from brorl_jax.sub import e\n",
      "sub/__init__.py": "", "sub/c.py": "import brorl_jax.d\n",
      "sub/e.py": "import os\n"})
  graph, _ = scan(root)
  assert find_cycle(graph) is None
  assert find_cycle(coarse(graph)) == ["brorl_jax.d", "brorl_jax.sub",
                                       "brorl_jax.d"]


def test_checker_finds_a_stage_importing_the_run(tmp_path):
  root = _write(tmp_path, {
      "__init__.py": "", "loop/__init__.py": "", "loop/trainer.py": "",
      "rl/__init__.py": "", "rl/update.py": "import os\n",
      "rl/losses.py": "from brorl_jax.loop import trainer\n",
      "train.py": "from brorl_jax.loop import trainer\n"})
  graph, _ = scan(root)
  assert stage_imports_of_the_run(graph) == [
      "brorl_jax.rl.losses -> brorl_jax.loop.trainer"]


def test_checker_flags_uncommented_local_imports(tmp_path):
  root = _write(tmp_path, {
      "__init__.py": "",
      "a.py": ("def f():\n  import json\n"
               "def g():\n  # torch is optional\n  import torch\n"
               "  import transformers\n"
               "def h():\n  import numpy  # heavy, only for plots\n"
               "def i():\n  import os  # pylint: disable=g-import-not-at-top\n"
               "def j():\n  x = 1  # set x\n  import re\n")})
  _, local = scan(root)
  assert [(n, _has_reason(lines, n)) for _, n, lines in local] == [
      (2, False), (5, True), (6, True), (8, True), (10, False), (13, False)]
