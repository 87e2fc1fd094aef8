"""The Llama's configuration, its size table and its FLOP count.

Kept apart from the layers (llama.py) so that the numbers every caller needs
(sizes, config validation, model FLOPs for MFU) read in one short module.

Rematerialisation (`remat_policy`), per decoder layer:

  "none"              no remat: keep every activation (fastest, most memory)
  "full"              save nothing but the layer input; recompute the layer
  "nothing_saveable"  the same as "full" (JAX's name)
  "dots"              save matmul outputs without batch dims (JAX policy)
  "qkv_proj"          save only the named q/k/v projections
  "all_proj"          save q/k/v, the attention output and the MLP gate/up
  "offload_layer_inputs"  as "full", but each layer's input is kept in
                      pinned host memory, not HBM, and copied back for the
                      backward pass (checked in TPU compiles; GPU untried;
                      on CPU the copies are no-ops)

"offload_layer_inputs" trades HBM for host memory and host transfers: with
"full", the L saved layer inputs (rows x length x width each) are the
largest activation left in HBM at long context.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from codeclm.model import attention
from codeclm.model import context_attention

# One size table. Vocabulary size comes from the tokenizer, not from here.
# "1b" uses 16 heads of 128 (Llama-2's head dim, the fast path of the flash
# kernels) and an MLP of 4 * width, so it has 1.07B parameters (+ embeddings).
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=2, emb_dim=32, num_heads=4, num_kv_heads=2,
                 mlp_dim=64),
    "demo": dict(num_layers=4, emb_dim=128, num_heads=4, num_kv_heads=4,
                 mlp_dim=352),
    "100m": dict(num_layers=12, emb_dim=768, num_heads=12, num_kv_heads=12,
                 mlp_dim=2048),
    "1b": dict(num_layers=16, emb_dim=2048, num_heads=16, num_kv_heads=16,
               mlp_dim=8192),
    "7b": dict(num_layers=32, emb_dim=4096, num_heads=32, num_kv_heads=32,
               mlp_dim=11008),
}

# Activations a remat policy can name (llama.py's checkpoint_name calls).
_PROJ_NAMES = ("query_proj", "key_proj", "value_proj")
_ALL_NAMES = _PROJ_NAMES + ("attention_out", "mlp_gate", "mlp_up")
LAYER_INPUT = "layer_input"


def _offload(*names: str):
  """Keep nothing in HBM; copy `names` to pinned host memory and back."""
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=(), names_which_can_be_offloaded=names,
      offload_src="device", offload_dst="pinned_host")


REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "qkv_proj": jax.checkpoint_policies.save_only_these_names(*_PROJ_NAMES),
    "all_proj": jax.checkpoint_policies.save_only_these_names(*_ALL_NAMES),
    "offload_layer_inputs": _offload(LAYER_INPUT),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture and numerics of one model; `head_dim` is resolved on init."""
  vocab_size: int
  num_layers: int
  emb_dim: int
  num_heads: int
  num_kv_heads: int
  mlp_dim: int
  head_dim: int | None = None        # None: emb_dim // num_heads
  norm_eps: float = 1e-5
  rope_theta: float = 1e4
  max_len: int = 4096                # longest sequence (positions) accepted
  dtype: str = "bfloat16"            # compute
  param_dtype: str = "float32"       # storage
  scan_layers: bool = True
  remat_policy: str = "full"
  attention_impl: str | None = "auto"  # see attention.py
  qk_norm: bool = False
  # Over a context mesh axis: chunks i and 2C-1-i per shard (see
  # context_attention.py); the config's mesh.context_load_balance.
  context_load_balance: bool = True
  # "all_gather" or "ring": how K/V cross the context axis (see
  # context_attention.py); the config's mesh.context_strategy.
  context_strategy: str = "all_gather"

  def __post_init__(self):
    if self.head_dim is None:
      if self.emb_dim % self.num_heads:
        raise ValueError(
            f"emb_dim={self.emb_dim} is not divisible by num_heads="
            f"{self.num_heads}; set head_dim explicitly or change the sizes.")
      object.__setattr__(self, "head_dim", self.emb_dim // self.num_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads="
          f"{self.num_kv_heads} (grouped-query attention).")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat_policy={self.remat_policy!r}; use one "
                       f"of {sorted(REMAT_POLICIES)}.")
    if self.attention_impl not in attention.IMPLS:
      raise ValueError(f"Unknown attention_impl={self.attention_impl!r}; use "
                       f"one of {attention.IMPLS} (see attention.py).")
    context_attention.check_strategy(self.context_strategy)
    for field in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, field))
      except TypeError as e:
        raise ValueError(f"{field}={getattr(self, field)!r} is not a dtype "
                         "name; use e.g. 'bfloat16' or 'float32'.") from e

  @classmethod
  def from_size(cls, size: str, **overrides) -> LlamaConfig:
    """A config from SIZES[size]; needs vocab_size= (the tokenizer's)."""
    if size not in SIZES:
      raise ValueError(f"Unknown model size {size!r}; use one of "
                       f"{sorted(SIZES)}.")
    if "vocab_size" not in overrides:
      raise ValueError("LlamaConfig.from_size needs vocab_size=... (the "
                       "tokenizer's vocab_size).")
    return cls(**{**SIZES[size], **overrides})


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
  """Training (forward + backward) FLOPs per token, PaLM appendix B style.

  6 * N + 12 * L * seq_len * H * F, where N counts the matmul weights: every
  layer's q, k, v, o and MLP projections plus the output head; not the input
  embedding (a lookup in the model's math; the one-hot matmul that implements
  it is an implementation cost, like remat) nor the norm scales. The attention
  term counts QK^T and AV over the full (not causally halved) window; remat
  recomputation is not counted (these are "model FLOPs", as used for MFU).
  """
  c = config
  attn = c.emb_dim * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
  attn += c.num_heads * c.head_dim * c.emb_dim
  mlp = 3 * c.emb_dim * c.mlp_dim
  n = c.num_layers * (attn + mlp) + c.emb_dim * c.vocab_size
  return float(6 * n + 12 * c.num_layers * seq_len * c.num_heads * c.head_dim)
