r"""The fit table: the paper's runs compiled for TPU slices (--mode=compile).

  python benchmarks/fit_table.py --out=/tmp/fit.jsonl            # compile
  python benchmarks/fit_table.py --out=/tmp/fit.jsonl --markdown # the table
  python benchmarks/fit_table.py --out=/tmp/fit.jsonl --recount  # from HLO
  python benchmarks/fit_table.py --out=/tmp/fit.jsonl --smallest=all
  python benchmarks/fit_table.py --out=/tmp/fit.jsonl --smallest=all --markdown

Each row compiles the real train step and the sampler's programs
(`python -m codeclm.main --mode=compile --config.compile.steps='(train,
sample)'`, one process per row, so a crash or an out-of-memory row does not
stop the others) at the paper's global batch, with fsdp over every chip,
remat "full" and train.grad_accum chosen so that each chip holds one sequence
per micro-batch; splash first, then XLA on the same slice. The sampler's
programs run on the weights' layout sampling would choose there (by default
"auto": a replicated bf16 copy unless it takes over half a chip's HBM, see
codeclm/train/compile.py); --markdown gives each program a line, the layout
in its name, and a row fits when every program does. --steps=train compiles
the train step alone, as rows before the sampling lines did. Results are
appended to --out as JSON lines as they finish, so a run stopped early keeps
its rows. Needs the [tpu] extra; a 7B row takes minutes of CPU.

--smallest searches, per model, TPU generation and attention, for the smallest
slice that fits: slices upward from the first on which the fp32 parameters
and AdamW moments (12 bytes per parameter) alone fit a chip's HBM, stopping
at the first that fits. (Temporaries shrink with more chips too: gradients
and optimizer updates are sharded. A slice over on temporaries fails in
seconds, one over on the sum compiles in full.) Rows already in --out are
reused, not compiled again; a generation whose largest slice (up to one
sequence per chip) is known not to fit is skipped.

--layout=planned leaves the layout to the planner (codeclm/train/planner.py:
mesh, grad_accum, remat, optimizer and weight offload and weight gathering
"auto", as the 1B and 7B configs ship): each row compiles the planner's choice for its
slice, and --smallest skips, without compiling, the slices on which the
planner finds no layout that fits (its estimate is within ~15% of XLA's).

  python benchmarks/fit_table.py --out=/tmp/fit_plan.jsonl --smallest=all \
      --layout=planned

The searches include Avc-LM 7B at 65,536 and 131,072 tokens (avc-7b-65k,
avc-7b-131k), e.g. --smallest=avc-7b-131k:v5e --layout=planned.
"""

import functools
import gzip
import json
import os
import re
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
_SMALLEST = flags.DEFINE_list(
    "smallest", [], "Searches to run, model:generation[:attention] "
    "(jpeg-7b:v5e:splash), or 'all'; with --markdown, the search table.")
_STEPS = flags.DEFINE_list(
    "steps", ["train", "sample"], "compile.steps of each row compiled.")
_LAYOUT = flags.DEFINE_enum(
    "layout", "fixed", ["fixed", "planned"], "fixed: fsdp over every chip, "
    "remat full, one sequence per chip per micro-batch; planned: the "
    "planner's choice for the slice (see the module docstring).")
_RECOUNT = flags.DEFINE_bool(
    "recount", False, "Recount --out's collectives from the HLO each compile "
    "kept in its workdir (after a change to hlo_stats.collectives), in place.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30

# (name, config, seq_len, global batch, topology). The target slices first.
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
# The searches (--smallest): model -> (config, seq_len, global batch).
MODELS = {
    "jpeg-1b": ("configs/jpeg_lm.py:1b", 12_288, 128),
    "jpeg-7b": ("configs/jpeg_lm.py:7b", 12_288, 256),
    "avc-7b": ("configs/avc_lm.py:7b", 32_768, 256),
    "avc-7b-65k": ("configs/avc_lm.py:7b", 65_536, 256),
    "avc-7b-131k": ("configs/avc_lm.py:7b", 131_072, 256),
}
SEARCH_GENERATIONS = ("v5e", "v5p", "v6e")
STATE_BYTES_PER_PARAM = 12  # fp32 parameter + AdamW's two fp32 moments.
# The order rows run in: the target slices with splash and XLA first.
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


def _topology():
  sys.path.insert(0, ROOT)
  from codeclm.train import tpu_topology  # pylint: disable=g-import-not-at-top
  return tpu_topology


def _hlo_stats():
  sys.path.insert(0, ROOT)
  from codeclm.train import hlo_stats  # pylint: disable=g-import-not-at-top
  return hlo_stats


def collective_bytes(program: dict) -> int:
  _topology()  # codeclm from ROOT.
  from codeclm.train import compile_report  # pylint: disable=g-import-not-at-top
  return compile_report.collective_bytes(program)


def chips_of(topology: str) -> int:
  return _topology().parse_topology(topology).chips


def recount(row) -> dict:
  """The row with its collectives counted again from its kept HLO."""
  for prog in row.get("report", {}).get("programs", ()):
    path = os.path.join(row.get("workdir", ""), prog.get("hlo", ""))
    if prog.get("hlo") and os.path.exists(path):
      with gzip.open(path, "rt") as f:
        prog["collectives"] = _hlo_stats().collectives(f.read())
  return row


def compile_row(name, config, seq_len, batch, topology, impl) -> dict:
  chips = chips_of(topology)
  accum = max(1, batch // chips)
  planned = _LAYOUT.value == "planned"
  workdir = tempfile.mkdtemp(prefix=f"fit_{name}_{impl}_")
  argv = [sys.executable, "-m", "codeclm.main", f"--config={config}",
          f"--workdir={workdir}", "--mode=compile",
          f"--config.compile.topology={topology}",
          f"--config.compile.steps={tuple(_STEPS.value)}",
          f"--config.seq_len={seq_len}", f"--config.batch_size={batch}",
          f"--config.model.attention_impl={impl}"]
  if not planned:
    argv += ["--config.mesh.shape=(1,-1,1,1)",
             f"--config.train.grad_accum={accum}",
             "--config.model.remat_policy=full",
             "--config.train.optimizer_offload=False",
             "--config.train.param_offload=False",
             "--config.train.weight_gather=per_micro_batch"]
  t = time.perf_counter()
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=_TIMEOUT.value, check=False)
  row = dict(name=name, config=config, seq_len=seq_len, batch=batch,
             topology=topology, attention=impl, grad_accum=accum,
             workdir=workdir, wall_s=round(time.perf_counter() - t),
             returncode=result.returncode)
  path = os.path.join(workdir, "compile_report.json")
  row["layout"] = _LAYOUT.value
  if os.path.exists(path):
    with open(path) as f:
      row["report"] = json.load(f)
    row["grad_accum"] = row["report"]["config"]["grad_accum"]
  else:
    row["error"] = result.stderr[-2000:]
    row["error_line"] = next(
        (line.strip() for line in result.stderr.splitlines()
         if "Check failed" in line or "Error" in line), "")[:300]
  return row


@functools.lru_cache(maxsize=None)  # An eval_shape of the whole model.
def state_bytes(config: str) -> int:
  """Parameters + AdamW moments of a config name's model size, in bytes."""
  _topology()  # codeclm from ROOT.
  from codeclm.model import llama  # pylint: disable=g-import-not-at-top
  from codeclm.model import llama_config  # pylint: disable=g-import-not-at-top
  size = config.split(":")[1]
  return STATE_BYTES_PER_PARAM * llama.param_count(
      llama_config.LlamaConfig.from_size(size, vocab_size=322))


def plan_error(config: str, seq_len: int, batch: int, topology: str,
               impl: str) -> str:
  """Why the planner finds no layout for the slice ("" when it does)."""
  _topology()  # codeclm from ROOT.
  from codeclm.train import planner  # pylint: disable=g-import-not-at-top
  path, arg = config.split(":")
  sys.path.insert(0, os.path.join(ROOT, os.path.dirname(path)))
  cfg = __import__(os.path.basename(path)[:-3]).get_config(arg)
  cfg.seq_len, cfg.batch_size = seq_len, batch
  spec = _topology().parse_topology(topology)
  try:
    planner.resolve(cfg, spec.chips, spec.hbm_bytes, attention=impl,
                    host_bytes=planner.HOST_BYTES_PER_CHIP[spec.generation])
  except ValueError as e:
    return str(e)
  return ""


def fits(row) -> bool:
  return bool(row.get("report", {}).get("verdict", {}).get("fits"))


def temporaries(row) -> int:
  progs = row.get("report", {}).get("programs", ())
  return progs[0]["memory"]["temporary"] if progs else 0


def search(model: str, generation: str, impl: str, done: dict):
  """Yields the rows of one search (see the module docstring), compiling
  the ones `done` ({(config, seq, topology, attention): row}) lacks."""
  config, seq_len, batch = MODELS[model]
  spec = _topology().GENERATIONS[generation]
  state = state_bytes(config)
  sizes = [size for size in spec.sizes
           if batch % chips_of(f"{generation}-{size}") == 0]
  largest = done.get((config, seq_len, f"{generation}-{sizes[-1]}", impl,
                       _LAYOUT.value))
  if largest is not None and not fits(largest):
    return  # Known already: no slice of this generation fits.
  for size in sizes:
    topology = f"{generation}-{size}"
    if state / chips_of(topology) > spec.hbm_bytes:
      continue  # The table says why the slices below the first tried fail.
    key = (config, seq_len, topology, impl, _LAYOUT.value)
    why = key not in done and _LAYOUT.value == "planned" and plan_error(
        config, seq_len, batch, topology, impl)
    if why:  # No compile: a row that says why.
      done[key] = dict(name=f"{model}-{topology}", config=config,
                       seq_len=seq_len, batch=batch, topology=topology,
                       attention=impl, layout="planned", wall_s=0,
                       error_line=f"planner: {why[:300]}")
      yield done[key]
    if key not in done:
      print(f"compiling {model} on {topology} with {impl} ...", flush=True)
      done[key] = compile_row(f"{model}-{topology}", config, seq_len, batch,
                              topology, impl)
      print(f"  done in {done[key]['wall_s']} s", flush=True)
      yield done[key]
    if fits(done[key]):
      return


def _gib(n: int) -> str:
  return f"{n / GIB:.2f}" if n < GIB / 10 else f"{n / GIB:.1f}"


def _reason(row) -> str:
  """A failed compile's first error line, without glog's time and thread."""
  line = row.get("error_line") or "see log"
  return re.sub(r"^[FEW]\d{4} [\d:.]+\s+\d+ ", "", line)


def smallest_markdown(rows) -> str:
  """One line per (model, generation, attention) searched or compiled."""
  topo = _topology()
  out = ["| model | seq | global batch | generation | attention | smallest "
         "slice that fits | mesh | GiB per chip | collectives GiB/step | "
         "the slice below it |", "|" + "---|" * 10]
  groups = {}
  for r in rows:
    gen = topo.parse_topology(r["topology"]).generation
    groups.setdefault((r["config"], r["seq_len"], gen, r["attention"]),
                      []).append(r)
  for (config, seq_len, gen, impl), group in sorted(groups.items()):
    spec = topo.GENERATIONS[gen]
    group.sort(key=lambda r: chips_of(r["topology"]))
    fit = next((r for r in group if fits(r)), None)
    if fit is None:
      tried = [r for r in group if "report" in r] or group
      last = tried[-1]
      if "report" not in last:
        out.append(f"| {config.split('/')[-1]} | {seq_len:,} | "
                   f"{last['batch']} | {gen} | {impl} | none | | | | "
                   f"{last['topology']}: the compiler failed: "
                   f"{_reason(last)} |")
        continue
      over = _gib(last["report"]["verdict"].get("over_bytes", 0))
      alone = (f", temporaries alone {temporaries(last) / GIB:.1f} GiB"
               if temporaries(last) > spec.hbm_bytes else "")
      slices = (tried[0]["topology"] if len(tried) == 1 else
                f"{len(tried)} slices, {tried[0]['topology']} to "
                f"{last['topology']}")
      out.append(f"| {config.split('/')[-1]} | {seq_len:,} | "
                 f"{group[0]['batch']} | {gen} | {impl} | none | | | | "
                 f"tried {slices}; {last['topology']} over by {over} "
                 f"GiB per chip{alone} |")
      continue
    below = [size for size in spec.sizes
             if chips_of(f"{gen}-{size}") < chips_of(fit["topology"])]
    if not below:
      under = f"none: {fit['topology']} is {gen}'s smallest"
    else:
      topology = f"{gen}-{below[-1]}"
      tried = [r for r in group if r["topology"] == topology]
      per_chip = state_bytes(config) / chips_of(topology)
      if tried and "report" not in tried[0]:
        under = f"{topology}: the compiler failed: {_reason(tried[0])}"
      elif tried:
        v = tried[0]["report"]["verdict"]
        under = f"{topology}: over by {_gib(v.get('over_bytes', 0))} GiB"
      elif per_chip > spec.hbm_bytes:
        under = (f"{topology}: parameters + AdamW alone {per_chip / GIB:.1f}"
                 f" GiB per chip")
      else:
        under = f"{topology}: not compiled"
    rep = fit["report"]
    prog = rep["programs"][0]
    mesh = "x".join(str(rep["mesh"][a]) for a in (
        "data", "fsdp", "context", "tensor") if a in rep["mesh"])
    moved = collective_bytes(prog)
    out.append(
        f"| {config.split('/')[-1]} | {seq_len:,} | {fit['batch']} "
        f"({fit['grad_accum']}) | {gen} | {impl} | {fit['topology']} | "
        f"{mesh} | {prog['memory']['total'] / GIB:.1f} of "
        f"{rep['hbm_bytes_per_chip'] / GIB:.0f} | {moved / GIB:.1f}"
        f"{'' if 'hlo' in prog else ' (old count)'} | {under} |")
  return "\n".join(out)


def _program_fits(prog, hbm: int) -> str:
  m = prog["memory"]
  if prog["fits"] and m["total"] <= hbm:
    return "yes"
  over = m["total"] - m.get("available", hbm)
  return f"no: over by {over / GIB:.1f} GiB"


def markdown(rows) -> str:
  """A line per compiled program: the train step, then the sampler's."""
  out = ["| model | seq | global batch (accum) | slice | mesh | remat | "
         "attention | program | GiB per chip (temp) | of HBM | "
         "collectives GiB/step | fits | compile s |", "|" + "---|" * 13]
  for r in rows:
    rep = r.get("report")
    if rep is None:
      out.append(f"| {r['config']} | {r['seq_len']:,} | {r['batch']} | "
                 f"{r['topology']} | | full | {r['attention']} | | failed: "
                 f"see log | | | | {r['wall_s']} |")
      continue
    mesh = "x".join(str(rep["mesh"][a]) for a in (
        "data", "fsdp", "context", "tensor") if a in rep["mesh"])
    hbm = rep["hbm_bytes_per_chip"]
    for prog in rep["programs"]:
      m = prog["memory"]
      if prog["fits"]:
        need = f"{m['total'] / GIB:.1f} ({m['temporary'] / GIB:.1f})"
        moved = collective_bytes(prog)
        # Counted before the HLO was kept (and the count fixed): RESULTS.
        moved = f"{moved / GIB:.1f}" + ("" if "hlo" in prog
                                         else " (old count)")
      else:  # XLA stopped at its temporaries.
        need = f">= {m['temporary'] / GIB:.1f} (temporaries alone)"
        moved = "-"
      out.append(
          f"| {r['config'].split('/')[-1]} | {r['seq_len']:,} | "
          f"{r['batch']} ({r['grad_accum']}) | {r['topology']} | {mesh} | "
          f"{rep['config']['remat_policy']} | "
          f"{rep['config']['attention_resolved']} | {prog['name']} | "
          f"{need} | {hbm / GIB:.0f} | {moved} | {_program_fits(prog, hbm)}"
          f" | {prog['compile_s']:.0f} |")
  return "\n".join(out)


def main(_):
  if _MARKDOWN.value:
    with open(_OUT.value) as f:
      rows = [json.loads(line) for line in f if line.strip()]
    print(smallest_markdown(rows) if _SMALLEST.value else markdown(rows))
    return
  if _RECOUNT.value:
    with open(_OUT.value) as f:
      rows = [recount(json.loads(line)) for line in f if line.strip()]
    with open(_OUT.value, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    return
  rows = []
  if os.path.exists(_OUT.value):  # A rerun continues where one stopped.
    with open(_OUT.value) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  if _SMALLEST.value:
    done = {(r["config"], r["seq_len"], r["topology"], r["attention"],
             r.get("layout", "fixed")): r for r in rows}
    wanted = ([f"{m}:{g}" for m in MODELS for g in SEARCH_GENERATIONS]
              if _SMALLEST.value == ["all"] else _SMALLEST.value)
    for item in wanted:
      model, generation, *impls = item.split(":")
      for impl in impls or ("splash", "xla"):
        for row in search(model, generation, impl, done):
          with open(_OUT.value, "a") as f:
            f.write(json.dumps(row) + "\n")
    return
  done = {(r["name"], r["attention"]) for r in rows
          if r.get("layout", "fixed") == _LAYOUT.value}
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
