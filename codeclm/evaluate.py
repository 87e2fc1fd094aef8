"""`python -m codeclm.evaluate`, kept working: the module is codeclm/eval/evaluate.py
(`python -m codeclm.eval.evaluate`), where imports should point."""

import runpy

if __name__ == "__main__":
  runpy.run_module("codeclm.eval.evaluate", run_name="__main__", alter_sys=True)
