"""The launchers run end to end, as a user types them, on a simulated cluster.

tests/fake_cluster/gcloud and tests/fake_cluster/srun come first on PATH:
each runs the launcher's worker command as 2 local processes x 4 CPU
devices, joined by jax.distributed (see those files for the environment they
give each worker). `launch/tpu_pod.sh` (workdir on the GCS emulator) and
`launch/gpu_slurm.sbatch` (a local workdir with a space in its path) run
every stage of the tiny config with overrides that hold parentheses, quotes,
commas, spaces and shell metacharacters; their losses, FIDs and recorded
configs must equal each other's, and their losses and configs those of the
same config trained directly (codeclm.main's train, in this process on its 8
devices).

CODECLM_TEST_TPU_POD_SH (default launch/tpu_pod.sh) runs another copy of the
TPU launcher under the same checks, e.g. an older revision.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = os.path.join(ROOT, "tests", "fake_cluster")
TPU_POD_SH = os.environ.get("CODECLM_TEST_TPU_POD_SH",
                            os.path.join(ROOT, "launch", "tpu_pod.sh"))
TIMEOUT = 300  # s, per launcher run; each takes 1-2 minutes on 2 cores.

# Every stage's overrides, as a user types them in bash. The weights' path
# holds a space (the TPU run's data dir a space and an apostrophe); the images
# string (recorded in config.json, unused by these stages) holds shell
# metacharacters that must arrive unexpanded.
IMAGES = "a b.jpg,c;$(false) `true` *.png & x|y"
OVERRIDES = (
    "--config.mesh.shape='(1,-1,1,1)' --config.train.steps=2 "
    "--config.compile.steps=\"('train',)\" "
    '--config.eval.inception_weights="$TMP_DIR/my weights.npz" '
    "--config.eval.num_examples=4 --config.eval.seeds='(0,)' "
    "--config.eval.ratios='(0.5,)' --config.eval.unconditional=False "
    "--config.eval.feature_batch=4 --config.eval.fid_method=low_rank "
    "--config.sample.max_new_tokens=32 "
    "--config.sample.images='a b.jpg,c;$(false) `true` *.png & x|y'")

# What the fake gcloud's workers keep of this environment (as the worker
# image would set it): the storage emulator, the tests' compilation cache.
_WORKER_ENV = ("STORAGE_EMULATOR_HOST TENSORSTORE_GCS_HTTP_URL "
               "JAX_COMPILATION_CACHE_DIR "
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS "
               "TF_CPP_MIN_LOG_LEVEL PYTHONUNBUFFERED")


def overrides_as_argv(tmp_dir: str) -> list[str]:
  """OVERRIDES split as bash splits them."""
  out = subprocess.run(
      ["bash", "-c", f'printf "%s\\0" {OVERRIDES}'], check=True,
      capture_output=True, env=dict(os.environ, TMP_DIR=tmp_dir),
      timeout=30).stdout.decode()
  return out.split("\0")[:-1]


def shell_words(line: str) -> list[str]:
  """The words bash makes of `line` (no command runs)."""
  out = subprocess.run(
      ["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "-", line],
      check=True, capture_output=True, timeout=30,
      cwd=tempfile.gettempdir()).stdout.decode()
  return out.split("\0")[:-1]


def base_env(tmp_dir, log_dir=None, **extra) -> dict:
  """This environment, cluster variables dropped, the fakes first on PATH;
  the fakes log their calls in log_dir (default tmp_dir)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM", "FAKE_", "CODECLM_", "JAX_COORDINATOR",
                              "JAX_LOCAL_DEVICE_IDS"))}
  env.update(PATH=os.pathsep.join([FAKE, os.path.dirname(sys.executable),
                                   env.get("PATH", "")]),
             TMP_DIR=str(tmp_dir), PYTHONUNBUFFERED="1",
             FAKE_CLUSTER_LOG=os.path.join(log_dir or tmp_dir,
                                           "cluster_calls.jsonl"))
  env.update({k: str(v) for k, v in extra.items()})
  return env


def run_line(line: str, env: dict, timeout: int = TIMEOUT):
  """Runs `line` in bash from the repo root: (exit code, all output). The
  whole process group (launcher, fake cluster, workers) dies on timeout."""
  proc = subprocess.Popen(["bash", "-c", line], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    raise AssertionError(f"{line}\ntimed out after {timeout}s:\n"
                         f"{out[-6000:]}") from None
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # Strays, if any.
    except ProcessLookupError:
      pass
  return proc.returncode, out


def cluster_calls(env) -> list[dict]:
  path = env["FAKE_CLUSTER_LOG"]
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def slurm_job_id() -> int:
  """A job id whose coordinator port (JAX: 61440 + id % 4096) is free now.

  That range is above Linux's ephemeral ports, so only another SLURM-like
  job could take it; a random id keeps concurrent test runs apart."""
  for _ in range(100):
    port = random.randrange(61440, 65536)
    with socket.socket() as s:
      try:
        s.bind(("", port))
      except OSError:
        continue
    return port - 61440 + 4096 * random.randrange(1, 100_000)
  raise RuntimeError("No free port in 61440-65535.")


def slurm_env(tmp_dir, log_dir=None, **extra) -> dict:
  """What sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=4 sets."""
  job = slurm_job_id()
  return base_env(tmp_dir, log_dir, SLURM_JOB_ID=job, SLURM_JOBID=job,
                  SLURM_NNODES=2, SLURM_JOB_NUM_NODES=2, SLURM_NTASKS=2,
                  SLURM_NTASKS_PER_NODE=1,
                  SLURM_JOB_NODELIST="localhost,127.0.0.1",
                  SLURM_SUBMIT_DIR=ROOT, SLURM_GPUS_ON_NODE=4, **extra)


def read_losses(workdir) -> dict[int, float]:
  """step -> loss from the run's TensorBoard event files (any store)."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  from codeclm.runtime import storage  # pylint: disable=g-import-not-at-top
  out = {}
  for f in storage.path(workdir).iterdir():
    if not f.name.startswith("events.out.tfevents"):
      continue
    with storage.local_file(f) as local:
      for event in event_file_loader.EventFileLoader(local).Load():
        for value in event.summary.value:
          if value.tag == "loss":
            out[event.step] = float(tensor_util.make_ndarray(value.tensor))
  return out


def read_json(p) -> dict:
  from codeclm.runtime import storage  # pylint: disable=g-import-not-at-top
  return storage.read_json(p)


def comparable_config(config: dict) -> dict:
  """config.json less what a launcher sets itself."""
  config = json.loads(json.dumps(config))
  config.pop("distributed")
  config["data"].pop("dir")
  config["model"].pop("attention_impl")
  return config


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """Random Inception weights (the real ones are a download), in a folder
  whose name the overrides use as $TMP_DIR."""
  from codeclm.eval import inception  # pylint: disable=g-import-not-at-top
  tmp_dir = tmp_path_factory.mktemp("launch")
  inception.save_params(inception.random_params(0),
                        str(tmp_dir / "my weights.npz"))
  return tmp_dir


@pytest.fixture(scope="module")
def tpu_run(gcs, weights, tmp_path_factory):
  """launch/tpu_pod.sh, all four stages, workdir on the GCS emulator, its own
  data dir (prepared by its prepare stage): (workdir, data dir, env, exit
  code, output)."""
  tmp_dir = weights
  name = tmp_path_factory.mktemp("tpu").name
  workdir = f"gs://test-bucket/{name}/run"
  data = tmp_path_factory.mktemp("tpu_data") / "data dir" / "it's here"
  env = base_env(tmp_dir, tmp_path_factory.mktemp("tpu_log"),
                 WORKDIR=workdir, DATA=data,
                 COMPILE_DIR=tmp_dir / "compile dir",
                 FAKE_CLUSTER_WORKER_ENV=_WORKER_ENV, **gcs)
  code, out = run_line(
      f'bash "$LAUNCHER" my-tpu us-central2-b tests/tiny_config.py '
      f'"$WORKDIR" "$DATA" {OVERRIDES}', dict(env, LAUNCHER=TPU_POD_SH))
  return workdir, data, env, code, out


@pytest.fixture(scope="module")
def slurm_run(data_dir, weights, tmp_path_factory):
  """launch/gpu_slurm.sbatch, all three stages, a local workdir with a space,
  the module's prepared data: (workdir, env, exit code, output)."""
  tmp_dir = weights
  workdir = tmp_path_factory.mktemp("slurm") / "run dir"
  env = slurm_env(tmp_dir, workdir.parent, WORKDIR=workdir, DATA=data_dir,
                  PYTHON=sys.executable)
  code, out = run_line(
      'bash launch/gpu_slurm.sbatch tests/tiny_config.py "$WORKDIR" "$DATA" '
      f"{OVERRIDES} --config.model.attention_impl=xla", env)
  return workdir, env, code, out


@pytest.fixture(scope="module")
def direct_run(data_dir, weights, tmp_path_factory):
  """The same config trained directly, in this process on its 8 devices, as
  `python -m codeclm.main` runs it: the config parsed from the same flags by
  the same config flag, then loop.train. Returns the workdir. (Not
  evaluated: that 2 processes evaluate as one does is
  tests/test_evaluate.py's; here the two launchers' FIDs must agree.)

  In this process rather than as `python -m codeclm.main`: two fewer
  interpreters importing JAX and TensorFlow (~15 s on 2 cores)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from codeclm.train import loop  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("direct") / "run"
  argv = ["codeclm.main", f"--config={ROOT}/tests/tiny_config.py",
          f"--config.data.dir={data_dir}", *overrides_as_argv(str(weights))]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  config = values.config
  loop.train(config, str(workdir))
  return workdir


def test_overrides_split_as_typed(weights):
  argv = overrides_as_argv(str(weights))
  assert "--config.mesh.shape=(1,-1,1,1)" in argv
  assert "--config.compile.steps=('train',)" in argv
  assert f"--config.eval.inception_weights={weights}/my weights.npz" in argv
  assert f"--config.sample.images={IMAGES}" in argv


def test_tpu_pod_runs_every_stage_with_overrides_as_typed(
    tpu_run, direct_run, gcs_env):
  workdir, data, env, code, out = tpu_run
  assert code == 0, out[-8000:]
  calls = cluster_calls(env)
  ssh = [c for c in calls if "ssh" in c["argv"]]
  # Pre-flight, prepare, train, eval: each on both workers.
  assert len(ssh) == 4 and all(len(c["hosts"]) == 2 for c in ssh), calls
  assert any("describe" in c["argv"] for c in calls)
  # Each stage's command, as the workers' shell splits it, holds the
  # overrides exactly as bash split the line typed.
  typed = overrides_as_argv(env["TMP_DIR"])
  for call, mode in zip(ssh[1:], ("prepare", "train", "eval")):
    command = call["argv"][-1]
    assert command.startswith("--command=cd "), command
    words = shell_words(command.split(" && ", 1)[1])
    assert words[:3] == ["python3", "-m", "codeclm.main"], words
    assert any(words[i:i + len(typed)] == typed
               for i in range(len(words))), (words, typed)
    assert (mode == "train") != any(w.startswith("--mode=") for w in words)
  assert "Process 1 of 2, 4 local / 8 global devices." in out

  # The compile check ran here for the pod's topology, the train step only.
  report = json.load(open(os.path.join(env["COMPILE_DIR"],
                                       "compile_report.json")))
  assert report["topology"] == "v5litepod-8", report
  assert [p["name"] for p in report["programs"]] == ["train step"], report

  # Every override reached the workers as typed: the config they recorded
  # is the direct run's (less what the launcher sets itself).
  config = read_json(f"{workdir}/config.json")
  assert config["mesh"]["shape"] == [1, -1, 1, 1]
  assert config["compile"]["steps"] == ["train"]
  assert config["eval"]["inception_weights"] == os.path.join(
      env["TMP_DIR"], "my weights.npz")
  assert config["sample"]["images"] == IMAGES
  assert config["data"]["dir"] == str(data)
  assert config["distributed"]["initialize"] is True
  direct = read_json(direct_run / "config.json")
  assert comparable_config(config) == comparable_config(direct)

  # Same data (prepared by 2 workers here), same losses; a finite FID (the
  # SLURM run's must equal it).
  assert (data / "tokenizer.json").read_bytes() == (
      direct_run / "tokenizer.json").read_bytes()
  losses, want = read_losses(workdir), read_losses(direct_run)
  assert sorted(losses) == sorted(want) == [1, 2], (losses, want)
  np.testing.assert_allclose([losses[s] for s in (1, 2)],
                             [want[s] for s in (1, 2)], rtol=2e-5)
  results = read_json(f"{workdir}/eval/step_2/results.json")
  assert results["record"]["processes"] == [2]
  assert np.isfinite(results["metrics"]["r50"]["fid"]["0"])


def test_gpu_slurm_runs_every_stage_with_overrides_as_typed(
    slurm_run, direct_run, tpu_run, gcs_env):
  workdir, env, code, out = slurm_run
  assert code == 0, out[-8000:]
  calls = cluster_calls(env)
  # Pre-flight, prepare, train, eval: each a step of 2 tasks.
  assert [len(c["hosts"]) for c in calls] == [2, 2, 2, 2], calls
  for call in calls[1:]:
    assert call["hosts"][0][:3] == [sys.executable, "-m", "codeclm.main"]
  assert "Process 1 of 2, 4 local / 8 global devices." in out
  # All of a node's GPUs, not JAX's SLURM default of GPU SLURM_LOCALID (on
  # CPUs the setting is inert; this shows it reaches JAX).
  assert "JAX distributed initialized with visible devices: 0,1,2,3" in out

  config = read_json(workdir / "config.json")
  assert config["model"]["attention_impl"] == "xla"  # The user's, last.
  assert config["distributed"]["num_processes"] == 2
  assert config["sample"]["images"] == IMAGES
  assert comparable_config(config) == comparable_config(
      read_json(direct_run / "config.json"))

  # The two launchers (2 processes x 4 devices each) agree exactly; the
  # direct run (1 x 8) up to float reassociation.
  tpu_workdir = tpu_run[0]
  losses = read_losses(workdir)
  assert losses == read_losses(tpu_workdir)
  want = read_losses(direct_run)
  np.testing.assert_allclose([losses[s] for s in (1, 2)],
                             [want[s] for s in (1, 2)], rtol=2e-5)
  results = read_json(workdir / "eval" / "step_2" / "results.json")
  assert results["record"]["processes"] == [2]
  assert results["metrics"] == read_json(
      f"{tpu_workdir}/eval/step_2/results.json")["metrics"]


def broken_python_dir(tmp_path) -> str:
  """A folder whose python3 is this interpreter without its site-packages:
  a host where the venv is missing."""
  folder = tmp_path / "no_venv"
  folder.mkdir()
  stub = folder / "python3"
  stub.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
  stub.chmod(0o755)
  return str(folder)


def test_tpu_pod_preflight_names_the_worker_and_runs_no_stage(tmp_path):
  env = base_env(tmp_path, FAKE_CLUSTER_PATH_1=broken_python_dir(tmp_path),
                 COMPILE_DIR=tmp_path / "compile", WORKDIR=tmp_path / "run",
                 DATA=tmp_path / "data")
  code, out = run_line(
      f'bash "$LAUNCHER" my-tpu us-central2-b tests/tiny_config.py '
      f'"$WORKDIR" "$DATA" {OVERRIDES}', dict(env, LAUNCHER=TPU_POD_SH),
      timeout=120)
  assert code != 0, out
  assert "pre-flight failed on worker my-tpu-w-1" in out, out
  assert "python3 cannot import codeclm and jax" in out, out
  assert "No module named" in out, out
  assert "worker my-tpu-w-0" not in out, out
  assert "no stage ran" in out, out
  calls = cluster_calls(env)
  assert len(calls) == 1 and "codeclm.main" not in json.dumps(calls), calls
  for path in ("compile", "run", "data"):
    assert not (tmp_path / path).exists(), path


def test_tpu_pod_preflight_names_a_missing_repo(tmp_path):
  env = base_env(tmp_path, REPO=tmp_path / "not the repo")
  code, out = run_line(
      f'bash "$LAUNCHER" my-tpu us-central2-b tests/tiny_config.py '
      f'"$TMP_DIR/run" "$TMP_DIR/data" {OVERRIDES}',
      dict(env, LAUNCHER=TPU_POD_SH), timeout=120)
  assert code != 0, out
  for worker in (0, 1):
    assert (f"pre-flight failed on worker my-tpu-w-{worker}: no directory "
            f"{tmp_path}/not the repo") in out, out
  assert len(cluster_calls(env)) == 1


def test_gpu_slurm_preflight_names_the_node_and_runs_no_stage(tmp_path):
  env = slurm_env(tmp_path, FAKE_CLUSTER_PATH_1=broken_python_dir(tmp_path),
                  WORKDIR=tmp_path / "run", DATA=tmp_path / "data")
  code, out = run_line(
      'bash launch/gpu_slurm.sbatch tests/tiny_config.py "$WORKDIR" "$DATA" '
      f"{OVERRIDES}", env, timeout=120)
  assert code != 0, out
  assert "pre-flight failed on node 127.0.0.1 (task 1)" in out, out
  assert "node localhost" not in out, out
  assert "no stage ran" in out, out
  calls = cluster_calls(env)
  assert len(calls) == 1 and "codeclm.main" not in json.dumps(calls), calls
  for path in ("run", "data"):
    assert not (tmp_path / path).exists(), path


def test_fake_gcloud_runs_each_worker_and_fails_like_gcloud(tmp_path):
  """Each worker gets its index, the job's size and one coordinator; a
  worker that fails makes gcloud exit non-zero, naming it."""
  env = base_env(tmp_path)
  code, out = run_line(
      "gcloud compute tpus tpu-vm ssh t --zone=z --worker=all --command='"
      'echo "$HOSTNAME $CODECLM_PROCESS_ID/$CODECLM_NUM_PROCESSES '
      '$JAX_COORDINATOR_ADDRESS $PWD"; [ "$CODECLM_PROCESS_ID" != 1 ]'
      "'", env, timeout=60)
  assert code != 0, out
  lines = sorted(l for l in out.splitlines() if l.startswith("t-w-"))
  assert [l.split()[:2] for l in lines] == [["t-w-0", "0/2"],
                                           ["t-w-1", "1/2"]], out
  assert lines[0].split()[2] == lines[1].split()[2], out  # One coordinator.
  assert lines[0].split()[3] != ROOT, out  # A login's directory, not ours.
  assert "worker 1 (t-w-1) exited with return code 1" in out, out
  assert "worker 0 (t-w-0) exited" not in out, out
  code, out = run_line("gcloud compute tpus tpu-vm describe t --zone=z "
                       "--format='value(acceleratorType)'", env, timeout=60)
  assert (code, out) == (0, "v5litepod-8\n")


def test_fake_srun_gives_each_task_slurm_variables(tmp_path):
  env = slurm_env(tmp_path)
  # Task 1 fails, which kills task 0 (--kill-on-bad-exit): it waits until
  # task 0 has printed (a file says so), or a slow start would lose the line.
  printed = tmp_path / "task0_printed"
  code, out = run_line(
      "srun --kill-on-bad-exit=1 bash -c 'echo \"task $SLURMD_NODENAME "
      "$SLURM_PROCID/$SLURM_NTASKS $SLURM_LOCALID $SLURM_STEP_NODELIST "
      f"$SLURM_JOB_ID\"; if [ $SLURM_PROCID = 0 ]; then touch {printed}; "
      f"else for i in $(seq 300); do [ -e {printed} ] && break; sleep 0.1; "
      "done; fi; exit $SLURM_PROCID'", env, timeout=60)
  assert code != 0, out
  lines = sorted(l for l in out.splitlines() if l.startswith("task "))
  job = env["SLURM_JOB_ID"]
  assert lines == sorted([f"task localhost 0/2 0 localhost,127.0.0.1 {job}",
                          f"task 127.0.0.1 1/2 0 localhost,127.0.0.1 {job}"]
                         ), out
  assert "task 1 (node 1, 127.0.0.1) exited with return code 1" in out, out
