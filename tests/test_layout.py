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


def _project_files(endings: tuple[str, ...]):
  """(folder, path, text) of the project's files with these endings, outside
  hidden folders and build outputs."""
  for folder, dirs, names in os.walk(ROOT):
    dirs[:] = [d for d in dirs if not d.startswith(".") and d not in (
        "build", "dist") and not d.endswith(".egg-info")]
    for name in names:
      if name.endswith(endings):
        path = os.path.join(folder, name)
        with open(path, encoding="utf-8") as f:
          yield folder, path, f.read()


def test_every_document_link_stays_inside_the_project():
  """Relative links in the project's Markdown files point at files that exist
  in the project (a clone stands alone)."""
  import re  # pylint: disable=g-import-not-at-top
  bad = []
  for folder, path, text in _project_files((".md",)):
    for target in re.findall(r"\]\(([^)#\s]+)", text):
      if re.match(r"[a-z]+:", target):
        continue  # http(s), mailto: not a file.
      resolved = os.path.normpath(os.path.join(folder, target))
      if (not resolved.startswith(ROOT + os.sep)
          or not os.path.exists(resolved)):
        bad.append(f"{os.path.relpath(path, ROOT)}: {target}")
  assert not bad, bad


# The workspace folder beside the checkout that held the project's design
# notes; a clone lacks it. Spelled in parts so this file does not name it.
_BESIDE = "/".join(("..", "sha" + "red"))


def test_nothing_refers_to_a_folder_beside_the_project():
  """No source, script or document names the workspace folder beside the
  checkout (a clone lacks it); the project keeps its own docs/."""
  bad = [os.path.relpath(path, ROOT) for _, path, text in _project_files(
      (".py", ".md", ".sh", ".sbatch", ".ipynb", ".ini", ".cfg"))
         if _BESIDE in text]
  assert not bad, bad


# Below `main` and the orchestrators a function receives the config section
# it reads (`data`, `codec`, `sample_cfg`, `tc`, ..., and top-level scalars
# like `seed=`, `seq_len=` as keywords), never the whole config, so the call
# shows which code reads which setting. The functions that may still take a
# parameter named `config`, by module (path under the project root) and
# qualified name, each with its reason:
_TAKE_CONFIG = {
    # The orchestrators: each dispatches the sections to what it calls.
    "codeclm/train/loop.py": {
        "train",  # The train orchestrator.
        # Reads mesh, model, train and data (four sections) and seq_len,
        # batch_size; shared by train, compile and the benchmarks.
        "build",
    },
    "codeclm/train/compile.py": {"run"},  # The compile job's orchestrator.
    # The planner reads and fills the layout fields of three sections (mesh,
    # train, model) and the step's shape (seq_len, batch_size, data).
    "codeclm/train/planner.py": {
        "resolve", "resolve_for_devices", "auto_fields", "check_resolved",
        "unplanned", "layout_of", "config_shape"},
    "codeclm/eval/evaluate.py": {"run"},  # The eval orchestrator.
    # Store or build from the whole config.
    "codeclm/train/checkpoint.py": {
        "write_run_files",  # Writes the whole config to config.json.
    },
    "codeclm/hf/import_hf.py": {
        "write_workdir",  # A command-line job of its own; writes config.json.
    },
    "codeclm/config_base.py": {
        "model_config",  # Defines the config: model section + seq_len -> model.
    },
    # Not the run config: a parameter named `config` that is a
    # llama_config.LlamaConfig (the model's own dataclass) ...
    "codeclm/model/llama.py": {"param_count"},
    "codeclm/model/llama_config.py": {"flops_per_token"},
    "codeclm/model/kv_cache.py": {"init_cache"},
    "codeclm/hf/weights.py": {"_layer_keys", "layer_keys", "params_from_hf",
                              "params_to_hf"},
    # ... or a tokenizer.json dict.
    "codeclm/tokenizer.py": {"_map_tokens"},
}


def _takes_config(path: str):
  """Qualified names (Class.method, outer.inner) of the functions and
  lambdas in a module that have a parameter named `config`."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)

  def visit(node, scope):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                            ast.Lambda, ast.ClassDef)):
        name = ".".join(scope + [getattr(child, "name", "lambda")])
        if not isinstance(child, ast.ClassDef):
          a = child.args
          params = a.posonlyargs + a.args + a.kwonlyargs + [
              p for p in (a.vararg, a.kwarg) if p]
          if any(p.arg == "config" for p in params):
            yield child.lineno, name
        yield from visit(child, scope + [getattr(child, "name", "lambda")])
      else:
        yield from visit(child, scope)

  yield from visit(tree, [])


def test_functions_take_config_sections_not_the_config():
  """No function in codeclm/ has a parameter named `config`, except those
  _TAKE_CONFIG lists; and each one it lists still takes one."""
  bad, found = [], set()
  for path in _modules():
    rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
    for line, name in _takes_config(path):
      found.add((rel, name))
      if name not in _TAKE_CONFIG.get(rel, ()):
        bad.append(f"{rel}:{line} {name}")
  assert not bad, ("below the orchestrators, take the config's sections "
                   "(config.data, config.model, ...) and top-level scalars "
                   f"(seed=, seq_len=) instead of the config: {bad}")
  stale = {(rel, name) for rel, names in _TAKE_CONFIG.items()
           for name in names} - found
  assert not stale, f"listed in _TAKE_CONFIG but take no `config`: {stale}"
