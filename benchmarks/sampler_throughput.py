r"""Decode throughput of the KV-cache sampler, and its gain over recomputation.

For each model size and context length L:
  cached     the Sampler continuing a prompt of L - new_tokens tokens by
             new_tokens tokens (cache length L); decode time = time(new_tokens)
             - time(1 token), so the prefill is not counted.
  recompute  one jitted full forward pass over [batch, L] tokens: what a
             sampler without a cache pays per new token at context L.
  ratio      recompute seconds per token / cached seconds per token.

Weights are random (speed does not depend on them); EOS is set outside the
vocabulary so every row runs the full length. Timings exclude compilation
(each function runs once before it is timed) and take the best of --repeats.

  python benchmarks/sampler_throughput.py --sizes=demo,100m \
      --contexts=1024,4096 --batch=1 --new_tokens=128
"""

import json
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from codeclm.model import llama
from codeclm.model import llama_config
from codeclm.model import random_init
from codeclm.sampling import sampler as sampler_lib

_SIZES = flags.DEFINE_list("sizes", ["demo", "100m"], "Model sizes.")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "4096"],
                              "Context (cache) lengths.")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows decoded at once.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Tokens decoded per row.")
_VOCAB = flags.DEFINE_integer("vocab", 322, "Vocabulary (Jpeg-LM: 320 + 2).")
_DTYPE = flags.DEFINE_string("dtype", "float32",
                             "Model compute dtype (CPUs lack fast bf16).")
_CACHE = flags.DEFINE_string("cache_dtype", "bfloat16", "KV cache dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs (best is kept).")
_RECOMPUTE = flags.DEFINE_bool("recompute", True, "Also time recomputation.")


def best_time(fn, repeats: int) -> float:
  fn()  # Compile (and warm up).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def measure(size: str, context: int) -> dict:
  config = llama_config.LlamaConfig.from_size(
      size, vocab_size=_VOCAB.value, max_len=context, dtype=_DTYPE.value,
      remat_policy="none")
  model = llama.Llama(config)
  params = jax.device_put(random_init.params(model))
  b, new = _BATCH.value, _NEW.value
  rng = np.random.default_rng(1)
  prompts = rng.integers(0, _VOCAB.value, (b, context - new)).tolist()
  sampler = sampler_lib.Sampler(model, eos_id=_VOCAB.value, pad_id=0,
                           cache_dtype=_CACHE.value, min_bucket=context)
  settings = sampler_lib.Settings(temperature=1.0, top_k=40, top_p=0.9,
                             max_new_tokens=new)
  full = best_time(lambda: sampler(params, prompts, settings), _REPEATS.value)
  one = best_time(lambda: sampler(
      params, prompts, sampler_lib.Settings(max_new_tokens=1)), _REPEATS.value)
  assert sampler.num_compilations == 1, sampler.num_compilations
  step = (full - one) / (new - 1)
  row = dict(size=size, params_m=round(llama.param_count(config) / 1e6, 1),
             context=context, batch=b, new_tokens=new,
             prefill_s=round(one, 3), step_ms=round(step * 1e3, 2),
             cached_tokens_per_s=round(b / step, 1))
  if _RECOMPUTE.value:
    forward = jax.jit(lambda p, t: model.apply({"params": p}, t))
    tokens = jnp.asarray(rng.integers(0, _VOCAB.value, (b, context)),
                         jnp.int32)
    t = best_time(lambda: forward(params, tokens).block_until_ready(),
                  _REPEATS.value)
    row.update(recompute_step_s=round(t, 3),
               recompute_tokens_per_s=round(b / t, 2),
               speedup=round(t / step, 1))
  return row


def main(argv):
  del argv
  print(json.dumps(dict(device=jax.devices()[0].device_kind,
                        count=jax.device_count(), cpu=platform.processor(),
                        dtype=_DTYPE.value, cache_dtype=_CACHE.value)))
  for size in _SIZES.value:
    for context in map(int, _CONTEXTS.value):
      print(json.dumps(measure(size, context)), flush=True)


if __name__ == "__main__":
  app.run(main)
