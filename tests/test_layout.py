"""The package layout rules (docs/architecture.md), read from the source.

Modules stay small, no two share a name, and imports flow one way: codecs and
the tokenizer know nothing of JAX, the model knows only JAX and Flax, data
knows codecs and the tokenizer; train, sampling, eval and hf compose the rest;
only main dispatches to all of them.
"""

import ast
import collections
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "codeclm")
MAX_LINES = 500

# What each part of codeclm may import from codeclm (by first name under
# codeclm: a package, or a top-level module), and which outside libraries it
# must not import.
_ALLOWED = {
    "codecs": {"codecs"},
    "tokenizer": set(),
    "runtime": {"runtime"},
    "model": {"model"},
    "data": {"data", "codecs", "tokenizer", "runtime"},
    "config_base": {"model"},
    "train": {"train", "data", "model", "codecs", "tokenizer", "runtime",
              "config_base", "sampling"},
    "sampling": {"sampling", "train", "data", "model", "codecs", "tokenizer",
                 "runtime", "config_base"},
    "eval": {"eval", "sampling", "train", "data", "model", "codecs",
             "runtime"},
    "hf": {"hf", "train", "model", "codecs", "tokenizer", "runtime",
           "config_base"},
    "main": {"runtime", "train", "data", "sampling", "eval"},
}
_NO_JAX = ("codecs", "tokenizer")
_JAX = ("jax", "jaxlib", "flax", "optax", "orbax")


def _modules():
  for folder, _, names in os.walk(PACKAGE):
    for name in sorted(names):
      if name.endswith(".py"):
        yield os.path.join(folder, name)


def _part(path: str) -> str:
  """The first name under codeclm/ of a module path: its package or module."""
  rel = os.path.relpath(path, PACKAGE)
  return rel.split(os.sep)[0].removesuffix(".py")


def _imports(path: str):
  """(line, module) for every import in a module, at any depth."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node.lineno, alias.name
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "codeclm":  # from codeclm import x: x is the part.
        for alias in node.names:
          yield node.lineno, f"codeclm.{alias.name}"
      else:
        yield node.lineno, node.module


def test_no_module_over_the_line_limit():
  long = {os.path.relpath(p, ROOT): n for p in _modules()
          if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
  assert not long, f"over {MAX_LINES} lines, split along a seam: {long}"


def test_no_two_modules_share_a_name():
  by_name = collections.defaultdict(list)
  for p in _modules():
    name = os.path.basename(p)
    if name not in ("__init__.py", "__main__.py"):
      by_name[name].append(os.path.relpath(p, ROOT))
  # A top-level module beside a package of a similar name (sample.py beside
  # sampling/) is a doubled name too.
  packages = {d for d in os.listdir(PACKAGE)
              if os.path.isfile(os.path.join(PACKAGE, d, "__init__.py"))}
  for name in os.listdir(PACKAGE):
    stem = name.removesuffix(".py")
    if name.endswith(".py") and any(p.startswith(stem) or stem.startswith(p)
                                    for p in packages):
      by_name[stem + "/"].extend([name, stem])
  doubled = {k: v for k, v in by_name.items() if len(v) > 1}
  assert not doubled, doubled


@pytest.mark.parametrize("part", sorted(_ALLOWED))
def test_imports_flow_one_way(part):
  bad = []
  for path in _modules():
    if _part(path) != part:
      continue
    for line, module in _imports(path):
      names = module.split(".")
      where = f"{os.path.relpath(path, ROOT)}:{line} imports {module}"
      if names[0] == "codeclm" and len(names) > 1:
        if names[1] not in _ALLOWED[part] and names[1] != part:
          bad.append(where)
      elif part in _NO_JAX and names[0] in _JAX:
        bad.append(where)
  assert not bad, bad


def test_every_part_is_listed():
  parts = {_part(p) for p in _modules()} - {"__init__"}
  assert parts <= set(_ALLOWED), parts - set(_ALLOWED)
