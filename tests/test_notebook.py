"""notebooks/sample.ipynb runs headless against a real tiny checkpoint."""

import base64
import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from tests import test_sample

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "sample.ipynb")


def run_notebook(tmp_path, monkeypatch, **env) -> list:
  """Executes the notebook headless; returns its code cells' outputs.

  The kernel inherits this environment: `env` (CODECLM_* settings), codeclm
  from this checkout, and one CPU device (not the 8 simulated ones).
  """
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  monkeypatch.setenv("PYTHONPATH", ROOT)
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  nbclient.NotebookClient(
      nb, timeout=180, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in nb.cells if cell.cell_type == "code"
             for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  return outputs


def test_sample_notebook_runs(tmp_path, monkeypatch):
  outputs = run_notebook(
      tmp_path, monkeypatch, CODECLM_WORKDIR=test_sample.tiny_workdir(),
      CODECLM_IMAGE=test_sample.photo_files(tmp_path)[1])
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


def test_sample_notebook_runs_on_an_imported_model(tmp_path, monkeypatch):
  """The notebook's HF_MODEL cell imports a Jpeg-LM-style folder and samples."""
  pytest.importorskip("transformers")
  from tests import test_hf_io  # pylint: disable=g-import-not-at-top
  foreign = test_hf_io.save_foreign(str(tmp_path / "hf"),
                                    test_hf_io.llama_style_tokenizer())
  outputs = run_notebook(
      tmp_path, monkeypatch, CODECLM_HF_MODEL=foreign,
      CODECLM_IMPORT_CONFIG=os.path.join(ROOT, "tests", "tiny_config.py"),
      CODECLM_WORKDIR=str(tmp_path / "imported"),
      CODECLM_IMAGE=test_sample.photo_files(tmp_path)[0])
  text = "".join(o.get("text", "") for o in outputs)
  assert "Step 0:" in text and "ByteCharTokenizer(" in text
  assert "MCUs expected 4" in text  # 32x32 images: the tiny config's codec.
  assert len([o for o in outputs if "image/png" in o.get("data", {})]) == 2
  assert (tmp_path / "imported" / "checkpoints" / "0").is_dir()


def test_install_cell_asks_for_the_users_codeclm(tmp_path):
  """Where codeclm is not importable (no site-packages: python -S, outside
  the checkout) the install cell names what to set; it fetches nothing."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cell = next(c.source for c in nb.cells if c.cell_type == "code")
  assert "CODECLM = " in cell and "pip" in cell
  result = subprocess.run([sys.executable, "-S", "-c", cell], cwd=tmp_path,
                          env={"PATH": os.environ.get("PATH", "")},
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert "set CODECLM to a codeclm checkout folder or wheel file" in (
      result.stderr), result.stderr
