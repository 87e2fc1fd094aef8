"""notebooks/sample.ipynb runs headless against a real tiny checkpoint."""

import base64
import io
import os

import numpy as np
from PIL import Image
import pytest

from tests import test_sample

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "sample.ipynb")


def test_sample_notebook_runs(tmp_path, monkeypatch):
  workdir = test_sample.tiny_workdir()
  image = test_sample.photo_files(tmp_path)[1]
  # The kernel inherits this environment: the checkpoint and image to use,
  # codeclm from this checkout, and one CPU device (not the 8 simulated ones).
  monkeypatch.setenv("CODECLM_WORKDIR", workdir)
  monkeypatch.setenv("CODECLM_IMAGE", image)
  monkeypatch.setenv("PYTHONPATH", ROOT)
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  nbclient.NotebookClient(
      nb, timeout=120, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}}).execute()

  outputs = [o for cell in nb.cells if cell.cell_type == "code"
             for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs)
  assert "Step 1:" in text and "MCUs expected 4" in text
  pngs = [Image.open(io.BytesIO(base64.b64decode(o.data["image/png"])))
          for o in outputs if "image/png" in o.get("data", {})]
  assert len(pngs) == 2  # The completion grid and the unconditional row.
  grid = np.asarray(pngs[0].convert("RGB"))
  # prompt | 3 completions | original of 32-pixel images, scaled up.
  scale = grid.shape[0] // 32
  assert grid.shape[:2] == (32 * scale, (5 * 34 - 2) * scale)
  saved = sorted(os.listdir(tmp_path / "samples"))
  assert saved == sorted([f"coffee_r50_{i}.jpg" for i in range(3)]
                         + [f"sample_{i}.jpg" for i in range(4)])
