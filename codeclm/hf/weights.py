"""Hugging Face transformers Llama <-> codeclm parameter conversion.

Lets a codeclm checkpoint be checked against (or exported to) the reference
PyTorch implementation, and HF Llama weights be loaded for fine-tuning. RoPE
uses the same "rotate_half" layout on both sides, so q/k need no permutation;
only transposes and head reshapes. torch/transformers are imported lazily,
never at module import, so the model package needs neither.

Params come back as host numpy arrays (unboxed, in the layout of the config's
`scan_layers`): the caller places them with its shardings, and a 7B model is
never gathered on one device.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from codeclm.model import llama_config

# HF per-layer names -> (codeclm path inside a layer, kind of transform).
_LAYER_KEYS = {
    "input_layernorm.weight": (("attn_norm", "scale"), "vector"),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), "vector"),
    "self_attn.q_proj.weight": (("attn", "q_proj"), "in_heads"),
    "self_attn.k_proj.weight": (("attn", "k_proj"), "in_kv_heads"),
    "self_attn.v_proj.weight": (("attn", "v_proj"), "in_kv_heads"),
    "self_attn.o_proj.weight": (("attn", "o_proj"), "out_heads"),
    "mlp.gate_proj.weight": (("mlp", "gate_proj"), "linear"),
    "mlp.up_proj.weight": (("mlp", "up_proj"), "linear"),
    "mlp.down_proj.weight": (("mlp", "down_proj"), "linear"),
}
_QK_NORM_KEYS = {  # Present in Qwen3/OLMo-style checkpoints only.
    "self_attn.q_norm.weight": (("attn", "q_norm", "scale"), "vector"),
    "self_attn.k_norm.weight": (("attn", "k_norm", "scale"), "vector"),
}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def config_from_hf(hf_config, **overrides) -> llama_config.LlamaConfig:
  """A LlamaConfig from a transformers LlamaConfig; rejects what we lack."""
  get = lambda name, default=None: getattr(hf_config, name, default)
  problems = []
  if get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act={get('hidden_act')!r} (only silu)")
  if get("attention_bias", False) or get("mlp_bias", False):
    problems.append("attention_bias / mlp_bias (codeclm has no biases)")
  rope = dict(get("rope_parameters") or get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    problems.append(f"rope_type={rope_type!r} (only default RoPE)")
  if problems:
    raise ValueError("Cannot convert this HF config: " + "; ".join(problems)
                     + ". Use a plain Llama-2 style model.")
  num_heads = hf_config.num_attention_heads
  fields = dict(
      vocab_size=hf_config.vocab_size,
      num_layers=hf_config.num_hidden_layers,
      emb_dim=hf_config.hidden_size,
      num_heads=num_heads,
      num_kv_heads=get("num_key_value_heads") or num_heads,
      mlp_dim=hf_config.intermediate_size,
      head_dim=get("head_dim") or hf_config.hidden_size // num_heads,
      norm_eps=float(hf_config.rms_norm_eps),
      rope_theta=float(rope.get("rope_theta", get("rope_theta", 1e4))),
      max_len=int(get("max_position_embeddings", 4096)),
  )
  return llama_config.LlamaConfig(**{**fields, **overrides})


def _to_numpy(x) -> np.ndarray:
  """torch tensor (any dtype, bf16 included) or array-like -> numpy."""
  if hasattr(x, "detach"):
    x = x.detach().cpu()
    if str(x.dtype) == "torch.bfloat16":
      import ml_dtypes  # pylint: disable=g-import-not-at-top
      import torch  # pylint: disable=g-import-not-at-top
      return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


def _layer_keys(config: llama_config.LlamaConfig) -> dict:
  return {**_LAYER_KEYS, **(_QK_NORM_KEYS if config.qk_norm else {})}


def hf_shape(name: str, kind: str, c: llama_config.LlamaConfig) -> tuple:
  """The shape HF stores the tensor `name` (of `kind`) in."""
  h, k, f, d = c.num_heads, c.num_kv_heads, c.head_dim, c.emb_dim
  if kind == "vector":
    return (f,) if "q_norm" in name or "k_norm" in name else (d,)
  if kind == "in_heads":
    return (h * f, d)
  if kind == "in_kv_heads":
    return (k * f, d)
  if kind == "out_heads":
    return (d, h * f)
  return (d, c.mlp_dim) if "down_proj" in name else (c.mlp_dim, d)


def from_hf_tensor(x: np.ndarray, name: str, shape: tuple,
                   dtype) -> np.ndarray:
  """Checks a HF tensor's shape and casts it to the params' dtype."""
  if x.shape != shape:
    raise ValueError(f"{name} has shape {x.shape}, expected {shape} from the "
                     "config; build the config with config_from_hf.")
  return x.astype(dtype)


def convert_from_hf(x: np.ndarray, kind: str,
                    c: llama_config.LlamaConfig) -> np.ndarray:
  """One HF layer tensor (torch [out, in] layout) -> codeclm's layout."""
  h, k, f, d = c.num_heads, c.num_kv_heads, c.head_dim, c.emb_dim
  if kind == "vector":
    return x
  if kind == "in_heads":
    return x.T.reshape(d, h, f)
  if kind == "in_kv_heads":
    return x.T.reshape(d, k, f)
  if kind == "out_heads":
    return x.T.reshape(h, f, d)
  return x.T


def convert_to_hf(x: np.ndarray, kind: str,
                  c: llama_config.LlamaConfig) -> np.ndarray:
  """The inverse of convert_from_hf (a contiguous array)."""
  h, k, f, d = c.num_heads, c.num_kv_heads, c.head_dim, c.emb_dim
  if kind == "vector":
    return np.ascontiguousarray(x)
  if kind == "in_heads":
    x = x.reshape(d, h * f).T
  elif kind == "in_kv_heads":
    x = x.reshape(d, k * f).T
  elif kind == "out_heads":
    x = x.reshape(h * f, d).T
  else:
    x = x.T
  return np.ascontiguousarray(x)


def layer_keys(config: llama_config.LlamaConfig) -> dict:
  """HF per-layer tensor name -> (path inside a codeclm layer, kind)."""
  return _layer_keys(config)


def params_from_hf(state_dict: Mapping[str, Any],
                   config: llama_config.LlamaConfig) -> dict:
  """codeclm params (numpy, param_dtype) from a LlamaForCausalLM state_dict.

  Torch Linear weights are [out, in]; codeclm kernels are [in, out] with the
  head axes split out. A missing lm_head (tied embeddings) is filled with the
  embedding, as HF does.
  """
  c = config
  d = c.emb_dim
  dtype = np.dtype(c.param_dtype)
  sd = {n: v for n, v in state_dict.items() if not _IGNORED.match(n)}
  if "lm_head.weight" not in sd and "model.embed_tokens.weight" in sd:
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
  expected = {"model.embed_tokens.weight", "model.norm.weight",
              "lm_head.weight"} | {
                  f"model.layers.{i}.{n}" for i in range(c.num_layers)
                  for n in _layer_keys(c)}
  missing, unexpected = expected - set(sd), set(sd) - expected
  if missing or unexpected:
    raise ValueError(
        f"state_dict does not match the config ({c.num_layers} layers, "
        f"qk_norm={c.qk_norm}): missing {sorted(missing)[:8]}, unexpected "
        f"{sorted(unexpected)[:8]}. Build the config with config_from_hf.")

  def get(name, shape):
    return from_hf_tensor(_to_numpy(sd[name]), name, shape, dtype)

  def convert(name, kind):
    return convert_from_hf(get(name, hf_shape(name, kind, c)), kind, c)

  layers = []
  for i in range(c.num_layers):
    layer = {}
    for name, (path, kind) in _layer_keys(c).items():
      node = layer
      for p in path[:-1]:
        node = node.setdefault(p, {})
      node[path[-1]] = np.ascontiguousarray(
          convert(f"model.layers.{i}.{name}", kind))
    layers.append(layer)
  params = {
      "embedding": get("model.embed_tokens.weight", (c.vocab_size, d)),
      "final_norm": {"scale": get("model.norm.weight", (d,))},
      "head": np.ascontiguousarray(
          get("lm_head.weight", (c.vocab_size, d)).T),
  }
  if c.scan_layers:
    params["layers"] = jax.tree.map(lambda *a: np.stack(a), *layers)
  else:
    params.update({f"layers_{i}": layer for i, layer in enumerate(layers)})
  return params


def params_to_hf(params: Mapping[str, Any],
                 config: llama_config.LlamaConfig,
                 dtype=None) -> dict[str, np.ndarray]:
  """The inverse of params_from_hf: a LlamaForCausalLM state_dict as numpy.

  Keeps the params' dtype unless `dtype` is given; load into torch with
  `{k: torch.from_numpy(v) for ...}` and `load_state_dict`.
  """
  c = config
  cast = lambda x: np.array(x, dtype)  # a writable copy (torch.from_numpy)
  if c.scan_layers:
    if "layers" not in params:
      raise ValueError("config.scan_layers=True but params have no 'layers'; "
                       "pass the config the params were built with.")
    stacked = params["layers"]
    layers = [jax.tree.map(lambda a, i=i: np.asarray(a)[i], stacked)
              for i in range(c.num_layers)]
  else:
    layers = [params[f"layers_{i}"] for i in range(c.num_layers)]

  sd = {"model.embed_tokens.weight": cast(params["embedding"])}
  for i, layer in enumerate(layers):
    for name, (path, kind) in _layer_keys(c).items():
      node = layer
      for p in path:
        node = node[p]
      sd[f"model.layers.{i}.{name}"] = convert_to_hf(cast(node), kind, c)
  sd["model.norm.weight"] = cast(params["final_norm"]["scale"])
  sd["lm_head.weight"] = np.ascontiguousarray(cast(params["head"]).T)
  return sd
