"""codeclm Llama against the reference: Hugging Face transformers (PyTorch)."""

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from codeclm.hf import weights as hf_weights  # pylint: disable=g-import-not-at-top,wrong-import-position
from codeclm.model import llama  # pylint: disable=g-import-not-at-top,wrong-import-position
from codeclm.model import llama_config  # pylint: disable=g-import-not-at-top,wrong-import-position


@functools.lru_cache(maxsize=None)
def hf_model(num_kv_heads: int):
  torch.manual_seed(num_kv_heads)
  config = transformers.LlamaConfig(
      hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=num_kv_heads, vocab_size=300,
      rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False, max_position_embeddings=128)
  model = transformers.LlamaForCausalLM(config).eval().float()
  with torch.no_grad():  # HF zero-inits nothing we care about, but make norm
    for name, p in model.named_parameters():  # scales non-trivial too.
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
  return model


@pytest.mark.parametrize("num_kv_heads", [4, 2])
@pytest.mark.parametrize("scan_layers", [True, False])
def test_logits_match_transformers(num_kv_heads, scan_layers):
  model = hf_model(num_kv_heads)
  config = hf_weights.config_from_hf(model.config, dtype="float32",
                             remat_policy="none", scan_layers=scan_layers)
  assert (config.num_kv_heads, config.head_dim, config.rope_theta) == (
      num_kv_heads, 16, 1e4)
  params = hf_weights.params_from_hf(model.state_dict(), config)
  tokens = np.random.default_rng(0).integers(0, 300, (2, 12))
  with torch.no_grad():
    want = model(torch.from_numpy(tokens)).logits.numpy()
  got = jax.jit(llama.Llama(config).apply)({"params": params},
                                            tokens.astype(np.int32))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_is_exact(scan_layers):
  model = hf_model(2)
  config = hf_weights.config_from_hf(model.config, scan_layers=scan_layers)
  sd = model.state_dict()
  back = hf_weights.params_to_hf(hf_weights.params_from_hf(sd, config), config)
  assert set(back) == set(sd)
  for name, value in sd.items():
    assert back[name].dtype == np.float32
    np.testing.assert_array_equal(back[name], value.numpy(), err_msg=name)
  # And HF accepts it back.
  model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})


def test_codeclm_init_exports_to_transformers():
  """codeclm's own params, exported, give HF the same logits."""
  config = llama_config.LlamaConfig.from_size(
      "tiny", vocab_size=300, dtype="float32", remat_policy="none")
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  tokens = np.random.default_rng(1).integers(0, 300, (1, 9)).astype(np.int32)
  params = nn.meta.unbox(jax.jit(llama.Llama(config).init)(
      jax.random.key(0), tokens)["params"])
  hf_config = transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
      rms_norm_eps=1e-5, rope_theta=1e4, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(hf_config).eval().float()
  model.load_state_dict({k: torch.from_numpy(v) for k, v in
                         hf_weights.params_to_hf(params, config).items()})
  with torch.no_grad():
    want = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  got = jax.jit(llama.Llama(config).apply)({"params": params}, tokens)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_bf16_state_dict_converts():
  model = hf_model(2)
  config = hf_weights.config_from_hf(model.config)
  sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
  params = hf_weights.params_from_hf(sd, config)
  assert params["embedding"].dtype == np.float32
  np.testing.assert_array_equal(
      params["embedding"], sd["model.embed_tokens.weight"].float().numpy())


def test_mismatches_fail_clearly():
  model = hf_model(2)
  config = hf_weights.config_from_hf(model.config)
  sd = dict(model.state_dict())
  del sd["model.layers.1.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="missing.*up_proj"):
    hf_weights.params_from_hf(sd, config)
  wrong = hf_weights.config_from_hf(model.config, mlp_dim=96)
  with pytest.raises(ValueError, match="shape"):
    hf_weights.params_from_hf(model.state_dict(), wrong)
  biased = transformers.LlamaConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, vocab_size=10, attention_bias=True)
  with pytest.raises(ValueError, match="bias"):
    hf_weights.config_from_hf(biased)
