"""The package's architecture as a test: every import of ctrl_jax by ctrl_jax (module-level and
inside functions) points down the layers, and no chain of imports comes back to where it began.

Layers, bottom up: runtime (imports nothing of ours) and models (may use runtime); core; problems
(base imports no problem, and no problem imports another); experiment and export; baselines;
launch. Inside core, the schedule, trajectory and objective modules use only each other.
"""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ctrl_jax")

# layer name → the layers (and itself) it may import
ALLOWED = {
    "root": set(),
    "runtime": {"runtime"},
    "models": {"runtime", "models"},
    "core": {"runtime", "models", "core"},
    "problems": {"runtime", "models", "core", "problems"},
    "experiment": {"runtime", "models", "core", "problems", "experiment"},
    "baselines": {"runtime", "models", "core", "problems", "experiment", "baselines"},
    "launch": {"runtime", "models", "core", "problems", "experiment", "baselines", "launch"},
}
PURE_CORE = {"ctrl_jax.core.schedules", "ctrl_jax.core.sampling", "ctrl_jax.core.objective"}


def _modules() -> dict[str, str]:
  """Dotted module name → file path, for every module of the package."""
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


MODULES = _modules()


def _imports(name: str, path: str | None = None) -> set[str]:
  """The ctrl_jax modules `name` (its file: `path`) imports anywhere, functions included."""
  path = path or MODULES[name]
  package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
      else:
        base = node.module or ""
      # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod itself
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                 for a in node.names]
    else:
      continue
    for t in targets:
      if t == "ctrl_jax" or t.startswith("ctrl_jax."):
        while t not in MODULES:  # `import ctrl_jax.models.x as y` of a missing name: its package
          t = t.rsplit(".", 1)[0]
        out.add(t)
  out.discard(name)
  return out


GRAPH = {name: _imports(name) for name in MODULES}


def layer(name: str) -> str:
  parts = name.split(".")
  if len(parts) == 1:
    return "root"
  if parts[1] in ("experiment", "export"):
    return "experiment"
  return parts[1]


def test_every_module_has_a_layer():
  assert {layer(m) for m in MODULES} <= set(ALLOWED), sorted(MODULES)


def test_imports_point_down_the_layers():
  bad = [f"{m} ({layer(m)}) imports {t} ({layer(t)})"
         for m, targets in sorted(GRAPH.items()) for t in sorted(targets)
         if layer(t) not in ALLOWED[layer(m)]]
  assert not bad, "\n".join(bad)


def test_the_trajectory_schedule_and_objective_use_only_each_other():
  bad = [f"{m} imports {t}" for m in sorted(PURE_CORE) for t in sorted(GRAPH[m])
         if t not in PURE_CORE]
  assert not bad, "\n".join(bad)


def test_problems_are_independent_and_the_registry_imports_none():
  def problem_of(name):
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "problems" else None

  bad = [f"{m} imports {t}" for m, targets in sorted(GRAPH.items()) for t in sorted(targets)
         if problem_of(m) and problem_of(t) and problem_of(t) != "base"
         and problem_of(m) != problem_of(t)]
  bad += [f"ctrl_jax.problems.base imports {t}" for t in GRAPH["ctrl_jax.problems.base"]
          if t.startswith("ctrl_jax.problems")]
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  # Tarjan's strongly connected components: any component of more than one module is a cycle.
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in GRAPH[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(sorted(comp))

  for v in sorted(GRAPH):
    if v not in index:
      visit(v)
  assert not cycles, cycles


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
  """An import hidden inside a function (the usual way to dodge a cycle) or written relative
  to the package is an edge all the same."""
  path = tmp_path / "sampling.py"
  path.write_text("import jax\n\n\ndef f():\n  from ctrl_jax.baselines import compare\n"
                  "  from . import train\n  from ..problems.base import Problem\n")
  assert _imports("ctrl_jax.core.sampling", str(path)) == {
      "ctrl_jax.baselines.compare", "ctrl_jax.core.train", "ctrl_jax.problems.base"}


@pytest.mark.parametrize("module", ["ctrl_jax.core.sampling", "ctrl_jax.core.train",
                                    "ctrl_jax.experiment"])
def test_importing_a_module_loads_nothing_above_it(module):
  above = {"core": ("ctrl_jax.problems", "ctrl_jax.baselines", "ctrl_jax.launch",
                    "ctrl_jax.experiment", "ctrl_jax.export"),
           "experiment": ("ctrl_jax.problems.digits", "ctrl_jax.problems.sd",
                          "ctrl_jax.problems.tiny", "ctrl_jax.baselines", "ctrl_jax.launch")}
  forbidden = above[layer(module)]
  code = (f"import sys, {module}; print('\\n'.join(m for m in sys.modules "
          f"if m.startswith({forbidden!r})))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.stdout.strip() == "", f"importing {module} loaded:\n{out.stdout}"
