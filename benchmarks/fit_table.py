r"""The fit table: the paper's runs compiled for TPU slices (--mode=compile).

  python benchmarks/fit_table.py --out=/tmp/fit.jsonl            # compile
  python benchmarks/fit_table.py --out=/tmp/fit.jsonl --markdown # the table
  python benchmarks/fit_table.py --out=/tmp/fit.jsonl --recount  # from HLO

Each row compiles the real train step (`python -m codeclm.main --mode=compile
--config.compile.steps='(train,)'`, one process per row, so a crash or an
out-of-memory row does not stop the others) at the paper's global batch, with
fsdp over every chip, remat "full" and train.grad_accum chosen so that each
chip holds one sequence per micro-batch; splash first, then XLA on the same
slice. Results are appended to --out as JSON lines as they finish, so a run
stopped early keeps its rows. Needs the [tpu] extra; a 7B row takes minutes of
CPU.
"""

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/tmp/fit_table.jsonl", "JSON lines.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print --out as a table.")
_ONLY = flags.DEFINE_list(
    "only", [], "Rows to run: a name runs it with both attentions, "
    "name:attention (jpeg-7b-v6e-64:xla) one of them (default: all).")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 3600, "Per compile.")
_RECOUNT = flags.DEFINE_bool(
    "recount", False, "Recount --out's collectives from the HLO each compile "
    "kept in its workdir (after a change to compile.collectives), in place.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30

# (name, config, seq_len, global batch, topology). Targets of issue 12 first.
ROWS = [
    ("jpeg-1b-v5e-16", "configs/jpeg_lm.py:1b", 12_288, 128, "v5e-16"),
    ("jpeg-7b-v5p-64", "configs/jpeg_lm.py:7b", 12_288, 256, "v5p-64"),
    ("jpeg-7b-v5e-256", "configs/jpeg_lm.py:7b", 12_288, 256, "v5e-256"),
    ("avc-7b-v5p-64", "configs/avc_lm.py:7b", 32_768, 256, "v5p-64"),
    ("jpeg-1b-v6e-8", "configs/jpeg_lm.py:1b", 12_288, 128, "v6e-8"),
    ("jpeg-7b-v6e-64", "configs/jpeg_lm.py:7b", 12_288, 256, "v6e-64"),
    ("jpeg-1b-v5p-8", "configs/jpeg_lm.py:1b", 12_288, 128, "v5p-8"),
    ("avc-7b-v5e-256", "configs/avc_lm.py:7b", 32_768, 256, "v5e-256"),
    ("avc-7b-v6e-64", "configs/avc_lm.py:7b", 32_768, 256, "v6e-64"),
]
# The order rows run in: the targets with splash and XLA first.
PLAN = [
    ("jpeg-1b-v5e-16", "splash"), ("jpeg-1b-v5e-16", "xla"),
    ("jpeg-7b-v5p-64", "splash"), ("jpeg-7b-v5e-256", "splash"),
    ("avc-7b-v5p-64", "splash"), ("jpeg-7b-v5e-256", "xla"),
    ("jpeg-7b-v5p-64", "xla"), ("avc-7b-v5p-64", "xla"),
    ("jpeg-1b-v6e-8", "splash"), ("jpeg-7b-v6e-64", "splash"),
    ("jpeg-1b-v6e-8", "xla"), ("jpeg-7b-v6e-64", "xla"),
    ("jpeg-1b-v5p-8", "splash"), ("jpeg-1b-v5p-8", "xla"),
    ("avc-7b-v5e-256", "xla"), ("avc-7b-v6e-64", "xla"),
    ("avc-7b-v5e-256", "splash"), ("avc-7b-v6e-64", "splash"),
]


def _aot():
  sys.path.insert(0, ROOT)
  from codeclm import compile as aot  # pylint: disable=g-import-not-at-top
  return aot


def chips_of(topology: str) -> int:
  return _aot().parse_topology(topology).chips


def recount(row) -> dict:
  """The row with its collectives counted again from its kept HLO."""
  for prog in row.get("report", {}).get("programs", ()):
    path = os.path.join(row.get("workdir", ""), prog.get("hlo", ""))
    if prog.get("hlo") and os.path.exists(path):
      with gzip.open(path, "rt") as f:
        prog["collectives"] = _aot().collectives(f.read())
  return row


def compile_row(name, config, seq_len, batch, topology, impl) -> dict:
  chips = chips_of(topology)
  accum = max(1, batch // chips)
  workdir = tempfile.mkdtemp(prefix=f"fit_{name}_{impl}_")
  argv = [sys.executable, "-m", "codeclm.main", f"--config={config}",
          f"--workdir={workdir}", "--mode=compile",
          f"--config.compile.topology={topology}",
          "--config.compile.steps=('train',)",
          "--config.mesh.shape=(1,-1,1)", f"--config.seq_len={seq_len}",
          f"--config.batch_size={batch}", f"--config.train.grad_accum={accum}",
          "--config.model.remat_policy=full",
          f"--config.model.attention_impl={impl}"]
  t = time.perf_counter()
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=_TIMEOUT.value, check=False)
  row = dict(name=name, config=config, seq_len=seq_len, batch=batch,
             topology=topology, attention=impl, grad_accum=accum,
             workdir=workdir, wall_s=round(time.perf_counter() - t),
             returncode=result.returncode)
  path = os.path.join(workdir, "compile_report.json")
  if os.path.exists(path):
    with open(path) as f:
      row["report"] = json.load(f)
  else:
    row["error"] = result.stderr[-2000:]
  return row


def markdown(rows) -> str:
  out = ["| model | seq | global batch (accum) | slice | mesh | remat | "
         "attention | GiB per chip (temp) | of HBM | collectives GiB/step | "
         "fits | compile s |", "|" + "---|" * 12]
  for r in rows:
    rep = r.get("report")
    if rep is None:
      out.append(f"| {r['config']} | {r['seq_len']:,} | {r['batch']} | "
                 f"{r['topology']} | | full | {r['attention']} | failed: "
                 f"see log | | | | {r['wall_s']} |")
      continue
    prog, v = rep["programs"][0], rep["verdict"]
    m = prog["memory"]
    mesh = "x".join(str(rep["mesh"][a]) for a in ("data", "fsdp", "tensor"))
    if prog["fits"]:
      need = f"{m['total'] / GIB:.1f} ({m['temporary'] / GIB:.1f})"
      moved = sum(c["bytes"] for c in prog["collectives"].values())
      # Counted before the HLO was kept (and the count fixed): see RESULTS.
      moved = f"{moved / GIB:.1f}" + ("" if "hlo" in prog else " (old count)")
    else:  # XLA stopped at its temporaries.
      need, moved = f">= {m['temporary'] / GIB:.1f} (temporaries alone)", "-"
    fits = "yes" if v["fits"] else (
        f"no: over by {v.get('over_bytes', 0) / GIB:.1f} GiB")
    out.append(
        f"| {r['config'].split('/')[-1]} | {r['seq_len']:,} | {r['batch']} "
        f"({r['grad_accum']}) | {r['topology']} | {mesh} | full | "
        f"{rep['config']['attention_resolved']} | {need} | "
        f"{rep['hbm_bytes_per_chip'] / GIB:.0f} | {moved} | {fits} | "
        f"{prog['compile_s']:.0f} |")
  return "\n".join(out)


def main(_):
  if _MARKDOWN.value:
    with open(_OUT.value) as f:
      print(markdown([json.loads(line) for line in f if line.strip()]))
    return
  if _RECOUNT.value:
    with open(_OUT.value) as f:
      rows = [recount(json.loads(line)) for line in f if line.strip()]
    with open(_OUT.value, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    return
  done = set()
  if os.path.exists(_OUT.value):  # A rerun continues where one stopped.
    with open(_OUT.value) as f:
      done = {(r["name"], r["attention"]) for r in map(json.loads, f)}
  by_name = {row[0]: row for row in ROWS}
  plan = [(by_name[name], impl) for name, impl in PLAN
          if (not _ONLY.value or name in _ONLY.value
              or f"{name}:{impl}" in _ONLY.value)
          and (name, impl) not in done]
  for row, impl in plan:
    print(f"compiling {row[0]} with {impl} ...", flush=True)
    result = compile_row(*row, impl)
    with open(_OUT.value, "a") as f:
      f.write(json.dumps(result) + "\n")
    print(f"  done in {result['wall_s']} s", flush=True)


if __name__ == "__main__":
  app.run(main)
