r"""`python -m codeclm.sampling`: the sample command on a training workdir.

It needs no --config: the model, tokenizer and codec come from the workdir;
--sample.* overrides the sampling settings (codeclm/sampling/files.py):

  python -m codeclm.sampling --workdir=/tmp/jpeg_demo \
      --sample.images=cat.png,dog.jpg --sample.ratios='(0.5,)'

It ends with a summary: where the samples, grids and per-sample reports are.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from codeclm import config_base
from codeclm.runtime import console
from codeclm.sampling import files

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
# Any size's sample section: only tb_* (unused here) differ by size.
_SAMPLE = config_flags.DEFINE_config_dict(
    "sample", config_base.lm_config("100m").sample, lock_config=True)
flags.DEFINE_bool(console.FLAG, False, console.FLAG_HELP)  # Read by setup.
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  import jax  # pylint: disable=g-import-not-at-top
  out = files.run(_SAMPLE.value, _WORKDIR.value)
  if jax.process_index() == 0:
    console.summary(f"Sampled step {out['step']}: {len(out['samples'])} "
                    "samples.", [
                        ("workdir", _WORKDIR.value),
                        ("samples", out["out_dir"]),
                        ("grids", "samples.png (unconditional), "
                                  "<image>_grid.png (completions)"),
                        ("reports", "<sample>.json: each one's decode "
                                    "report")])


if __name__ == "__main__":
  console.setup(sys.argv)  # Before JAX and its libraries log.
  app.run(main)
