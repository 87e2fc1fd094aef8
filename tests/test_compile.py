"""--mode=compile: TPU topologies compiled on this CPU host through libtpu.

The compile tests need libtpu (the [tpu] extra, which CI installs); the name,
mesh and missing-libtpu checks run everywhere. Models are 1-layer and narrow
so that each compile takes seconds.
"""

import importlib.util
import json
import os
import sys

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from codeclm.train import compile as aot
from codeclm.train import hlo_stats
from codeclm.train import tpu_topology

sys.path.insert(0, os.path.dirname(__file__))
import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="needs libtpu: pip install -e '.[tpu]' (CI installs it)")


def small_config(topology, attention, seq_len=512, batch_size=8,
                 steps=("train",)):
  c = tiny_config.get_config()
  c.model.num_layers = 1
  c.model.dtype = "bfloat16"
  c.model.remat_policy = "full"
  c.model.attention_impl = attention
  c.seq_len = seq_len
  c.batch_size = batch_size
  c.mesh.shape = (1, -1, 1, 1)
  c.compile.topology = topology
  c.compile.steps = steps
  return c


@pytest.mark.parametrize("name,libtpu_name,chips", [
    ("v4-32", "v4:2x2x4", 16),
    ("v5litepod-256", "v5e:16x16", 256),
    ("v5e-256", "v5e:16x16", 256),
    ("v5e-4", "v5e:2x2", 4),
    ("v5e-8", "v5e:2x4", 8),
    ("v5p-8", "v5p:2x2x1", 4),
    ("v5p-64", "v5p:2x4x4", 32),
    ("v5p-128", "v5p:4x4x4", 64),
    ("v6e-64", "v6e:8x8", 64),
    ("v6e-1", "v6e:1x1", 1),
])
def test_cloud_names_translate_for_libtpu(name, libtpu_name, chips):
  t = tpu_topology.parse_topology(name)
  assert (t.libtpu_name, t.chips) == (libtpu_name, chips)


@needs_libtpu
@pytest.mark.parametrize("name", ["v5e-1", "v6e-1", "v5e-4"])
def test_slices_of_one_chip_have_their_device(name):
  """A one-chip slice is smaller than libtpu's default 2x2-chip host."""
  devices = tpu_topology.topology_devices(tpu_topology.parse_topology(name))
  assert len(devices) == tpu_topology.parse_topology(name).chips
  assert devices[0].platform == "tpu"


def test_unknown_topology_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"Unknown TPU topology 'v9-8'.*v5e-N"):
    tpu_topology.parse_topology("v9-8")
  with pytest.raises(ValueError, match=r"v5e slices come in sizes \[1, 4, 8"):
    tpu_topology.parse_topology("v5e-3")


def test_libtpu_workaround_only_where_needed_and_never_over_the_user():
  """v5p-8 gets its all-reduce-scatter fusion turned off (libtpu aborts
  there otherwise; benchmarks/libtpu_v5p8.py); other slices get nothing;
  a value the user set for that flag stays, other flags are kept."""
  flag = "--xla_tpu_enable_all_reduce_scatter_fusion"
  v5p8 = tpu_topology.parse_topology("v5p-8")
  env = {"LIBTPU_INIT_ARGS": "--xla_foo=1"}
  assert tpu_topology.apply_libtpu_workarounds(v5p8, env) == (
      f"{flag}=false",)
  assert env["LIBTPU_INIT_ARGS"] == f"--xla_foo=1 {flag}=false"
  assert tpu_topology.apply_libtpu_workarounds(v5p8, env) == ()  # Once.
  env = {"LIBTPU_INIT_ARGS": f"{flag}=true"}
  assert tpu_topology.apply_libtpu_workarounds(v5p8, env) == ()
  assert env["LIBTPU_INIT_ARGS"] == f"{flag}=true"
  env = {}
  assert tpu_topology.apply_libtpu_workarounds(
      tpu_topology.parse_topology("v5p-16"), env) == ()
  assert not env
  vm = {"TPU_ACCELERATOR_TYPE": "v5p-8"}  # What a Cloud TPU VM sets.
  assert tpu_topology.workarounds_for_this_vm(vm) == (f"{flag}=false",)
  assert tpu_topology.workarounds_for_this_vm({}) == ()


def test_mesh_that_does_not_divide_names_the_axis():
  v5e16 = tpu_topology.parse_topology("v5e-16")
  with pytest.raises(ValueError, match="the fsdp axis \\(3\\) does not divide"):
    tpu_topology.check_mesh((1, 3, 1, -1), v5e16)
  with pytest.raises(ValueError, match="covers 8 devices.*put -1"):
    tpu_topology.check_mesh((2, 4, 1, 1), v5e16)
  tpu_topology.check_mesh((2, -1, 1, 2), v5e16)  # Fine.


def test_without_libtpu_says_which_extra(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda n, *a: None if n == "libtpu" else real(n, *a))
  with pytest.raises(RuntimeError, match=r"pip install -e '\.\[tpu\]'"):
    tpu_topology.topology_devices(tpu_topology.parse_topology("v5e-4"))


@needs_libtpu
def test_report_of_every_step(tmp_path, capsys):
  config = small_config("v5e-4", "splash",
                        steps=("train", "eval", "sample"))
  report = aot.run(config, str(tmp_path))
  assert json.loads((tmp_path / "compile_report.json").read_text()) == (
      json.loads(json.dumps(report)))
  assert report["libtpu_topology"] == "v5e:2x2"
  assert report["device_kind"] == "TPU v5 lite"
  assert report["config"]["attention_resolved"] == "splash"
  assert [p["name"].split(" (")[0] for p in report["programs"]] == [
      "train step", "eval step", "sample prepare", "sample prefill",
      "sample decode"]
  assert report["sample"]["layout"] == "bfloat16 replicated over data,fsdp"
  for program in report["programs"]:
    assert program["fits"]
    kinds = {"argument", "output", "alias", "temporary", "code", "total"}
    assert set(program["memory"]) == kinds | {f"host_{k}" for k in kinds}
    assert program["memory"]["argument"] > 0
    assert (tmp_path / program["hlo"]).stat().st_size > 0  # Kept, gzipped.
  train = report["programs"][0]
  # fsdp over 4 chips: the step gathers the weights (bf16, layer by layer).
  assert train["collectives"]["all-gather"]["bytes"] > 0
  assert report["flops"]["xla_per_chip"] > 0
  assert report["flops"]["model_per_chip"] > 0
  assert report["verdict"]["fits"] and report["verdict"]["need_bytes"] < (
      report["hbm_bytes_per_chip"])
  assert "FITS" in capsys.readouterr().out


@needs_libtpu
def test_ring_compiles_for_tpu_with_tiled_blocks(tmp_path):
  """mesh.context_strategy="ring" over context 4 on v5e-4: splash cannot
  serve the ring, so its blocks run the tiled loop, and the report says so."""
  c = small_config("v5e-4", "splash")
  c.mesh.shape, c.mesh.context_strategy = (1, 1, 4, 1), "ring"
  report = aot.run(c, str(tmp_path))
  assert report["config"]["attention_resolved"] == "ring of tiled blocks"
  assert report["verdict"]["fits"]
  train = report["programs"][0]
  assert train["collectives"]["collective-permute"]["bytes"] > 0


def sampler_config(mlp_dim=512, param_offload=False, **sample):
  """One layer, wide enough that the weights outweigh TPU tile padding."""
  c = small_config("v5e-4", "splash", seq_len=256, steps=("sample",))
  c.model.update(emb_dim=256, mlp_dim=mlp_dim, num_heads=2, num_kv_heads=2)
  c.train.param_offload = param_offload
  c.sample.update(sample)
  return c


def _programs(report):
  return {p["name"].split(" (")[0]: p for p in report["programs"]}


@needs_libtpu
def test_sampler_programs_hold_the_replicated_copy(tmp_path):
  """Prefill and decode compile on the weights as sampling lays them out:
  with reshard_params a bf16 copy on every chip (made by the prepare step),
  else fp32 split over the 4 fsdp chips; so the copy's arguments are larger
  by the difference, counted here from the parameter count. Weights that
  training keeps in host memory (train.param_offload, on the second) are
  sampled from device memory, as a sampler restores them."""
  reports = {r: aot.run(sampler_config(reshard_params=r, param_offload=not r),
                        str(tmp_path / str(r))) for r in (True, False)}
  copy, kept = (reports[r]["sample"] for r in (True, False))
  assert copy["layout"] == "bfloat16 replicated over data,fsdp"
  assert kept["layout"] == "float32 sharded as trained"
  assert list(_programs(reports[True])) == [
      "sample prepare", "sample prefill", "sample decode"]
  assert list(_programs(reports[False])) == ["sample prefill",
                                             "sample decode"]
  # Parameters: nearly all bf16 in the copy (norm scales stay fp32), and
  # fp32 over 4 chips as trained (an unsplit vocabulary dim aside).
  params = copy["weights_bytes_per_chip"] / 2
  assert abs(kept["weights_bytes_per_chip"] - params) < 0.1 * params, kept
  extra = copy["weights_bytes_per_chip"] - kept["weights_bytes_per_chip"]
  assert extra > 0.8 * params
  for name in ("sample prefill", "sample decode"):
    args = {r: _programs(reports[r])[name]["memory"]["argument"]
            for r in (True, False)}
    assert abs(args[True] - args[False] - extra) < 0.1 * extra, (name, args)
  prepare = _programs(reports[True])["sample prepare"]["memory"]
  assert prepare["output"] >= 0.9 * copy["weights_bytes_per_chip"]


@needs_libtpu
def test_auto_layout_follows_the_chips_memory(tmp_path, capsys):
  """reshard_params="auto" (the default) replicates on a v5e chip's 16 GiB,
  and keeps the weights sharded once the copy is over max_copy_fraction of
  it; the table says which layout was compiled, and why."""
  # Programs of their own: libtpu cannot reload another test's from JAX's
  # persistent cache (and warns).
  report = aot.run(sampler_config(768), str(tmp_path / "default"))
  assert report["sample"]["setting"] == "auto"
  assert report["sample"]["reshard_params"], report["sample"]
  assert "sample prepare" in _programs(report)
  tiny = aot.run(sampler_config(768, max_copy_fraction=1e-6),
                 str(tmp_path / "tiny"))
  assert not tiny["sample"]["reshard_params"], tiny["sample"]
  assert list(_programs(tiny)) == ["sample prefill", "sample decode"]
  assert "over 1e-06 of its 16.00 GiB" in tiny["sample"]["why"]
  assert ("Sampling weights: float32 sharded as trained"
          in capsys.readouterr().out)


@needs_libtpu
def test_splash_temporaries_are_a_fraction_of_xla(tmp_path):
  """At 4,096 tokens XLA stores [rows, heads, T, T] logits; splash does not.

  Measured (v5p-8, 1 row per chip, 4 heads): splash 0.088 of XLA's
  temporaries; asserted < 1/5.
  """
  temps = {}
  for impl in ("splash", "xla"):
    report = aot.run(small_config("v5p-8", impl, seq_len=4096, batch_size=4),
                     str(tmp_path / impl))
    assert report["config"]["attention_resolved"] == impl
    temps[impl] = report["programs"][0]["memory"]["temporary"]
  print(f"splash / xla temporaries: {temps['splash'] / temps['xla']:.3f}")
  assert temps["splash"] < temps["xla"] / 5, temps


@needs_libtpu
def test_a_config_that_cannot_fit_gets_the_verdict(tmp_path):
  # XLA attention at 16K tokens, 4 rows per v5e chip (data-only mesh): the
  # logits alone are 4 x 4 heads x 16K^2 x 4 bytes = 17 GiB per chip.
  config = small_config("v5e-4", "xla", seq_len=16384, batch_size=16)
  config.mesh.shape = (-1, 1, 1, 1)
  report = aot.run(config, str(tmp_path))
  verdict = report["verdict"]
  assert not verdict["fits"]
  assert verdict["over_bytes"] > 0
  assert "attention_impl='splash'" in verdict["knobs"][0]
  assert "RESOURCE_EXHAUSTED" in report["programs"][0]["error"]


@needs_libtpu
def test_collective_bytes_equal_the_closed_form():
  """A scan of N steps, each gathering K fsdp-sharded [D, D] bf16 weights
  (the all-gathers that feed a matmul become TPU async collective fusions:
  one op, copied into its start, overlap and done fusions) and a psum of D
  floats after a Pallas kernel (whose multi-line kernel_metadata once ended
  the computation's parse early): the count is K*N gathers of D*D*2 bytes
  and N all-reduces of D*4 bytes, each once."""
  n, d, k, rows = 5, 256, 3, 8
  mesh = _mesh("v5e-4")

  def add_one(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1

  def step(h, w_shards):
    for w_shard in w_shards:
      w = jax.lax.all_gather(w_shard, "x", axis=0, tiled=True)
      h = jnp.tanh(jnp.dot(h.astype(jnp.bfloat16), w,
                           preferred_element_type=jnp.float32))
    h = pl.pallas_call(add_one, out_shape=jax.ShapeDtypeStruct(h.shape,
                                                               h.dtype),
                       metadata={"note": "multi-line in the HLO text"})(h)
    return h + jax.lax.psum(h.sum(0), "x"), None

  f = jax.jit(jax.shard_map(
      lambda h, ws: jax.lax.scan(step, h, ws)[0], mesh=mesh,
      in_specs=(P("x"), [P(None, "x")] * k), out_specs=P("x"),
      check_vma=False))
  weights = jax.ShapeDtypeStruct((n, d, d), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P(None, "x")))
  hlo = f.lower(jax.ShapeDtypeStruct((4 * rows, d), jnp.float32,
                                     sharding=NamedSharding(mesh, P("x"))),
                [weights] * k).compile().as_text()
  assert "async_collective_fusion" in hlo  # The copies this test is about.
  assert hlo_stats.collectives(hlo) == {
      "all-gather": dict(count=k * n, bytes=k * n * d * d * 2),
      "all-reduce": dict(count=n, bytes=n * d * 4)}


def _mesh(topology):
  return jax.sharding.Mesh(
      np.array(tpu_topology.topology_devices(
          tpu_topology.parse_topology(topology))), ("x",))


@needs_libtpu
def test_windowed_einsum_ring_counts_its_trips():
  """On 16 chips XLA gathers a small fsdp weight for a long activation as a
  windowed einsum: a while loop of collective-permutes, a bidirectional ring
  whose unsigned counter steps by 2 to 8 (4 trips of 4 permutes), after one
  permute before it: 17 shards of D/16 rows per gathered [D, M] weight. A
  trip count read from the loop's bound alone (8) doubles it; one that finds
  no signed bound (1) quarters it."""
  n, d, m, rows = 3, 64, 64, 512
  mesh = _mesh("v5e-16")

  def f(h, ws):
    step = lambda h, w: (jnp.tanh(jnp.dot(
        h.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)), None)
    return jax.lax.scan(step, h, ws)[0]

  hlo = jax.jit(f, out_shardings=NamedSharding(mesh, P("x"))).lower(
      jax.ShapeDtypeStruct((16 * rows, d), jnp.float32,
                           sharding=NamedSharding(mesh, P("x"))),
      jax.ShapeDtypeStruct((n, d, m), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P(None, "x")))
  ).compile().as_text()
  assert "windowed_dot_general" in hlo
  shard = d // 16 * m * 2
  assert hlo_stats.collectives(hlo) == {
      "collective-permute": dict(count=n * 17, bytes=n * 17 * shard)}


def test_a_host_computation_does_not_hide_the_entry():
  """Offloading (remat or optimizer state to host) adds computations that
  end with `}, execution_thread="host"`: the parse once took ENTRY for part
  of such a computation and counted no collective at all."""
  hlo = "\n".join([
      "%host_side (p: f32[4]) -> f32[4] {",
      "  ROOT %p = f32[4]{0} parameter(0)",
      '}, execution_thread="host"',
      "",
      "ENTRY %main (a: f32[4]) -> f32[16] {",
      "  %a = f32[4]{0} parameter(0)",
      "  ROOT %all-gather = f32[16]{0} all-gather(%a), channel_id=1, "
      "replica_groups={{0,1,2,3}}, dimensions={0}",
      "}"])
  assert hlo_stats.collectives(hlo) == {"all-gather": dict(count=1,
                                                           bytes=64)}
