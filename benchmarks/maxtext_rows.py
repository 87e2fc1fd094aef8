r"""codeclm beside MaxText, row by row, at MaxText's own layouts.

  python benchmarks/maxtext_rows.py --out=/tmp/maxtext.jsonl             # compile
  python benchmarks/maxtext_rows.py --out=/tmp/maxtext.jsonl --markdown  # table
  python benchmarks/maxtext_rows.py --only=avc-v5e-16-c4-offload ...

MaxText's train step was compiled ahead of time for these TPU slices (same
jax and libtpu; Llama-2 7B shape, vocab 322, remat full, flash attention,
fsdp over the chips not in the context axis). Its per-chip totals (GB,
10^9 bytes: arguments + outputs - aliased + temporaries + code) and layouts
are ROWS below. Each row here compiles codeclm's train step
(`python -m codeclm.main --mode=compile`, one process per row) at that
layout, set by hand: the same mesh, the same sequences per step (MaxText's
per-chip batch times the chips, without gradient accumulation unless its row
has micro-batches), the same remat and offloads, splash attention. Rows are
appended to --out as JSON lines as they finish; rows already there are not
compiled again. A 7B row takes 1-6 minutes of CPU; needs the [tpu] extra.

The PLANNED rows leave the layout to the planner (every layout field "auto",
as the configs ship) at the sequences per step of the slice's best MaxText
row, beside that row: the planner's choice against the best hand-set layout
MaxText found for the same work per step.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/tmp/maxtext_rows.jsonl", "JSON lines.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print --out as a table.")
_ONLY = flags.DEFINE_list("only", [], "Row names to compile (default all).")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 3600, "Per compile.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JPEG, AVC = "configs/jpeg_lm.py:7b", "configs/avc_lm.py:7b"


class Row(NamedTuple):
  """A MaxText row (its layout in its words, its GB per chip) and codeclm's
  same layout: mesh (data, fsdp, context, tensor), sequences per step,
  micro-batches, remat policy, optimizer state in host memory."""
  name: str
  config: str
  topology: str
  words: str
  maxtext_gb: float
  mesh: tuple[int, ...]
  batch: int
  accum: int
  remat: str
  opt_host: bool

  def flags(self) -> list[str]:
    """The codeclm flags that set this layout by hand."""
    return [f"--config.mesh.shape=({','.join(map(str, self.mesh))})",
            f"--config.train.grad_accum={self.accum}",
            f"--config.model.remat_policy={self.remat}",
            f"--config.train.optimizer_offload={self.opt_host}",
            "--config.train.param_offload=False",
            "--config.train.weight_gather=per_micro_batch"]


class Planned(NamedTuple):
  """The planner's choice at the sequences per step of `best`, the slice's
  best MaxText row (its name in ROWS)."""
  name: str
  config: str
  topology: str
  batch: int
  best: str


ROWS = [
    Row("jpeg-v5e-256-b1", JPEG, "v5e-256", "batch 1 per chip", 8.29,
        (1, 256, 1, 1), 256, 1, "full", False),
    Row("jpeg-v5e-32-8micro", JPEG, "v5e-32", "8 micro-batches", 15.2,
        (1, 32, 1, 1), 256, 8, "full", False),
    Row("jpeg-v5e-16-b1", JPEG, "v5e-16", "batch 1 per chip", 17.89,
        (1, 16, 1, 1), 16, 1, "full", False),
    Row("jpeg-v5e-16-c2", JPEG, "v5e-16", "context 2", 13.99,
        (1, 8, 2, 1), 8, 1, "full", False),
    Row("jpeg-v5e-16-offload", JPEG, "v5e-16", "layer inputs offloaded to host",
        12.89, (1, 16, 1, 1), 16, 1, "offload_layer_inputs", False),
    Row("jpeg-v5e-16-opt-host", JPEG, "v5e-16",
        "optimizer state in host memory",
        15.15, (1, 16, 1, 1), 16, 1, "full", True),
    Row("avc-v5e-256-b1", AVC, "v5e-256", "batch 1 per chip", 18.11,
        (1, 256, 1, 1), 256, 1, "full", False),
    Row("avc-v5e-32-c4", AVC, "v5e-32", "context 4", 12.00,
        (1, 8, 4, 1), 8, 1, "full", False),
    Row("avc-v5e-16-c8", AVC, "v5e-16", "context 8", 14.82,
        (1, 2, 8, 1), 2, 1, "full", False),
    Row("avc-v5e-16-c4-offload", AVC, "v5e-16",
        "context 4 + layer-input offload",
        12.80, (1, 4, 4, 1), 4, 1, "offload_layer_inputs", False),
    Row("avc-v5e-8-c8-offload", AVC, "v5e-8", "context 8 + layer-input offload",
        17.83, (1, 1, 8, 1), 1, 1, "offload_layer_inputs", False),
    Row("avc-v5e-8-c8-both", AVC, "v5e-8",
        "context 8 + layer-input and optimizer offload", 15.97,
        (1, 1, 8, 1), 1, 1, "offload_layer_inputs", True),
]

PLANNED = [
    Planned("jpeg-v5e-16-planned", JPEG, "v5e-16", 16, "jpeg-v5e-16-offload"),
    Planned("avc-v5e-16-planned", AVC, "v5e-16", 4, "avc-v5e-16-c4-offload"),
    Planned("avc-v5e-8-planned", AVC, "v5e-8", 1, "avc-v5e-8-c8-both"),
    Planned("avc-v5e-32-planned", AVC, "v5e-32", 8, "avc-v5e-32-c4"),
]
BY_NAME = {r.name: r for r in ROWS}
NAMES = [r.name for r in ROWS] + [r.name for r in PLANNED]


def compile_row(name, config, topology, batch, layout=()) -> dict:
  """One compile; `layout` holds the flags that set it (none: planned)."""
  workdir = tempfile.mkdtemp(prefix=f"maxtext_{name}_")
  argv = [sys.executable, "-m", "codeclm.main", f"--config={config}",
          f"--workdir={workdir}", "--mode=compile",
          f"--config.compile.topology={topology}",
          "--config.compile.steps=('train',)", f"--config.batch_size={batch}",
          "--config.model.attention_impl=splash", *layout]
  t = time.perf_counter()
  result = subprocess.run(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True,
                          timeout=_TIMEOUT.value, check=False)
  out = dict(name=name, workdir=workdir, returncode=result.returncode,
             wall_s=round(time.perf_counter() - t))
  path = os.path.join(workdir, "compile_report.json")
  if os.path.exists(path):
    with open(path) as f:
      report = json.load(f)
    out["memory"] = report["programs"][0]["memory"]
    out["collectives"] = report["programs"][0]["collectives"]
    out["layout"] = report["planner"]["layout"] if report.get(
        "planner") else None
  else:
    out["error"] = result.stderr[-2000:]
  return out


def _model(config: str) -> str:
  return "Jpeg-LM 7B @ 12,288" if config == JPEG else "Avc-LM 7B @ 32,768"


def _cells(row, theirs: float) -> str:
  """codeclm GB (GiB) | host GB | difference | at or below."""
  if row is None or "memory" not in row:
    return f"{'not compiled' if row is None else 'compile failed'} | | |"
  mem = row["memory"]
  ours, host = mem["total"] / 1e9, mem.get("host_total", 0) / 1e9
  return (f"{ours:.2f} ({mem['total'] / 2**30:.2f}) | {host:.2f} | "
          f"{ours - theirs:+.2f} | {'yes' if ours <= theirs else '**no**'}")


def _layout_words(layout: dict) -> str:
  knobs = [layout["remat_policy"]] + [k for k in (
      "optimizer_offload", "param_offload") if layout[k]]
  n = layout["grad_accum"]
  return (f"{'x'.join(map(str, layout['mesh']))}, {n} micro-batch"
          f"{'' if n == 1 else 'es'}, {', '.join(knobs)}")


def markdown(done: dict) -> str:
  lines = ["| run | layout (MaxText's words; codeclm mesh data x fsdp x "
           "context x tensor, sequences per step) | MaxText GB | codeclm GB "
           "(GiB) | codeclm host GB | difference GB | at or below |",
           "|---|---|---|---|---|---|---|"]
  for r in ROWS:
    layout = (f"{r.words}; {'x'.join(map(str, r.mesh))}, {r.batch} per step"
              + (f" in {r.accum} micro-batches" if r.accum > 1 else ""))
    cells = _cells(done.get(r.name), r.maxtext_gb)
    lines.append(f"| {_model(r.config)}, {r.topology} | {layout} | "
                 f"{r.maxtext_gb:.2f} | {cells} |")
  lines += ["", "| run | sequences per step | planner's layout | best MaxText "
            "row | MaxText GB | codeclm GB (GiB) | codeclm host GB | "
            "difference GB | at or below |", "|---|---|---|---|---|---|---|---|"
            "---|"]
  for p in PLANNED:
    best, row = BY_NAME[p.best], done.get(p.name)
    chosen = _layout_words(row["layout"]) if row and row.get("layout") else ""
    lines.append(f"| {_model(p.config)}, {p.topology} | {p.batch} | {chosen} | "
                 f"{best.words} | {best.maxtext_gb:.2f} | "
                 f"{_cells(row, best.maxtext_gb)} |")
  return "\n".join(lines)


def main(_):
  done = {}
  if os.path.exists(_OUT.value):
    with open(_OUT.value) as f:
      for line in f:
        row = json.loads(line)
        done[row["name"]] = row
  if _MARKDOWN.value:
    print(markdown(done))
    return
  unknown = set(_ONLY.value) - set(NAMES)
  if unknown:
    raise app.UsageError(f"--only: no rows {sorted(unknown)}; rows are "
                         f"{NAMES}.")
  jobs = [(r.name, r.config, r.topology, r.batch, r.maxtext_gb, r.flags())
          for r in ROWS]
  jobs += [(p.name, p.config, p.topology, p.batch,
            BY_NAME[p.best].maxtext_gb, ()) for p in PLANNED]
  for name, config, topology, batch, theirs, layout in jobs:
    if (_ONLY.value and name not in _ONLY.value) or (
        name in done and "memory" in done[name]):
      continue
    print(f"{name}: compiling ...", flush=True)
    result = compile_row(name, config, topology, batch, layout)
    with open(_OUT.value, "a") as f:
      f.write(json.dumps(result) + "\n")
    total = result.get("memory", {}).get("total")
    print(f"{name}: {total / 1e9:.2f} GB (MaxText {theirs:.2f}), "
          f"{result['wall_s']} s" if total else
          f"{name}: failed: {result.get('error', '')[-400:]}", flush=True)


if __name__ == "__main__":
  app.run(main)
