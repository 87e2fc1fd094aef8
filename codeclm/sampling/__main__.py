r"""`python -m codeclm.sample`: the sample command on a training workdir.

The code lives in codeclm/sampling/ (files.run); this module only parses flags:

  python -m codeclm.sample --workdir=/tmp/jpeg_demo \
      --sample.images=cat.png,dog.jpg --sample.ratios='(0.5,)'
"""

import json

from codeclm.sampling import files


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  summary = files.run(_SAMPLE.value, _WORKDIR.value)
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from codeclm import config_base  # pylint: disable=g-import-not-at-top
  _WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
  # Any size's sample section: only tb_* (unused here) differ by size.
  _SAMPLE = config_flags.DEFINE_config_dict(
      "sample", config_base.lm_config("100m").sample, lock_config=True)
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
