"""A training workdir loaded for sampling, and samplers built from a config."""

from __future__ import annotations

import base64
import dataclasses
import math
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from codeclm import config_base
from codeclm.model import llama
from codeclm.model import sharding
from codeclm.runtime import storage
from codeclm.sampling import sampler as sampler_lib

def _tuples(x):
  """JSON lists back to the tuples configs hold (mesh rules and shapes)."""
  return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass
class Loaded:
  """A trained model ready to sample, with what decodes its output."""
  config: ml_collections.ConfigDict
  model: llama.Llama
  params: Any
  tokenizer: Any
  codec: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  step: int


def load(workdir: str, step: int | None = None,
         mesh_shape: Sequence[int] | None = None) -> Loaded:
  """A workdir's config, tokenizer, codec and params (latest or `step`).

  Params are restored with the training rules onto `mesh_shape` (default: the
  training config's mesh.shape over this machine's devices; a shape without
  -1 takes the first devices it needs, so (1, 1, 1, 1) samples on one device).
  """
  from codeclm.train import checkpoint  # pylint: disable=g-import-not-at-top
  from codeclm.train import params_io  # pylint: disable=g-import-not-at-top
  from codeclm import codecs  # pylint: disable=g-import-not-at-top
  from codeclm.tokenizer import ByteBPE  # pylint: disable=g-import-not-at-top
  workdir = storage.path(workdir)
  for name in checkpoint.RUN_FILES:
    if not (workdir / name).exists():
      raise FileNotFoundError(
          f"{workdir} has no {name}: point --workdir at a training workdir "
          "(config.json, tokenizer.json, manifest.json and checkpoints/).")
  config = ml_collections.ConfigDict(
      storage.read_json(workdir / "config.json"))
  manifest = storage.read_json(workdir / "manifest.json")
  tokenizer = ByteBPE.load(workdir / "tokenizer.json")
  codec = codecs.from_settings(manifest["codec"])
  codecs.warn_on_version_differences(manifest["codec"], codec,
                                     workdir / "manifest.json")
  stored = manifest.get("header_b64")  # Codecs that strip headers store one.
  if stored and base64.b64decode(stored) != codec.header():
    logging.warning(
        "The codec header this Pillow/libjpeg makes differs from the one the "
        "training data used (manifest.json: %s); decoded samples may show "
        "wrong colours or blocks. Install the versions named there.",
        manifest["codec"])
  rules = _tuples(config.mesh.rules)
  trained_shape = _tuples(config.mesh.shape)
  if len(trained_shape) == 3:  # Written before the context axis: its size 1.
    trained_shape = trained_shape[:2] + (1,) + trained_shape[2:]
    config.mesh.shape = trained_shape
    logging.info("%s/config.json has a (data, fsdp, tensor) mesh.shape; "
                 "reading it as %s over %s.", workdir, trained_shape,
                 sharding.MESH_AXES)
  shape = _tuples(mesh_shape or trained_shape)
  # A shape without -1 may use fewer devices than there are (e.g. (1, 1, 1, 1)),
  # but not under jax.distributed: every process samples its own rows.
  if (-1 not in shape and jax.process_count() > 1
      and math.prod(shape) != jax.device_count()):
    raise ValueError(
        f"mesh_shape={shape} uses {math.prod(shape)} of the "
        f"{jax.device_count()} devices of this {jax.process_count()}-process "
        "jax.distributed run, which samples on every process: use a shape "
        "with -1, e.g. (-1, 1, 1, 1).")
  devices = None if -1 in shape else jax.devices()[:math.prod(shape)]
  mesh = sharding.make_mesh(shape, devices)
  model = llama.Llama(config_base.model_config(config, tokenizer.vocab_size))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(model.init, jax.random.key(0),
                           jnp.zeros((1, 1), jnp.int32))
  shardings = sharding.logical_shardings(boxed["params"], mesh, rules)
  abstract = checkpoint.abstract_with_shardings(
      nn.meta.unbox(boxed["params"]), shardings)
  params, step = params_io.restore_workdir_params(workdir, abstract, step)
  return Loaded(config, model, params, tokenizer, codec, mesh, rules, step)



def settings_of(sample_cfg, max_new_tokens: int) -> sampler_lib.Settings:
  return sampler_lib.Settings(temperature=sample_cfg.temperature, top_k=sample_cfg.top_k,
                  top_p=sample_cfg.top_p, max_new_tokens=max_new_tokens)


def sampler_of(sample_cfg, model, tokenizer, mesh, rules) -> sampler_lib.Sampler:
  return sampler_lib.Sampler(model, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                 mesh=mesh, rules=rules, cache_dtype=sample_cfg.cache_dtype,
                 min_bucket=sample_cfg.min_bucket,
                 reshard_params=sample_cfg.reshard_params,
                 unroll_layers=sample_cfg.unroll_layers,
                 # A workdir's config.json from before the field: default.
                 max_copy_fraction=sample_cfg.get(
                     "max_copy_fraction", sampler_lib.MAX_COPY_FRACTION))


def grammar_of(constrained: bool, codec, tokenizer):
  """The token grammar sampling uses (sample.constrained), or None
  (unconstrained, or AVC)."""
  if not constrained:
    return None
  if codec.name != "jpeg":
    logging.info("sample.constrained is ignored for %s: only JPEG has a "
                 "grammar.", codec.name)
    return None
  from codeclm.sampling import jpeg_grammar  # pylint: disable=g-import-not-at-top
  from codeclm.sampling import token_grammar  # pylint: disable=g-import-not-at-top
  return token_grammar.build(jpeg_grammar.build(codec), tokenizer)
