r"""libtpu's abort compiling a 7B train step for v5p-8, and its workaround.

  python benchmarks/libtpu_v5p8.py

Compiles one decoder layer of Llama-2 7B's width (Jpeg-LM 7B's config with
num_layers=1: 12,288 tokens, fsdp over the 4 chips, 8 micro-batches, remat
full) for v5p-8 ahead of time, twice, each in its own process:

  without the workaround  LIBTPU_INIT_ARGS names the all-reduce-scatter
      fusion's flag as on (libtpu's default), which keeps codeclm from
      adding its workaround: libtpu 0.0.42.1 aborts (SIGABRT,
      "rotated_pincer_fusion_emitter.cc ... Check failed:
      s_count.has_value()").
  with it                 codeclm's default on this slice
      (tpu_topology.LIBTPU_WORKAROUNDS: all-reduce-scatter fusion off):
      it compiles.

The whole 7B model and mesh context 4 abort the same way, and mesh
(1, 2, 1, 2) compiles without the workaround. Needs the [tpu] extra; about
a minute per compile.
"""

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_tpu_enable_all_reduce_scatter_fusion"


def compile_once(libtpu_args: str | None) -> tuple[int, str]:
  """(exit status, the line that says what happened)."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.pop("LIBTPU_INIT_ARGS", None)
  if libtpu_args is not None:
    env["LIBTPU_INIT_ARGS"] = libtpu_args
  argv = [sys.executable, "-m", "codeclm.main",
          "--config=configs/jpeg_lm.py:7b", "--mode=compile",
          f"--workdir={tempfile.mkdtemp(prefix='v5p8_')}",
          "--config.compile.topology=v5p-8",
          "--config.compile.steps=('train',)",
          "--config.model.num_layers=1", "--config.mesh.shape=(1,4,1,1)",
          "--config.train.grad_accum=8", "--config.model.remat_policy=full",
          "--config.train.optimizer_offload=False",
          "--config.train.param_offload=False",
          "--config.train.weight_gather=per_micro_batch"]
  result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True,
                          text=True, check=False)
  lines = (result.stdout + result.stderr).splitlines()
  said = next((l.strip() for l in lines if "Check failed" in l), None) or next(
      (l.strip() for l in lines if l.startswith(("FITS", "DOES NOT FIT"))),
      lines[-1] if lines else "")
  return result.returncode, said[:200]


def main():
  for name, args in (("without the workaround", f"{FLAG}=true"),
                     ("with it (codeclm's default)", None)):
    status, said = compile_once(args)
    verdict = "ABORTED" if status < 0 or status == 134 else f"exit {status}"
    print(f"v5p-8, {name}: {verdict}: {said}")


if __name__ == "__main__":
  main()
