"""Context parallelism (the mesh's context axis) against context 1.

8 simulated CPU devices. The tiny config's loss and gradients over packed
rows whose documents cross the shard boundaries, with context 2, 4 and 8,
load-balanced or not, equal those of a context-1 mesh; a 3-step training run
gives the same losses on (1,-1,1,1), (1,2,4,1) and (1,1,8,1).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codeclm import config_base
from codeclm.model import context_attention
from codeclm.model import llama
from codeclm.model import random_init
from codeclm.model import sharding
from codeclm.train import loop
from codeclm.train import step
from tests import tiny_config

VOCAB = 302
ROWS, T = 8, 128


def model_of(balance: bool, impl: str = "xla", seq_len: int = T):
  c = tiny_config.get_config()
  c.seq_len = seq_len
  c.model.update(dtype="float32", attention_impl=impl)
  c.mesh.context_load_balance = balance
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


def loss_and_grads(shape, balance, impl="xla", t=T):
  """Mean token loss and its gradients on a mesh, via the trainer's loss."""
  mesh = sharding.make_mesh(shape)
  model = model_of(balance, impl, t)

  def mean_loss(p, batch):
    total, aux = step.loss_terms(model, p, batch, True, 0.0,
                                 np.ones(VOCAB, np.float32))
    return total / aux["tokens"]

  data = jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(
      ("batch", "length"), sharding.DEFAULT_RULES))
  weights = params()  # Numpy, drawn outside any mesh.
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    batch = jax.device_put(packed_batch(t), data)
    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(weights, batch)
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
