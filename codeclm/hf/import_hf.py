r"""Imports a Hugging Face Llama (e.g. the released Jpeg-LM) into a workdir.

  python -m codeclm.hf.import_hf --src=DIR_OR_HUB_ID --workdir=W \
      [--config=configs/jpeg_lm.py:7b] [--mesh_shape='(1,-1,1,1)']

DIR holds `config.json` (a LlamaForCausalLM), one or many `*.safetensors`
(with `model.safetensors.index.json` when sharded) and the tokenizer
(`tokenizer.json`, or a SentencePiece `tokenizer.model` converted here once).
A hub id is fetched with huggingface_hub.snapshot_download (online only).

W becomes a workdir that `--mode=sample`, `--mode=eval`, the notebook and
`train.init_from=W` read like a trained one: `checkpoints/0/state` (params
only), `config.json` (--config with the model fields of the HF config),
`manifest.json` (the codec of --config) and `tokenizer.json`. Tensors are read
one at a time (safetensors maps the files) and placed onto the mesh, so host
memory holds at most one stacked parameter beyond the placed model. W is
written under a temporary name and renamed at the end: a failed import leaves
nothing behind.
"""

import base64
import importlib.util
import json
import os
import shutil
import tempfile
import types

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
from safetensors import safe_open
from tokenizers import Tokenizer

from codeclm import codecs
from codeclm import config_base
from codeclm.hf import weights as hf_weights
from codeclm.model import llama
from codeclm.model import llama_config
from codeclm.model import sharding
from codeclm.runtime import storage
from codeclm.train import planner
from codeclm import tokenizer as tokenizer_lib


def default_config() -> str:
  """jpeg_lm.py:7b of the configs that came with this codeclm.

  A wheel installs them inside the package (codeclm/configs/, see setup.py);
  a checkout has them beside it (configs/), whatever the working directory.
  """
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  folders = (os.path.join(package, "configs"),
             os.path.join(os.path.dirname(package), "configs"))
  for folder in folders:
    if os.path.isfile(os.path.join(folder, "jpeg_lm.py")):
      return os.path.join(folder, "jpeg_lm.py") + ":7b"
  return os.path.join(folders[0], "jpeg_lm.py") + ":7b"  # Named in the error.


_DEFAULT_CONFIG = default_config()
_ARCHITECTURES = ("LlamaForCausalLM",)
# Model fields of the codeclm config that the HF config sets.
_MODEL_FIELDS = ("num_layers", "emb_dim", "num_heads", "num_kv_heads",
                 "mlp_dim", "head_dim", "norm_eps", "rope_theta")


class ImportHFError(ValueError):
  """The source folder is not an importable HF Llama; names the file."""


def load_config(spec: str = ""):
  """The ConfigDict of a config file spec "path.py[:arg]", as --config reads;
  "" is the default, jpeg_lm.py:7b of codeclm's own configs."""
  path, _, arg = (spec or _DEFAULT_CONFIG).partition(":")
  module_spec = importlib.util.spec_from_file_location("codeclm_config", path)
  if module_spec is None or not os.path.isfile(path):
    raise FileNotFoundError(
        f"Config file {path} does not exist; pass a config file spec such as "
        f"{_DEFAULT_CONFIG} (codeclm's own configs)." if spec else
        f"codeclm's own configs are not at {path}: reinstall codeclm (its "
        "wheel ships configs/ as codeclm/configs/) or pass --config.")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def resolve_source(src: str) -> str:
  """A local folder: `src` itself, or the hub snapshot of the id `src`."""
  if os.path.isdir(src):
    return os.path.abspath(src)
  if src.count("/") == 1 and not src.startswith((".", "/")):
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    return snapshot_download(src, allow_patterns=[
        "*.json", "*.safetensors", "tokenizer.model"])
  raise ImportHFError(f"--src={src!r} is neither a folder nor a hub id "
                     "(owner/name).")


def read_hf_config(src: str) -> dict:
  path = os.path.join(src, "config.json")
  if not os.path.isfile(path):
    raise ImportHFError(f"{path} is missing: --src must be a Hugging Face model "
                       "folder (config.json, *.safetensors, tokenizer files).")
  with open(path) as f:
    cfg = json.load(f)
  archs = cfg.get("architectures") or []
  if not any(a in _ARCHITECTURES for a in archs) or cfg.get(
      "model_type", "llama") != "llama":
    raise ImportHFError(
        f"{path} describes {archs or cfg.get('model_type')!r}, not "
        f"{_ARCHITECTURES[0]}: codeclm's model is a plain Llama.")
  return cfg


def codeclm_config(base, hf_cfg: dict, src: str):
  """--config with the model and sequence fields of the HF config."""
  try:
    lc = hf_weights.config_from_hf(types.SimpleNamespace(**hf_cfg))
  except ValueError as e:
    raise ImportHFError(f"{os.path.join(src, 'config.json')}: {e}") from e
  config = base.copy_and_resolve_references()
  with config.unlocked():
    for name in _MODEL_FIELDS:
      config.model[name] = getattr(lc, name)
    config.seq_len = lc.max_len
  return config


def read_tokenizer(src: str, hf_cfg: dict):
  """The model's tokenizer behind codeclm's interface (see tokenizer.py)."""
  json_path = os.path.join(src, "tokenizer.json")
  spm_path = os.path.join(src, "tokenizer.model")
  if os.path.isfile(json_path):
    source = json_path
    try:
      tok = Tokenizer.from_file(json_path)
    except Exception as e:  # tokenizers raises a bare Exception.
      raise ImportHFError(f"{json_path} is not a tokenizer.json ({e}).") from e
  elif os.path.isfile(spm_path):
    source, tok = spm_path, convert_sentencepiece(spm_path)
  else:
    raise ImportHFError(f"{src} has neither tokenizer.json nor tokenizer.model.")
  vocab_size = hf_cfg["vocab_size"]
  exported = tokenizer_lib.from_hf(tok)
  if exported is not None and exported.vocab_size == vocab_size:
    return exported  # codeclm's own BPE, exported earlier: the exact inverse.
  bos_id, eos_id = _special_id(src, hf_cfg, tok, "bos"), _special_id(
      src, hf_cfg, tok, "eos")
  try:
    return tokenizer_lib.ByteCharTokenizer(
        tok, bos_id=bos_id, eos_id=eos_id, vocab_size=vocab_size,
        source=source)
  except ValueError as e:
    raise ImportHFError(str(e)) from e


def _special_id(src: str, hf_cfg: dict, tok: Tokenizer, which: str) -> int:
  """BOS or EOS id: config.json's, else tokenizer_config.json's token."""
  if isinstance(hf_cfg.get(f"{which}_token_id"), int):
    return hf_cfg[f"{which}_token_id"]
  path = os.path.join(src, "tokenizer_config.json")
  if os.path.isfile(path):
    with open(path) as f:
      token = json.load(f).get(f"{which}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if token is not None and tok.token_to_id(token) is not None:
      return tok.token_to_id(token)
  raise ImportHFError(f"No {which} token id in {src}/config.json "
                     f"({which}_token_id) or tokenizer_config.json.")


class _SentencePieceSource:
  """What transformers' LlamaConverter reads from a slow Llama tokenizer."""
  legacy = True  # Llama-2's tokenizer: prefix space, spaces as "▁".
  add_prefix_space = True

  def __init__(self, path: str):
    import sentencepiece  # pylint: disable=g-import-not-at-top
    self.vocab_file = path
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)

  def convert_ids_to_tokens(self, i: int) -> str:
    return self._sp.id_to_piece(i)


def convert_sentencepiece(path: str) -> Tokenizer:
  """A SentencePiece BPE tokenizer.model as a `tokenizers` one (once).

  Normalizer and decoder are transformers' LlamaConverter's; the BPE model is
  built here from SentencePieceExtractor, because LlamaConverter.tokenizer
  calls the extractor with transformers 4's arguments and fails in 5.x.
  """
  from tokenizers import AddedToken  # pylint: disable=g-import-not-at-top
  from tokenizers import models  # pylint: disable=g-import-not-at-top
  from transformers.convert_slow_tokenizer import LlamaConverter  # pylint: disable=g-import-not-at-top
  from transformers.convert_slow_tokenizer import SentencePieceExtractor  # pylint: disable=g-import-not-at-top
  try:
    converter = LlamaConverter(_SentencePieceSource(path))
    proto = converter.proto
    if proto.trainer_spec.model_type != 2:
      raise ValueError(f"model_type {proto.trainer_spec.model_type} is not "
                       "BPE (2), as Llama's")
    extracted = SentencePieceExtractor(path).extract(None)
    tok = Tokenizer(models.BPE(
        extracted["vocab"], extracted["merges"], fuse_unk=True,
        unk_token=proto.trainer_spec.unk_piece, byte_fallback=True))
  except Exception as e:  # sentencepiece/protobuf raise many types.
    raise ImportHFError(f"{path} is not a SentencePiece BPE model ({e}).") from e
  tok.normalizer = converter.normalizer(proto)
  tok.decoder = converter.decoder("\u2581", add_prefix_space=True)
  tok.add_special_tokens(
      [AddedToken(p.piece, special=True, normalized=False)
       for p in proto.pieces if p.type in (2, 3)]  # unknown, control
      + extracted["additional_special_tokens"])
  return tok


class SafetensorsReader:
  """Tensors by name across a folder's safetensors files, one at a time."""

  def __init__(self, src: str):
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    else:
      files = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
      if not files:
        raise ImportHFError(f"{src} has no *.safetensors files (PyTorch .bin "
                           "checkpoints: re-save with safe_serialization).")
      weight_map = {}
      for name in files:
        for key in self._open(os.path.join(src, name)).keys():
          weight_map[key] = name
    self._src, self._map, self._files = src, weight_map, {}

  def _open(self, path: str):
    try:
      return safe_open(path, framework="numpy")
    except Exception as e:  # SafetensorError, OSError
      raise ImportHFError(f"{path} is not a complete safetensors file ({e}); "
                         "download it again.") from e

  def names(self) -> set[str]:
    return set(self._map)

  def get(self, name: str) -> np.ndarray:
    path = os.path.join(self._src, self._map[name])
    if path not in self._files:
      self._files[path] = self._open(path)
    try:
      return self._files[path].get_tensor(name)
    except Exception as e:  # pylint: disable=broad-except
      raise ImportHFError(f"{path}: tensor {name} does not read ({e}).") from e


def leaf_sources(c: llama_config.LlamaConfig) -> dict[tuple, tuple]:
  """codeclm param path -> (HF names, kind); per-layer leaves list L names."""
  out = {("embedding",): (["model.embed_tokens.weight"], "embedding"),
         ("final_norm", "scale"): (["model.norm.weight"], "vector"),
         ("head",): (["lm_head.weight"], "head")}
  for name, (path, kind) in hf_weights.layer_keys(c).items():
    names = [f"model.layers.{i}.{name}" for i in range(c.num_layers)]
    if c.scan_layers:
      out[("layers",) + path] = (names, kind)
    else:
      for i, n in enumerate(names):
        out[(f"layers_{i}",) + path] = ([n], kind)
  return out


def read_leaf(reader: SafetensorsReader, names: list[str], kind: str,
              c: llama_config.LlamaConfig, shape: tuple, dtype) -> np.ndarray:
  """One codeclm leaf (stacked over layers when `names` has several)."""
  if kind in ("embedding", "head"):
    name = names[0]
    if name not in reader.names() and kind == "head":
      name = "model.embed_tokens.weight"  # Tied embeddings, as HF does.
    x = hf_weights.from_hf_tensor(reader.get(name), name, (c.vocab_size, c.emb_dim),
                          dtype)
    return np.ascontiguousarray(x.T) if kind == "head" else x
  out = np.empty(shape, dtype)
  for i, name in enumerate(names):
    x = hf_weights.from_hf_tensor(reader.get(name), name, hf_weights.hf_shape(name, kind, c),
                          dtype)
    y = hf_weights.convert_from_hf(x, kind, c)
    if len(names) > 1:
      out[i] = y
    else:
      out[...] = y
  return out


def _check_names(reader: SafetensorsReader, sources: dict, src: str) -> None:
  wanted = {n for names, _ in sources.values() for n in names}
  have = {n for n in reader.names() if not n.endswith("rotary_emb.inv_freq")}
  missing = wanted - have - {"lm_head.weight"}
  unexpected = have - wanted
  if missing or unexpected:
    raise ImportHFError(
        f"The safetensors in {src} do not match its config.json: missing "
        f"{sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}.")


def import_params(reader: SafetensorsReader, model: llama.Llama, mesh, rules):
  """Params placed on the mesh, converted one leaf at a time."""
  c = model.config
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(model.init, jax.random.key(0),
                           jnp.zeros((1, 1), jnp.int32))["params"]
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  abstract = nn.meta.unbox(boxed)
  sources = leaf_sources(c)
  flat = {tuple(k.key for k in path): leaf for path, leaf
          in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  flat_shardings = {tuple(k.key for k in path): s for path, s
                    in jax.tree_util.tree_flatten_with_path(shardings)[0]}
  if set(flat) != set(sources):
    raise ValueError(f"codeclm params {sorted(set(flat) ^ set(sources))} have "
                     "no HF source; update import_hf.leaf_sources.")
  placed = {}
  for path, leaf in flat.items():
    names, kind = sources[path]
    x = read_leaf(reader, names, kind, c, leaf.shape, leaf.dtype)
    placed[path] = jax.make_array_from_callback(
        leaf.shape, flat_shardings[path], lambda index, x=x: x[index])
    del x
  return jax.tree_util.tree_map_with_path(
      lambda path, _: placed[tuple(k.key for k in path)], abstract)


def write_workdir(workdir: str, config, tokenizer, params) -> None:
  """config.json, manifest.json, tokenizer.json and checkpoints/0."""
  codec = codecs.from_config(config.codec)
  manifest = dict(format=1, source="import_hf", codec=codec.settings(),
                  header_b64=base64.b64encode(codec.header()).decode("ascii"),
                  tokenizer="tokenizer.json")
  workdir = storage.path(workdir)
  storage.write_text(workdir / "config.json",
                     config.to_json_best_effort(indent=2))
  storage.write_json(workdir / "manifest.json", manifest)
  storage.write_text(workdir / "tokenizer.json", tokenizer.to_json())
  manager = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(create=True,
                                           enable_async_checkpointing=False),
      item_names=("state",))
  manager.save(0, args=ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params})))
  manager.wait_until_finished()
  manager.close()


def run(src: str, workdir: str, base_config=None, mesh_shape=None) -> str:
  """Imports `src` into a new `workdir`; returns the workdir.

  base_config: the codeclm config to start from (default: load_config()).
  """
  if base_config is None:
    base_config = load_config()
  workdir = storage.path(workdir)
  if workdir.exists() and any(workdir.iterdir()):
    raise FileExistsError(f"--workdir={workdir} exists and is not empty; "
                          "import into a new folder.")
  src = resolve_source(src)
  hf_cfg = read_hf_config(src)
  # An "auto" layout (1B, 7B) is the planner's at train time; weights are
  # placed, and config.json records, fsdp over this machine's devices.
  config = planner.unplanned(codeclm_config(base_config, hf_cfg, src))
  tokenizer = read_tokenizer(src, hf_cfg)
  reader = SafetensorsReader(src)
  model = llama.Llama(config_base.model_config(config, tokenizer.vocab_size))
  _check_names(reader, leaf_sources(model.config), src)
  shape = tuple(mesh_shape or config.mesh.shape)
  devices = None if -1 in shape else jax.devices()[:int(np.prod(shape))]
  mesh = sharding.make_mesh(shape, devices)
  rules = tuple(tuple(r) for r in config.mesh.rules)
  # Written beside it (or locally, for a store without renames), then moved
  # or uploaded: an interrupted import leaves no half workdir.
  remote = storage.is_remote(workdir)
  workdir.parent.mkdir(parents=True, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=workdir.name + ".importing-",
                         dir=None if remote else workdir.parent)
  try:
    params = import_params(reader, model, mesh, rules)
    write_workdir(tmp, config, tokenizer, params)
    del params
    if remote:
      storage.upload(tmp, workdir)
    else:
      if workdir.is_dir():
        workdir.rmdir()  # Empty (checked above).
      storage.move(tmp, workdir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("Imported %s into %s (%s).", src, workdir, tokenizer)
  return os.fspath(workdir)


def parse_shape(text: str) -> tuple[int, ...] | None:
  """'(1,-1,1,1)' -> (1, -1, 1, 1); '' -> None."""
  text = text.strip().strip("()[]")
  return tuple(int(v) for v in text.split(",") if v.strip()) if text else None


def main():
  """Flags are defined here, not at import, so tests can import run()."""
  flags.DEFINE_string("src", None, "HF model folder or hub id.")
  flags.DEFINE_string("workdir", None, "New workdir to write.")
  config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "codeclm config whose codec, data, sample "
      "and eval fields the workdir gets (model fields come from the HF "
      "config).")
  flags.DEFINE_string("mesh_shape", "", "e.g. '(1,-1,1,1)'; '' = the config's "
                      "mesh.shape.")
  flags.mark_flags_as_required(["src", "workdir"])
  f = flags.FLAGS

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run(f.src, f.workdir, f.config, parse_shape(f.mesh_shape))

  app.run(_main)


if __name__ == "__main__":
  main()
