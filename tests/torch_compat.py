"""Makes transformers importable beside this environment's torchvision.

Called by tests/conftest.py for the test session, and by benchmarks that
import transformers (benchmarks/sampler_vs_hf.py).
"""

import os

_KEEP_ALIVE = []


def importable_torchvision() -> None:
  """Lets the CUDA-only torchvision wheel import on the CPU torch.

  The package index has torchvision 0.28 only as a CUDA build: its C++ ops
  library fails to load on torch 2.13+cpu, and torchvision then dies at
  import while registering fake kernels for `torchvision::nms`/`qnms`.
  transformers imports torchvision when it is installed, so without this
  tests/test_hf.py would fail in the `[reference]` environment (pytorch-fid,
  the FID reference, needs torchvision's pure-Python Inception model). Only
  the two schemas are declared; no torchvision op is ever run.
  """
  if _KEEP_ALIVE:
    return  # Declared already (conftest, then a benchmark in-process).
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("torchvision")
  if spec is None or importlib.util.find_spec("torch") is None:
    return
  import torch  # pylint: disable=g-import-not-at-top
  try:
    torch.ops.load_library(os.path.join(spec.submodule_search_locations[0],
                                        "_C.so"))
  except (OSError, RuntimeError):
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
      lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) "
                 "-> Tensor")
    _KEEP_ALIVE.append(lib)  # Dropping the Library would undefine the ops.
