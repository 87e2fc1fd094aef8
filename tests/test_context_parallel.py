"""Context parallelism (the mesh's context axis) against context 1.

8 simulated CPU devices. The tiny config's loss and gradients over packed
rows whose documents cross the shard boundaries, with context 2, 4 and 8,
load-balanced or not, equal those of a context-1 mesh, with K/V all-gathered
or passed around a ring (mesh.context_strategy); a 3-step training run
gives the same losses on (1,-1,1,1), (1,2,4,1) and (1,1,8,1).
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codeclm import config_base
from codeclm.model import attention
from codeclm.model import context_attention
from codeclm.model import llama
from codeclm.model import random_init
from codeclm.model import sharding
from codeclm.train import loop
from codeclm.train import step
from tests import tiny_config

VOCAB = 302
ROWS, T = 8, 128


def model_of(balance: bool, impl: str = "xla", seq_len: int = T,
             strategy: str = "all_gather"):
  c = tiny_config.get_config()
  c.seq_len = seq_len
  c.model.update(dtype="float32", attention_impl=impl)
  c.mesh.context_load_balance = balance
  c.mesh.context_strategy = strategy
  return llama.Llama(config_base.model_config(c, VOCAB))


def packed_batch(t: int = T) -> dict:
  """Packed rows: documents of 3 to 40 tokens (positions from 0 in each),
  so they cross every chunk boundary; some rows end in padding (id 0,
  loss mask 0)."""
  rng = np.random.default_rng(0)
  segment_ids = np.zeros((ROWS, t), np.int32)
  positions = np.zeros((ROWS, t), np.int32)
  for r in range(ROWS):
    start, doc = 0, 1
    end = t - (0 if r % 2 else int(rng.integers(1, 20)))
    while start < end:
      n = min(int(rng.integers(3, 41)), end - start)
      segment_ids[r, start:start + n] = doc
      positions[r, start:start + n] = np.arange(n)
      start, doc = start + n, doc + 1
  return dict(inputs=rng.integers(0, VOCAB, (ROWS, t)).astype(np.int32),
              targets=rng.integers(0, VOCAB, (ROWS, t)).astype(np.int32),
              segment_ids=segment_ids, positions=positions,
              loss_mask=(segment_ids > 0).astype(np.float32))


@functools.lru_cache(maxsize=None)
def params():
  return random_init.params(model_of(True), scheme="by_role")


def loss_and_grads(shape, balance, impl="xla", t=T, strategy="all_gather",
                   hlo=False):
  """Mean token loss and its gradients on a mesh, via the trainer's loss
  (hlo: the compiled module's text instead)."""
  mesh = sharding.make_mesh(shape)
  model = model_of(balance, impl, t, strategy)

  def mean_loss(p, batch):
    total, aux = step.loss_terms(model, p, batch, True, 0.0,
                                 np.ones(VOCAB, np.float32))
    return total / aux["tokens"]

  data = jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(
      ("batch", "length"), sharding.DEFAULT_RULES))
  weights = params()  # Numpy, drawn outside any mesh.
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    batch = jax.device_put(packed_batch(t), data)
    fn = jax.jit(jax.value_and_grad(mean_loss))
    if hlo:
      return fn.lower(weights, batch).compile().as_text()
    loss, grads = fn(weights, batch)
  return float(loss), jax.tree.map(np.asarray, grads)


@functools.lru_cache(maxsize=None)
def context_one(impl="xla", t=T):
  return loss_and_grads((1, -1, 1, 1), True, impl, t)


def assert_same(got, want, rtol=1e-5):
  loss, grads = got
  want_loss, want_grads = want
  assert loss == pytest.approx(want_loss, rel=rtol)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    w = want_grads
    for key in path:
      w = w[key.key]
    # Relative to the leaf's largest entry: tiny entries carry fp32 noise.
    np.testing.assert_allclose(g, w, rtol=0, atol=rtol * np.abs(w).max(),
                               err_msg=jax.tree_util.keystr(path))


def test_load_balanced_layout_gives_shard_i_chunks_i_and_2c_minus_1_minus_i():
  t, shards = 16, 4  # 8 chunks of 2 tokens: 0,7 | 1,6 | 2,5 | 3,4.
  chunks = [0, 7, 1, 6, 2, 5, 3, 4]
  want = np.concatenate([[2 * c, 2 * c + 1] for c in chunks])
  np.testing.assert_array_equal(
      context_attention.window_index(t, shards, True), want)
  x = np.arange(2 * t).reshape(2, t) * 10
  laid = np.asarray(context_attention.to_layout(jnp.asarray(x), shards, True))
  np.testing.assert_array_equal(laid, x[:, want])
  back = context_attention.from_layout(jnp.asarray(laid), shards, True)
  np.testing.assert_array_equal(np.asarray(back), x)
  np.testing.assert_array_equal(  # Unbalanced: the natural split.
      context_attention.window_index(t, shards, False), np.arange(t))


@pytest.mark.parametrize("context", [2, 4, 8])
@pytest.mark.parametrize("balance", [True, False])
def test_loss_and_grads_equal_context_one(context, balance):
  shape = (1, 8 // context, context, 1)
  assert_same(loss_and_grads(shape, balance), context_one())


def test_tiled_kernel_with_tensor_parallel_heads():
  """The CPU tiled kernel, heads split over tensor beside context."""
  assert_same(loss_and_grads((1, 2, 2, 2), True, "tiled"), context_one())


def test_splash_kernel_interpreted():
  """Splash (Pallas interpret mode) with the layout's query positions:
  its block sparsity and mask follow the true positions."""
  assert_same(loss_and_grads((1, 4, 2, 1), True, "splash", 256),
              context_one("xla", 256))


@pytest.mark.parametrize("shape,balance,impl", [
    ((1, 1, 8, 1), True, "xla"),
    ((1, 1, 8, 1), False, "xla"),   # Most blocks wholly masked.
    ((1, 2, 2, 2), True, "tiled"),  # Heads over tensor beside context.
])
def test_ring_loss_and_grads_equal_context_one(shape, balance, impl):
  """K/V passed around the context axis, merged by log-sum-exp, and the
  ring's own backward pass."""
  assert_same(loss_and_grads(shape, balance, impl, strategy="ring"),
              context_one())


def test_ring_tiles_of_queries_equal_dense_attention():
  """The tiled ring at T/C = 2 * TILE (two tiles of queries per block, which
  the model tests' short windows do not reach), heads over tensor: output
  and gradients equal one device's dense attention over packed rows."""
  b, t, h, kv, f = 2, 4 * attention.TILE, 4, 2, 8
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, f)), jnp.float32)
             for n in (h, kv, kv))
  seg = jnp.asarray(packed_batch(t)["segment_ids"][:b])
  probe = jnp.asarray(rng.standard_normal((b, t, h, f)), jnp.float32)

  def ring(q, k, v):
    lay = lambda x: context_attention.to_layout(x, 2, True)
    out = context_attention.attend(lay(q), lay(k), lay(v), lay(seg),
                                   impl="tiled", balance=True,
                                   strategy="ring")
    return jnp.sum(context_attention.from_layout(out, 2, True) * probe)

  def dense(q, k, v):
    out = attention.attend(q, k, v, impl="xla", segment_ids=seg, mask=None,
                           is_causal=True)
    return jnp.sum(out * probe)

  grad = lambda fn: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))
  want = grad(dense)(q, k, v)
  with (jax.set_mesh(sharding.make_mesh((1, 2, 2, 2))),
        nn.logical_axis_rules(sharding.DEFAULT_RULES)):
    got = grad(ring)(q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * np.abs(w).max())


def collective_shapes(hlo: str, ops: tuple[str, ...]) -> list[tuple]:
  """The result shapes (dims) of every `ops` instruction in HLO text."""
  shapes = []
  for m in re.finditer(r" = (.*?) (" + "|".join(ops) + r")(?:-start)?\(",
                       hlo):
    arrays = re.findall(r"[a-z0-9]+\[([\d,]*)\]", m.group(1))
    shapes += [tuple(int(d) for d in dims.split(",") if d) for dims in arrays]
  return shapes


def test_ring_moves_kv_by_collective_permutes_not_gathers():
  """Compiled for (1,1,8,1): the ring's K/V (and dK/dV) cross devices as
  [.., T/8, F] blocks by collective-permutes; no all-gather, reduce-scatter
  or all-reduce of a whole window's [.., T, F] K/V is left. The same checks
  find those gathers, and no such permutes, in the all-gather strategy."""
  f = model_of(True).config.head_dim
  whole = lambda s: len(s) > 1 and T in s[:-1] and s[-1] == f
  block = lambda s: len(s) > 1 and T // 8 in s[:-1] and s[-1] == f
  gathers = ("all-gather", "reduce-scatter", "all-reduce")
  hops = ("collective-permute",)
  ring = loss_and_grads((1, 1, 8, 1), True, strategy="ring", hlo=True)
  assert not [s for s in collective_shapes(ring, gathers) if whole(s)]
  assert [s for s in collective_shapes(ring, hops) if block(s)]
  gathered = loss_and_grads((1, 1, 8, 1), True, hlo=True)
  assert [s for s in collective_shapes(gathered, gathers) if whole(s)]
  assert not [s for s in collective_shapes(gathered, hops) if block(s)]


def test_unknown_context_strategy_names_the_two():
  with pytest.raises(ValueError, match="'all_gather' or 'ring'"):
    model_of(True, strategy="allgather")


@functools.lru_cache(maxsize=None)
def initial_state():
  """The trainer's initial state (params and AdamW moments), on the host."""
  c = tiny_config.get_config()
  c.mesh.shape = (1, -1, 1, 1)
  setup = loop.build(c, VOCAB, np.ones(VOCAB, np.float32))
  with setup.context():
    return jax.tree.map(np.asarray, setup.init_fn(jax.random.key(0)))


def train_losses(shape) -> list[float]:
  """3 steps of the trainer's step (loop.build: sharded init, AdamW, the
  global batch fed as the loop feeds it) on packed rows, in fp32."""
  c = tiny_config.get_config()
  c.model.dtype = "float32"
  c.data.packing = "pack"
  c.mesh.shape = shape
  setup = loop.build(c, VOCAB, np.ones(VOCAB, np.float32))
  rows = loop.batch_rows(setup.data_sharding, c.batch_size)[0]
  batch = loop.global_batch(packed_batch(), setup.data_sharding, rows,
                            c.batch_size)
  losses, state = [], initial_state()
  with setup.context():
    state = jax.device_put(state, setup.state_shardings)
    for _ in range(3):
      state, metrics = setup.step_fn(state, batch)
      losses.append(float(metrics["loss"]))
  return losses


def test_three_steps_train_the_same_on_context_meshes():
  want = train_losses((1, -1, 1, 1))
  assert want[2] < want[0]  # It learns: the steps are real.
  for shape in ((1, 2, 4, 1), (1, 1, 8, 1)):
    np.testing.assert_allclose(train_losses(shape), want, rtol=1e-4,
                               err_msg=str(shape))
