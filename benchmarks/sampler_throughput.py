r"""Decode throughput of the KV-cache sampler, and its gain over recomputation.

For each model size and context length L:
  cached     the Sampler continuing a prompt of L - new_tokens tokens by
             new_tokens tokens (cache length L); decode time = time(new_tokens)
             - time(1 token), so the prefill is not counted.
  recompute  one jitted full forward pass over [batch, L] tokens: what a
             sampler without a cache pays per new token at context L.
  ratio      recompute seconds per token / cached seconds per token.
  guided     (--guided) classifier-free guidance: the same rows with an
             unconditional prompt each (the batch doubled into pairs that mix
             their logits every step), step time and guided / unguided ratio;
             beside it an unguided step of twice the rows (doubled), so the
             cost of the mix itself shows (guided / doubled); in wall time
             and in this process's CPU time (steadier on a shared machine),
             the three timed in turns.

Weights are random (speed does not depend on them); EOS is set outside the
vocabulary so every row runs the full length. Timings exclude compilation
(each function runs once before it is timed) and take the best of --repeats.

  python benchmarks/sampler_throughput.py --sizes=demo,100m \
      --contexts=1024,4096 --batch=1 --new_tokens=128
  python benchmarks/sampler_throughput.py --sizes=demo --contexts=1024 \
      --batch=8 --guided --norecompute
"""

import dataclasses
import functools
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
_GUIDED = flags.DEFINE_bool("guided", False,
                            "Also time classifier-free guided decoding.")
_SCALE = flags.DEFINE_float("guidance", 3.0, "Guidance scale for --guided.")


def best_time(fn, repeats: int) -> float:
  fn()  # Compile (and warm up).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def best_times(fns: dict, repeats: int, clock=time.perf_counter) -> dict:
  """best_time of each function, timed in turns (one run of each per round),
  so that a load that changes over time weighs on all of them alike.
  clock=time.process_time counts this process's CPU seconds (all threads),
  which other jobs on a shared machine disturb far less than wall time."""
  for fn in fns.values():
    fn()  # Compile (and warm up).
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      start = clock()
      fn()
      times[k].append(clock() - start)
  return {k: min(v) for k, v in times.items()}


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
  if _GUIDED.value:  # The same prompts after another first token.
    uncond = [[(p[0] + 1) % _VOCAB.value] + p[1:] for p in prompts]
    upto = lambda n: dataclasses.replace(settings, max_new_tokens=n)
    runs = dict(  # Unguided; guided; unguided on twice the rows.
        plain=lambda n: sampler(params, prompts, upto(n)),
        guided=lambda n: sampler(params, prompts, upto(n),
                                 unconditional=uncond, guidance=_SCALE.value),
        doubled=lambda n: sampler(params, prompts + uncond, upto(n)))
    calls = {(k, n): functools.partial(fn, n) for k, fn in runs.items()
             for n in (1, new)}
    for clock, unit in ((time.perf_counter, "ms"), (time.process_time,
                                                    "cpu_ms")):
      t = best_times(calls, _REPEATS.value, clock)
      steps = {k: (t[k, new] - t[k, 1]) / (new - 1) for k in runs}
      row.update({f"{k}_step_{unit}": round(v * 1e3, 2)
                  for k, v in steps.items()})
      row[f"guided_ratio_{unit}"] = round(steps["guided"] / steps["plain"], 3)
      row[f"guided_over_doubled_{unit}"] = round(
          steps["guided"] / steps["doubled"], 3)
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
