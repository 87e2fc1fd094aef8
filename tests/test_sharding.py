"""Mesh, logical rules and sharded init / forward on 8 simulated CPU devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from codeclm.model import kv_cache
from codeclm.model import llama
from codeclm.model import llama_config
from codeclm.model import random_init
from codeclm.model import sharding

CONFIG = llama_config.LlamaConfig.from_size(
    "tiny", vocab_size=256, max_len=32, dtype="float32", remat_policy="none")
TOKENS = np.random.default_rng(0).integers(0, 256, (8, 8)).astype(np.int32)

# Logical names -> the specs DEFAULT_RULES must give (before size-1 axes).
FC = ("fsdp", "context")  # ZeRO-3 over both.
EXPECTED = {
    "embedding": P("tensor", FC),
    "head": P(FC, "tensor"),
    "final_norm/scale": P(FC),
    "layers/attn_norm/scale": P(None, FC),
    "layers/attn/q_proj": P(None, FC, "tensor", None),
    "layers/attn/k_proj": P(None, FC, "tensor", None),
    "layers/attn/o_proj": P(None, "tensor", None, FC),
    "layers/mlp/gate_proj": P(None, FC, "tensor"),
    "layers/mlp/down_proj": P(None, "tensor", FC),
}


def abstract_params():
  return jax.eval_shape(llama.Llama(CONFIG).init, jax.random.key(0),
                        jnp.zeros((1, 8), jnp.int32))["params"]


def get(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


@functools.lru_cache(maxsize=None)
def reference():
  """Random params (numpy) and their single-device logits, no mesh."""
  params = random_init.params(llama.Llama(CONFIG), scheme="by_role")
  logits = jax.jit(llama.Llama(CONFIG).apply)({"params": params}, TOKENS)
  return params, np.asarray(logits)


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (2, 2, 1, 2), (1, 4, 1, 2),
                                   (1, -1, 1, 1), (1, 2, 2, 2)])
def test_sharded_init_and_forward(shape):
  mesh = sharding.make_mesh(shape)
  assert mesh.axis_names == sharding.MESH_AXES
  assert mesh.devices.size == 8
  model = llama.Llama(CONFIG)
  rules = sharding.DEFAULT_RULES
  boxed = abstract_params()
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  for path, spec in EXPECTED.items():
    assert get(shardings, path).spec == spec, path
  data = jax.sharding.NamedSharding(
      mesh, nn.logical_to_mesh_axes(("batch", "length"), rules))
  ref_params, ref_logits = reference()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # An rbg key: the same init, several times faster to compile on CPU.
    params = jax.jit(
        lambda r: nn.meta.unbox(model.init(r, TOKENS[:1])["params"]),
        out_shardings=shardings)(jax.random.key(0, impl="rbg"))
    logits = jax.jit(model.apply, in_shardings=({"params": shardings}, data))(
        {"params": jax.device_put(ref_params, shardings)},
        jax.device_put(TOKENS, data))
  q = params["layers"]["attn"]["q_proj"]
  fsdp = mesh.shape["fsdp"] * mesh.shape["context"]
  tensor = mesh.shape["tensor"]
  assert q.sharding.spec == EXPECTED["layers/attn/q_proj"]
  assert q.addressable_shards[0].data.shape == (2, 32 // fsdp, 4 // tensor, 8)
  assert 0.5 < np.std(np.asarray(params["embedding"])) < 1.5  # Initialised.
  sharding.check_large_params_sharded(params, mesh, min_size=1000)
  sharding.check_large_params_sharded(shardings, mesh, min_size=1000,
                                      shapes=boxed)
  if mesh.shape["fsdp"] > 1:  # Every default-rule weight has "embed" on fsdp.
    sharding.check_large_params_sharded(shardings, mesh)
  np.testing.assert_allclose(logits, ref_logits, atol=2e-5, rtol=2e-5)


def test_check_raises_when_rules_map_nothing():
  mesh = sharding.make_mesh((1, 4, 1, 2))
  boxed = abstract_params()
  replicated = sharding.logical_shardings(boxed, mesh, rules=())
  with pytest.raises(ValueError, match=r"replicated.*q_proj"):
    sharding.check_large_params_sharded(replicated, mesh, min_size=1000,
                                        shapes=boxed)
  with pytest.raises(ValueError, match=r"replicated.*embedding.*shapes="):
    sharding.check_large_params_sharded(replicated, mesh)  # Sizes unknown.
  # Small params are exempt; pure data parallelism replicates by design.
  sharding.check_large_params_sharded(replicated, mesh, min_size=10**6,
                                      shapes=boxed)
  data_only = sharding.make_mesh((8, 1, 1, 1))
  sharding.check_large_params_sharded(
      sharding.logical_shardings(boxed, data_only, rules=()), data_only,
      shapes=boxed)


def test_indivisible_dims_stay_whole():
  """A 300-entry vocabulary cannot split 8 ways: that axis is dropped."""
  mesh = sharding.make_mesh((1, 1, 1, 8))
  config = llama_config.LlamaConfig.from_size("tiny", vocab_size=300,
                                              num_heads=8, num_kv_heads=8)
  boxed = jax.eval_shape(llama.Llama(config).init, jax.random.key(0),
                         jnp.zeros((1, 8), jnp.int32))["params"]
  shardings = sharding.logical_shardings(boxed, mesh, sharding.DEFAULT_RULES)
  assert shardings["embedding"].spec == P(None, FC)
  assert shardings["layers"]["attn"]["q_proj"].spec == P(
      None, FC, "tensor", None)


def test_cache_is_sharded_by_logical_names():
  mesh = sharding.make_mesh((4, 1, 1, 2))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    cache = jax.jit(lambda: kv_cache.init_cache(CONFIG, 4, 16))()
  want = jax.sharding.NamedSharding(mesh, P(None, ("data", "fsdp"),
                                            "tensor"))  # [L, B, K, S, F]
  assert cache.k.sharding.is_equivalent_to(want, 5)
  assert cache.k.addressable_shards[0].data.shape == (2, 1, 1, 16, 8)


def test_make_mesh_errors_name_the_fix():
  with pytest.raises(ValueError, match="needs 6 devices but there are 8"):
    sharding.make_mesh((2, 3, 1, 1))
  with pytest.raises(ValueError, match="not divisible"):
    sharding.make_mesh((3, -1, 1, 1))
  with pytest.raises(ValueError, match="4 entries"):
    sharding.make_mesh((8, 1))
  # The (data, fsdp, tensor) form of before the context axis: what to insert.
  with pytest.raises(ValueError, match=r"\(1,-1,1\) becomes \(1,-1,1,1\).*"
                     r"\(2, -1, 2\) -> \(2, -1, 1, 2\)"):
    sharding.make_mesh((2, -1, 2))
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh((-1, -1, 1, 1))
  assert dict(sharding.make_mesh((-1, 2, 1, 2)).shape) == dict(
      data=2, fsdp=2, context=1, tensor=2)


# -- Bytes per device and the default meshes (loop.build: shapes only). ------


def _setup(config, devices=None):
  from codeclm.train import loop  # pylint: disable=g-import-not-at-top
  return loop.build(config, 322, np.ones(322, np.float32), devices)


def _config(size):
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  if size == "tiny":
    return tiny_config.get_config()
  from codeclm import config_base  # pylint: disable=g-import-not-at-top
  from codeclm.train import planner  # pylint: disable=g-import-not-at-top
  # 1B and 7B leave the layout "auto"; these tests set the mesh themselves
  # (the rest as before the planner: fsdp, one micro-batch, remat full).
  return planner.unplanned(config_base.lm_config(size))


@pytest.mark.parametrize("shape", [(8, 1, 1, 1), (1, 4, 1, 2)])
def test_bytes_per_device_is_one_devices_shards(shape, caplog):
  import logging  # pylint: disable=g-import-not-at-top
  from codeclm.train import loop  # pylint: disable=g-import-not-at-top
  config = _config("tiny")
  config.mesh.shape = shape
  setup = _setup(config)
  got = sharding.bytes_per_device(setup.abstract_state, setup.state_shardings)
  state = setup.init_fn(jax.random.key(0, impl="rbg"))
  device = setup.mesh.devices.flat[3]
  held = sum(s.data.nbytes for x in jax.tree.leaves(state)
             for s in x.addressable_shards if s.device == device)
  assert got == held
  total = sum(x.nbytes for x in jax.tree.leaves(state))
  assert (got == total) == (shape == (8, 1, 1, 1))  # Replicated, or split.
  with caplog.at_level(logging.INFO):
    loop.report(setup, config.batch_size, batch_size=config.batch_size,
                seq_len=config.seq_len)
  assert f"~{got / 2**30:.3g} GiB per device" in caplog.text


def test_default_meshes_shard_1b_and_7b():
  for size in ("demo", "100m"):
    assert tuple(_config(size).mesh.shape) == (-1, 1, 1, 1)
  from codeclm import config_base  # pylint: disable=g-import-not-at-top
  from codeclm.train import planner  # pylint: disable=g-import-not-at-top
  for size in ("1b", "7b"):  # "auto" (the planner's); unplanned: fsdp.
    assert planner.is_auto(config_base.lm_config(size).mesh.shape)
    config = _config(size)
    assert tuple(config.mesh.shape) == (1, -1, 1, 1)
    setup = _setup(config)  # eval_shape only: nothing is allocated.
    per_device = sharding.bytes_per_device(setup.abstract_state,
                                           setup.state_shardings)
    total = sum(x.size * x.dtype.itemsize
                for x in jax.tree.leaves(setup.abstract_state))
    assert abs(per_device - total / 8) < 1024  # All but a few scalars split.
  assert 9.5e9 < per_device < 10.5e9  # 7B: 12 bytes a parameter / 8.


def test_a_state_that_does_not_fit_names_the_mesh():
  config = _config("7b")
  config.mesh.shape = (-1, 1, 1, 1)  # Replicated: 81 GB on every device.
  setup = _setup(config)
  state = sharding.bytes_per_device(setup.abstract_state, setup.state_shardings)
  with pytest.raises(ValueError, match=r"mesh\.shape=\(8, 1, 1, 1\).*fsdp"):
    sharding.check_state_fits(state, setup.mesh, 0.5, 80 * 2**30)
  sharding.check_state_fits(state, setup.mesh, 0.5, None)  # CPU: unknown.
  config.mesh.shape = (1, -1, 1, 1)
  setup = _setup(config)
  sharding.check_state_fits(
      sharding.bytes_per_device(setup.abstract_state, setup.state_shardings),
      setup.mesh, 0.5, 80 * 2**30)
