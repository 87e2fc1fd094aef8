"""The wheel works outside the checkout; setup.py pins the tested versions.

The wheel is built from a copy of the checkout (a build in the tree would
leave build/ there, and modules a stale build/ still holds would ship),
installed without dependencies into a folder of its own (this environment
has them), and run from a directory that is neither: the CPU demo config it
ships trains a step, and import_hf finds its default config.
"""

import glob
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

from packaging.requirements import Requirement
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Libraries whose internals codeclm uses: their minor release is bounded.
INTERNALS = ("jax", "jaxlib", "orbax-checkpoint", "grain", "etils")


def _metadata_requirements(wheel: str) -> list[Requirement]:
  with zipfile.ZipFile(wheel) as z:
    name, = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    text = z.read(name).decode()
  return [Requirement(line.split(":", 1)[1].strip())
          for line in text.splitlines() if line.startswith("Requires-Dist:")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
  """(wheel path, install folder): built from a copy, installed --no-deps."""
  tmp = tmp_path_factory.mktemp("packaging")
  src = tmp / "src"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".*", "build", "dist", "*.egg-info", "__pycache__"))

  def pip(*args):
    done = subprocess.run([sys.executable, "-m", "pip", "-q",
                           "--disable-pip-version-check", *args], cwd=tmp,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"pip {args}:\n{done.stderr[-4000:]}"

  pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
      str(src))
  path, = glob.glob(str(tmp / "dist" / "codeclm-*.whl"))
  site = tmp / "site"
  pip("install", "--no-deps", "--no-index", "--target", str(site), path)
  return path, site


def run_installed(site, tmp_path, *args) -> subprocess.CompletedProcess:
  """`python *args` with the installed wheel first on the path, from an
  empty directory; one CPU device, as a user's machine has."""
  cwd = tmp_path / "elsewhere"
  cwd.mkdir(exist_ok=True)
  env = dict(os.environ, PYTHONPATH=str(site))
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+",
                            "", env.get("XLA_FLAGS", "")).strip()
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_wheel_ships_the_configs(wheel):
  with zipfile.ZipFile(wheel[0]) as z:
    names = set(z.namelist())
  for config in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
    assert f"codeclm/configs/{os.path.basename(config)}" in names, (
        f"{config} is not in the wheel: setup.py must ship configs/ as "
        "codeclm/configs/.")
  assert not [n for n in names if n.startswith(("tests/", "configs/"))]


def test_installed_demo_config_trains_from_elsewhere(wheel, tmp_path):
  _, site = wheel
  config = site / "codeclm" / "configs" / "jpeg_lm.py"
  workdir = tmp_path / "work"
  result = run_installed(
      site, tmp_path, "-m", "codeclm.main", f"--config={config}:demo",
      f"--workdir={workdir}", "--config.data.num_examples=32",
      "--config.data.eval_examples=4", "--config.train.steps=1",
      "--config.train.eval_every=0", "--config.sample.tb_every=0",
      "--verbose_libraries")
  assert result.returncode == 0, result.stderr[-4000:]
  assert (workdir / "checkpoints" / "1").is_dir()
  # The flag brings libraries' INFO lines back (the README demo, run without
  # it in tests/test_readme.py, shows none).
  assert re.search(r"^I.* checkpoint_manager\.py:\d+\] ", result.stderr,
                   re.M), result.stderr[-3000:]
  assert re.search(rf"^  checkpoint +{workdir}/checkpoints/1$", result.stdout,
                   re.M), result.stdout


def test_installed_import_hf_finds_its_default_config(wheel, tmp_path):
  """import_hf's default (and the notebook's import cell's) is the 7B
  config that came with the wheel, the same as the checkout's."""
  pytest.importorskip("safetensors")  # The [hf] extra.
  from codeclm.hf import import_hf  # pylint: disable=g-import-not-at-top
  _, site = wheel
  result = run_installed(site, tmp_path, "-c", (
      "import codeclm, json; from codeclm.hf import import_hf; "
      "c = import_hf.load_config(); print(json.dumps(dict("
      "codeclm=codeclm.__file__, spec=import_hf.default_config(), "
      "config=c.to_dict())))"))
  assert result.returncode == 0, result.stderr[-4000:]
  got = json.loads(result.stdout.splitlines()[-1])
  # The wheel's codeclm, not the checkout's (nor the editable install's).
  assert got["codeclm"] == f"{site}/codeclm/__init__.py"
  assert got["spec"] == f"{site}/codeclm/configs/jpeg_lm.py:7b"
  want = import_hf.load_config(os.path.join(ROOT, "configs", "jpeg_lm.py:7b"))
  assert got["config"] == json.loads(json.dumps(want.to_dict()))


def test_pins_hold_the_tested_versions(wheel):
  """Every base requirement admits what this environment runs; jax and the
  [tpu] extra's jax agree; libraries whose internals codeclm uses have an
  upper bound, so a new release cannot break an install silently."""
  reqs = _metadata_requirements(wheel[0])
  base = [r for r in reqs if r.marker is None]
  for r in base:
    version = importlib.metadata.version(r.name)
    assert r.specifier.contains(version, prereleases=True), (
        f"setup.py requires {r}, but the tested environment has {version}.")
  by_name = {r.name: r for r in base}
  for name in INTERNALS:
    assert name in by_name, f"{name} is not declared in install_requires."
    assert any(s.operator in ("<", "==", "~=") for s in by_name[name].specifier
               ), f"{by_name[name]} has no upper bound."
  tpu, = [r for r in reqs if r.name == "jax" and r.marker is not None
          and "tpu" in str(r.marker)]
  pinned, = [s.version for s in tpu.specifier if s.operator == "=="]
  assert by_name["jax"].specifier.contains(pinned), (tpu, by_name["jax"])
  assert by_name["jaxlib"].specifier.contains(pinned), (tpu, by_name["jaxlib"])
  assert "epath" in by_name["etils"].extras
