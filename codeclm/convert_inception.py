"""`python -m codeclm.convert_inception`, kept working: the module is codeclm/eval/convert_inception.py
(`python -m codeclm.eval.convert_inception`), where imports should point."""

import runpy

if __name__ == "__main__":
  runpy.run_module("codeclm.eval.convert_inception", run_name="__main__", alter_sys=True)
