r"""Memory of context attention per strategy, compiled for a TPU slice.

  python benchmarks/context_attention_memory.py --topology=v5e-8
  python benchmarks/context_attention_memory.py --topology=v5e-32 --forward

One attention call over a window split on a context axis of every chip of
the slice (mesh (1, 1, C, 1)), load-balanced, bf16, compiled ahead of time
(libtpu, no TPU needed) for each (strategy, kernel): "all_gather" gathers
K/V over the axis and attends with splash (or the given kernel); "ring"
passes K/V blocks around it (codeclm/model/context_attention.py). Prints
XLA's temporaries per chip for the gradient of the call under remat
"nothing_saveable" (or the forward pass with --forward). Temporaries are
HBM only: kernels' on-chip VMEM is not in them, so tiny cases read low.
"""

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp

from codeclm.model import context_attention
from codeclm.model import sharding
from codeclm.train import tpu_topology

_TOPOLOGY = flags.DEFINE_string("topology", "v5e-8", "Cloud TPU slice.")
_SEQ = flags.DEFINE_integer("seq_len", 32_768, "Window length T.")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads (and KV heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "F.")
_FORWARD = flags.DEFINE_bool("forward", False, "The forward pass alone.")
_RUNS = flags.DEFINE_list(
    "runs", ["ring:tiled", "all_gather:splash", "ring:xla"],
    "strategy:kernel pairs to compile.")


def temporaries(mesh, strategy: str, impl: str) -> int:
  """XLA's temporary bytes per chip for one compiled attention call."""
  t, h, f = _SEQ.value, _HEADS.value, _HEAD_DIM.value
  split = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(None, "context"))
  arg = lambda: jax.ShapeDtypeStruct((1, t, h, f), jnp.bfloat16,
                                     sharding=split)
  attend = lambda q, k, v: context_attention.attend(
      q, k, v, None, impl=impl, balance=True, strategy=strategy)

  def loss(q, k, v):
    out = jax.checkpoint(attend, policy=jax.checkpoint_policies
                         .nothing_saveable)(q, k, v)
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))

  fn = attend if _FORWARD.value else jax.grad(loss, argnums=(0, 1, 2))
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    compiled = jax.jit(fn).lower(arg(), arg(), arg()).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main(argv):
  del argv
  topology = tpu_topology.parse_topology(_TOPOLOGY.value)
  devices = tpu_topology.topology_devices(topology)
  mesh = sharding.make_mesh((1, 1, len(devices), 1), devices)
  what = "forward" if _FORWARD.value else "gradient (remat nothing_saveable)"
  print(f"{topology.name}: context {len(devices)}, T={_SEQ.value}, "
        f"{_HEADS.value} heads of {_HEAD_DIM.value}, bf16, {what}")
  for run in _RUNS.value:
    strategy, impl = run.split(":")
    mib = temporaries(mesh, strategy, impl) / 2**20
    print(f"  {strategy:10s} {impl:7s} temporaries {mib:8.1f} MiB per chip")


if __name__ == "__main__":
  app.run(main)
