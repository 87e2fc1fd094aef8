r"""Decode step time on a simulated 8-device fsdp mesh: params as trained
(fsdp-sharded, `Sampler(reshard_params=False)`: every step all-gathers the
weights) against laid out once for decoding (the default).

Both samplers run in the same process, interleaved, --repeats times; step =
(time(new_tokens) - time(1 token)) / (new_tokens - 1), so the prefill and
the one-off reshard are excluded; medians are printed. 8 CPU "devices" share
this machine's cores, so the absolute numbers say little about a real pod:
the ratio shows what the per-step gathers cost.

  python benchmarks/sampler_fsdp.py --size=demo --batch=8 --new_tokens=64
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from codeclm.model import llama  # pylint: disable=g-import-not-at-top
from codeclm.model import llama_config  # pylint: disable=g-import-not-at-top
from codeclm.model import random_init  # pylint: disable=g-import-not-at-top
from codeclm.model import sharding  # pylint: disable=g-import-not-at-top
from codeclm.sampling import sampler as sampler_lib  # pylint: disable=g-import-not-at-top

_SIZE = flags.DEFINE_string("size", "demo", "Model size.")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows (a multiple of 8).")
_PROMPT = flags.DEFINE_integer("prompt", 64, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens decoded per row.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (median kept).")


def main(argv):
  del argv
  config = llama_config.LlamaConfig.from_size(
      _SIZE.value, vocab_size=322, max_len=_PROMPT.value + _NEW.value,
      dtype=_DTYPE.value, remat_policy="none")
  model = llama.Llama(config)
  mesh = sharding.make_mesh((1, 8, 1, 1))
  rng = np.random.default_rng(0)
  params = random_init.params(model, rng, mesh=mesh)  # Laid out as trained.
  prompts = rng.integers(0, 322, (_BATCH.value, _PROMPT.value)).tolist()
  samplers = {name: sampler_lib.Sampler(
      model, eos_id=322, pad_id=0, mesh=mesh, cache_dtype=_DTYPE.value,
      reshard_params=name == "decode_layout")
              for name in ("as_trained", "decode_layout")}
  runs = {n: sampler_lib.Settings(temperature=1.0, top_k=40, max_new_tokens=n)
          for n in (1, _NEW.value)}

  def timed(sampler, settings):
    start = time.perf_counter()
    sampler(params, prompts, settings)
    return time.perf_counter() - start

  for s in samplers.values():  # Compile both buckets.
    for settings in runs.values():
      timed(s, settings)
  steps = {name: [] for name in samplers}
  for _ in range(_REPEATS.value):
    for name, s in samplers.items():
      full, one = timed(s, runs[_NEW.value]), timed(s, runs[1])
      steps[name].append((full - one) / (_NEW.value - 1))
  ms = {n: round(float(np.median(t)) * 1e3, 2) for n, t in steps.items()}
  print(json.dumps(dict(size=_SIZE.value, mesh="fsdp=8 (simulated CPU)",
                        batch=_BATCH.value, prompt=_PROMPT.value,
                        new_tokens=_NEW.value, dtype=_DTYPE.value,
                        step_ms=ms, all_ms={n: [round(x * 1e3, 2) for x in t]
                                            for n, t in steps.items()},
                        speedup=round(ms["as_trained"]
                                      / ms["decode_layout"], 2))))


if __name__ == "__main__":
  app.run(main)
