"""The KV-cache sampler against full recomputation; its masks; the command."""

import atexit
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from codeclm import codecs
from codeclm import config_base
from codeclm.model import llama
from codeclm.model import llama_config
from codeclm.model import random_init
from codeclm.model import sharding
from codeclm.sampling import constraint as constraint_lib
from codeclm.sampling import decode_loop
from codeclm.sampling import files
from codeclm.sampling import sampler as sampler_lib
from codeclm.sampling import tensorboard
from codeclm.sampling import workdir as workdir_lib
from codeclm.train import params_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 300
EOS, PAD = 299, 0
GREEDY = sampler_lib.Settings(temperature=0.0, max_new_tokens=64)
PROMPTS = [[1, 5, 9], [7] * 17, [3], list(range(2, 42))]  # lengths 3, 17, 1, 40


@functools.lru_cache(maxsize=None)
def model_and_params():
  config = llama_config.LlamaConfig.from_size(
      "tiny", vocab_size=VOCAB, max_len=256, dtype="float32",
      remat_policy="none")
  model = llama.Llama(config)
  # Random weights from numpy: compiling model.init costs seconds on CPU.
  return model, jax.device_put(random_init.params(model))


@functools.lru_cache(maxsize=None)
def sampler(eos=EOS):
  return sampler_lib.Sampler(model_and_params()[0], eos_id=eos, pad_id=PAD,
                        cache_dtype="float32")


def run(prompts=PROMPTS, settings=GREEDY, eos=EOS, **kwargs):
  _, params = model_and_params()
  return sampler(eos)(params, prompts, settings, **kwargs)


@functools.lru_cache(maxsize=None)
def full_forward():
  model, params = model_and_params()
  return jax.jit(lambda t: model.apply({"params": params}, t))


def recompute_greedy(prompts, new_tokens: int, eos: int = EOS):
  """Greedy decoding by a full (cache-free) forward pass at every step."""
  width, forward = 128, full_forward()  # One width: one compilation.
  seqs = [list(p) for p in prompts]
  done = [False] * len(prompts)
  for _ in range(new_tokens):
    batch = np.full((len(seqs), width), PAD, np.int32)
    for i, s in enumerate(seqs):
      batch[i, :len(s)] = s
    logits = np.asarray(forward(jnp.asarray(batch)))
    for i, s in enumerate(seqs):
      if not done[i]:
        s.append(int(np.argmax(logits[i, len(s) - 1])))
        done[i] = s[-1] == eos
  return [s[len(p):] for s, p in zip(seqs, prompts)]


# -- masks ---------------------------------------------------------------------


def test_top_k_mask_on_known_logits():
  logits = jnp.array([[1.0, 3.0, 2.0, 0.0, 2.5], [0.0, 0.0, 1.0, 0.0, -1.0]])
  np.testing.assert_array_equal(
      decode_loop.top_k_mask(logits, 2),
      [[0, 1, 0, 0, 1], [1, 0, 1, 0, 0]])  # A tie goes to the lower id.
  np.testing.assert_array_equal(decode_loop.top_k_mask(logits, 1),
                                [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]])
  assert decode_loop.top_k_mask(logits, 0).all()
  assert decode_loop.top_k_mask(logits, 9).all()


def test_top_p_mask_on_known_logits():
  logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
  expect = {0.4: [0, 1, 0, 0], 0.7: [0, 1, 0, 1], 0.85: [1, 1, 0, 1],
            0.99: [1, 1, 1, 1], 1.0: [1, 1, 1, 1]}
  for p, keep in expect.items():
    np.testing.assert_array_equal(decode_loop.top_p_mask(logits, p)[0], keep,
                                  err_msg=f"p={p}")


def test_masks_match_hugging_face_warpers():
  torch = pytest.importorskip("torch")
  from transformers import generation  # pylint: disable=g-import-not-at-top
  logits = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32)
  for k in (1, 5, 40):
    ref = generation.TopKLogitsWarper(k)(None, torch.tensor(logits))
    np.testing.assert_array_equal(decode_loop.top_k_mask(jnp.asarray(logits), k),
                                  np.isfinite(ref.numpy()))
  for p in (0.1, 0.5, 0.9):
    ref = generation.TopPLogitsWarper(p)(None, torch.tensor(logits))
    np.testing.assert_array_equal(decode_loop.top_p_mask(jnp.asarray(logits), p),
                                  np.isfinite(ref.numpy()))


def test_choose_draws_within_both_masks():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12)) * 2,
                       jnp.float32)
  keys = jax.random.split(jax.random.key(0), 2 * 500).reshape(500, 2)
  draw = jax.jit(jax.vmap(  # k and p traced, as in the sampler: 1 compile.
      lambda kk, k, p: decode_loop.choose(logits, kk, 1.0, k, p),
      in_axes=(0, None, None)))
  for k, p in ((0, 1.0), (4, 1.0), (0, 0.6), (5, 0.8)):
    draws = np.asarray(draw(keys, k, p))                  # [500, 2]
    keep = np.asarray(decode_loop.top_k_mask(logits, k)
                      & decode_loop.top_p_mask(logits, p))
    for row in range(2):  # Only kept tokens, and more than the top one.
      kept = set(np.flatnonzero(keep[row]))
      assert set(draws[:, row]) <= kept and len(set(draws[:, row])) > 1, (
          k, p, row)


def test_settings_and_prompts_are_checked():
  with pytest.raises(ValueError, match="top_p"):
    sampler_lib.Settings(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    sampler_lib.Settings(temperature=-1.0)
  with pytest.raises(ValueError, match="empty"):
    run([[1], []])
  with pytest.raises(ValueError, match="outside"):
    run([[1, VOCAB]])
  with pytest.raises(ValueError, match="max_len"):
    run([[1] * 200], sampler_lib.Settings(max_new_tokens=100))


# -- decoding ------------------------------------------------------------------


def test_guidance_needs_one_unconditional_prompt_per_prompt():
  with pytest.raises(ValueError, match="one each"):
    run(PROMPTS, unconditional=PROMPTS[:2], guidance=2.0)


def test_greedy_with_cache_equals_full_recomputation():
  got = run()
  want = recompute_greedy(PROMPTS, GREEDY.max_new_tokens)
  for i, (g, w) in enumerate(zip(got, want)):
    assert not g.ended and len(g.tokens) == 64, i
    np.testing.assert_array_equal(g.tokens, w, err_msg=f"row {i}")
  assert len({tuple(g.tokens) for g in got}) == len(got)  # Rows differ.


def test_each_row_stops_at_its_eos():
  free = run()
  # EOS := a token row 0 first draws at step 10 (a real stop mid-batch).
  eos = int(free[0].tokens[10])
  assert eos not in free[0].tokens[:10]
  got = run(eos=eos)
  assert got[0].ended and len(got[0].tokens) == 10
  for g, f in zip(got, free):
    stop = np.flatnonzero(f.tokens == eos)
    want = f.tokens[:stop[0]] if len(stop) else f.tokens
    assert g.ended == bool(len(stop))
    np.testing.assert_array_equal(g.tokens, want)
  np.testing.assert_array_equal(
      [g.tokens for g in got[:1]],
      [recompute_greedy(PROMPTS[:1], 11, eos)[0][:-1]])


def test_top_k_one_equals_greedy():
  greedy = run()
  for seed in (0, 1):
    got = run(settings=sampler_lib.Settings(temperature=1.5, top_k=1,
                                       max_new_tokens=64), seed=seed)
    for g, w in zip(got, greedy):
      np.testing.assert_array_equal(g.tokens, w.tokens)


def test_unrolled_layers_draw_what_the_scan_draws():
  """The sampler splits the scanned layers and unrolls them (module doc):
  the same tokens as the scan, greedy and sampled, and no layer loop left
  (a scan is one while per forward pass, prefill and decode; the rest are
  the decode loop and the sampling's own). Params laid out once
  (Sampler.prepare) draw the same again, and their call copies no weights:
  it slices none out of the stacked layers."""
  model, params = model_and_params()
  # Dense attention: the tiled CPU prefill kernel adds loops of its own.
  model = llama.Llama(dataclasses.replace(model.config, attention_impl="xla"))
  settings = sampler_lib.Settings(temperature=1.0, top_k=40,
                                  max_new_tokens=32)
  whiles, drawn, slices = {}, {}, {}
  for unroll in (False, True, "prepared"):
    s = sampler_lib.Sampler(model, eos_id=EOS, pad_id=PAD,
                            cache_dtype="float32", unroll_layers=bool(unroll))
    given = s.prepare(params) if unroll == "prepared" else params
    hlo = s.lower(given, PROMPTS, GREEDY).as_text()
    whiles[unroll] = hlo.count("stablehlo.while")
    slices[unroll] = hlo.count("stablehlo.slice")
    drawn[unroll] = [[g.tokens for g in s(given, PROMPTS, x, seed=3)]
                     for x in (GREEDY, settings)]
  assert whiles[False] - whiles[True] == 2, whiles
  assert whiles["prepared"] == whiles[True], whiles
  # 2 layers x 9 weights sliced out of the stack, in the plain call only.
  assert slices[True] - slices["prepared"] >= 18, slices
  # Params kept as trained (reshard_params=False) need no layout: prepare
  # returns them as they are, not a copy of the model.
  kept = sampler_lib.Sampler(model, eos_id=EOS, pad_id=PAD,
                             reshard_params=False).prepare(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(kept.tree),
                                    jax.tree.leaves(params)))
  for other in (True, "prepared"):
    for scanned, unrolled in zip(drawn[False], drawn[other]):
      for a, b in zip(scanned, unrolled):
        np.testing.assert_array_equal(a, b)


def test_seeded_and_independent_of_the_batch():
  settings = sampler_lib.Settings(temperature=1.0, top_k=40, top_p=0.9,
                             max_new_tokens=32)
  a = run(settings=settings, seed=7)
  b = run(settings=settings, seed=7)
  c = run(settings=settings, seed=8)
  # Row 3 in another batch, given its global id, draws what it drew before.
  other = run([PROMPTS[1], PROMPTS[3], [4], [5, 6]], settings=settings, seed=7,
              sample_ids=[10, 3, 11, 12])
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x.tokens, y.tokens)
  assert any(not np.array_equal(x.tokens, y.tokens) for x, y in zip(a, c))
  np.testing.assert_array_equal(other[1].tokens, a[3].tokens)
  # The same prompt with another id draws other tokens.
  assert not np.array_equal(other[0].tokens, a[1].tokens)


def test_one_compilation_per_bucket():
  _, params = model_and_params()
  s = sampler()
  assert s.shapes(3, 59, 60) == (4, 64, 128)
  s(params, PROMPTS, GREEDY)  # Bucket (4, 64, 128): compiled by now.
  before = s.num_compilations
  # Prompt lengths anywhere in the bucket (2 to 60 tokens), other settings.
  for prompts, settings, seed in [
      ([[4, 5]] * 3, sampler_lib.Settings(temperature=0.7, top_k=5,
                                          max_new_tokens=48), 1),
      ([[5] * 10] * 3, sampler_lib.Settings(max_new_tokens=48), 1),
      ([[5] * 60] * 3, sampler_lib.Settings(max_new_tokens=48), 1),
      ([list(range(1, 60)), [2], [3, 4]],
       sampler_lib.Settings(top_p=0.5, max_new_tokens=60), 2),
  ]:
    s(params, prompts, settings, seed=seed)
  # Another EOS and a re-created Sampler reuse the compiled loop too.
  sampler_lib.Sampler(s.model, eos_id=7, pad_id=PAD, cache_dtype="float32")(
      params, PROMPTS, GREEDY)
  assert s.num_compilations == before
  s(params, [[1] * 100], GREEDY)  # A longer prompt: the next bucket.
  assert s.num_compilations == before + 1


def test_constraint_even_ids_only():
  even = np.arange(VOCAB) % 2 == 0  # Two identical states: shapes as below.
  constraint = constraint_lib.Constraint.create(np.stack([even, even]),
                                                np.zeros((2, VOCAB)))
  settings = sampler_lib.Settings(temperature=1.0, max_new_tokens=48)
  free = run(settings=settings, seed=3)
  assert any((f.tokens % 2).any() for f in free)  # Odd ids do occur ...
  for g in run(settings=settings, seed=3, constraint=constraint):
    assert len(g.tokens) == 48 and not (g.tokens % 2).any()  # ... not here.


def test_constraint_alternates_two_sets():
  low = np.arange(VOCAB) < 100
  allowed = np.stack([low, ~low])                  # state 0: low, 1: high
  next_state = np.stack([np.ones(VOCAB), np.zeros(VOCAB)])
  for start in (0, 1):
    constraint = constraint_lib.Constraint.create(allowed, next_state, start)
    for g in run(settings=sampler_lib.Settings(max_new_tokens=40), seed=5,
                 constraint=constraint):
      is_low = g.tokens < 100
      np.testing.assert_array_equal(is_low[start::2], True)
      np.testing.assert_array_equal(is_low[1 - start::2], False)
  with pytest.raises(ValueError, match="allow no token"):
    constraint_lib.Constraint.create(np.zeros((1, VOCAB)), np.zeros((1, VOCAB)))


def fsdp_params(mesh):
  """The test params laid out by the training rules on `mesh`."""
  return random_init.params(model_and_params()[0], mesh=mesh)


def test_sharded_over_a_mesh_matches_one_device():
  mesh = sharding.make_mesh((1, 4, 1, 2))  # fsdp 4 (batch, weights), tensor 2
  s = sampler_lib.Sampler(model_and_params()[0], eos_id=EOS, pad_id=PAD,
                          mesh=mesh, cache_dtype="float32")
  assert s.batch_multiple == 4
  got = s(fsdp_params(mesh), PROMPTS[:3], GREEDY)
  for g, w in zip(got, run(PROMPTS[:3])):
    np.testing.assert_array_equal(g.tokens, w.tokens)



def test_cache_split_over_context_draws_the_same_tokens(shape=(1, 2, 4, 1)):
  """The KV cache's length splits over the context axis (kv_cache's
  "length" rule): each device holds 1/C of every row's positions, decoding
  gathers no cache-length array, and the tokens are one device's."""
  model, _ = model_and_params()
  mesh = sharding.make_mesh(shape)
  s = sampler_lib.Sampler(model, eos_id=EOS, pad_id=PAD, mesh=mesh,
                          cache_dtype="float32")
  params = fsdp_params(mesh)
  got = s(params, PROMPTS[:3], GREEDY)
  for g, w in zip(got, run(PROMPTS[:3])):
    np.testing.assert_array_equal(g.tokens, w.tokens)

  rows, prompt_len, cache_len = s.shapes(3, 40, GREEDY.max_new_tokens)
  prefill = jax.jit(functools.partial(decode_loop.prefill,
                                      cache_len=cache_len,
                                      cache_dtype=jnp.float32))
  with jax.set_mesh(mesh), nn.logical_axis_rules(s.rules):
    _, cache = prefill(s.prepare(params),
                       jnp.ones((rows, prompt_len), jnp.int32),
                       jnp.full((rows,), prompt_len, jnp.int32))
  k = jax.tree.leaves(cache.k)[0]  # [(L,) B, K, S, F]
  assert k.shape[-2] == cache_len
  assert k.sharding.shard_shape(k.shape)[-2] == cache_len // shape[2]
  hlo = s.lower(params, PROMPTS[:3], GREEDY).compile().as_text()
  gathered = loop_all_gathers(hlo)
  assert gathered is not None
  assert not [x for x in gathered if cache_len in x], gathered


def loop_all_gathers(hlo: str) -> list[tuple[int, ...]]:
  """Result shapes of the all-gathers anywhere inside the sampler's decode
  loop (its while body and every computation that body calls)."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
    if head:
      name = head.group(1)
      comps[name] = []
    elif name and line.startswith("  "):
      comps[name].append(line)
  todo = re.findall(r" while\(.*?body=%([^,\s]+), metadata=\{op_name="
                    r'"jit\(_generate\)/while"', hlo)
  assert len(todo) == 1, "the decode loop's while not found in the HLO"
  seen, shapes = set(), []
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    for line in comps[name]:
      todo += re.findall(r"(?:calls|body|condition|to_apply)=%([^,\s]+)",
                         line)
      gather = re.search(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(",
                         line)
      if gather:
        shapes.append(tuple(int(d) for d in gather.group(1).split(",") if d))
  return shapes


def test_decode_loop_gathers_no_weights_on_an_fsdp_mesh():
  """Weights are laid out for decoding once, before the loop.

  With reshard_params=False (the layout as trained) every step all-gathers
  each layer's weights; the check must see those.
  """
  model, params = model_and_params()
  mesh = sharding.make_mesh((1, 8, 1, 1))  # Whole weights are gathered here.
  sharded = fsdp_params(mesh)
  weights = set()  # Whole leaves, and one layer of the scanned ones.
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    weights.add(x.shape)
    if "layers" in jax.tree_util.keystr(path):
      weights.add(x.shape[1:])
  gathered = {}
  for reshard in (False, True):
    s = sampler_lib.Sampler(model, eos_id=EOS, pad_id=PAD, mesh=mesh,
                            cache_dtype="float32", reshard_params=reshard)
    hlo = s.lower(sharded, PROMPTS, GREEDY).compile().as_text()
    gathered[reshard] = [x for x in loop_all_gathers(hlo) if x in weights]
  assert len(gathered[False]) >= 7, gathered  # A layer's 7 projections.
  assert not gathered[True], gathered[True]


def test_auto_reshard_replicates_only_what_fits():
  """reshard_params="auto": the replicated copy while it takes at most
  max_fraction of a device (or the memory is unknown, as on CPU), else the
  weights as trained; True and False (or their text) always win."""
  model, params = model_and_params()
  rules = sharding.DEFAULT_RULES
  # The copy, counted here: every weight whole in the model dtype, norm
  # scales as stored (fp32).
  bf16 = llama.Llama(dataclasses.replace(model.config, dtype="bfloat16"))
  whole = {
      dtype: sum(x.size * (4 if dtype == "float32" or "scale" in
                           jax.tree_util.keystr(path) else 2)
                 for path, x in jax.tree_util.tree_leaves_with_path(params))
      for dtype in ("float32", "bfloat16")}
  fsdp = sharding.make_mesh((1, 8, 1, 1))  # Replicated over all 8 devices.
  assert decode_loop.copy_bytes(model, fsdp, rules) == whole["float32"]
  assert decode_loop.copy_bytes(bf16, fsdp, rules) == whole["bfloat16"]
  mesh = sharding.make_mesh((1, 4, 1, 2))  # Split over tensor only.
  copy = decode_loop.copy_bytes(model, mesh, rules)
  assert whole["float32"] / 2 <= copy < whole["float32"]

  choose = functools.partial(sampler_lib.choose_reshard, model=model,
                             mesh=mesh, rules=rules)
  assert choose("auto", memory=2 * copy) == (True, mock.ANY)  # Just half.
  assert choose("auto", memory=None)[0]
  keep, why = choose("auto", memory=2 * copy - 1)
  assert not keep and "over 0.5 of" in why and "sharded as trained" in why
  assert not choose("auto", memory=4 * copy, max_fraction=0.2)[0]
  assert choose("AUTO", memory=4 * copy, max_fraction=0.3)[0]
  for setting, want in ((True, True), (False, False), ("False", False),
                        ("true", True)):
    assert choose(setting, memory=1)[0] is want
    assert choose(setting, memory=None)[0] is want
  with pytest.raises(ValueError, match="True, False or 'auto'"):
    choose("yes", memory=None)


def test_sampler_auto_keeps_the_weights_sharded_where_a_copy_would_not_fit(
    monkeypatch, caplog):
  """The Sampler applies the rule with its devices' memory and says why."""
  model, _ = model_and_params()
  mesh = sharding.make_mesh((1, 8, 1, 1))
  params = fsdp_params(mesh)
  make = lambda **kw: sampler_lib.Sampler(model, eos_id=EOS, pad_id=PAD,
                                          mesh=mesh, **kw)
  assert make().reshard_params  # CPU: no memory limit known, replicate.
  copy = decode_loop.copy_bytes(model, mesh, sharding.DEFAULT_RULES)
  monkeypatch.setattr(sharding, "device_memory", lambda mesh: 4 * copy)
  assert make().reshard_params
  monkeypatch.setattr(sharding, "device_memory", lambda mesh: copy)
  caplog.set_level(logging.INFO)
  s = make()
  assert not s.reshard_params
  said = [r.getMessage() for r in caplog.records if "Sampler:" in
          r.getMessage()]
  assert len(said) == 1 and "over 0.5 of" in said[0], said
  # Nothing laid out: prepare hands the trained weights back as they are.
  kept = s.prepare(params)
  assert all(a is b for a, b in zip(jax.tree.leaves(kept.tree),
                                    jax.tree.leaves(params)))
  assert make(reshard_params=True).reshard_params  # Explicit wins.
  assert make(max_copy_fraction=1.0).reshard_params  # The share, passed.


def test_prepared_shardings_are_the_layout_prepare_makes():
  """--mode=compile compiles prefill and decode on prepared_shardings: the
  layout Sampler.prepare really gives (replicated over fsdp, split over
  tensor), per layer when unrolled."""
  model, _ = model_and_params()
  mesh = sharding.make_mesh((1, 4, 1, 2))
  params = fsdp_params(mesh)
  for unroll in (True, False):
    s = sampler_lib.Sampler(model, eos_id=EOS, pad_id=PAD, mesh=mesh,
                            reshard_params=True, unroll_layers=unroll)
    got = s.prepare(params).tree
    want = decode_loop.prepared_shardings(model, mesh, s.rules,
                                          unroll_layers=unroll)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert ("layers_1" in want) is unroll
    specs = [w.spec for w in jax.tree.leaves(want)]
    assert any("tensor" in str(p) for p in specs), specs
    assert not any("fsdp" in str(p) for p in specs), specs
    for x, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert x.sharding.is_equivalent_to(w, x.ndim), (x.sharding, w)


def test_bf16_cache_is_the_default_and_tracks_fp32():
  model, params = model_and_params()
  s = sampler_lib.Sampler(model, eos_id=EOS, pad_id=PAD)
  assert s.cache_dtype == jnp.bfloat16
  got = s(params, PROMPTS, GREEDY)
  want = run()
  agree = [np.mean(g.tokens[:16] == w.tokens[:16]) for g, w in zip(got, want)]
  assert np.mean(agree) > 0.5, agree


# -- a real workdir: the image command, TensorBoard grids, the CLI -------------


@functools.lru_cache(maxsize=None)
def tiny_workdir() -> str:
  """A real training workdir (tiny data, the trainer run for one step).

  Shared by every test of the session that needs one (test_notebook.py too).
  """
  from codeclm.train import loop  # pylint: disable=g-import-not-at-top
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  path = tempfile.mkdtemp(prefix="codeclm_sample_")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  c = tiny_config.get_config()
  c.seq_len = 256
  c.train.update(steps=1, ckpt_every=1, eval_every=0, async_checkpoints=False,
                 compilation_cache=False)
  loop.train(c, path)
  return path


def photo_files(directory) -> list[str]:
  """Two real photographs as PNG files."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  paths = []
  for name in ("astronaut", "coffee"):
    paths.append(os.path.join(directory, f"{name}.png"))
    Image.fromarray(getattr(data, name)()).save(paths[-1])
  return paths


def sample_config(**overrides) -> ml_collections.ConfigDict:
  c = config_base.lm_config("demo").sample
  # One device; min_bucket = seq_len: every call below is one bucket (one
  # compilation, shared by the Samplers of the tests that follow).
  c.update({**dict(num_samples=4, images="", ratios=(0.5,), completions=2,
                   seed=0, max_new_tokens=48, mesh_shape=(1, 1, 1, 1),
                   min_bucket=256), **overrides})
  return c


@pytest.fixture(scope="module")
def workdir():
  return tiny_workdir()


@pytest.mark.filterwarnings("ignore:Sharding info not provided")
def test_restore_params_matches_the_saved_state(workdir):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  loaded = workdir_lib.load(workdir, step=1, mesh_shape=(2, 2, 1, 2))
  assert loaded.step == 1
  saved = ocp.PyTreeCheckpointer().restore(
      os.path.join(workdir, "checkpoints", "1", "state"))
  flat = jax.tree_util.tree_flatten_with_path(loaded.params)[0]
  assert len(flat) == len(jax.tree.leaves(saved["params"]))
  for path, leaf in flat:
    want = functools.reduce(lambda t, k: t[k.key], path, saved["params"])
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want),
                                  err_msg=jax.tree_util.keystr(path))
  # restore_params given the workdir itself takes its latest step.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=x.sharding), loaded.params)
  latest = params_io.restore_params(workdir, abstract)
  jax.tree.map(np.testing.assert_array_equal, latest, loaded.params)
  head = loaded.params["head"]  # Laid out by the training rules.
  assert head.sharding.spec == jax.sharding.PartitionSpec(
      ("fsdp", "context"), "tensor")
  with pytest.raises(FileNotFoundError, match=r"committed steps \[1\]"):
    workdir_lib.load(workdir, step=99)


def test_sample_command_writes_images_and_reports(workdir, tmp_path):
  images = photo_files(tmp_path)
  out = tmp_path / "out"
  summary = files.run(sample_config(images=",".join(images),
                                     out_dir=str(out)), workdir)
  loaded_codec = codecs.from_settings(json.load(open(
      os.path.join(workdir, "manifest.json")))["codec"])
  names = [f"sample_{i:04d}" for i in range(4)] + [
      f"{n}_r50_{j}" for n in ("astronaut", "coffee") for j in (0, 1)]
  assert sorted(summary["samples"]) == sorted(names)
  assert summary["constrained"] is True  # The default for JPEG.
  for name in names:
    info = json.load(open(out / f"{name}.json"))
    assert info["constrained"] is True
    assert info["report"]["expected"] == loaded_codec.num_mcus
    assert info["report"] == summary["samples"][name]
    with Image.open(out / f"{name}.jpg") as im:  # A standalone JPEG file.
      assert im.format == "JPEG" and im.size == (32, 32)
    png = np.asarray(Image.open(out / f"{name}.png"))
    assert png.shape == (32, 32, 3)
  # A completion keeps its prompt: the top MCU row is the original's.
  full = loaded_codec.encode(images[0])
  prompt_pixels = loaded_codec.decode(loaded_codec.prompt(full, 0.5))[0]
  for j in (0, 1):
    info = json.load(open(out / f"astronaut_r50_{j}.json"))
    assert info["report"]["clean"] >= 2 and info["ratio"] == 0.5
    png = np.asarray(Image.open(out / f"astronaut_r50_{j}.png"))
    np.testing.assert_array_equal(png[:8], prompt_pixels[:8])
  grid = np.asarray(Image.open(out / "astronaut_grid.png"))
  assert grid.shape == (32, 4 * 32 + 3 * 2, 3)  # prompt | 2 samples | original
  np.testing.assert_array_equal(
      grid[:, -32:], np.asarray(Image.open(out / "astronaut_original.png")))
  assert (out / "samples.png").exists()


def test_tensorboard_sampler(workdir):
  loaded = workdir_lib.load(workdir, mesh_shape=(1, 1, 1, 1))
  sample_cfg = sample_config(tb_every=5, tb_samples=3, tb_images=2,
                             max_new_tokens=40)
  tb = tensorboard.TensorBoardSampler(
      sample_cfg, loaded.model, loaded.mesh, loaded.rules, loaded.tokenizer,
      loaded.codec, os.path.join(workdir, "data"))
  assert tb.due(10) and not tb.due(7)
  images = tb(loaded.params)
  assert images["samples/unconditional"].shape == (1, 32, 3 * 34 - 2, 3)
  assert images["samples/completions"].shape == (1, 2 * 34 - 2, 4 * 34 - 2, 3)
  assert images["samples/completions"].dtype == np.uint8
  compiled = tb.sampler.num_compilations
  again = tb(loaded.params)  # Fixed seed and prompts: the same grids, ...
  np.testing.assert_array_equal(again["samples/completions"],
                                images["samples/completions"])
  assert tb.sampler.num_compilations == compiled  # ... and no new compile.


def test_command_lines(workdir, tmp_path):
  """`python -m codeclm.sampling` and `codeclm.main --mode=sample`, at once."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmds = {
      "cli": [sys.executable, "-m", "codeclm.sampling", f"--workdir={workdir}",
              "--sample.num_samples=1", "--sample.max_new_tokens=16",
              "--sample.mesh_shape=(1,1,1,1)",
              f"--sample.out_dir={tmp_path / 'cli'}"],
      "main": [sys.executable, "-m", "codeclm.main",
               f"--config={ROOT}/tests/tiny_config.py", f"--workdir={workdir}",
               "--mode=sample", "--config.sample.num_samples=1",
               "--config.sample.max_new_tokens=16",
               "--config.sample.mesh_shape=(1,1,1,1)",
               f"--config.sample.out_dir={tmp_path / 'main'}"],
  }
  procs = {k: subprocess.Popen(v, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
           for k, v in cmds.items()}
  for name, proc in procs.items():
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    info = json.load(open(tmp_path / name / "sample_0000.json"))
    assert info["new_tokens"] <= 16 and info["step"] == 1


def test_sampler_vs_hf_benchmark_smoke(capsys):
  """benchmarks/sampler_vs_hf.py --tiny runs (not timed: CI's smoke test)."""
  pytest.importorskip("transformers")
  import importlib.util  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "sampler_vs_hf", os.path.join(ROOT, "benchmarks", "sampler_vs_hf.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(tiny=True):
    bench.main([])
  rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
  assert rows[0]["logits_max_abs_diff"] < 1e-4  # The same model both sides.
  assert [(r["prompt"], r["batch"]) for r in rows[1:]] == [(8, 2), (24, 2)]
  for r in rows[1:]:
    assert set(r["prefill_s"]) == {"codeclm", "hf"} and r["prefill_ratio"] > 0
    assert r["full_length_rows"] == 2
  with flagsaver.flagsaver(tiny=True, breakdown=True):
    bench.main([])
  rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()][1:]
  assert [(r["prompt"], r["batch"]) for r in rows] == [(8, 2), (24, 2)]
  for r in rows:
    for part in ("forward", "matmuls", "attention"):
      assert r[part]["jax_s"] > 0 and r[part]["torch_s"] > 0, r


def test_sampler_profile_benchmark_smoke():
  """benchmarks/sampler_profile.py traces a call and names the ops that ran
  (not timed: CI's smoke test)."""
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "benchmarks", "sampler_profile.py"),
       "--size=demo", "--batch=1", "--prompt=16", "--new_tokens=3",
       "--top=40"], capture_output=True, text=True, timeout=300, check=True,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")).stdout
  assert re.search(r"^call: [\d.]+ s", out, re.M), out
  ops = re.findall(r"^\s*([\d.]+) ms  (\S+)\s+(.*)$", out, re.M)
  assert sum(float(ms) for ms, _, _ in ops) > 0, out
  names = " ".join(name for _, _, name in ops)
  # Prefill and decode loop both show, by the model code that made them.
  assert "Llama/" in names and "while/body" in names, out
