"""Weight decay by logical axes, and the learning rate of the first update."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from codeclm.model import llama
from codeclm.model import llama_config
from codeclm.train import optimizer
from tests import tiny_config


def boxed_params(scan_layers: bool):
  config = llama_config.LlamaConfig.from_size(
      "tiny", vocab_size=64, max_len=16, scan_layers=scan_layers,
      qk_norm=True, remat_policy="none")
  return jax.eval_shape(llama.Llama(config).init, jax.random.key(0),
                        jnp.zeros((1, 8), jnp.int32))["params"]


def decayed_names(scan_layers: bool) -> dict[str, bool]:
  """{path with the layer index dropped: decayed?} over every parameter."""
  mask = optimizer.decay_mask(boxed_params(scan_layers))
  out = {}
  for path, decayed in jax.tree_util.tree_leaves_with_path(mask):
    name = re.sub(r"layers_\d+", "layers", jax.tree_util.keystr(path))
    assert out.setdefault(name, decayed) == decayed, name
  return out


def test_scanned_and_unscanned_decay_the_same_parameters():
  scanned, unscanned = decayed_names(True), decayed_names(False)
  assert scanned == unscanned
  no_decay = sorted(k for k, v in scanned.items() if not v)
  assert no_decay == sorted(
      f"['{p}']['scale']" for p in (
          "final_norm", "layers']['attn_norm", "layers']['mlp_norm",
          "layers']['attn']['q_norm", "layers']['attn']['k_norm"))
  for name in ("['embedding']", "['head']", "['layers']['attn']['q_proj']",
               "['layers']['mlp']['down_proj']"):
    assert scanned[name], name


@pytest.mark.parametrize("scan_layers", [True, False])
def test_zero_gradient_moves_matrices_but_not_norm_scales(scan_layers):
  boxed = boxed_params(scan_layers)
  params = jax.tree.map(lambda s: jnp.full(s.shape, 2.0, s.dtype),
                        jax.tree.map(lambda b: b.value, boxed,
                                     is_leaf=lambda x: hasattr(x, "names")))
  tc = tiny_config.get_config().train
  tc.weight_decay = 0.1
  tx, _ = optimizer.make_optimizer(tc, optimizer.decay_mask(boxed))
  opt_state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, opt_state, params)
  new = optax.apply_updates(params, updates)
  layers = new["layers"] if scan_layers else new["layers_0"]
  for scale in (new["final_norm"]["scale"], layers["attn_norm"]["scale"],
                layers["mlp_norm"]["scale"]):
    np.testing.assert_array_equal(scale, 2.0)
  for matrix in (new["embedding"], new["head"], layers["attn"]["q_proj"]):
    assert np.all(np.asarray(matrix) < 2.0)  # Decayed towards 0.


def test_a_parameter_without_logical_names_is_an_error():
  with pytest.raises(ValueError, match=r"\['w'\] has no logical axis names"):
    optimizer.decay_mask({"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)})


def test_first_update_uses_a_nonzero_learning_rate():
  tc = tiny_config.get_config().train
  tc.update(lr=1e-3, warmup_steps=4, steps=10, end_lr_ratio=0.1)
  schedule = optimizer.make_schedule(tc)
  lrs = [float(schedule(c)) for c in range(tc.steps)]
  np.testing.assert_allclose(lrs[:4], [2.5e-4, 5e-4, 7.5e-4, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(lrs[-1], 1e-4, rtol=1e-6)  # The last update.
  # The first real update moves the parameters.
  params = {"w": jnp.ones((2, 2))}
  tx, _ = optimizer.make_optimizer(tc, {"w": True})
  updates, _ = tx.update({"w": jnp.ones((2, 2))}, tx.init(params), params)
  assert np.all(np.asarray(updates["w"]) < 0)
