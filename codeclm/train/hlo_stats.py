"""Collectives in a compiled HLO module and their bytes per step.

Read from the HLO text (`compiled.as_text()`, or the gzipped copy that
--mode=compile keeps) by walking the call graph from ENTRY, so that an op in
a loop body counts once per trip (the scanned layers, the micro-batches), not
once per copy in the text.
"""

import math
import re

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
    elif line.rstrip() == "}" or line.startswith("}, execution_thread="):
      name = None  # (A host computation's end names its thread.)
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
