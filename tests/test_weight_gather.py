"""Where the train step keeps its weights and optimizer state (step.py).

train.weight_gather="per_step" (one gather of the weights per step, grads
summed per batch shard and reduced once), train.optimizer_offload=True
(optimizer state in pinned host memory between steps) and
train.param_offload=True (the weights there too) must train exactly as the
default: fp32 steps with "per_step" and the optimizer offload, and with both
offloads, each resumed from an Orbax checkpoint after the first, against two
straight default steps on the same (data 2, fsdp 4) mesh with 4
micro-batches; the eval step on host-resident weights gives the default's
sums. The compiled steps' collectives are counted
against a closed form: "per_step" all-gathers the weights once and reduces
their gradients once; "per_micro_batch" does both once per micro-batch.
"""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from codeclm import config_base
from codeclm.model import sharding
from codeclm.train import checkpoint
from codeclm.train import hlo_stats
from codeclm.train import loop
from tests import tiny_config

MICRO = 4
SHAPE = (2, 4, 1, 1)  # 8 batch shards of one row per micro-batch.
VOCAB = 302


def config(**train):
  c = tiny_config.get_config()
  c.train.update(grad_accum=MICRO, **train)
  c.model.dtype = "float32"
  c.mesh.shape = SHAPE
  c.seq_len = 64
  c.batch_size = 8 * MICRO
  return c


def batches(setup, c, n=2):
  """n global batches of random tokens, split as the trainer splits them."""
  rng = np.random.default_rng(0)
  shape = (c.batch_size, c.seq_len)
  out = []
  for _ in range(n):
    local = dict(inputs=rng.integers(0, VOCAB, shape),
                 targets=rng.integers(0, VOCAB, shape),
                 segment_ids=np.ones(shape), positions=np.tile(
                     np.arange(c.seq_len), (c.batch_size, 1)),
                 loss_mask=rng.random(shape) < 0.9)
    out.append({k: jax.device_put(v.astype(
        np.float32 if k == "loss_mask" else np.int32), setup.data_sharding)
                for k, v in local.items()})
  return out


def compiled_step(c):
  """(setup, its compiled train step, the collectives' bytes by kind)."""
  setup = loop.build(c, VOCAB, np.ones(VOCAB, np.float32))
  state = checkpoint.abstract_with_shardings(setup.abstract_state,
                                             setup.state_shardings)
  with setup.context():
    step = setup.step_fn.lower(state, batches(setup, c, 1)[0]).compile()
  moved = {k: v["bytes"] for k, v in hlo_stats.collectives(
      step.as_text()).items()}
  return setup, step, moved


def kinds(tree):
  return {x.sharding.memory_kind for x in jax.tree.leaves(tree)}


def placed_run(c, path, init_values=None):
  """Sharded init (into host memory where offloaded), one step, an Orbax
  save, a restore into the state's shardings, a second step, an eval step.
  `init_values` (another run's initial state) replaces the init's."""
  setup, step, moved = compiled_step(c)
  first, second = batches(setup, c)
  with setup.context():
    init = setup.init_fn(jax.random.key(0))
    if init_values is not None:
      init = jax.device_put(init_values, setup.state_shardings)
    run = dict(moved=moved, init=dict(opt_state=kinds(init.opt_state),
                                      params=kinds(init.params)),
               init_values=jax.device_get(init))  # The step donates it.
    state, m1 = step(init, first)
    run["after_step"] = dict(opt_state=kinds(state.opt_state),
                             params=kinds(state.params))
    saver = ocp.StandardCheckpointer()
    saver.save(path, state)
    saver.wait_until_finished()
    state = saver.restore(path, checkpoint.abstract_with_shardings(
        setup.abstract_state, setup.state_shardings))
    run["restored"] = dict(opt_state=kinds(state.opt_state),
                           params=kinds(state.params))
    state, m2 = step(state, second)
    run["eval"] = jax.device_get(setup.eval_fn(state.params, first))
  run.update(losses=[float(m1["loss"]), float(m2["loss"])],
             state=jax.device_get(state))
  return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Two steps each way from the same initial state: "placed" (per_step +
  optimizer offload), "host" (both offloads, per_micro_batch; from placed's
  initial state), "default": two steps from that state moved onto the
  device, and its eval step (one init compile fewer)."""
  placed = placed_run(config(weight_gather="per_step", optimizer_offload=True),
                      tmp_path_factory.mktemp("placed") / "state")
  host = placed_run(config(optimizer_offload=True, param_offload=True),
                    tmp_path_factory.mktemp("host") / "state",
                    placed["init_values"])

  c = config()
  setup, step, moved = compiled_step(c)
  losses = []
  with setup.context():
    state = jax.device_put(placed["init_values"], setup.state_shardings)
    first = batches(setup, c)
    for batch in first:
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    evaluated = jax.device_get(setup.eval_fn(state.params, first[0]))
  default = dict(losses=losses, state=jax.device_get(state), moved=moved,
                 eval=evaluated,
                 weight_bytes=sum(x.size * 4 for x in jax.tree.leaves(
                     setup.abstract_state.params)))
  return default, placed, host


@pytest.mark.parametrize("which", [1, 2], ids=["per_step", "param_offload"])
def test_placements_train_as_the_default(runs, which):
  default_run, other = runs[0], runs[which]
  np.testing.assert_allclose(other["losses"], default_run["losses"],
                             rtol=1e-6)
  want = jax.tree_util.tree_leaves_with_path(default_run["state"])
  got = jax.tree.leaves(other["state"])
  assert len(got) == len(want)
  for (path, x), y in zip(want, got):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert np.linalg.norm(y - x) <= 1e-5 * np.linalg.norm(x), path
  for k, v in default_run["eval"].items():
    np.testing.assert_allclose(other["eval"][k], v, rtol=1e-5, err_msg=k)


def test_offloaded_state_lives_in_host_memory(runs):
  placed, host = runs[1], runs[2]
  on = lambda opt, params: dict(opt_state={opt}, params={params})
  for when in ("init", "after_step", "restored"):
    assert placed[when] == on("pinned_host", "device"), when
    assert host[when] == on("pinned_host", "pinned_host"), when


def test_per_step_gathers_and_reduces_once(runs):
  each, once = runs[0]["moved"], runs[1]["moved"]
  weights = runs[0]["weight_bytes"]
  # Every weight is split over fsdp: one gather moves them all (fp32 here),
  # one reduction (an all-reduce on CPU) their gradients, plus the three
  # loss sums and the grad norm.
  assert once["all-gather"] == weights
  assert weights <= once["all-reduce"] <= weights + 1024
  assert each["all-gather"] >= MICRO * weights  # Forward (+ backward).
  assert each["all-reduce"] >= MICRO * weights  # Each micro-batch's grads.
  total = lambda d: d["all-gather"] + d["all-reduce"]
  assert total(each) >= MICRO * total(once) * 0.95


def test_unknown_weight_gather_says_what_to_use():
  with pytest.raises(ValueError, match=r"weight_gather='per_layer'.*"
                     r"per_micro_batch.*per_step"):
    loop.build(config(weight_gather="per_layer"), VOCAB,
               np.ones(VOCAB, np.float32))
  c = config(weight_gather="per_step")
  c.mesh.shape = (1, 4, 2, 1)
  with pytest.raises(ValueError, match=r"'per_step' needs mesh context 1"):
    loop.build(c, VOCAB, np.ones(VOCAB, np.float32))


def test_state_check_counts_the_gathered_copy():
  """7B on 8 devices: the "per_step" copy (bf16 matrices, fp32 norm scales)
  and its fp32 accumulator are whole on every device, and the start-up
  check counts them with the state."""
  c = config_base.lm_config("7b")
  c.mesh.shape, c.seq_len = (1, 8, 1, 1), 4096
  c.model.update(remat_policy="full", dtype="bfloat16")
  c.train.update(grad_accum=1, optimizer_offload=False,
                 param_offload=False, weight_gather="per_step")
  setup = loop.build(c, VOCAB, np.ones(VOCAB, np.float32))
  params = jax.tree_util.tree_leaves_with_path(setup.abstract_state.params)
  gathered = loop.gathered_bytes(setup.placement,
                                 setup.abstract_state.params, "bfloat16")
  # Each weight: its copy (2 bytes, 4 for norm scales) + accumulator (4).
  assert gathered == sum(x.size * (8 if "scale" in jax.tree_util.keystr(p)
                                   else 6) for p, x in params)
  assert 6e9 * 6 < gathered < 7e9 * 6  # 7B: ~38.9e9 bytes per device.
  state = sharding.bytes_by_memory_kind(setup.abstract_state,
                                        setup.state_shardings)["device"]
  sharding.check_state_fits(state, setup.mesh, 0.5, 80 * 2**30)
  with pytest.raises(ValueError, match=r"weight_gather='per_step'"):
    sharding.check_state_fits(state, setup.mesh, 0.5, 80 * 2**30, gathered)
