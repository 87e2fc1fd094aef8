"""The Flax Llama: sizes, counts, cache, packing, scan, remat and precision."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codeclm.model import kv_cache
from codeclm.model import llama
from codeclm.model import llama_config
from codeclm.model import random_init

VOCAB = 300


def tiny(**overrides) -> llama_config.LlamaConfig:
  fields = dict(vocab_size=VOCAB, max_len=64, dtype="float32",
                remat_policy="none")
  return llama_config.LlamaConfig.from_size("tiny", **{**fields, **overrides})


@functools.lru_cache(maxsize=None)
def init_params(config, seed=0):
  """Random params of `config`'s shapes, drawn by numpy (cached).

  Compiling Flax's init costs seconds on 2 cores; tests here need only some
  generic weights (norm scales away from 1 included). Sharded init is tested
  in test_sharding.py.
  """
  return random_init.params(llama.Llama(config), seed, scheme="by_role")


@functools.lru_cache(maxsize=None)
def jitted_apply(config):
  return jax.jit(llama.Llama(config).apply)


def forward(config, params, *args, **kwargs):
  """Jitted apply, one per config (eager Flax dispatch is slow on 2 cores)."""
  return jitted_apply(config)({"params": params}, *args, **kwargs)


def random_tokens(shape, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape),
                     jnp.int32)


def closed_form_count(c: llama_config.LlamaConfig) -> int:
  """Llama-2: 2*V*d + L*(4*d*d + 3*d*f + 2*d) + d, generalised to GQA."""
  d, hf, kf = c.emb_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  return (2 * c.vocab_size * d + c.num_layers * (
      d * (2 * hf + 2 * kf) + 3 * d * c.mlp_dim + 2 * d) + d)


def test_7b_param_count_matches_published_figure():
  config = llama_config.LlamaConfig.from_size("7b", vocab_size=32000)
  assert llama.param_count(config) == 6_738_415_616
  config = llama_config.LlamaConfig.from_size("7b", vocab_size=322)
  d, f, layers = 4096, 11008, 32
  assert llama.param_count(config) == (
      2 * 322 * d + layers * (4 * d * d + 3 * d * f + 2 * d) + d)


@pytest.mark.parametrize("size", sorted(llama_config.SIZES))
def test_every_size_builds(size):
  config = llama_config.LlamaConfig.from_size(size, vocab_size=322)
  assert llama.param_count(config) == closed_form_count(config)


def test_sizes_are_what_their_names_say():
  count = lambda s: llama.param_count(
      llama_config.LlamaConfig.from_size(s, vocab_size=322))
  assert 0.5e6 < count("demo") < 2e6
  assert 80e6 < count("100m") < 130e6
  assert 1.0e9 < count("1b") < 1.2e9


def test_flops_per_token_7b():
  config = llama_config.LlamaConfig.from_size("7b", vocab_size=32000)
  n = 6_738_415_616 - 32000 * 4096 - 32 * 2 * 4096 - 4096  # matmul weights
  assert llama_config.flops_per_token(config, 4096) == (
      6 * n + 12 * 32 * 4096 * 4096)


def test_rope_matches_complex_rotation():
  """rotate_half RoPE == multiplying (x[:F/2] + i x[F/2:]) by e^{i p w}."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = rng.integers(0, 100, (2, 5))
  freq = 1e4 ** (-np.arange(0, 8, 2) / 8)
  z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(
      1j * pos[:, :, None, None] * freq)
  want = np.concatenate([z.real, z.imag], axis=-1)
  got = llama.apply_rope(jnp.asarray(x), jnp.asarray(pos), 1e4)
  np.testing.assert_allclose(got, want, atol=1e-4)


def reference_forward(params, c: llama_config.LlamaConfig, tokens):
  """An independent numpy Llama (causal, fp64, explicit GQA head repeat)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  def norm(x, scale):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + c.norm_eps) * scale

  def rope(x):  # x [T, N, F]
    t, f = x.shape[0], x.shape[-1]
    ang = np.arange(t)[:, None] * c.rope_theta ** (-np.arange(0, f, 2) / f)
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :f // 2], x[..., f // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  out = []
  group = c.num_heads // c.num_kv_heads
  for row in np.asarray(tokens):
    x = p["embedding"][row]
    t = len(row)
    for i in range(c.num_layers):
      w = jax.tree.map(lambda a, i=i: a[i], p["layers"])
      h = norm(x, w["attn_norm"]["scale"])
      q = rope(np.einsum("td,dhf->thf", h, w["attn"]["q_proj"]))
      k = rope(np.einsum("td,dkf->tkf", h, w["attn"]["k_proj"]))
      v = np.einsum("td,dkf->tkf", h, w["attn"]["v_proj"])
      k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
      s = np.einsum("thf,shf->hts", q, k) / np.sqrt(c.head_dim)
      s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
      a = np.exp(s - s.max(-1, keepdims=True))
      a /= a.sum(-1, keepdims=True)
      o = np.einsum("hts,shf->thf", a, v)
      x = x + np.einsum("thf,hfd->td", o, w["attn"]["o_proj"])
      h = norm(x, w["mlp_norm"]["scale"])
      g = h @ w["mlp"]["gate_proj"]
      x = x + (g / (1 + np.exp(-g)) * (h @ w["mlp"]["up_proj"])) @ w[
          "mlp"]["down_proj"]
    out.append(norm(x, p["final_norm"]["scale"]) @ p["head"])
  return np.stack(out)


def test_forward_matches_numpy_reference():
  config = tiny()
  params = init_params(config)
  tokens = random_tokens((2, 10))
  logits = forward(config, params, tokens)
  np.testing.assert_allclose(
      logits, reference_forward(params, config, tokens), atol=1e-4, rtol=1e-4)


def test_cache_prefill_and_decode_match_full_forward():
  """Two rows, prompts of 5 and 3 tokens right-padded to 5, then 5 steps."""
  config = tiny()
  model = llama.Llama(config)
  params = init_params(config)
  seq = random_tokens((2, 10))
  full = jax.jit(model.apply)({"params": params}, seq)
  lengths = np.array([5, 3])
  prompt = np.array(seq[:, :5])
  prompt[1, 3:] = 7  # padding, overwritten by row 1's real tokens later
  apply = jax.jit(lambda p, t, pos, cache: model.apply(
      {"params": p}, t, pos, cache=cache))
  cache = kv_cache.init_cache(config, 2, 16, dtype=jnp.float32)
  logits, cache = apply(params, jnp.asarray(prompt),
                        jnp.broadcast_to(jnp.arange(5), (2, 5)), cache)
  for b, n in enumerate(lengths):
    np.testing.assert_allclose(logits[b, :n], full[b, :n], atol=1e-5,
                               rtol=1e-5)
  pos = lengths.copy()
  for _ in range(5):
    tok = np.take_along_axis(np.asarray(seq), pos[:, None], axis=1)
    logits, cache = apply(params, jnp.asarray(tok), jnp.asarray(pos[:, None]),
                          cache)
    want = full[np.arange(2), pos]
    np.testing.assert_allclose(logits[:, 0], want, atol=1e-5, rtol=1e-5)
    pos += 1
  assert cache.k.shape == (2, 2, 2, 16, 8)  # [L, B, K, S, F]


def test_cache_works_without_scan():
  config = tiny(scan_layers=False)
  params = init_params(config)
  seq = random_tokens((1, 6))
  full = forward(config, params, seq)
  cache = kv_cache.init_cache(config, 1, 8, dtype=jnp.float32)
  logits, cache = forward(config, params, seq[:, :4], cache=cache)
  logits2, _ = forward(config, params, seq[:, 4:6], jnp.array([[4, 5]]),
                       cache=cache)
  np.testing.assert_allclose(
      np.concatenate([logits, logits2], 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_prefill_fast_path_matches_the_masked_path(scan_layers, cache_dtype):
  """positions=None (causal over the T new keys, slab write) == explicit
  arange positions (scatter, [B, 1, T, S] mask), on a cache holding junk."""
  config = tiny(scan_layers=scan_layers)
  params = init_params(tiny())
  if not scan_layers:
    params = {k: v for k, v in params.items() if k != "layers"} | {
        f"layers_{i}": jax.tree.map(lambda a, i=i: a[i],
                                    init_params(tiny())["layers"])
        for i in range(config.num_layers)}
  tokens = random_tokens((2, 6))
  shape = kv_cache.init_cache(config, 2, 16, dtype=cache_dtype).k.shape
  junk = np.random.default_rng(5).normal(size=shape)
  cache = kv_cache.KVCache(k=jnp.asarray(junk, cache_dtype),
                           v=jnp.asarray(-junk, cache_dtype))
  fast_logits, fast = forward(config, params, tokens, cache=cache)
  masked_logits, masked = forward(
      config, params, tokens, jnp.broadcast_to(jnp.arange(6), (2, 6)),
      cache=cache)
  # The masked path attends to K/V read back from the cache (rounded to
  # bf16 there); the fast path to the fresh fp32 ones.
  tol = 1e-5 if cache_dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(fast_logits, masked_logits, atol=tol, rtol=tol)
  np.testing.assert_allclose(fast_logits, forward(config, params, tokens),
                             atol=1e-5, rtol=1e-5)
  for got, want, old in ((fast.k, masked.k, cache.k),
                         (fast.v, masked.v, cache.v)):
    assert got.dtype == cache_dtype and got.shape == shape
    got32, want32 = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got32, want32, atol=tol, rtol=tol)
    # Positions 0..5 were written, the rest kept (cache is [L, B, K, S, F]).
    np.testing.assert_array_equal(np.asarray(got[:, :, :, 6:], np.float32),
                                  np.asarray(old[:, :, :, 6:], np.float32))
    assert not np.array_equal(np.asarray(got[:, :, :, :6], np.float32),
                              np.asarray(old[:, :, :, :6], np.float32))


def unrolled_params(config):
  """init_params(config) with the layer stack split into layers_i."""
  params = init_params(config)
  return {k: v for k, v in params.items() if k != "layers"} | {
      f"layers_{i}": jax.tree.map(lambda a, i=i: a[i], params["layers"])
      for i in range(config.num_layers)}


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_per_layer_cache_matches_the_stacked_one(cache_dtype):
  """Unrolled, rematerialised layers: a prefill and three decode steps give
  the same logits with a per-layer cache as with a stacked one, and the
  same cache contents; a decode step reads its layer's keys in place (the
  stack is sliced, a copy per layer, every step)."""
  config = tiny(scan_layers=False, remat_policy="full")
  params = unrolled_params(tiny(remat_policy="full"))
  tokens = random_tokens((2, 9))
  model = llama.Llama(config)
  step = jax.jit(lambda p, t, pos, c: model.apply(
      {"params": p}, t, pos, cache=c))
  results, hlo = {}, {}
  for per_layer in (False, True):
    cache = kv_cache.init_cache(config, 2, 16, cache_dtype, per_layer=per_layer)
    assert isinstance(cache.k, tuple) == per_layer and cache.length == 16
    logits, cache = forward(config, params, tokens[:, :6], cache=cache)
    outs = [logits]
    for i in range(6, 9):
      pos = jnp.full((2, 1), i, jnp.int32)
      logits, cache = step(params, tokens[:, i:i + 1], pos, cache)
      outs.append(logits)
    results[per_layer] = (np.concatenate(outs, 1), cache)
    hlo[per_layer] = step.lower(params, tokens[:, :1], pos,
                                cache).compile().as_text()
  (stacked, cache_s), (per_layer, cache_p) = results[False], results[True]
  np.testing.assert_array_equal(per_layer, stacked)
  np.testing.assert_allclose(per_layer, forward(config, params, tokens),
                             atol=3e-2 if cache_dtype == jnp.bfloat16
                             else 1e-5)
  for whole, layers in ((cache_s.k, cache_p.k), (cache_s.v, cache_p.v)):
    np.testing.assert_array_equal(np.asarray(whole, np.float32),
                                  np.asarray(jnp.stack(layers), np.float32))
  if cache_dtype == jnp.float32:  # (A bf16 cache is widened either way.)
    one = re.escape(f"[2,{config.num_kv_heads},16,{config.head_dim}]")
    sliced = lambda text: re.findall(
        rf"= f32{one}\S* (?:slice|dynamic-slice|fusion)\(.*"
        r"(?:slice|calls=%[\w.-]*slice)", text)
    assert sliced(hlo[False])  # The copy this layout avoids (can fail).
    assert not sliced(hlo[True]), sliced(hlo[True])[:2]


def test_per_layer_cache_needs_unrolled_layers():
  with pytest.raises(ValueError, match="unrolled"):
    kv_cache.init_cache(tiny(), 1, 8, per_layer=True)


def test_bf16_cache_holds_the_fp32_cache_rounded():
  """The bf16 cache (written through its uint16 bits) holds the fp32 cache's
  values rounded to bf16, at [layer, row, head, position], nothing else."""
  config = tiny()
  params = init_params(config)
  tokens = random_tokens((2, 5))
  pos = jnp.array([[0, 1, 2, 3, 4], [9, 3, 7, 0, 12]])
  caches = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    _, caches[dtype] = forward(config, params, tokens, pos,
                               cache=kv_cache.init_cache(config, 2, 16, dtype))
  written = np.zeros(16, bool)
  written[[9, 3, 7, 0, 12]] = True
  for a32, a16 in ((caches[jnp.float32].k, caches[jnp.bfloat16].k),
                   (caches[jnp.float32].v, caches[jnp.bfloat16].v)):
    a32, a16 = np.asarray(a32), np.asarray(a16.astype(jnp.float32))
    # Layer 0 sees the same inputs: one bf16 rounding apart (later layers
    # also see attention over rounded keys).
    np.testing.assert_allclose(a16[0], a32[0], rtol=2 ** -8, atol=1e-6)
    np.testing.assert_allclose(a16, a32, rtol=0.1, atol=0.05)
    for a in (a32, a16):
      assert (a[:, 1][:, :, written] != 0).all()
      assert (a[:, 1][:, :, ~written] == 0).all()


def test_decode_step_updates_the_cache_in_place():
  """A jitted decode step with a donated bf16 cache neither copies nor
  converts the whole cache (XLA on CPU used to widen it to fp32 per layer)."""
  config = tiny()
  model = llama.Llama(config)
  cache = kv_cache.init_cache(config, 2, 16)
  step = jax.jit(lambda p, t, pos, c: model.apply(
      {"params": p}, t, pos, cache=c), donate_argnums=3)
  hlo = step.lower(init_params(config), jnp.zeros((2, 1), jnp.int32),
                   jnp.array([[3], [5]]), cache).compile().as_text()
  shape = "[" + ",".join(map(str, cache.k.shape)) + "]"
  whole = [line for line in hlo.splitlines()
           if shape in line and "parameter(" not in line]
  assert whole  # The in-place update itself.
  bad = [line.strip()[:120] for line in whole
         if re.search(r"(?<!bitcast-)convert\(|copy\(|f32" + re.escape(shape),
                      line)]
  assert not bad, bad


def test_segment_ids_isolate_packed_sequences():
  config = tiny()
  params = init_params(config)
  a, b = random_tokens((1, 5), seed=2), random_tokens((1, 4), seed=3)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
  positions = jnp.array([list(range(5)) + list(range(4)) + list(range(3))])
  logits = forward(config, params, packed, positions, segments)
  alone_a = forward(config, params, a)
  alone_b = forward(config, params, b)
  np.testing.assert_allclose(logits[:, :5], alone_a, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(logits[:, 5:9], alone_b, atol=1e-5, rtol=1e-5)
  # Without segment ids the second sequence does see the first.
  mixed = forward(config, params, packed, positions)
  assert np.abs(np.asarray(mixed[:, 5:9] - alone_b)).max() > 1e-3


def test_scan_and_unrolled_layers_agree():
  config = tiny()
  params = init_params(config)
  unrolled = {k: v for k, v in params.items() if k != "layers"}
  for i in range(config.num_layers):
    unrolled[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i],
                                           params["layers"])
  tokens = random_tokens((2, 7))
  scanned = forward(config, params, tokens)
  loop = forward(tiny(scan_layers=False), unrolled, tokens)
  np.testing.assert_allclose(scanned, loop, atol=1e-6, rtol=1e-6)
  # Same structure as a fresh unrolled init.
  fresh = init_params(tiny(scan_layers=False))
  assert jax.tree.structure(fresh) == jax.tree.structure(unrolled)


def test_remat_policies_give_same_loss_and_grads():
  tokens = random_tokens((2, 8))
  params = init_params(tiny())
  results = {}
  for policy in llama_config.REMAT_POLICIES:
    if policy == "nothing_saveable":
      continue  # The same policy object as "full".
    model = llama.Llama(tiny(remat_policy=policy))

    def loss(p, model=model):
      logits = model.apply({"params": p}, tokens[:, :-1])
      logp = jax.nn.log_softmax(logits)
      return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    results[policy] = jax.jit(jax.value_and_grad(loss))(params)
  base_loss, base_grads = results.pop("none")
  assert np.isfinite(base_loss)
  for policy, (value, grads) in results.items():
    np.testing.assert_allclose(value, base_loss, rtol=1e-6, err_msg=policy)
    jax.tree.map(lambda x, y, p=policy: np.testing.assert_allclose(
        x, y, atol=1e-6, rtol=1e-5, err_msg=p), grads, base_grads)


def saved_residuals(policy: str, capsys) -> str:
  """What the backward pass keeps from the forward, as JAX prints it."""
  model = llama.Llama(tiny(remat_policy=policy))
  tokens = jnp.zeros((2, 8), jnp.int32)
  params = init_params(tiny())
  jax.ad_checkpoint.print_saved_residuals(
      lambda p: model.apply({"params": p}, tokens).sum(), params)
  return capsys.readouterr().out


def test_remat_policies_save_what_they_name(capsys):
  # Stacked over the scan: q is [L, B, T, H, F], k and v [L, B, T, K, F].
  q, kv = "f32[2,2,8,4,8]", "f32[2,2,8,2,8]"
  full = saved_residuals("full", capsys)
  assert q not in full and kv not in full
  qkv = saved_residuals("qkv_proj", capsys)
  assert qkv.count(q) == 1 and qkv.count(kv) == 2
  assert len(saved_residuals("none", capsys).splitlines()) > len(
      qkv.splitlines()) > len(full.splitlines())


def test_qk_norm_adds_parameters_and_runs():
  config = tiny(qk_norm=True)
  params = init_params(config)
  assert params["layers"]["attn"]["q_norm"]["scale"].shape == (2, 8)
  logits = forward(config, params, random_tokens((1, 4)))
  assert np.isfinite(np.asarray(logits)).all()


def test_bf16_default_runs_with_fp32_params_and_logits():
  config = llama_config.LlamaConfig.from_size("tiny", vocab_size=VOCAB)
  assert config.dtype == "bfloat16" and config.remat_policy == "full"
  model = llama.Llama(config)
  tokens = random_tokens((2, 7))
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  params = init_params(tiny())  # The same fp32 params, already compiled.
  logits = jax.jit(model.apply)({"params": params}, tokens)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  # Close to the fp32 model (bf16 rounding only).
  fp32 = forward(tiny(), params, tokens)
  assert np.abs(np.asarray(logits - fp32)).max() < 0.1 * np.abs(
      np.asarray(fp32)).max()
  grads = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).sum()))(
      params)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_too_long_inputs_fail_clearly():
  config = tiny(max_len=8)
  model = llama.Llama(config)
  params = init_params(tiny())
  with pytest.raises(ValueError, match="max_len"):
    model.apply({"params": params}, jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(ValueError, match="max_len"):
    jax.jit(model.apply)({"params": params}, jnp.zeros((1, 9), jnp.int32))
  with pytest.raises(ValueError, match="positions reach 8"):
    model.apply({"params": params}, jnp.zeros((1, 2), jnp.int32),
                jnp.array([[7, 8]]))
  cache = kv_cache.init_cache(config, 1, 4, dtype=jnp.float32)
  with pytest.raises(ValueError, match="cache"):
    model.apply({"params": params}, jnp.zeros((1, 5), jnp.int32), cache=cache)
  with pytest.raises(ValueError, match="max_len"):
    kv_cache.init_cache(config, 1, 9)


def test_bad_configs_fail_clearly():
  with pytest.raises(ValueError, match="num_kv_heads"):
    llama_config.LlamaConfig.from_size("tiny", vocab_size=10, num_kv_heads=3)
  with pytest.raises(ValueError, match="remat_policy"):
    llama_config.LlamaConfig.from_size("tiny", vocab_size=10,
                                       remat_policy="some")
  with pytest.raises(ValueError, match="vocab_size"):
    llama_config.LlamaConfig.from_size("tiny")
  with pytest.raises(ValueError, match="Unknown model size"):
    llama_config.LlamaConfig.from_size("13b", vocab_size=10)
