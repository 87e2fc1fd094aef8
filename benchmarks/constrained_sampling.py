r"""Grammar-constrained JPEG sampling: table build time and memory, the cost
per decode step, and the clean-MCU share of a checkpoint's samples.

  tables   byte automaton and token tables (codeclm/sampling/jpeg_grammar.py,
           token_grammar.py) for a 64 and a 256 px codec and BPEs of 320 and
           1,024 entries trained on scikit-image photographs.
  mask     the constraint's own work per step (row gather, counter mask,
           state update) around choose(), jitted, 200 calls, best of
           --repeats: robust where whole decode steps are too noisy.
  step     the Sampler decoding with random weights, constrained and not, in
           the same process, interleaved; decode time per step =
           (time(new_tokens) - time(1)) / (new_tokens - 1), best of
           --repeats; ratio = constrained / unconstrained.
  clean    (--workdir) samples of a trained checkpoint, unconditional and
           completions of held-out images at ratio 0.5, constrained and not:
           mean clean-MCU share and EOS share.

  python benchmarks/constrained_sampling.py --sizes=demo,100m --batches=1,8 \
      --workdir=/tmp/jpeg_demo --parts=tables,step,clean
"""

import json
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from codeclm.codecs import jpeg
from codeclm.model import llama
from codeclm.model import llama_config
from codeclm.model import random_init
from codeclm.sampling import decode_loop
from codeclm.sampling import files
from codeclm.sampling import jpeg_grammar
from codeclm.sampling import sampler as sampler_lib
from codeclm.sampling import tensorboard
from codeclm.sampling import token_grammar
from codeclm.sampling import workdir as workdir_lib
from codeclm.tokenizer import ByteBPE

_SIZES = flags.DEFINE_list("sizes", ["demo", "100m"], "Model sizes.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Rows decoded at once.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens decoded per row.")
_CONTEXT = flags.DEFINE_integer("context", 1024, "Cache length.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (best is kept).")
_VOCABS = flags.DEFINE_list("vocabs", ["320", "1024"], "BPE entries.")
_WORKDIR = flags.DEFINE_string("workdir", "", "A trained JPEG workdir.")
_SAMPLES = flags.DEFINE_integer("samples", 8, "Samples per kind (clean).")
_PARTS = flags.DEFINE_list("parts", ["tables", "step", "mask", "clean"],
                           "What to measure (clean needs --workdir).")

PHOTOS = ("astronaut", "brick", "camera", "cat", "chelsea", "coffee", "coins",
          "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
          "moon", "page", "retina", "rocket", "text")


def photos(codec):
  from skimage import data  # pylint: disable=g-import-not-at-top
  out = []
  for name in PHOTOS:
    image = getattr(data, name)()
    h, w = image.shape[:2]
    out += [codec.encode(image),
            codec.encode(image[h // 4:h - h // 4, w // 4:w - w // 4])]
  return out


def tables():
  for size in (64, 256):
    codec = jpeg.JpegCodec(size, size)
    start = time.perf_counter()
    automaton = jpeg_grammar.build(codec)
    byte_s = time.perf_counter() - start
    streams = photos(codec)
    for vocab in map(int, _VOCABS.value):
      tokenizer = ByteBPE.train(streams, vocab)
      start = time.perf_counter()
      grammar = token_grammar.build(automaton, tokenizer)
      token_s = time.perf_counter() - start
      allowed = [float((grammar.next[s] >= 0).mean()) for s in
                 _states_along(grammar, tokenizer, streams[0])]
      yield dict(kind="tables", size=size, bpe_entries=tokenizer.num_entries,
                 states=automaton.num_states, byte_build_s=round(byte_s, 2),
                 byte_table_mb=round(automaton.next.nbytes / 1e6, 1),
                 token_build_s=round(token_s, 2),
                 token_tables_mb=round(grammar.nbytes / 1e6, 1),
                 allowed_share_along_a_photo=round(np.mean(allowed), 3))


def _states_along(grammar, tokenizer, data):
  state = 0
  for t in tokenizer.encode(data):
    yield state
    state = int(grammar.next[state, t])


def steps():
  codec = jpeg.JpegCodec(64, 64)
  streams = photos(codec)
  tokenizer = ByteBPE.train(streams, 320)
  grammar = token_grammar.build(jpeg_grammar.build(codec), tokenizer)
  prompt = codec.prompt(streams[0], 0.25)
  ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(prompt)])
  for size in _SIZES.value:
    config = llama_config.LlamaConfig.from_size(
        size, vocab_size=tokenizer.vocab_size, max_len=_CONTEXT.value,
        dtype="float32", remat_policy="none")
    model = llama.Llama(config)
    # Random weights: speed does not depend on them.
    params = jax.device_put(random_init.params(model))
    sampler = sampler_lib.Sampler(model, eos_id=tokenizer.eos_id,
                                  pad_id=tokenizer.pad_id,
                                  cache_dtype="bfloat16", min_bucket=256)
    for b in map(int, _BATCHES.value):
      prompts = [ids] * b
      extra = grammar.sampler_args([prompt] * b)
      times = {}
      for new in (_NEW.value, 1):
        settings = sampler_lib.Settings(temperature=1.0, top_k=40, top_p=0.9,
                                        max_new_tokens=new)
        calls = {"free": lambda s=settings: sampler(params, prompts, s),
                 "constrained": lambda s=settings: sampler(
                     params, prompts, s, **extra)}
        for fn in calls.values():
          fn()  # Compile.
        best = {k: float("inf") for k in calls}
        for _ in range(_REPEATS.value):  # Interleaved: same load for both.
          for k, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
        times[new] = best
      step = {k: (times[_NEW.value][k] - times[1][k]) / (_NEW.value - 1)
              for k in ("free", "constrained")}
      yield dict(kind="step", size=size, batch=b, context=_CONTEXT.value,
                 new_tokens=_NEW.value,
                 free_step_ms=round(step["free"] * 1e3, 2),
                 constrained_step_ms=round(step["constrained"] * 1e3, 2),
                 ratio=round(step["constrained"] / step["free"], 3))


def mask():
  """The constraint's own cost per step: choose() with and without the
  table row gather, counter mask and state update, jitted, many calls."""
  codec = jpeg.JpegCodec(64, 64)
  tokenizer = ByteBPE.train(photos(codec), 320)
  grammar = token_grammar.build(jpeg_grammar.build(codec), tokenizer)
  constraint = grammar.constraint
  v = tokenizer.vocab_size

  @jax.jit
  def free(logits, keys, state, count):
    return decode_loop.choose(logits, keys, 1.0, 40, 0.9), state, count

  @jax.jit
  def constrained(logits, keys, state, count):
    row = constraint.next_state[state]
    allowed = (row >= 0) & constraint.counter.allows(state, count)
    token = decode_loop.choose(jnp.where(allowed, logits, -jnp.inf), keys,
                               1.0, 40, 0.9)
    count = constraint.counter.advance(state, count, token)
    return token, jnp.take_along_axis(row, token[:, None], 1)[:, 0], count

  calls = 200
  for b in map(int, _BATCHES.value):
    logits = jax.random.normal(jax.random.key(0), (b, v))
    keys = jax.random.split(jax.random.key(1), b)
    state = jnp.full((b,), jpeg_grammar.build(codec).mcu_start, jnp.int32)
    count = jnp.zeros((b,), jnp.int32)
    best = {}
    for _ in range(_REPEATS.value):
      for name, fn in (("free", free), ("constrained", constrained)):
        jax.block_until_ready(fn(logits, keys, state, count))
        start = time.perf_counter()
        for _ in range(calls):
          out = fn(logits, keys, state, count)
        jax.block_until_ready(out)
        best[name] = min(best.get(name, 1e9),
                         (time.perf_counter() - start) / calls)
    yield dict(kind="mask", batch=b, vocab=v,
               choose_us=round(best["free"] * 1e6, 1),
               constrained_choose_us=round(best["constrained"] * 1e6, 1),
               overhead_us=round((best["constrained"] - best["free"]) * 1e6,
                                 1))


def clean():
  loaded = workdir_lib.load(_WORKDIR.value, mesh_shape=(1, 1, 1, 1))
  cfg = loaded.config.sample
  sampler = workdir_lib.sampler_of(cfg, loaded.model, loaded.tokenizer,
                                   loaded.mesh, loaded.rules)
  grammar = workdir_lib.grammar_of(True, loaded.codec, loaded.tokenizer)
  from codeclm.train import loop  # pylint: disable=g-import-not-at-top
  held_out = tensorboard.eval_examples(
      loop.data_dir_of(loaded.config.data, _WORKDIR.value), _SAMPLES.value)
  n = _SAMPLES.value
  todo = [files.Request(f"u{i}") for i in range(n)] + [
      files.Request(f"c{i}", loaded.codec.prompt(x, 0.5), 0.5)
      for i, x in enumerate(held_out)]
  settings = workdir_lib.settings_of(cfg, loaded.model.config.max_len)
  for name, g in (("free", None), ("constrained", grammar)):
    start = time.perf_counter()
    results = files.draw(sampler, loaded.params, loaded.tokenizer,
                         loaded.codec, todo, settings, seed=0, batch_size=8,
                         grammar=g)
    for kind, rs in (("unconditional", results[:n]),
                     ("completion_0.5", results[n:])):
      yield dict(kind="clean", workdir=_WORKDIR.value, step=loaded.step,
                 sampling=name, requests=kind, count=len(rs),
                 clean_mcu_share=round(float(np.mean(
                     [r.report.clean_fraction for r in rs])), 3),
                 eos_share=round(float(np.mean([r.sample.ended for r in rs])),
                                 3),
                 seconds=round(time.perf_counter() - start, 1))


def main(argv):
  del argv
  print(json.dumps(dict(device=jax.devices()[0].device_kind,
                        cpu=platform.processor())), flush=True)
  parts = dict(tables=tables, step=steps, mask=mask, clean=clean)
  for name in _PARTS.value:
    if name == "clean" and not _WORKDIR.value:
      continue
    for row in parts[name]():
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  app.run(main)
