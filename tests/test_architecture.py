"""The package's shape: imports point one way (no cycle, lazy imports included), the library
never imports bench/, scripts/ or tests/, and no module grows past ~400 lines."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("qlora_jax", "pallas_kernels")
MAX_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for pkg in PACKAGES:
    for f in sorted((ROOT / pkg).rglob("*.py")):
      parts = f.relative_to(ROOT).with_suffix("").parts
      out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
  return out


def _imported(name: str, path: pathlib.Path) -> set[str]:
  """Every module `name` imports anywhere in its file (inside functions too), absolute names."""
  found = set()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
      found.update(f"{base}.{a.name}" for a in node.names)
      found.add(base)
  return found


def import_graph() -> dict[str, set[str]]:
  """module -> the library modules it imports (a name resolves to its longest module prefix)."""
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    edges = set()
    for target in _imported(name, path):
      while target and target not in mods:
        target = target.rpartition(".")[0]
      if target and target != name:
        edges.add(target)
    graph[name] = edges
  return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a list of modules, or None (depth-first search)."""
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state and (found := visit(nxt)):
        return found
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_the_import_graph_has_no_cycle():
  assert _cycle(import_graph()) is None, " -> ".join(_cycle(import_graph()))


def test_the_cycle_finder_finds_one():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_library_never_imports_bench_scripts_or_tests():
  bad = [(name, t) for name, path in _modules().items() for t in _imported(name, path)
         if t.split(".")[0] in ("bench", "scripts", "tests")]
  assert not bad, bad


@pytest.mark.parametrize("layer, below", [
    ("qlora_jax.format", ("qlora_jax.format",)),
    ("pallas_kernels", ("pallas_kernels", "qlora_jax.format")),
    ("qlora_jax.nn", ("qlora_jax.nn", "pallas_kernels", "qlora_jax.format")),
])
def test_lower_layers_import_nothing_above_them(layer, below):
  """format -> kernels -> nn: the bottom of the pipeline never reaches up (cli is a leaf)."""
  up = [(m, t) for m, edges in import_graph().items() if m.startswith(layer) for t in edges
        if not t.startswith(below) and t != "qlora_jax.cli"]
  assert not up, up


def test_no_module_over_400_lines():
  long = {name: n for name, path in _modules().items()
          if (n := len(path.read_text().splitlines())) > MAX_LINES}
  assert not long, long
