r"""--mode=compile: does a config fit a TPU slice, and what does it communicate?

Compiles, on a machine with no accelerator, the train step, the eval step and
the sampler's prefill and decode steps for a named Cloud TPU topology
(libtpu's topology descriptions give the slice's devices), then reports per
chip: argument / output / temporary / code bytes against the chip's HBM with a
verdict (and, when it does not fit, the knobs to turn); XLA's FLOPs next to
the model FLOPs; and the collectives in the compiled HLO with their bytes per
step. Written to <workdir>/compile_report.json and printed as a table; each
program's compiled HLO is kept next to it (train_step.hlo.gz, ...).

  python -m codeclm.main --config=configs/jpeg_lm.py:7b --workdir=/tmp/aot \
      --mode=compile --config.compile.topology=v5p-128 \
      --config.mesh.shape='(1,-1,1)'

Needs libtpu (`pip install -e '.[tpu]'`). GPU targets are out of scope (XLA
needs CUDA to compile for them).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import math
import os
import re
import time

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from codeclm.data import loader
from codeclm.model import attention
from codeclm.model import llama
from codeclm.model import sharding
from codeclm.train import loop

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  libtpu: str            # libtpu's name ("v5e" in "v5e:4x4")
  dims: int              # 2-D or 3-D torus
  per_chip: int          # Cloud TPU names count TensorCores (2) or chips (1)
  hbm_bytes: int         # per chip (data sheet)
  sizes: tuple[int, ...]  # the slice sizes in the name (cores or chips)


# Cloud TPU slice names: v4 and v5p count TensorCores (v5p-8 is 4 chips),
# v5e and v6e count chips.
GENERATIONS = {
    "v4": Generation("v4", 3, 2, 32 * GIB, tuple(2**i for i in range(3, 13))),
    "v5p": Generation("v5p", 3, 2, 95 * GIB,
                      tuple(2**i for i in range(3, 14))),
    "v5e": Generation("v5e", 2, 1, 16 * GIB, (1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": Generation("v6e", 2, 1, 32 * GIB, (1, 4, 8, 16, 32, 64, 128, 256)),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str              # as typed, e.g. "v5litepod-16"
  generation: str        # "v5e"
  chips: int
  grid: tuple[int, ...]  # chips along each torus axis

  @property
  def libtpu_name(self) -> str:
    return f"{GENERATIONS[self.generation].libtpu}:" + "x".join(
        map(str, self.grid))

  @property
  def hbm_bytes(self) -> int:
    return GENERATIONS[self.generation].hbm_bytes


def known_topologies() -> str:
  return "; ".join(
      f"{g}-N with N in {list(spec.sizes)}" + (
          " (TensorCores: 2 per chip)" if spec.per_chip == 2 else " (chips)")
      for g, spec in GENERATIONS.items()) + "; v5litepod-N = v5e-N."


def parse_topology(name: str) -> Topology:
  """A Cloud TPU slice name (v4-32, v5litepod-256, v5e-256, v5p-128, v6e-64)."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  gen = match and ALIASES.get(match.group(1), match.group(1))
  if not match or gen not in GENERATIONS:
    raise ValueError(f"Unknown TPU topology {name!r}; known: "
                     f"{known_topologies()}")
  spec, n = GENERATIONS[gen], int(match.group(2))
  if n not in spec.sizes:
    raise ValueError(f"{name!r}: {gen} slices come in sizes {list(spec.sizes)}"
                     f"; known: {known_topologies()}")
  chips = n // spec.per_chip
  grid = [1] * spec.dims if chips < 4 else [2, 2] + [1] * (spec.dims - 2)
  while math.prod(grid) < chips:  # Double the smallest axis, the last first.
    smallest = min(grid)
    i = max(j for j, g in enumerate(grid) if g == smallest)
    grid[i] *= 2
  return Topology(name, gen, chips, tuple(grid))


def topology_devices(topology: Topology) -> list:
  """The slice's (unattached) devices, from libtpu."""
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(
        "--mode=compile needs libtpu to compile for TPUs: install the [tpu] "
        "extra (pip install -e '.[tpu]').")
  # Without these libtpu looks for a TPU VM's metadata and warns at length.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.name)
  # Only topologies, no chip: other compiling processes (pytest -n 2) may
  # hold libtpu too; without this the second one fails on its lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  hosts = {}
  if topology.chips < 4:  # libtpu's default host of 2x2 chips cannot hold it.
    hosts["chips_per_host_bounds"] = topology.grid + (1,) * (
        3 - len(topology.grid))
  return list(topologies.get_topology_desc(
      platform="tpu", topology_name=topology.libtpu_name, **hosts).devices)


def check_mesh(shape, topology: Topology) -> None:
  """A mesh the slice cannot hold fails here, naming the axis to change."""
  shape = [int(s) for s in shape]
  fixed = {a: s for a, s in zip(sharding.MESH_AXES, shape) if s != -1}
  for axis, size in fixed.items():
    if topology.chips % size:
      raise ValueError(
          f"mesh.shape {tuple(shape)}: the {axis} axis ({size}) does not "
          f"divide the {topology.chips} chips of {topology.name}; change "
          f"mesh.shape's {axis} entry to a divisor of {topology.chips}.")
  if -1 not in shape and math.prod(shape) != topology.chips:
    raise ValueError(
        f"mesh.shape {tuple(shape)} covers {math.prod(shape)} devices but "
        f"{topology.name} has {topology.chips} chips; put -1 in one axis "
        "(e.g. fsdp: mesh.shape=(1,-1,1)).")
  if -1 in shape and topology.chips % math.prod(fixed.values()):
    raise ValueError(
        f"mesh.shape {tuple(shape)}: the fixed axes {fixed} do not divide "
        f"{topology.chips} chips; change one of them.")


# -- what the compiled programs need ------------------------------------------


def _with_sharding(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                        sharding=s),
                      tree, shardings)


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  out = dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
             alias=m.alias_size_in_bytes, temporary=m.temp_size_in_bytes,
             code=m.generated_code_size_in_bytes)
  # Donated (aliased) outputs reuse their arguments' buffers.
  out["total"] = (out["argument"] + out["output"] - out["alias"]
                  + out["temporary"] + out["code"])
  return out


_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
                "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
                "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_OP = re.compile(r"\s(" + "|".join(_COLLECTIVES) + r"|while)(-start)?\(")


def _array_bytes(text: str) -> list[int]:
  return [_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
          for d, dims in _SHAPE.findall(text)]


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
  """HLO text -> {computation: instruction lines}, ENTRY's name.

  A computation ends at a line that is a lone "}": a Pallas kernel's
  frontend attributes (kernel_metadata, e.g. splash attention's) hold
  multi-line JSON whose lines may start with "}" too.
  """
  comps, entry, name = {}, None, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(ENTRY )?%(\S+) .*\{\s*$", line)
    if name is None and head:
      name = head.group(2)
      comps[name] = []
      entry = name if head.group(1) else entry
    elif line.rstrip() == "}":
      name = None
    elif name is not None:
      if line.startswith("  %") or line.startswith("  ROOT %"):
        comps[name].append(line)
      elif comps[name]:  # A continuation of the instruction above.
        comps[name][-1] += line
  return comps, entry


def _defs(lines: list[str]) -> dict[str, str]:
  return {m.group(1): line for line in lines
          if (m := re.match(r"\s*(?:ROOT )?%(\S+) = ", line))}


def _operands(line: str, op: str) -> list[str]:
  m = re.search(r"\s" + re.escape(op) + r"\(([^)]*)\)", line)
  return re.findall(r"%([^\s,)]+)", m.group(1)) if m else []


def _int_constant(line: str | None) -> int | None:
  m = re.search(r"\s[su]\d+\[\][^=]* constant\((-?\d+)\)", line or "")
  return int(m.group(1)) if m else None


def _tuple_index(line: str | None) -> int | None:
  m = re.search(r"get-tuple-element\(%[^)]*\), index=(\d+)", line or "")
  return int(m.group(1)) if m else None


def _trip_count(while_line: str, caller: list[str], cond: list[str],
                body: list[str]) -> int:
  """How often a while loop runs: XLA's known_trip_count when it is there,
  else from its induction variable, i in [start, bound) by step: the
  condition's compare(i, bound), the body's i + step, the init's start.
  Windowed einsum loops (an all-gather or reduce-scatter done as a ring of
  collective-permutes) count by 2 in unsigned ints: a count taken from the
  bound alone would double them."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', while_line)
  if known:
    return int(known.group(1))
  cdefs = _defs(cond)
  root = next((line for line in cond if line.lstrip().startswith("ROOT")), "")
  args = _operands(root, "compare")
  direction = re.search(r"direction=(\w+)", root)
  fallback = max((c for line in cond if (c := _int_constant(line))
                  is not None), default=1)
  if len(args) != 2 or not direction:
    return fallback
  a, b = (cdefs.get(x) for x in args)
  op = direction.group(1)
  if _int_constant(a) is not None:  # bound > i: read it as i < bound.
    a, b = b, a
    op = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(op, op)
  index, bound = _tuple_index(a), _int_constant(b)
  if index is None or bound is None or op not in ("LT", "LE", "NE"):
    return fallback
  bdefs = _defs(body)
  broot = next((line for line in body if line.lstrip().startswith("ROOT")),
               "")
  step = 1
  outs = _operands(broot, "tuple")
  if index < len(outs):
    add = bdefs.get(outs[index], "")
    terms = [_int_constant(bdefs.get(x)) for x in _operands(add, "add")]
    step = next((t for t in terms if t), 1)
  start, defs = 0, _defs(caller)
  init = _operands(while_line, "while")
  inits = _operands(defs.get(init[0], "") if init else "", "tuple")
  if index < len(inits):
    start = _int_constant(defs.get(inits[index])) or 0
  span = bound - start + (1 if op == "LE" else 0)
  return max(0, -(-span // step)) if step > 0 else fallback


def collectives(hlo_text: str) -> dict:
  """Collective ops of a compiled HLO module and their bytes per step.

  Walks the call graph from ENTRY: ops in a while loop's body count once per
  trip (the scanned layers, the micro-batches, a windowed einsum's ring; see
  _trip_count), ops in fusions, calls and async wrappers once per call, each
  branch of a conditional as if it ran (an upper bound; the train step has
  none). One collective counts once per execution
  of the computation that runs it, however many copies the HLO holds: TPU's
  async collective fusion splits one all-gather over a start fusion, the
  compute fusions that overlap it and a done fusion, each with a copy of the
  op under the same channel_id. An op's bytes are its result's (all arrays of
  a combined op; the output of an async start): the gathered array, the
  reduced one, a reduce-scatter's shard.
  """
  comps, entry = _computations(hlo_text)

  totals: dict[str, dict] = {}

  def walk(comp: str, times: int, counted: set) -> None:
    """counted: the collectives already counted in this execution of the
    computation that a while body (or ENTRY) runs, by channel."""
    for line in comps.get(comp, ()):
      op = _OP.search(line)
      if op and op.group(1) == "while":
        body = re.search(r"body=%([^\s,]+)", line)
        cond = re.search(r"condition=%([^\s,]+)", line)
        if body and cond:
          n = _trip_count(line, comps[comp], comps[cond.group(1)],
                          comps[body.group(1)])
          walk(body.group(1), times * n, set())
        continue
      if op:
        channel = re.search(r"channel_id=(\d+)", line)
        key = channel.group(1) if channel else (comp, line.split(" = ")[0])
        if key not in counted:
          counted.add(key)
          arrays = _array_bytes(line[line.index(" = ") + 3:op.start()])
          size = max(arrays, default=0) if op.group(2) else sum(arrays)
          total = totals.setdefault(op.group(1), dict(count=0, bytes=0))
          total["count"] += times
          total["bytes"] += times * size
      for group in re.findall(
          r"\b(?:calls|to_apply|called_computations|branch_computations|"
          r"true_computation|false_computation)=\{?((?:%[^\s,}]+(?:, )?)+)",
          line):
        for called in re.findall(r"%([^\s,}]+)", group):
          walk(called, times, counted)

  if entry is not None:
    walk(entry, 1, set())
  return totals


def _flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float(cost["flops"]) if cost and "flops" in cost else None


def _compile(name: str, fn, args, context, hlo_dir: epath.Path) -> dict:
  """Compiles fn(*args); RESOURCE_EXHAUSTED becomes a result, not a crash.

  The compiled HLO is kept in hlo_dir (gzipped text, one file per program):
  the collectives can be read there, or recounted without recompiling.
  """
  t = time.perf_counter()
  with context():
    lowered = fn.lower(*args)
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return dict(name=name, fits=False, error=str(e).splitlines()[0][:500],
                memory=_exhausted_numbers(str(e)),
                compile_s=time.perf_counter() - t)
  hlo = compiled.as_text()
  hlo_file = hlo_dir / (re.sub(r"\W+", "_", name.split(" (")[0]) + ".hlo.gz")
  hlo_dir.mkdir(parents=True, exist_ok=True)
  hlo_file.write_bytes(gzip.compress(hlo.encode()))
  return dict(name=name, fits=True, memory=_memory(compiled),
              xla_flops=_flops(compiled), collectives=collectives(hlo),
              hlo=hlo_file.name, compile_s=time.perf_counter() - t)


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _exhausted_numbers(message: str) -> dict:
  """Bytes in XLA's "... required for HLO temporaries (24.53G) exceeds
  available HBM (15.75G)": the temporaries alone (it stops there) and HBM."""
  nums = [float(v) * _UNITS[u] for v, u in re.findall(
      r"\((\d+(?:\.\d+)?)([KMGT]?)\)", message)]
  if len(nums) < 2:
    return {}
  return dict(temporary=int(nums[0]), total=int(nums[0]),
              available=int(nums[1]))


# -- the knobs ----------------------------------------------------------------


def knobs(config, setup, impl: str, over_bytes: float) -> list[str]:
  """What to turn when a step does not fit, most effective first."""
  out = []
  m, chips = config.model, setup.mesh.size
  rows = config.batch_size // (setup.mesh.shape["data"]
                               * setup.mesh.shape["fsdp"])
  if impl == "xla" and config.seq_len >= 2048:
    out.append("model.attention_impl='splash' (XLA attention stores the "
               f"[rows, heads, {config.seq_len}, {config.seq_len}] logits)")
  if m.remat_policy not in ("full", "nothing_saveable"):
    out.append(f"model.remat_policy='full' (now {m.remat_policy!r})")
  if rows // config.train.grad_accum > 1:
    out.append(f"train.grad_accum={config.train.grad_accum * 2} (each chip "
               f"holds {rows // config.train.grad_accum} rows per micro-batch)")
  if setup.mesh.shape["data"] > 1:
    out.append(f"mesh.shape: move data ({setup.mesh.shape['data']}) into "
               "fsdp, so parameters and optimizer state are split over "
               f"{chips} chips, not {chips // setup.mesh.shape['data']}")
  out.append(f"a larger slice: {over_bytes / GIB:.2f} GiB per chip over")
  return out


# -- the run ------------------------------------------------------------------


def _sampler_steps(config, setup):
  """The sampler's two programs, built from llama.py alone: prefill of a
  prompt into a fresh cache, and one decode step over that cache."""
  model, sc = setup.model, config.sample
  spec = nn.logical_to_mesh_axes(("batch",), setup.rules)[0]
  axes = spec if isinstance(spec, tuple) else (() if spec is None else (spec,))
  multiple = math.prod(setup.mesh.shape[a] for a in axes)
  rows = -(-sc.batch_size // multiple) * multiple
  cache_len = config.seq_len
  prompt_len = config.compile.sample_prompt_len or cache_len // 2
  cache_dtype = jnp.dtype(sc.cache_dtype)

  def prefill(params, prompts):
    cache = llama.init_cache(model.config, rows, cache_len, cache_dtype)
    logits, cache = model.apply({"params": params}, prompts, cache=cache)
    return logits[:, -1], cache

  def decode(params, tokens, positions, cache):
    logits, cache = model.apply({"params": params}, tokens, positions,
                                cache=cache)
    return logits[:, 0], cache

  with setup.context():
    data = jax.sharding.NamedSharding(
        setup.mesh, nn.logical_to_mesh_axes(("batch", "length"), setup.rules))
    cache_shape = jax.eval_shape(
        lambda: llama.init_cache(model.config, rows, cache_len, cache_dtype))
    cache_sharding = jax.sharding.NamedSharding(
        setup.mesh, sharding._fit(  # pylint: disable=protected-access
            nn.logical_to_mesh_axes(llama.CACHE_AXES, setup.rules),
            cache_shape.k.shape, setup.mesh))
  params = _with_sharding(setup.abstract_state.params,
                          setup.state_shardings.params)
  ints = lambda t: jax.ShapeDtypeStruct((rows, t), jnp.int32, sharding=data)
  cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=cache_sharding), cache_shape)
  return [
      (f"sample prefill ({rows}x{prompt_len})", jax.jit(prefill),
       (params, ints(prompt_len))),
      (f"sample decode ({rows} rows, cache {cache_len})",
       jax.jit(decode, donate_argnums=(3,)),
       (params, ints(1), ints(1), cache)),
  ]


def run(config, workdir: str) -> dict:
  """Compiles every step for config.compile.topology; writes the report."""
  topology = parse_topology(config.compile.topology)
  check_mesh(config.mesh.shape, topology)
  devices = topology_devices(topology)
  vocab = config.data.vocab_size + 2  # BPE entries + BOS/EOS.
  setup = loop.build(config, vocab, np.ones(vocab, np.float32), devices)
  impl = attention.resolve(config.model.attention_impl, "tpu",
                           config.model.dtype, config.seq_len, False)
  batch = {k: jax.ShapeDtypeStruct(
      (config.batch_size, config.seq_len),
      np.float32 if k == "loss_mask" else np.int32,
      sharding=setup.data_sharding) for k in loader.BATCH_KEYS}
  state = _with_sharding(setup.abstract_state, setup.state_shardings)
  steps = tuple(config.compile.steps)
  unknown = set(steps) - {"train", "eval", "sample"}
  if unknown or not steps:
    raise ValueError(f"compile.steps={steps}: use some of 'train', 'eval', "
                     "'sample'.")
  programs = []
  if "train" in steps:
    programs.append(("train step", setup.step_fn, (state, batch)))
  if "eval" in steps:
    programs.append(("eval step", setup.eval_fn, (state.params, batch)))
  if "sample" in steps:
    programs += _sampler_steps(config, setup)

  out = epath.Path(workdir)
  results = []
  for name, fn, args in programs:
    logging.info("Compiling the %s for %s ...", name, topology.name)
    results.append(_compile(name, fn, args, setup.context, out))

  hbm = topology.hbm_bytes
  train_result = results[0] if "train" in steps else {}
  model_flops = setup.flops_per_token * config.batch_size * config.seq_len
  worst = max(results, key=lambda r: r["memory"].get("total", 0))
  need = worst["memory"].get("total", 0)
  fits = all(r["fits"] and r["memory"]["total"] <= hbm for r in results)
  verdict = dict(fits=fits, worst=worst["name"], need_bytes=need,
                 hbm_bytes=hbm)
  if not fits:
    available = worst["memory"].get("available", hbm)
    verdict["over_bytes"] = max(need - available, 0)
    verdict["knobs"] = knobs(config, setup, impl, verdict["over_bytes"])
  report = dict(
      topology=topology.name, libtpu_topology=topology.libtpu_name,
      chips=topology.chips, device_kind=devices[0].device_kind,
      hbm_bytes_per_chip=hbm, mesh=dict(setup.mesh.shape),
      config=dict(size=config.size, seq_len=config.seq_len,
                  batch_size=config.batch_size,
                  grad_accum=config.train.grad_accum,
                  remat_policy=config.model.remat_policy,
                  attention_impl=config.model.attention_impl,
                  attention_resolved=impl, dtype=config.model.dtype),
      programs=results,
      flops=dict(
          model_per_chip=model_flops / topology.chips,
          xla_per_chip=train_result.get("xla_flops"),
          note=("XLA's cost analysis counts a while loop's body once: with "
                "scan_layers one of num_layers layers (and its remat "
                "recomputation); model FLOPs are 6N + attention per token, "
                "no remat (as for MFU)." if config.model.scan_layers else
                "XLA's count includes remat recomputation; model FLOPs "
                "do not.")),
      verdict=verdict)
  out.mkdir(parents=True, exist_ok=True)
  (out / "compile_report.json").write_text(json.dumps(report, indent=1))
  print(table(report))
  return report


def table(report: dict) -> str:
  """The report as a small text table."""
  gib = lambda b: "-" if b is None else f"{b / GIB:.2f}"
  lines = [
      f"{report['topology']} ({report['libtpu_topology']}, "
      f"{report['chips']} chips of {report['device_kind']}, "
      f"{gib(report['hbm_bytes_per_chip'])} GiB HBM), mesh {report['mesh']}, "
      f"attention {report['config']['attention_resolved']}, remat "
      f"{report['config']['remat_policy']}",
      "| program | args GiB | temp GiB | out GiB | code GiB | total GiB | "
      "collectives GiB/step | compile s |",
      "|---|---|---|---|---|---|---|---|"]
  for r in report["programs"]:
    m = r["memory"]
    moved = sum(c["bytes"] for c in r.get("collectives", {}).values())
    lines.append(
        f"| {r['name']} | {gib(m.get('argument'))} | "
        f"{gib(m.get('temporary'))} | {gib(m.get('output'))} | "
        f"{gib(m.get('code'))} | {gib(m.get('total'))}"
        f"{'' if r['fits'] else ' (RESOURCE_EXHAUSTED)'} | "
        f"{gib(moved) if r['fits'] else '-'} | {r['compile_s']:.0f} |")
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
