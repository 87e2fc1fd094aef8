r"""`python -m codeclm.sampling`: the sample command on a training workdir.

It needs no --config: the model, tokenizer and codec come from the workdir;
--sample.* overrides the sampling settings (codeclm/sampling/files.py):

  python -m codeclm.sampling --workdir=/tmp/jpeg_demo \
      --sample.images=cat.png,dog.jpg --sample.ratios='(0.5,)'
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from codeclm import config_base
from codeclm.sampling import files

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
# Any size's sample section: only tb_* (unused here) differ by size.
_SAMPLE = config_flags.DEFINE_config_dict(
    "sample", config_base.lm_config("100m").sample, lock_config=True)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  summary = files.run(_SAMPLE.value, _WORKDIR.value)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  app.run(main)
