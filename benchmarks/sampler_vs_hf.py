r"""codeclm's sampler against Hugging Face `generate` on the same weights.

Random weights (speed does not depend on them) are made once in codeclm's
layout and converted with codeclm/hf/weights.py into a transformers
LlamaForCausalLM; the logits of both on one prompt are compared first. Then,
for each size x prompt length x batch (x constraint), both sides draw with
top-k 40 sampling, timed the same way:

  prefill   the wall time of a call that draws 1 new token (the prompt's
            forward pass, one draw and the call's overhead);
  decode    (time(new_tokens) - time(1 token)) / (new_tokens - 1) per step;
            tokens/s = batch / step.

Compilation and warm-up are excluded (every call is made once first), and
codeclm's weights are laid out for decoding once (Sampler.prepare), as a
user drawing many batches does and as HF's model holds its own layout. The
calls of both sides are interleaved within each repeat, so both see the same
load, and the median of --repeats is kept. EOS is disabled on both sides
(outside the vocabulary; eos_token_id=None), so every row runs the full
length. ratio = HF seconds / codeclm seconds: > 1 means codeclm is faster.

--grammar=jpeg also runs codeclm under the JPEG grammar constraint
(codeclm/sampling/token_grammar.py: a 256 px codec, a 320-entry BPE trained
on scikit-image photos; prompts are a photo's first tokens). HF has no such
constraint, so its unconstrained time is the reference there: the ratio
charges the constraint's whole cost to codeclm.

--breakdown times the prefill's parts instead (on CPU), to show where a
prefill ratio comes from. Each is timed the same way, and each ratio is
torch seconds / JAX seconds:

  forward    the whole model: codeclm's `Llama.apply` (jitted, logits at the
             last position only, as the sampler asks) against transformers'
             forward (`logits_to_keep=1`), same weights;
  matmuls    only the layers' weight matmuls (q, k, v, o, gate, up, down),
             chained as in the model (k and v returned, so neither side
             can drop them): XLA's dots against torch's;
  attention  only causal attention over [B, T, H, F]: jax.nn.
             dot_product_attention against torch's scaled_dot_product_attention.

If `matmuls` and `forward` have about the same ratio, the matmul kernels set
the pace and no change in codeclm's model code can move it.

The script runs unchanged on a GPU (both sides then use it; JAX does not
preallocate, so torch fits beside it); there it also prints the HBM
bandwidth bound of a decode step: (weights + KV cache bytes) / peak
bandwidth (--peak_gbps, or a table of known devices).

  python benchmarks/sampler_vs_hf.py --sizes=demo,100m --prompts=128,512 \
      --batches=1,8 --new_tokens=128 --repeats=3 --grammar=none,jpeg
  python benchmarks/sampler_vs_hf.py --sizes=100m --prompts=512 --breakdown
  python benchmarks/sampler_vs_hf.py --tiny   # a smoke run (CI), not timed
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import platform  # pylint: disable=g-import-not-at-top,wrong-import-position
import statistics  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from codeclm.hf import weights as hf_weights  # pylint: disable=g-import-not-at-top
from codeclm.model import attention  # pylint: disable=g-import-not-at-top
from codeclm.model import kv_cache  # pylint: disable=g-import-not-at-top
from codeclm.model import llama  # pylint: disable=g-import-not-at-top
from codeclm.model import llama_config  # pylint: disable=g-import-not-at-top
from codeclm.model import random_init  # pylint: disable=g-import-not-at-top
from codeclm.sampling import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
from tests import torch_compat  # pylint: disable=g-import-not-at-top

_SIZES = flags.DEFINE_list("sizes", ["demo", "100m"], "Model sizes.")
_PROMPTS = flags.DEFINE_list("prompts", ["128", "512"], "Prompt lengths.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Rows drawn at once.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens drawn per row.")
_VOCAB = flags.DEFINE_integer("vocab", 322, "Vocabulary (Jpeg-LM: 320 + 2).")
_DTYPE = flags.DEFINE_string("dtype", "float32",
                             "Compute dtype of both sides (CPU: float32).")
_CACHE = flags.DEFINE_string("cache_dtype", "",
                             "codeclm's KV cache dtype; '' = --dtype (HF "
                             "keeps its cache in the compute dtype).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (median kept).")
_GRAMMAR = flags.DEFINE_list("grammar", ["none"],
                             "none and/or jpeg (codeclm under the JPEG "
                             "grammar constraint).")
_PEAK = flags.DEFINE_float("peak_gbps", 0.0, "Peak memory bandwidth of the "
                           "accelerator in GB/s (0: from a table).")
_BREAKDOWN = flags.DEFINE_bool("breakdown", False, "Time the prefill's parts "
                                "(forward, matmuls, attention) instead.")
_TINY = flags.DEFINE_bool("tiny", False, "A smoke run of a few seconds: the "
                          "tiny model, short prompts, few tokens, 1 repeat.")

# Peak HBM bandwidth, GB/s, of devices the script may meet (vendor sheets).
_PEAK_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039, "L4": 300}


def hf_model(config: llama_config.LlamaConfig, params: dict, device: str):
  """transformers' Llama holding the same weights (codeclm/hf/weights.py)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  hf_config = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.emb_dim,
      intermediate_size=config.mlp_dim, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
      max_position_embeddings=config.max_len, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(hf_config)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in
                         hf_weights.params_to_hf(params, config).items()})
  return model.to(device=device, dtype=getattr(torch, config.dtype)).eval()


def models(size: str, vocab: int, device: str, cache: dict):
  """(config, numpy params, HF model, params on the JAX device) of one size
  and vocabulary, made once per run (`cache`)."""
  key = (size, vocab)
  if key not in cache:
    config = llama_config.LlamaConfig.from_size(
        size, vocab_size=vocab, max_len=4096, dtype=_DTYPE.value,
        remat_policy="none")
    params = random_init.params(llama.Llama(config))  # numpy, for both
    cache[key] = (config, params, hf_model(config, params, device),
                  jax.device_put(params))
  return cache[key]


def jpeg_grammar_and_prompt(length: int):
  """The JPEG token grammar and a photo's first `length` tokens (with BOS)."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  from codeclm.codecs import jpeg  # pylint: disable=g-import-not-at-top
  from codeclm.sampling import jpeg_grammar  # pylint: disable=g-import-not-at-top
  from codeclm.sampling import token_grammar  # pylint: disable=g-import-not-at-top
  from codeclm.tokenizer import ByteBPE  # pylint: disable=g-import-not-at-top
  codec = jpeg.JpegCodec(256, 256)
  streams = [codec.encode(getattr(data, n)()) for n in (
      "astronaut", "coffee", "chelsea", "rocket", "camera", "brick")]
  tokenizer = ByteBPE.train(streams, 320)
  grammar = token_grammar.build(jpeg_grammar.build(codec), tokenizer)
  ids = tokenizer.encode(streams[0])[:length - 1]
  prompt = tokenizer.decode(ids)
  return grammar, tokenizer, [tokenizer.bos_id] + list(ids), prompt


class Timer:
  """Wall time of a call, with the device synchronised (torch or JAX)."""

  def __init__(self, device: str):
    self.device = device

  def __call__(self, fn):
    """(seconds, what fn returned)."""
    start = time.perf_counter()
    out = fn()
    if self.device == "cuda":
      import torch  # pylint: disable=g-import-not-at-top
      torch.cuda.synchronize()
    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def compare(size: str, prompt_len: int, batch: int, grammar: str,
            device: str, cache: dict) -> dict:
  """One row: prefill and decode of both sides, medians, ratios."""
  import torch  # pylint: disable=g-import-not-at-top
  new = _NEW.value
  if grammar == "jpeg":
    if "jpeg" not in cache:
      cache["jpeg"] = {}
    if prompt_len not in cache["jpeg"]:
      cache["jpeg"][prompt_len] = jpeg_grammar_and_prompt(prompt_len)
    tables, tokenizer, ids, prompt_bytes = cache["jpeg"][prompt_len]
    vocab = tokenizer.vocab_size
  else:
    vocab = _VOCAB.value
  config, params, hf, jparams = models(size, vocab, device, cache)
  rng = np.random.default_rng(prompt_len)
  if grammar == "jpeg":
    prompts = np.array([ids] * batch, np.int64)
    eos = tokenizer.eos_id
    extra = tables.sampler_args([prompt_bytes] * batch)
  else:
    prompts = rng.integers(0, vocab, (batch, prompt_len))
    eos, extra = vocab, {}  # Outside the vocabulary: never drawn.
  sampler = sampler_lib.Sampler(
      llama.Llama(config), eos_id=eos, pad_id=0,
      cache_dtype=_CACHE.value or _DTYPE.value)
  jparams = sampler.prepare(jparams)  # Once, as HF's model holds its layout.
  inputs = torch.from_numpy(prompts).to(device)
  timer = Timer(device)
  top_k = 40

  def ours(n):
    settings = sampler_lib.Settings(temperature=1.0, top_k=top_k,
                                    max_new_tokens=n)
    return lambda: sampler(jparams, prompts.tolist(), settings, **extra)

  def theirs(n):
    def run():
      with torch.no_grad():
        return hf.generate(inputs, attention_mask=torch.ones_like(inputs),
                           do_sample=True, top_k=top_k, top_p=1.0,
                           temperature=1.0, max_new_tokens=n,
                           min_new_tokens=n, eos_token_id=None,
                           pad_token_id=0)
    return run

  calls = {(side, n): make(n) for side, make in (("codeclm", ours),
                                                  ("hf", theirs))
           for n in (1, new)}
  for fn in calls.values():
    fn()  # Compile / warm up.
  compiled = sampler.num_compilations
  times, outs = {k: [] for k in calls}, {}
  for _ in range(_REPEATS.value):
    for k, fn in calls.items():
      seconds, outs[k] = timer(fn)
      times[k].append(seconds)
  assert sampler.num_compilations == compiled  # Nothing compiled while timed.
  # Rows that stopped early (only possible under the grammar: EOS after
  # EOI) would make codeclm's decode look faster; they are reported.
  full_rows = sum(len(x.tokens) == new for x in outs["codeclm", new])
  assert grammar != "none" or full_rows == batch
  median = lambda k: float(np.median(times[k]))
  step = {side: float(np.median(np.subtract(times[side, new],
                                            times[side, 1]))) / (new - 1)
          for side in ("codeclm", "hf")}
  prefill = {side: median((side, 1)) for side in ("codeclm", "hf")}
  row = dict(size=size, params_m=round(llama.param_count(config) / 1e6, 1),
             prompt=prompt_len, batch=batch, new_tokens=new, grammar=grammar,
             full_length_rows=full_rows,
             prefill_s={k: round(v, 4) for k, v in prefill.items()},
             decode_tokens_per_s={k: round(batch / v, 1)
                                  for k, v in step.items()},
             prefill_ratio=round(prefill["hf"] / prefill["codeclm"], 2),
             decode_ratio=round(step["hf"] / step["codeclm"], 2))
  peak = _PEAK.value or next((v for k, v in _PEAK_GBPS.items()
                              if k in jax.devices()[0].device_kind), 0)
  if device == "cuda" and peak:
    weights = sum(x.size for x in jax.tree.leaves(params)) * np.dtype(
        _DTYPE.value).itemsize
    kv = (2 * config.num_layers * batch * config.num_kv_heads
          * (prompt_len + new // 2) * config.head_dim
          * np.dtype(_CACHE.value or _DTYPE.value).itemsize)
    bound = (weights + kv) / (peak * 1e9)
    row.update(bandwidth_bound_step_ms=round(bound * 1e3, 3),
               step_over_bound={k: round(v / bound, 1)
                                for k, v in step.items()})
  return row


def logits_agree(device: str, cache: dict) -> float:
  """Max |codeclm - HF| of the last prompt logits (the conversion's check)."""
  import torch  # pylint: disable=g-import-not-at-top
  config, _, hf, jparams = models(_SIZES.value[0], _VOCAB.value, device,
                                  cache)
  tokens = np.random.default_rng(0).integers(0, _VOCAB.value, (1, 16))
  ours = llama.Llama(config).apply({"params": jparams}, tokens)[0, -1]
  with torch.no_grad():
    theirs = hf(torch.from_numpy(tokens).to(device)).logits[0, -1]
  return float(np.abs(np.asarray(ours, np.float32)
                      - theirs.float().cpu().numpy()).max())


def prefill_parts(config: llama_config.LlamaConfig, params: dict, hf,
                  batch: int, t: int):
  """{part: (jax_fn, torch_fn)}, each a thunk running that part once."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(batch)
  ids = rng.integers(0, config.vocab_size, (batch, t))
  model = llama.Llama(config)
  last = jnp.full((batch, 1), t - 1, jnp.int32)
  # The sampler's prefill: the prompt written into a fresh KV cache.
  forward = jax.jit(lambda p, x: model.apply(
      {"params": p}, x, logits_at=last,
      cache=kv_cache.init_cache(config, batch, t, config.dtype)))
  jparams, jids, tids = jax.device_put(params), jnp.asarray(ids), (
      torch.from_numpy(ids))

  layer = jax.tree.map(lambda x: np.asarray(x[0]), params["layers"])
  names = [("attn", f"{n}_proj") for n in "qkvo"] + [
      ("mlp", f"{n}_proj") for n in ("gate", "up", "down")]
  mats = [layer[a][n].reshape(-1, layer[a][n].shape[-1]) if n == "o_proj"
          else layer[a][n].reshape(layer[a][n].shape[0], -1)
          for a, n in names]
  x = rng.normal(size=(batch * t, config.emb_dim)).astype(np.float32)

  def chain(x, ws, silu):
    kv = []  # Returned, so neither side can drop them.
    for _ in range(config.num_layers):
      q, k, v = (x @ w for w in ws[:3])
      kv += [k, v]
      x = x + q @ ws[3]
      x = x + (silu(x @ ws[4]) * (x @ ws[5])) @ ws[6]
    return x, kv

  jchain = jax.jit(functools.partial(chain, silu=jax.nn.silu))
  jmats, jx = [jnp.asarray(m) for m in mats], jnp.asarray(x)
  tmats, tx = [torch.from_numpy(m) for m in mats], torch.from_numpy(x)

  shape = (batch, t, config.num_heads, config.head_dim)
  q, k, v = (rng.normal(size=shape).astype(np.float32) for _ in range(3))
  jattn = jax.jit(lambda q, k, v: attention.attend(  # As the prefill does.
      q, k, v, impl=config.attention_impl, segment_ids=None, mask=None,
      is_causal=True, prefill=True))
  jq, jk, jv = (jnp.asarray(a) for a in (q, k, v))
  tq, tk, tv = (torch.from_numpy(a).transpose(1, 2) for a in (q, k, v))

  def no_grad(fn):
    def run():
      with torch.no_grad():
        return fn()
    return run

  return {
      "forward": (lambda: forward(jparams, jids),
                  no_grad(lambda: hf(tids, logits_to_keep=1).logits)),
      "matmuls": (lambda: jchain(jx, jmats),
                  no_grad(lambda: chain(tx, tmats,
                                        torch.nn.functional.silu))),
      "attention": (lambda: jattn(jq, jk, jv), no_grad(
          lambda: torch.nn.functional.scaled_dot_product_attention(
              tq, tk, tv, is_causal=True))),
  }


def breakdown(size: str, prompt_len: int, batch: int, cache: dict) -> dict:
  """One row of --breakdown: each prefill part's medians and ratio."""
  config, params, hf, _ = models(size, _VOCAB.value, "cpu", cache)
  fns = prefill_parts(config, params, hf, batch, prompt_len)
  timer = Timer("cpu")
  for jfn, tfn in fns.values():
    jfn(), tfn()  # Compile / warm up.
  times = {(p, side): [] for p in fns for side in ("jax", "torch")}
  for _ in range(_REPEATS.value):
    for p, (jfn, tfn) in fns.items():
      times[p, "jax"].append(timer(jfn)[0])
      times[p, "torch"].append(timer(tfn)[0])
  row = {"size": size, "prompt": prompt_len, "batch": batch}
  for p in fns:
    j, h = (statistics.median(times[p, s]) for s in ("jax", "torch"))
    row[p] = {"jax_s": round(j, 4), "torch_s": round(h, 4),
              "ratio": round(h / j, 2)}
  return row


def main(argv):
  del argv
  torch_compat.importable_torchvision()  # Before transformers is imported.
  import torch  # pylint: disable=g-import-not-at-top
  if _TINY.value:
    # Two prompt lengths in one bucket: one compilation in all.
    flags.FLAGS.sizes, flags.FLAGS.prompts = ["tiny"], ["8", "24"]
    flags.FLAGS.batches, flags.FLAGS.new_tokens = ["2"], 3
    flags.FLAGS.repeats = 1
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  cache = {}
  print(json.dumps(dict(
      jax_device=jax.devices()[0].device_kind, torch_device=device,
      torch_threads=torch.get_num_threads(), cpu=platform.processor(),
      cores=os.cpu_count(), dtype=_DTYPE.value,
      cache_dtype=_CACHE.value or _DTYPE.value,
      logits_max_abs_diff=logits_agree(device, cache))), flush=True)
  for size in _SIZES.value:
    for prompt_len in map(int, _PROMPTS.value):
      for batch in map(int, _BATCHES.value):
        if _BREAKDOWN.value:
          print(json.dumps(breakdown(size, prompt_len, batch, cache)),
                flush=True)
          continue
        for grammar in _GRAMMAR.value:
          print(json.dumps(compare(size, prompt_len, batch, grammar, device,
                                   cache)), flush=True)


if __name__ == "__main__":
  app.run(main)
