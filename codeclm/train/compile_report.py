"""The numbers --mode=compile reports per program, and the verdict's words.

Per-chip memory (HBM, and host memory beside it: offloaded activations or
optimizer state) and FLOPs of a compiled program (or, when it did not fit,
what XLA's RESOURCE_EXHAUSTED error says), the knobs to turn when a step does
not fit, and the report as a text table.

Signature: `knobs(model_cfg, tc, setup, impl, over_bytes, *, batch_size,
seq_len)`, the config's model and train sections, never the whole config;
`sample_knobs(sample, over_bytes)` when a sampler program is the worst.
"""

import re

import jax.numpy as jnp

from codeclm.train import tpu_topology


_KINDS = dict(argument="argument_size_in_bytes", output="output_size_in_bytes",
              alias="alias_size_in_bytes", temporary="temp_size_in_bytes",
              code="generated_code_size_in_bytes")


def memory(compiled) -> dict:
  """Bytes per chip by kind, and the total the chip must hold at once: in
  HBM (`total`, what the verdict reads) and in the host's memory
  (`host_total`: activations a remat policy offloads, host arguments)."""
  m = compiled.memory_analysis()
  out = {}
  for prefix in ("", "host_"):
    for kind, field in _KINDS.items():
      out[prefix + kind] = getattr(m, prefix + field)
    # Donated (aliased) outputs reuse their arguments' buffers.
    out[prefix + "total"] = (
        out[prefix + "argument"] + out[prefix + "output"]
        - out[prefix + "alias"] + out[prefix + "temporary"]
        + out[prefix + "code"])
  return out


def collective_bytes(program: dict) -> int:
  """Bytes per step per chip of a program's counted collectives, all ops."""
  return sum(c["bytes"] for c in program.get("collectives", {}).values())


def xla_flops(compiled) -> float | None:
  """XLA's FLOPs count (a while loop's body once), None if it has none."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost["flops"]) if cost and "flops" in cost else None


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def exhausted_numbers(message: str) -> dict:
  """Bytes in XLA's "... required for HLO temporaries (24.53G) exceeds
  available HBM (15.75G)": the temporaries alone (it stops there) and HBM."""
  nums = [float(v) * _UNITS[u] for v, u in re.findall(
      r"\((\d+(?:\.\d+)?)([KMGT]?)\)", message)]
  if len(nums) < 2:
    return {}
  return dict(temporary=int(nums[0]), total=int(nums[0]),
              available=int(nums[1]))


def knobs(model_cfg, tc, setup, impl: str, over_bytes: float, *,
          batch_size: int, seq_len: int) -> list[str]:
  """What to turn when a step does not fit, most effective first.
  `model_cfg` and `tc`: the config's model and train sections."""
  out = []
  m, chips = model_cfg, setup.mesh.size
  rows = batch_size // (setup.mesh.shape["data"] * setup.mesh.shape["fsdp"])
  if impl == "xla" and seq_len >= 2048:
    out.append("model.attention_impl='splash' (XLA attention stores the "
               f"[rows, heads, {seq_len}, {seq_len}] logits)")
  if m.remat_policy in ("full", "nothing_saveable"):
    # The saved layer inputs: L x rows x (length / context) x width.
    saved = (m.num_layers * max(rows // tc.grad_accum, 1) * seq_len
             // setup.mesh.shape["context"] * m.emb_dim
             * jnp.dtype(m.dtype).itemsize)
    out.append("model.remat_policy='offload_layer_inputs' (the saved layer "
               f"inputs, {saved / tpu_topology.GIB:.2f} GiB per chip, move "
               "to host memory)")
  elif not m.remat_policy.startswith("offload_"):
    out.append(f"model.remat_policy='full' (now {m.remat_policy!r})")
  if rows // tc.grad_accum > 1:
    out.append(f"train.grad_accum={tc.grad_accum * 2} (each chip "
               f"holds {rows // tc.grad_accum} rows per micro-batch)")
  if setup.mesh.shape["data"] > 1:
    out.append(f"mesh.shape: move data ({setup.mesh.shape['data']}) into "
               "fsdp, so parameters and optimizer state are split over "
               f"{chips} chips, not {chips // setup.mesh.shape['data']}")
  out.append(f"a larger slice: {over_bytes / tpu_topology.GIB:.2f} GiB per "
             "chip over")
  return out


def sample_knobs(sample: dict, over_bytes: float) -> list[str]:
  """What to turn when a sampler program does not fit; `sample`: the
  report's entry for the sampler (compile.py)."""
  out = []
  if sample["reshard_params"]:
    out.append(
        "sample.reshard_params=False (the weights stay sharded as trained, "
        "not a replicated copy of "
        f"{sample['weights_bytes_per_chip'] / tpu_topology.GIB:.2f} GiB per "
        "chip; or lower sample.max_copy_fraction for 'auto')")
  per_chip = sample["rows"] // sample["batch_multiple"]
  if per_chip > 1:
    out.append(f"sample.batch_size={sample['rows'] // 2} (each chip holds "
               f"{per_chip} rows' KV caches)")
  out.append(f"a larger slice: {over_bytes / tpu_topology.GIB:.2f} GiB per "
             "chip over")
  return out


def table(report: dict) -> str:
  """The report as a small text table."""
  gib = lambda b: "-" if b is None else f"{b / tpu_topology.GIB:.2f}"
  lines = [
      f"{report['topology']} ({report['libtpu_topology']}, "
      f"{report['chips']} chips of {report['device_kind']}, "
      f"{gib(report['hbm_bytes_per_chip'])} GiB HBM), mesh {report['mesh']}, "
      f"attention {report['config']['attention_resolved']}, remat "
      f"{report['config']['remat_policy']}",
      "| program | args GiB | temp GiB | out GiB | code GiB | total GiB | "
      "host GiB | collectives GiB/step | compile s |",
      "|---|---|---|---|---|---|---|---|---|"]
  for r in report["programs"]:
    m = r["memory"]
    moved = collective_bytes(r)
    lines.append(
        f"| {r['name']} | {gib(m.get('argument'))} | "
        f"{gib(m.get('temporary'))} | {gib(m.get('output'))} | "
        f"{gib(m.get('code'))} | {gib(m.get('total'))}"
        f"{'' if r['fits'] else ' (RESOURCE_EXHAUSTED)'} | "
        f"{gib(m.get('host_total'))} | "
        f"{gib(moved) if r['fits'] else '-'} | {r['compile_s']:.0f} |")
  if report.get("sample"):
    s = report["sample"]
    lines.append(f"Sampling weights: {s['layout']}, "
                 f"{gib(s['weights_bytes_per_chip'])} GiB per chip "
                 f"({s['why']}).")
  f = report["flops"]
  if f["xla_per_chip"]:
    lines.append(f"FLOPs per chip per train step: XLA {f['xla_per_chip']:.3g}"
                 f", model {f['model_per_chip']:.3g} ({f['note']})")
  v = report["verdict"]
  if v["fits"]:
    lines.append(f"FITS: the largest program ({v['worst']}) needs "
                 f"{gib(v['need_bytes'])} of {gib(v['hbm_bytes'])} GiB.")
  else:
    lines.append(f"DOES NOT FIT: {v['worst']} is over by "
                 f"{gib(v['over_bytes'])} GiB per chip. Turn: "
                 + "; ".join(v["knobs"]))
  return "\n".join(lines)
