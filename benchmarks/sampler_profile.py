r"""Where one sampler call spends its time, per HLO op, from a JAX trace.

  python benchmarks/sampler_profile.py --size=100m --batch=8 --prompt=512 \
      --new_tokens=65

Runs `Sampler` on random weights (params laid out once, as `--mode=sample`
does), traces one call with `jax.profiler` (a Perfetto trace, so no
TensorBoard plugin is needed) and prints the busiest ops, grouped by the
model code that made them (the op_name metadata of the compiled HLO, with
layer numbers folded: layers_3 -> L). Times are summed over threads, so ops
that ran side by side add up past the wall time. Ops inside the decode loop
are under "while/body".
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codeclm.model import llama
from codeclm.model import llama_config
from codeclm.sampling import sampler as sampler_lib

_SIZE = flags.DEFINE_string("size", "100m", "Model size (llama_config.SIZES).")
_BATCH = flags.DEFINE_integer("batch", 8, "Rows.")
_PROMPT = flags.DEFINE_integer("prompt", 512, "Prompt tokens per row.")
_NEW = flags.DEFINE_integer("new_tokens", 65, "Tokens drawn per row.")
_TOP = flags.DEFINE_integer("top", 25, "Op groups to print.")
_VOCAB = 322  # A JPEG-LM vocabulary.


def op_names(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: its op_name, layers folded}."""
  names = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]*)\"",
                     line)
    if match:
      names[match.group(1)] = re.sub(r"layers_\d+", "L", match.group(2))
  return names


def main(_):
  config = llama_config.LlamaConfig.from_size(
      _SIZE.value, vocab_size=_VOCAB, max_len=4096, dtype="float32")
  model = llama.Llama(config)
  prompts = np.random.default_rng(0).integers(
      1, _VOCAB, (_BATCH.value, _PROMPT.value)).tolist()
  params = nn.meta.unbox(jax.jit(model.init)(
      jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  sampler = sampler_lib.Sampler(model, eos_id=_VOCAB, pad_id=0,
                                cache_dtype="float32")
  params = sampler.prepare(params)
  settings = sampler_lib.Settings(temperature=1.0, top_k=40,
                                  max_new_tokens=_NEW.value)
  call = lambda: sampler(params, prompts, settings)
  call()  # Compile.
  seconds = []
  for _ in range(3):
    start = time.perf_counter()
    call()
    seconds.append(time.perf_counter() - start)
  print(f"call: {np.median(seconds):.3f} s (median of 3)")

  hlo = op_names(sampler.lower(params, prompts, settings).compile()
                 .as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      call()
    path, = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"),
                      recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  busy = collections.Counter()
  for e in events:
    op = e.get("args", {}).get("hlo_op") if e.get("ph") == "X" else None
    if op:
      busy[(op.split(".")[0], hlo.get(op, "?"))] += e["dur"] / 1e3
  print(f"ops: {sum(busy.values()):,.0f} ms over all threads")
  for (kind, name), ms in busy.most_common(_TOP.value):
    print(f"{ms:9.1f} ms  {kind:28s} {name[:110]}")


if __name__ == "__main__":
  app.run(main)
