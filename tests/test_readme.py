"""Every command in README.md and docs/*.md is run, or checked against CI.

Commands come from the fenced shell blocks of README.md, then of the pages in
DOCS (```bash, sh, shell,
console, or a bare ``` whose lines all start with a known program), with
backslash continuations joined, comments dropped and `&&` / `;` chains split.
Each one is one of:

- environment setup (`python3.11 -m venv`, `. .venv/bin/activate`,
  `pip install`): must match what .ci/run does (CI runs them on a clean
  machine), not run here;
- the test command (`python -m pytest ...`): must equal .ci/run's;
- `python -m codeclm.<module> ...` or `python benchmarks/<x>.py ...`: run for
  real, from the repo root with this interpreter, with the TINY overrides of
  its (program, config, mode) appended, every /tmp/ path moved into a temp
  dir and the example input files of FILES created; it must exit 0 and leave
  the OUTPUTS of its key. Commands sharing a --workdir run in README order,
  in one test (train, then sample from that workdir);
- listed in DOCUMENTED_ONLY with the reason it cannot run here.

Anything else fails `test_every_readme_command_is_known` with what to add, so
the README cannot drift from working commands.
"""

import dataclasses
import glob
import os
import re
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# The pages whose commands run too, in this order after the README's (a page's
# command that repeats an earlier one is not run twice).
DOCS = ("docs/codecs.md", "docs/data.md", "docs/training.md", "docs/pods.md",
        "docs/sampling.md", "docs/evaluation.md", "docs/huggingface.md")
CI = os.path.join(ROOT, ".ci", "run")
SHELL_LANGS = ("bash", "sh", "shell", "console", "zsh")
PROGRAMS = ("python", "python3", "python3.11", "pip", ".", "source", "bash",
            "cd", "export")

# Appended to a command that runs for real, keyed by (program, --config,
# --mode): just enough to finish in seconds on CPU (absl: a later flag wins).
_JPEG_DEMO_DATA = ["--config.data.num_examples=64",
                   "--config.data.eval_examples=8"]
_AVC_DEMO_DATA = ["--config.data.num_examples=32",
                  "--config.data.eval_examples=4"]
_TRAIN_TINY = ["--config.train.steps=2", "--config.sample.tb_every=0"]
_SAMPLE_TINY = ["num_samples=1", "max_new_tokens=32", "completions=1"]
_EVAL_TINY = ["--config.eval.num_examples=4", "--config.eval.seeds=(0,)",
              "--config.eval.ratios=(0.5,)", "--config.eval.unconditional=False",
              "--config.sample.max_new_tokens=32"]
TINY = {
    ("codeclm.main", "configs/jpeg_lm.py:demo", "prepare"): _JPEG_DEMO_DATA,
    ("codeclm.main", "configs/jpeg_lm.py:demo", "train"):
        _JPEG_DEMO_DATA + _TRAIN_TINY,
    ("codeclm.main", "configs/jpeg_lm.py:demo", "sample"): [
        f"--config.sample.{o}" for o in _SAMPLE_TINY],
    ("codeclm.main", "configs/jpeg_lm.py:demo", "eval"): _EVAL_TINY,
    ("codeclm.sampling", None, None): [f"--sample.{o}" for o in _SAMPLE_TINY],
    ("codeclm.eval.convert_inception", None, None): [],
    ("codeclm.main", "configs/avc_lm.py:demo", "prepare"): _AVC_DEMO_DATA,
    ("codeclm.main", "configs/avc_lm.py:demo", "train"):
        _AVC_DEMO_DATA + _TRAIN_TINY,
    ("codeclm.main", "configs/avc_lm.py:demo", "sample"): [
        f"--config.sample.{o}" for o in _SAMPLE_TINY],
    # The 7B's shapes shrunk to a 1-layer, width-64 model (needs libtpu).
    ("codeclm.main", "configs/jpeg_lm.py:7b", "compile"): [
        "--config.model.num_layers=1", "--config.model.emb_dim=64",
        "--config.model.num_heads=2", "--config.model.num_kv_heads=2",
        "--config.model.mlp_dim=128", "--config.seq_len=512",
        "--config.batch_size=64", "--config.compile.steps=('train',)"],
    ("codeclm.hf.export_hf", None, None): [],
    ("codeclm.hf.import_hf", "configs/jpeg_lm.py:demo", None): [],
}

# Files each key must leave, as globs under the command's --workdir.
OUTPUTS = {
    ("codeclm.main", "configs/jpeg_lm.py:demo", "prepare"): [
        "data/manifest.json", "data/tokenizer.json"],
    ("codeclm.main", "configs/jpeg_lm.py:demo", "train"): [
        "checkpoints/2/commit_success.txt", "config.json", "tokenizer.json",
        "manifest.json", "events.out.tfevents*"],
    ("codeclm.main", "configs/jpeg_lm.py:demo", "sample"): [
        "samples/step_2/sample_0000.jpg", "samples/step_2/*_grid.png"],
    ("codeclm.main", "configs/jpeg_lm.py:demo", "eval"): [
        "eval/step_2/results.json"],
    ("codeclm.sampling", None, None): ["samples/step_*/*_grid.png"],
    ("codeclm.eval.convert_inception", None, None): ["fid_inception.npz"],
    ("codeclm.main", "configs/avc_lm.py:demo", "prepare"): [
        "data/manifest.json", "data/tokenizer.json"],
    ("codeclm.main", "configs/avc_lm.py:demo", "train"): [
        "checkpoints/2/commit_success.txt", "config.json", "manifest.json"],
    ("codeclm.main", "configs/jpeg_lm.py:7b", "compile"): [
        "compile_report.json"],
    ("codeclm.main", "configs/avc_lm.py:demo", "sample"): [
        "samples/step_2/sample_0000.json", "samples/step_2/samples.png",
        "samples/step_2/clip_r67_0.mp4", "samples/step_2/clip_grid.png"],
    ("codeclm.hf.export_hf", None, None): [  # --dst is beside the workdir.
        "../jpeg_demo_hf/model.safetensors.index.json",
        "../jpeg_demo_hf/tokenizer.json", "../jpeg_demo_hf/README.md"],
    ("codeclm.hf.import_hf", "configs/jpeg_lm.py:demo", None): [
        "checkpoints/0/commit_success.txt", "config.json", "tokenizer.json",
        "manifest.json"],
}


def _skimage_picture(name: str):
  def make(path: str) -> None:
    import skimage.data  # pylint: disable=g-import-not-at-top
    Image.fromarray(getattr(skimage.data, name)()).save(path)
  return make


def _random_inception(path: str) -> None:
  """The real FID weights are a download; random ones run the same code."""
  from codeclm.eval import inception  # pylint: disable=g-import-not-at-top
  inception.save_params(inception.random_params(0), path)


def _random_inception_pth(path: str) -> None:
  """pytorch-fid's .pth (a download) as random tensors under its key names."""
  import torch  # pylint: disable=g-import-not-at-top
  from codeclm.eval import inception  # pylint: disable=g-import-not-at-top
  torch_names = {"kernel": "weight", "scale": "weight", "bias": "bias",
                 "mean": "running_mean", "var": "running_var"}
  rng = np.random.default_rng(0)
  state = {}
  for key, shape in inception.param_shapes().items():
    *module, leaf = key.split("/")[1:]  # Drop "params" / "batch_stats".
    value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if leaf == "kernel":  # Flax [H, W, I, O] is torch's [O, I, H, W].
      value = value.transpose(3, 2, 0, 1)
    state[".".join(module + [torch_names[leaf]])] = torch.from_numpy(value)
  torch.save(state, path)


def _image_folder(path: str) -> None:
  """A user's folder of pictures: crops of scikit-image's photos, in two
  subfolders (as class folders would be), some as PNG."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  photos = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB")
            for n in ("astronaut", "chelsea", "coffee", "rocket")]
  for i in range(24):
    photo = photos[i % len(photos)]
    x, y = (37 * i) % (photo.width - 128), (23 * i) % (photo.height - 128)
    sub = os.path.join(path, ("day", "night")[i % 2])
    os.makedirs(sub, exist_ok=True)
    photo.crop((x, y, x + 128, y + 128)).save(
        os.path.join(sub, f"{i:02d}." + ("png" if i % 3 else "jpg")))


def _foreign_llama(path: str) -> None:
  """A tiny Jpeg-LM-style HF folder (bf16 shards, Braille tokenizer)."""
  from tests import test_hf_io  # pylint: disable=g-import-not-at-top
  test_hf_io.save_foreign(path, test_hf_io.llama_style_tokenizer(),
                          max_len=2048)


def _synthetic_clip(path: str) -> None:
  """A real .mp4 (H.264 in MP4) of one of the built-in synthetic videos."""
  from codeclm.codecs import avc  # pylint: disable=g-import-not-at-top
  from codeclm.data.sources import synthetic_videos  # pylint: disable=g-import-not-at-top
  codec = avc.AvcCodec(width=64, height=48)
  codec.save(os.path.splitext(path)[0],
             codec.encode(synthetic_videos.synthetic_video(0, 64, 48)))


# Example inputs the README names, made in the temp dir when a command runs.
FILES = {
    "clip.mp4": _synthetic_clip,
    "cat.png": _skimage_picture("chelsea"),
    "dog.jpg": _skimage_picture("coffee"),
    "fid_inception.npz": _random_inception,
    "jpeg_lm_hf": _foreign_llama,
    "my_images": _image_folder,
    "pt_inception-2015-12-05-6726825d.pth": _random_inception_pth,
}
OUTPUT_FLAGS = ("--dst",)  # Flags that name a file the command writes.
INPUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".mp4", ".mkv",
                    ".webm", ".avi", ".mov", ".npz", ".pth")

# (regex on the command, why it cannot run here). Keep it short and honest.
DOCUMENTED_ONLY = [
    (r"launch/tpu_pod\.sh", "needs gcloud and a Cloud TPU slice"),
    (r"^gcsfuse ", "needs a GCS bucket and FUSE"),
    (r"init_from=", "a 7B fine-tune; tests/test_hf_io.py runs train.init_from "
     "from an imported tiny model"),
    (r"jpeg_lm\.py:demo_classes", "the class demo and its guided samples: "
     "tests/test_class_conditioning.py trains a class-conditional workdir on "
     "synthetic_classes and samples it through sampling/files.run, the "
     "sample mode's code"),
]


# -- Parsing. ------------------------------------------------------------------


def shell_blocks(markdown: str) -> list[tuple[int, str]]:
  """(first line number, text) of each fenced block holding shell commands."""
  blocks, lines, i = [], markdown.splitlines(), 0
  while i < len(lines):
    fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
    if not fence:
      i += 1
      continue
    end = i + 1
    while end < len(lines) and not lines[end].strip().startswith(
        fence.group(1)):
      end += 1
    body = "\n".join(lines[i + 1:end])
    lang = fence.group(2).lower()
    words = [ln.split()[0] for ln in re.sub(r"\\\n", " ", body).splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    if lang in SHELL_LANGS or (not lang and words and all(
        w.lstrip("$") in PROGRAMS or w == "$" for w in words)):
      blocks.append((i + 2, body))
    i = end + 1
  return blocks


def commands(script: str) -> list[list[str]]:
  """argv of each command: continuations joined, comments, chains split."""
  out = []
  for line in re.sub(r"\\\n", " ", script).splitlines():
    line = re.sub(r"^\s*\$\s+", "", line)  # A console prompt.
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    argv = []
    for token in list(lexer) + [";"]:
      if token in ("&&", ";"):
        if argv:
          out.append(argv)
        argv = []
      else:
        argv.append(token)
  return out


@dataclasses.dataclass
class Command:
  line: int
  argv: list[str]
  env: dict

  @property
  def text(self) -> str:
    return shlex.join(self.argv)

  def flag(self, name: str) -> str | None:
    for arg in self.argv:
      if arg.startswith(f"--{name}="):
        return arg.split("=", 1)[1]
    return None

  @property
  def key(self):
    """(program, config, mode) for TINY and OUTPUTS; None if not runnable."""
    argv = self.argv
    if argv[0] != "python" or len(argv) < 2:
      return None
    if argv[1] == "-m" and len(argv) > 2 and argv[2].startswith("codeclm."):
      if argv[2] == "codeclm.main":
        return (argv[2], self.flag("config"), self.flag("mode") or "train")
      return (argv[2], self.flag("config"), self.flag("mode"))
    if re.fullmatch(r"benchmarks/\w+\.py", argv[1]):
      return (argv[1], self.flag("config"), None)
    return None


def readme_commands(path: str = README) -> list[Command]:
  """The commands of one Markdown file; Command.line is "file:line"."""
  with open(path) as f:
    text = f.read()
  name = os.path.relpath(path, ROOT)
  out = []
  for line, block in shell_blocks(text):
    line = f"{name}:{line}"
    for argv in commands(block):
      env = {}
      while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
        name, value = argv.pop(0).split("=", 1)
        env[name] = value
      if argv:
        out.append(Command(line, argv, env))
  return out


def ci_commands() -> list[list[str]]:
  with open(CI) as f:
    return commands(f.read())


# -- Classification. -----------------------------------------------------------


def pip_install(argv: list[str]) -> tuple[bool, frozenset[str]] | None:
  """(editable, extras) of a `pip install` of this package, else None."""
  if argv[:2] == ["pip", "install"]:
    args = argv[2:]
  elif argv[1:4] == ["-m", "pip", "install"]:
    args = argv[4:]
  else:
    return None
  specs = [a for a in args if not a.startswith("-")]
  if len(specs) != 1:
    return None
  match = re.fullmatch(r"\.(?:\[([\w,]*)\])?", specs[0])
  if not match:
    return None
  return "-e" in args, frozenset(filter(None, (match.group(1) or "").split(",")))


def is_venv(argv):
  return re.fullmatch(r"python3(\.\d+)?", argv[0]) and argv[1:3] == [
      "-m", "venv"]


def is_activate(argv):
  return argv[0] in (".", "source") and len(argv) == 2 and argv[1].endswith(
      "bin/activate")


def is_pytest(argv):
  return argv[:3] == ["python", "-m", "pytest"]


def documented_only(command: Command) -> str | None:
  for pattern, reason in DOCUMENTED_ONLY:
    if re.search(pattern, command.text):
      return reason
  return None


def kind(command: Command) -> str:
  argv = command.argv
  if is_venv(argv) or is_activate(argv) or pip_install(argv) is not None:
    return "setup"
  if is_pytest(argv):
    return "test"
  if documented_only(command):
    return "documented"
  if command.key in TINY:
    return "run"
  return "unknown"


def all_commands() -> list[Command]:
  """The README's commands, then the DOCS pages' not already shown."""
  out, seen = [], set()
  for path in (README,) + tuple(os.path.join(ROOT, d) for d in DOCS):
    for c in readme_commands(path):
      if (c.text, tuple(sorted(c.env.items()))) not in seen:
        seen.add((c.text, tuple(sorted(c.env.items()))))
        out.append(c)
  return out


COMMANDS = all_commands()
# The README demo: its first command that runs here (the quick start's).
DEMO = next((c for c in COMMANDS if kind(c) == "run"), None)


def test_parser_joins_continuations_and_splits_chains():
  markdown = "\n".join([
      "text", "```bash", "# a comment", "A=1 python -m x --f='(1, 2)' \\",
      "    --g=3 && . .venv/bin/activate; pip install -e '.[dev]'", "```",
      "```", "images -- a diagram --> bytes", "```",
      "```python", "print('not shell')", "```",
      "```", "$ python -m y", "python -m z \\", "  --a=1", "```"])
  blocks = shell_blocks(markdown)
  assert [line for line, _ in blocks] == [3, 14]
  assert [commands(b) for _, b in blocks] == [
      [["A=1", "python", "-m", "x", "--f=(1, 2)", "--g=3"],
       [".", ".venv/bin/activate"], ["pip", "install", "-e", ".[dev]"]],
      [["python", "-m", "y"], ["python", "-m", "z", "--a=1"]]]


def test_unmapped_commands_are_unknown():
  def of(text):
    return kind(Command(1, shlex.split(text), {}))
  assert of("python -m codeclm.main --config=configs/jpeg_lm.py:demo "
            "--workdir=/tmp/x") == "run"
  assert of("python -m codeclm.main --config=configs/jpeg_lm.py:7b "
            "--workdir=/tmp/x") == "unknown"  # No tiny overrides for it.
  assert of("python -m codeclm.main --config=configs/jpeg_lm.py:demo "
            "--workdir=/tmp/x --mode=unheard") == "unknown"
  assert of("make all") == "unknown"
  assert of("python setup.py install") == "unknown"
  assert of("pip install -e '.[dev]'") == "setup"
  assert of("pip install torch") == "unknown"


def test_every_readme_command_is_known():
  assert COMMANDS, "No commands found in README.md's code blocks."
  assert all(os.path.exists(os.path.join(ROOT, d)) for d in DOCS), DOCS
  unknown = [c for c in COMMANDS if kind(c) == "unknown"]
  assert not unknown, (
      "Commands in README.md or docs/ this test does not know how to check:"
      "\n" + "\n".join(f"  {c.line}: {c.text}  (key {c.key})" for c in unknown)
      + "\nAdd a mapping in tests/test_readme.py: TINY and OUTPUTS entries for "
      "its (program, --config, --mode) key to run it, or a DOCUMENTED_ONLY "
      "entry with the reason it cannot run offline on CPU.")
  assert set(TINY) == set(OUTPUTS), "Each TINY key needs OUTPUTS, and back."
  stale = [p for p, _ in DOCUMENTED_ONLY
           if not any(re.search(p, c.text) for c in COMMANDS)]
  assert not stale, f"DOCUMENTED_ONLY entries match no command: {stale}"


def test_the_demo_is_the_quick_start_training():
  """check_demo_console reads a training run's lines and summary."""
  assert DEMO is not None and DEMO.key == (
      "codeclm.main", "configs/jpeg_lm.py:demo", "train"), DEMO


def test_demo_console_projection():
  """The full demo's extra lines, from its config's cadence."""
  full = events(demo_config().train)
  tc = demo_config().train
  assert full == (tc.steps // tc.log_every + (tc.steps % tc.log_every > 0),
                  tc.steps // tc.eval_every + (tc.steps % tc.eval_every > 0),
                  tc.steps // tc.ckpt_every + (tc.steps % tc.ckpt_every > 0))


def test_console_hides_only_library_info():
  """Warnings and errors of every library pass; INFO only from codeclm (and
  JAX's one line per cluster process); --verbose_libraries keeps all."""
  import logging  # pylint: disable=g-import-not-at-top
  from codeclm.runtime import console  # pylint: disable=g-import-not-at-top
  library = os.path.join(os.path.dirname(np.__file__), "..", "orbax", "x.py")
  own = os.path.join(ROOT, "codeclm", "train", "loop.py")

  def record(level, pathname, name="absl"):
    return logging.LogRecord(name, level, pathname, 1, "m", (), None)
  keep = console._LibraryInfoFilter().filter  # pylint: disable=protected-access
  assert not keep(record(logging.INFO, library))
  assert keep(record(logging.WARNING, library))
  assert keep(record(logging.ERROR, library))
  assert keep(record(logging.INFO, own))
  assert keep(record(logging.INFO, library, "jax._src.distributed"))
  assert not console.verbose_requested(["main", "--config=c.py"])
  assert console.verbose_requested(["main", "--verbose_libraries"])
  assert not console.verbose_requested(["main", "--verbose_libraries",
                                        "--noverbose_libraries"])
  assert console.verbose_requested(["main", "--verbose_libraries=true"])


def test_setup_commands_match_ci():
  ci = ci_commands()
  ci_installs = [pip_install(a) for a in ci if pip_install(a) is not None]
  ci_installs = [x for x in ci_installs if x[1]]  # Not `pip install -U pip`.
  assert ci_installs and any(is_venv(a) for a in ci) and any(
      is_activate(a) for a in ci), f"Unexpected .ci/run: {ci}"
  ci_extras = frozenset().union(*(extras for _, extras in ci_installs))
  setup = [c for c in COMMANDS if kind(c) == "setup"]
  assert setup, "The README shows no environment setup."
  for c in setup:
    install = pip_install(c.argv)
    if install is not None:
      editable, extras = install
      assert editable, f"line {c.line}: CI installs editable (-e): {c.text}"
      assert extras <= ci_extras, (
          f"line {c.line}: {c.text} installs extras {sorted(extras)}; CI only "
          f"installs {sorted(ci_extras)} (.ci/run), so it never checks them.")
    elif is_activate(c.argv):
      venvs = [x.argv[-1] for x in setup if is_venv(x.argv)]
      assert any(c.argv[1] == f"{v}/bin/activate" for v in venvs), (
          f"line {c.line}: {c.text} activates a venv the README never makes.")


def test_test_command_is_what_ci_runs():
  ci = [a for a in ci_commands() if is_pytest(a)]
  assert len(ci) == 1, f".ci/run should run pytest once: {ci}"
  shown = [c for c in COMMANDS if kind(c) == "test"]
  assert shown, "The README does not show how to run the tests."
  for c in shown:
    assert c.argv == ci[0], (
        f"{c.line} runs `{c.text}`; .ci/run runs "
        f"`{shlex.join(ci[0])}`. Make them the same.")


# -- Running. ------------------------------------------------------------------


def chains() -> dict[str, list[Command]]:
  """Runnable commands grouped by --workdir (README order within a group)."""
  out = {}
  for i, c in enumerate(c for c in COMMANDS if kind(c) == "run"):
    out.setdefault(c.flag("workdir") or f"no-workdir-{i}", []).append(c)
  return out


def localize(arg: str, tmp: str) -> str:
  """/tmp/ paths and written files into `tmp`; FILES inputs made there."""
  name, eq, value = arg.partition("=") if arg.startswith("--") else (
      "", "", arg)
  items = []
  for item in value.split(","):
    if item.startswith("folder:"):  # A data source naming an input folder.
      items.append("folder:" + localize(item[len("folder:"):], tmp))
      continue
    if item.startswith("/tmp/"):
      item = os.path.join(tmp, item[len("/tmp/"):])
    elif name in OUTPUT_FLAGS:
      item = os.path.join(tmp, item)
    elif item in FILES:
      path = os.path.join(tmp, item)
      if not os.path.exists(path):  # A command before may have written it.
        FILES[item](path)
      item = path
    elif item.lower().endswith(INPUT_EXTENSIONS) and not os.path.exists(
        os.path.join(ROOT, item)):
      pytest.fail(f"README names the input file {item!r}, which does not "
                  "exist: add how to make it to FILES in tests/test_readme.py.")
    items.append(item)
  return name + eq + ",".join(items)


# The README demo (its first runnable command) prints at most this many lines
# on a fresh clone, ending with its summary.
DEMO_MAX_LINES = 40


def demo_config():
  """The ConfigDict of the README demo's --config, as absl loads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, arg = DEMO.flag("config").partition(":")
  spec = importlib.util.spec_from_file_location(
      "readme_demo_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def events(tc) -> tuple[int, int, int]:
  """(log, eval, checkpoint) steps a run of `tc` (config.train) prints: each
  every k steps and at the last step."""
  def count(every):
    if not every:
      return 0
    return len({s for s in range(every, tc.steps + 1, every)} | {tc.steps})
  return count(tc.log_every), count(tc.eval_every), count(tc.ckpt_every)


def check_demo_console(output: str) -> None:
  """The demo's console (stdout and stderr as a terminal shows them): the
  test runs it for 2 steps, which print one step, eval and checkpoint line
  each; the full demo prints those at its own cadence and nothing else more
  (prepare's progress is one redrawn line whatever the count). Libraries'
  INFO lines are off, and the summary comes last."""
  lines = output.rstrip("\n").split("\n")
  kinds = {"log": r"\] \[2\] bits_per_byte=.*ETA", "eval": r"\] \[2\] eval: ",
           "checkpoint": r"\] \[2\] checkpoint -> "}
  for name, pattern in kinds.items():
    found = [ln for ln in lines if re.search(pattern, ln)]
    assert len(found) == 1, (name, found, output[-4000:])
  noise = [ln for ln in lines if re.match(
      r"I\d{4} .* (checkpoint_manager|logging_writer)\.py:\d+\]", ln)]
  assert not noise, f"Orbax and clu INFO lines show: {noise[:3]}"
  full = events(demo_config().train)
  projected = len(lines) + sum(full) - len(kinds)
  assert projected <= DEMO_MAX_LINES, (
      f"The README demo would print {projected} lines ({len(lines)} in this "
      f"2-step run, plus {sum(full) - len(kinds)} more step, eval and "
      f"checkpoint lines); keep it to {DEMO_MAX_LINES}:\n{output}")
  summary = [i for i, ln in enumerate(lines) if ln.startswith("Trained to ")]
  assert summary and re.match(r"  next +python -m codeclm\.main ", lines[-1]), (
      f"The demo should end with its summary:\n{output[-3000:]}")
  assert [ln.split()[0] for ln in lines[summary[-1] + 1:]] == [
      "workdir", "checkpoint", "tensorboard", "next"], output[-3000:]


def run(command: Command, tmp: str) -> subprocess.CompletedProcess:
  argv = [sys.executable] + [localize(a, tmp) for a in command.argv[1:]]
  argv += TINY[command.key]
  env = dict(os.environ, **command.env)
  # As on a user's machine: one CPU device, not conftest's eight.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                            env.get("XLA_FLAGS", "")).strip()
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
  # One stream, in the order a terminal shows it.
  return subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=600,
                        check=False)


@pytest.mark.slow
@pytest.mark.parametrize("workdir", sorted(chains()))
def test_readme_commands_run(workdir, tmp_path):
  for command in chains()[workdir]:
    result = run(command, str(tmp_path))
    assert result.returncode == 0, (
        f"{command.line}: `{command.text}` (with "
        f"{TINY[command.key]}) exited {result.returncode}:\n"
        f"{result.stdout[-4000:]}")
    if command is DEMO:
      check_demo_console(result.stdout)
    shown = command.flag("workdir")
    root = localize(shown, str(tmp_path)) if shown else str(tmp_path)
    for pattern in OUTPUTS[command.key]:
      assert glob.glob(os.path.join(root, pattern)), (
          f"{command.line}: `{command.text}` left no {pattern} "
          f"in {root}; it has {sorted(os.listdir(root))}.")
