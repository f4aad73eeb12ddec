"""The package's shape: no import cycles among lm's modules, imports at any depth counted.

A function-level import hides a cycle at run time (the import happens late enough to
work) but still ties the modules into one knot; this test parses the source instead of
importing it, so it sees those too.
"""

import ast
import os

import pytest

LM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lm")


def _modules(root):
  """{dotted module name: file path} of the package at `root`."""
  base = os.path.dirname(root)
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
        out[dotted.removesuffix(".__init__")] = path
  return out


def import_graph(root):
  """{module: modules of the same package it imports}, from every import statement in the
  file (top-level, in functions, in branches). `from pkg import name` counts pkg.name
  when that is a module, else pkg."""
  modules = _modules(root)
  package = os.path.basename(root)
  graph = {}
  for module, path in modules.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    here = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          parts = here.split(".")[:len(here.split(".")) - node.level + 1]
          source = ".".join(parts + ([node.module] if node.module else []))
        else:
          source = node.module or ""
        for alias in node.names:
          full = f"{source}.{alias.name}"
          deps.add(full if full in modules else source)
    graph[module] = {d for d in deps
                     if d in modules and d != module and d.split(".")[0] == package}
  return graph


def cycles(graph):
  """The strongly connected components with more than one module (Tarjan's algorithm)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_lm_has_no_import_cycles():
  graph = import_graph(LM)
  assert len(graph) > 30  # the parser found the package
  assert "lm.trees" in graph["lm.pretrained"]  # and its imports
  found = cycles(graph)
  assert not found, "import cycles in lm/: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("late", [False, True])
def test_the_cycle_finder_sees_cycles_through_function_level_imports(tmp_path, late):
  package = tmp_path / "pkg"
  (package / "sub").mkdir(parents=True)
  (package / "__init__.py").write_text("")
  (package / "sub" / "__init__.py").write_text("")
  (package / "a.py").write_text("from pkg.sub import b\n")
  (package / "sub" / "b.py").write_text("from . import c\n")
  inner = "def f():\n  from .. import a\n" if late else "import os\n"
  (package / "sub" / "c.py").write_text(inner)
  (package / "d.py").write_text("import pkg.a\n")
  found = cycles(import_graph(str(package)))
  assert found == ([["pkg.a", "pkg.sub.b", "pkg.sub.c"]] if late else [])
