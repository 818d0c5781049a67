"""The code's shape, read from its syntax tree (nothing is imported): function sizes and import
circles stay within the limits the style guide sets (HELPERS.md, issue 39)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'capture_jax'

# Most lines a function may span (its `def` to its last line, docstring included).
STRICT_LIMIT = 60  # train.py and instances/: the two trainers and the instance pipeline
LIMIT = 80  # the rest of capture_jax/
# Outside the limits: the benchmarks (measurement scripts) and the model's forward pass, which
# reads top to bottom as the paper's figure.
EXEMPT_FOLDERS = ('bench',)
EXEMPT_FUNCTIONS = {('models/capture.py', '__call__')}


def _modules() -> dict[str, Path]:
  """Dotted module name -> file, for every module of the package."""
  modules = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts = parts[:-1]
    modules['.'.join(parts)] = path
  return modules


def _limit(relative: str) -> int | None:
  if relative.split('/')[0] in EXEMPT_FOLDERS:
    return None
  return STRICT_LIMIT if relative == 'train.py' or relative.startswith('instances/') else LIMIT


def long_functions() -> list[str]:
  """`file:line name (N lines > limit)` for every function over its limit."""
  found = []
  for path in _modules().values():
    relative = path.relative_to(PACKAGE).as_posix()
    limit = _limit(relative)
    if limit is None:
      continue
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      lines = node.end_lineno - node.lineno + 1
      if lines > limit and (relative, node.name) not in EXEMPT_FUNCTIONS:
        found.append(f'{relative}:{node.lineno} {node.name} ({lines} lines > {limit})')
  return found


def import_graph() -> dict[str, set[str]]:
  """Module -> the package's modules it imports (anywhere in it: a function-level import
  is a dependency too)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
      if isinstance(node, ast.Import):
        imported |= {a.name for a in node.names if a.name in modules}
      elif isinstance(node, ast.ImportFrom):
        base = _absolute(node, name, path)
        for a in node.names:
          full = f'{base}.{a.name}'
          if full in modules:
            imported.add(full)
          elif base in modules:
            imported.add(base)
    imported.discard(name)
    graph[name] = imported
  return graph


def _absolute(node: ast.ImportFrom, module: str, path: Path) -> str:
  """The module a `from X import ...` names, relative imports resolved."""
  if not node.level:
    return node.module or ''
  package = module.split('.') if path.name == '__init__.py' else module.split('.')[:-1]
  base = package[: len(package) - (node.level - 1)]
  return '.'.join(base + ([node.module] if node.module else []))


def import_circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
  """The sets of modules that import each other, directly or through others (the strongly
  connected components of more than one module, Tarjan's algorithm)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  circles = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        circles.append(frozenset(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return circles


def test_no_function_over_the_limit():
  assert long_functions() == []


def test_no_two_modules_import_each_other():
  circles = import_circles(import_graph())
  assert circles == [], [sorted(c) for c in circles]


def test_the_circle_finder():
  """The circle finder on a made-up graph: a chain has none, a loop of three is one."""
  assert import_circles({'a': {'b'}, 'b': {'c'}, 'c': set()}) == []
  assert import_circles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [frozenset('abc')]
