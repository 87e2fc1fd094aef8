"""Class conditioning end to end: class tokens, labelled data, label dropout,
windows that keep their class, guided sampling, the HF round trip."""

import dataclasses
import functools
import json
import math
import os

from array_record.python import array_record_module
import numpy as np
from PIL import Image
import pytest

from codeclm import tokenizer as tokenizer_lib
from codeclm.data import conditioning
from codeclm.data import loader
from codeclm.data import prepare
from codeclm.data.sources import synthetic_classes
from codeclm.data.sources.base import DataError
from codeclm.model import llama
from codeclm.model import sharding
from codeclm.sampling import constraint as constraint_lib
from codeclm.sampling import decode_loop
from codeclm.sampling import files
from codeclm.sampling import sampler as sampler_lib
from codeclm.sampling import workdir as workdir_lib
from codeclm.tokenizer import ByteBPE
from tests import test_sample
from tests.test_sources import make_config

N = 3  # classes
NAMES = synthetic_classes.label_names(N)
ONE_DEVICE = (1,) * len(sharding.MESH_AXES)


# -- class tokens --------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def class_tokenizer() -> ByteBPE:
  rng = np.random.default_rng(0)
  data = [np.minimum(rng.zipf(1.4, 800), 255).astype(np.uint8).tobytes()
          for _ in range(20)]
  return ByteBPE.train(data, vocab_size=300).with_classes(
      ["cat", "dog: big", "\u27e9odd"])


def test_class_ids_follow_eos_and_no_bytes_make_them():
  tok = class_tokenizer()
  plain = ByteBPE.from_json(tok.to_json()).with_classes(["x", "y"])
  ids = [tok.class_id(i) for i in range(3)] + [tok.class_id(None)]
  assert ids == list(range(tok.eos_id + 1, tok.vocab_size)) == [302, 303, 304,
                                                                305]
  assert tok.no_class_id == 305 and tok.num_entries == 300
  assert not set(ids) & {tok.bos_id, tok.eos_id, *range(tok.num_entries)}
  # Data that spells the tokens' names still encodes to BPE entries only.
  rng = np.random.default_rng(1)
  spelled = [json.loads(tok.to_json())["added_tokens"][i]["content"]
             for i in range(2, 6)]
  for data in [s.encode(enc) for s in spelled for enc in ("utf-8", "utf-16")
               ] + [bytes(range(256)), rng.bytes(3000)]:
    encoded = tok.encode(data)
    assert encoded.max() < tok.num_entries
    assert tok.decode(encoded) == data
  assert tok.decode([65, tok.class_id(1), 66, tok.no_class_id]) == b"AB"
  # The file keeps them; with_classes replaces a list, keeping the BPE ids.
  again = ByteBPE.from_json(tok.to_json())
  assert again.class_names == ("cat", "dog: big", "\u27e9odd")
  assert (plain.class_names, plain.vocab_size) == (("x", "y"), 305)
  np.testing.assert_array_equal(plain.encode(b"abc\xff" * 9),
                                tok.encode(b"abc\xff" * 9))
  with pytest.raises(ValueError, match="no class tokens"):
    ByteBPE.from_json(json.dumps(
        {**json.loads(tok.to_json()), "added_tokens": json.loads(
            tok.to_json())["added_tokens"][:2]})).class_id(0)
  broken = json.loads(tok.to_json())
  broken["added_tokens"] = broken["added_tokens"][:-1]  # No "no class".
  with pytest.raises(ValueError, match="not a ByteBPE tokenizer"):
    ByteBPE.from_json(json.dumps(broken))
  with pytest.raises(ValueError, match="not one of"):
    tok.class_id(3)


def check_hf_class_tokens(hf, tok: ByteBPE) -> None:
  """transformers' tokenizer has the class tokens at our ids, as specials."""
  names = [tokenizer_lib.class_token(i, n) for i, n in enumerate(
      tok.class_names)] + [tokenizer_lib.NO_CLASS]
  ids = list(range(tok.eos_id + 1, tok.vocab_size))
  assert hf.convert_tokens_to_ids(names) == ids
  data = b"\x00\xffab"
  text = hf.decode([tok.bos_id, ids[1], *tok.encode(data).tolist()],
                   skip_special_tokens=True)
  assert tokenizer_lib.from_chars(text) == data
  assert hf(tokenizer_lib.to_chars(data))["input_ids"] == [
      tok.bos_id, *tok.encode(data).tolist()]


def test_hf_tokenizer_keeps_the_class_tokens(tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  from codeclm.hf import export_hf  # pylint: disable=g-import-not-at-top
  tok = class_tokenizer()
  back = tokenizer_lib.from_hf(tokenizer_lib.to_hf(tok))
  assert back.to_json() == tok.to_json()
  folder = str(tmp_path)
  for name, text in export_hf.hf_tokenizer_files(tok, 512).items():
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
      f.write(text)
  check_hf_class_tokens(transformers.AutoTokenizer.from_pretrained(folder),
                        tok)
  assert "## Classes" in export_hf._classes_note(tok)


# -- labelled data -------------------------------------------------------------


def labelled_config(**data):
  config = make_config(source="synthetic_classes", num_classes=N,
                       num_examples=30, eval_examples=5, examples_per_shard=8,
                       streams=1, **data)
  config.seq_len, config.batch_size = 64, 4
  return config


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
  """synthetic_classes prepared unconditioned, then again with classes
  (the second run keeps the shards and rewrites the tokenizer)."""
  out = str(tmp_path_factory.mktemp("labelled"))
  prepare_ = lambda config: prepare.run(
      config.data, config.codec, out, seed=0, process_index=0,
      process_count=1, progress=False)
  before = prepare_(labelled_config())
  plain = ByteBPE.load(os.path.join(out, "tokenizer.json"))
  shard = os.path.join(out, before["shards"][-1]["path"])
  stamp = os.stat(shard).st_mtime_ns
  manifest = prepare_(labelled_config(conditioning="class"))
  assert os.stat(shard).st_mtime_ns == stamp
  tok = ByteBPE.load(os.path.join(out, "tokenizer.json"))
  return out, manifest, plain, tok


def test_prepare_adds_the_class_tokens_and_lists_them(labelled):
  out, manifest, plain, tok = labelled
  assert plain.class_names == () and tok.class_names == tuple(NAMES)
  assert tok.vocab_size == plain.vocab_size + N + 1
  assert manifest["label_names"] == NAMES
  assert manifest["vocabulary"]["classes"] == {
      n: plain.eos_id + 1 + i for i, n in enumerate(NAMES)}
  assert manifest["vocabulary"]["no_class_id"] == tok.no_class_id
  # Labels are stored per record; synthetic_classes' rule is index % N.
  meta = json.load(open(os.path.join(out, "train-00000-of-00004.json")))
  assert meta["labels"] == [i % N for i in meta["indices"]]


def test_synthetic_classes_are_told_apart_by_the_hue_rule():
  source = synthetic_classes.SyntheticClassSource(24, N, 32, 32)
  from codeclm import codecs  # pylint: disable=g-import-not-at-top
  codec = codecs.from_config(make_config().codec)
  for i in range(24):
    item = source[i]
    pixels = codec.decode(codec.encode(item.data))[0]  # After JPEG.
    assert item.label == i % N
    assert synthetic_classes.class_of(pixels, N) == item.label
  # Unlabelled pictures fall into every class (the rule is not a constant).
  from codeclm.data.sources import synthetic_images  # pylint: disable=g-import-not-at-top
  seen = {synthetic_classes.class_of(synthetic_images.synthetic_image(
      i, 32, 32), N) for i in range(40)}
  assert seen == set(range(N))


def test_unlabelled_data_with_conditioning_fails_at_start(labelled, tmp_path):
  config = make_config(num_examples=10, conditioning="class")
  with pytest.raises(DataError, match="needs labelled data.*synthetic_classes"):
    prepare.run(config.data, config.codec, str(tmp_path / "u"), seed=0,
                process_index=0, process_count=1, progress=False)
  assert not (tmp_path / "u").exists()  # Failed before anything was written.
  out, _, plain, _ = labelled
  config = labelled_config(conditioning="class")
  with pytest.raises(DataError, match="no class tokens.*--mode=prepare"):
    loader.TrainBatches(config.data, out, plain, seq_len=64, batch_size=4,
                        seed=0)
  # Data prepared without labels, read with conditioning on.
  config = make_config(num_examples=10, eval_examples=2)
  prepare.run(config.data, config.codec, str(tmp_path / "p"), seed=0,
              process_index=0, process_count=1, progress=False)
  config.data.conditioning = "class"
  with pytest.raises(DataError, match="needs labelled data"):
    loader.TrainBatches(config.data, str(tmp_path / "p"), plain, seq_len=64,
                        batch_size=4, seed=0)
  config.data.conditioning = "classes"
  with pytest.raises(DataError, match="Unknown config.data.conditioning"):
    loader.TrainBatches(config.data, str(tmp_path / "p"), plain, seq_len=64,
                        batch_size=4, seed=0)


def test_label_dropout_rate_is_seeded_by_position():
  n, rate = 20_000, 0.1
  kept = np.array([conditioning.keeps_label(0, p, rate) for p in range(n)])
  assert abs((1 - kept.mean()) - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
  again = [conditioning.keeps_label(0, p, rate) for p in range(500)]
  other = [conditioning.keeps_label(1, p, rate) for p in range(500)]
  assert again == kept[:500].tolist() and other != again
  assert all(conditioning.keeps_label(0, p, 0.0) for p in range(100))
  assert not any(conditioning.keeps_label(0, p, 1.0) for p in range(100))


def reference_stream(out, tok, *, seed, dropout, count):
  """The first `count` examples of the record order as [BOS, class, ids,
  EOS], built from the shards and the source's labelling rule (index % N)."""
  index_of = {}
  manifest = json.load(open(os.path.join(out, "manifest.json")))
  for shard in manifest["shards"]:
    reader = array_record_module.ArrayRecordReader(
        os.path.join(out, shard["path"]))
    meta = json.load(open(os.path.join(
        out, shard["path"].replace(".array_record", ".json"))))
    index_of.update(zip(reader.read_all(), meta["indices"]))
    reader.close()
  order = loader.record_order(out, seed=seed)
  examples = []
  for p in range(count):
    label = index_of[order[p]] % N
    keep = conditioning.keeps_label(seed, p, dropout)
    cls = tok.eos_id + 1 + label if keep else tok.eos_id + 1 + N
    examples.append([tok.bos_id, cls, *tok.encode(order[p]).tolist(),
                     tok.eos_id])
  return examples


def test_concat_windows_start_with_the_class_of_their_first_token(labelled):
  out, _, _, tok = labelled
  config = labelled_config(conditioning="class")
  batches = loader.TrainBatches(config.data, out, tok, seq_len=64,
                                batch_size=4, seed=0, label_dropout=0.3)
  windows = []
  for _ in range(6):
    b = next(batches)
    windows += [{k: b[k][r] for k in b} for r in range(4)]
  # The window's stream tokens: input 1 (after the class), then targets 1..
  stream = np.concatenate([np.concatenate([w["inputs"][1:2], w["targets"][1:]])
                           for w in windows])
  examples = reference_stream(out, tok, seed=0, dropout=0.3, count=30)
  want = np.concatenate([np.array(e) for e in examples])[:len(stream)]
  np.testing.assert_array_equal(stream, want)  # Every token, in order.
  classes = stream[np.flatnonzero(stream == tok.bos_id) + 1]
  assert (classes == tok.no_class_id).any() and (
      classes != tok.no_class_id).any()
  inside = 0
  for k, w in enumerate(windows):
    start = 64 * k
    bos = np.flatnonzero(stream[:start + 1] == tok.bos_id).max()
    assert w["inputs"][0] == stream[bos + 1]  # The image's class token.
    np.testing.assert_array_equal(w["inputs"][2:], w["targets"][1:-1])
    assert w["targets"][0] == tok.pad_id  # The class token's: masked.
    assert w["loss_mask"][0] == 0 and w["loss_mask"][1:].all()
    inside += stream[start] != tok.bos_id
  assert inside >= len(windows) // 2  # Most windows start inside an image.


def test_pack_pieces_of_a_long_example_start_with_its_class(labelled):
  out, _, _, tok = labelled
  config = labelled_config(conditioning="class", packing="pack")
  batches = loader.TrainBatches(config.data, out, tok, seq_len=64,
                                batch_size=4, seed=0, label_dropout=0.3)
  examples = reference_stream(out, tok, seed=0, dropout=0.3, count=30)
  pieces = 0
  for _ in range(4):
    b = next(batches)
    for r in range(4):
      seg = b["segment_ids"][r]
      for s in set(seg[seg > 0].tolist()):
        tokens = b["inputs"][r][seg == s].tolist()
        if tokens[0] == tok.bos_id:
          assert tokens[1] > tok.eos_id
          continue
        pieces += 1
        cls, body = tokens[0], tokens[1:]
        hosts = [e for e in examples if e[1] == cls and any(
            e[i:i + len(body)] == body for i in range(2, len(e)))]
        assert hosts, "a piece whose class token is not its example's"
  assert pieces


def test_a_resumed_loader_drops_the_same_labels(labelled):
  out, _, _, tok = labelled
  config = labelled_config(conditioning="class")
  make = lambda: loader.TrainBatches(config.data, out, tok, seq_len=64,
                                     batch_size=4, seed=0, label_dropout=0.5)
  straight = make()
  next(straight)
  state = straight.get_state()
  want = [next(straight) for _ in range(3)]
  resumed = make()
  resumed.set_state(json.loads(json.dumps(state)))
  for w in want:
    got = next(resumed)
    for k in loader.BATCH_KEYS:
      np.testing.assert_array_equal(got[k], w[k])


def test_eval_batches_keep_every_label(labelled):
  out, _, _, tok = labelled
  config = labelled_config(conditioning="class")
  stream = np.concatenate([
      np.concatenate([b["inputs"][r, 1:2], b["targets"][r, 1:]])
      for b in loader.eval_batches(config.data, out, tok, seq_len=64,
                                   batch_size=4) for r in range(4)])
  classes = stream[np.flatnonzero(stream == tok.bos_id) + 1]
  # Eval records 0..4 in order, none dropped: class i % N each.
  assert classes.tolist() == [tok.class_id(i % N) for i in range(5)]


# -- guided sampling -----------------------------------------------------------


SETTINGS = sampler_lib.Settings(temperature=1.0, top_k=40, top_p=0.9,
                                max_new_tokens=24)
# Class-conditional completions: BOS, a class token, then prompt tokens.
COND = [[1, 290, 5, 9], [1, 291, 7, 7, 7, 8, 2], [1, 292]]
UNCOND = [[1, 293, 5, 9], [1, 293, 7, 7, 7, 8, 2], [1, 293]]


def guided(s, **kwargs):
  return test_sample.run(COND, SETTINGS, seed=4, unconditional=UNCOND,
                         guidance=s, **kwargs)


def tokens(samples):
  return [x.tokens.tolist() for x in samples]


def test_guidance_zero_is_unconditional_and_one_is_conditional():
  assert tokens(guided(0.0)) == tokens(test_sample.run(UNCOND, SETTINGS,
                                                       seed=4))
  assert tokens(guided(1.0)) == tokens(test_sample.run(COND, SETTINGS,
                                                       seed=4))
  assert tokens(guided(3.0)) != tokens(guided(1.0))


def test_mix_is_uncond_plus_scaled_difference_on_both_rows():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7)).astype(np.float32)
  g = decode_loop.Guidance(partner=np.array([1, 0, 3, 2, 4]),
                           conditional=np.array([1, 0, 0, 1, 1], bool),
                           scale=np.float32(2.5))
  mixed = np.asarray(g.mix(logits))
  for c, u in ((0, 1), (3, 2)):
    want = logits[u] + 2.5 * (logits[c] - logits[u])
    np.testing.assert_allclose(mixed[c], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(mixed[c], mixed[u])
  np.testing.assert_allclose(mixed[4], logits[4], rtol=1e-6)  # Unpaired.


def test_the_constraint_applies_after_guidance():
  """Masked logits are -inf; mixed at s > 1 they would be nan. An even-ids
  constraint after guidance leaves whole samples of even ids."""
  even = np.arange(test_sample.VOCAB) % 2 == 0
  constraint = constraint_lib.Constraint.create(np.stack([even, even]),
                                                np.zeros((2, even.size)))
  for s in (3.0, -1.0):
    for x in guided(s, constraint=constraint):
      assert len(x.tokens) == 24 and not (x.tokens % 2).any()


def test_guided_rows_split_over_a_mesh_draw_what_one_device_draws():
  model, params = test_sample.model_and_params()
  mesh = sharding.make_mesh((-1,) + ONE_DEVICE[1:])  # All 8 devices.
  spread = sampler_lib.Sampler(model, eos_id=test_sample.EOS,
                               pad_id=test_sample.PAD, mesh=mesh,
                               cache_dtype="float32")
  got = spread(params, COND, SETTINGS, seed=4, unconditional=UNCOND,
               guidance=3.0)
  assert tokens(got) == tokens(guided(3.0))


# -- a trained class-conditional workdir ---------------------------------------


def class_workdir(path: str, num_classes: int = N) -> str:
  """A class-conditional tiny workdir (synthetic_classes), one step."""
  from codeclm.train import loop  # pylint: disable=g-import-not-at-top
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  c = tiny_config.get_config()
  c.data.update(source="synthetic_classes", num_classes=num_classes,
                conditioning="class")
  c.seq_len = 256
  c.train.update(steps=1, ckpt_every=1, eval_every=0, async_checkpoints=False,
                 compilation_cache=False)
  loop.train(c, path)
  return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return class_workdir(str(tmp_path_factory.mktemp("classes") / "w"))


def test_guided_constrained_samples_all_decode_with_pillow(workdir, tmp_path):
  loaded = workdir_lib.load(workdir, mesh_shape=ONE_DEVICE)
  assert loaded.tokenizer.class_names == tuple(NAMES)
  model = llama.Llama(dataclasses.replace(loaded.model.config, max_len=1024))
  cfg = test_sample.sample_config(cache_dtype="float32", min_bucket=1024,
                                  mesh_shape=ONE_DEVICE)
  sampler = workdir_lib.sampler_of(cfg, model, loaded.tokenizer, loaded.mesh,
                                   loaded.rules)
  grammar = workdir_lib.grammar_of(True, loaded.codec, loaded.tokenizer)
  todo = [files.Request(f"c{c}_{j}", label=c, class_name=NAMES[c])
          for c in range(N) for j in range(2)]
  results = files.draw(sampler, loaded.params, loaded.tokenizer,
                       loaded.codec, todo, dataclasses.replace(
                           SETTINGS, max_new_tokens=1024),
                       seed=0, batch_size=8, grammar=grammar, guidance=3.0)
  for r in results:
    assert r.sample.ended and r.report.clean == r.report.expected
    written = loaded.codec.save(str(tmp_path / r.request.name), r.data)
    jpg = [p for p in written if p.endswith(".jpg")][0]
    with Image.open(jpg) as im:
      im.load()  # Pillow decodes the whole file.
      assert im.size == (32, 32)


def test_sample_command_writes_a_grid_per_class(workdir, tmp_path):
  out = tmp_path / "out"
  summary = files.run(test_sample.sample_config(
      num_samples=1, classes=f"{NAMES[2]},0", per_class=2, guidance=2.0,
      out_dir=str(out), mesh_shape=ONE_DEVICE), workdir)
  names = [f"class_{n}_{j:02d}" for n in (NAMES[2], NAMES[0])
           for j in range(2)]
  assert set(names) <= set(summary["samples"])
  for name in names:
    info = json.load(open(out / f"{name}.json"))
    assert info["class"] in (NAMES[2], NAMES[0]) and info["guidance"] == 2.0
    assert info["label"] == NAMES.index(info["class"])
  plain = json.load(open(out / "sample_0000.json"))
  assert plain["class"] is None and plain["guidance"] is None
  for n in (NAMES[2], NAMES[0]):
    assert np.asarray(Image.open(out / f"class_{n}.png")).shape == (
        32, 2 * 32 + 2, 3)
  assert np.asarray(Image.open(out / "classes.png")).shape == (
      2 * 32 + 2, 2 * 32 + 2, 3)
  with pytest.raises(ValueError, match="neither a class name nor an id"):
    files.class_labels("purple", NAMES)
  with pytest.raises(ValueError, match="no class tokens"):
    files.class_labels("all", ())


def test_hf_export_and_import_keep_the_class_tokens(workdir, tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  from codeclm.hf import export_hf  # pylint: disable=g-import-not-at-top
  from codeclm.hf import import_hf  # pylint: disable=g-import-not-at-top
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  exported = export_hf.run(workdir, str(tmp_path / "hf"), dtype="float32")
  tok = ByteBPE.load(os.path.join(workdir, "tokenizer.json"))
  check_hf_class_tokens(transformers.AutoTokenizer.from_pretrained(exported),
                        tok)
  assert json.load(open(os.path.join(exported, "config.json")))[
      "vocab_size"] == tok.vocab_size
  assert f"'no class': {tok.no_class_id}" in open(
      os.path.join(exported, "README.md")).read()
  base = tiny_config.get_config()
  base.mesh.shape = ONE_DEVICE
  back = import_hf.run(exported, str(tmp_path / "w"), base)
  assert open(os.path.join(back, "tokenizer.json")).read() == open(
      os.path.join(workdir, "tokenizer.json")).read()
  assert ByteBPE.load(os.path.join(back, "tokenizer.json")).class_names == (
      tuple(NAMES))


@pytest.mark.slow
def test_two_processes_draw_the_guided_samples_one_process_draws(
    workdir, tmp_path):
  """--mode=sample with classes and guidance as 2 processes x 4 devices
  (jax.distributed on localhost): each draws its share of the doubled
  (conditional + unconditional) batch, and the files equal, byte for byte,
  those of this process's 8 devices."""
  from tests import test_evaluate  # pylint: disable=g-import-not-at-top
  from tests import multihost  # pylint: disable=g-import-not-at-top
  sample = dict(num_samples=0, classes="all", per_class=2, guidance=3.0,
                max_new_tokens=32, mesh_shape=(-1, 1, 1, 1), min_bucket=256,
                batch_size=4, constrained=False)
  logs = multihost.run(2, workdir, [
      "--mode=sample",
      *(f"--config.sample.{k}={v}" for k, v in sample.items()),
      f"--config.sample.out_dir={tmp_path / 'two'}"], timeout=400)
  # 3 classes x 2 = 6 requests: samples 0-2 on process 0, 3-5 on process 1.
  for log in logs:
    assert "Wrote 3 samples to" in log, log[-3000:]
  files.run(test_sample.sample_config(out_dir=str(tmp_path / "one"),
                                      **sample), workdir)
  one, two = (test_evaluate.tree_sha256(tmp_path / n) for n in ("one", "two"))
  assert one == two
  assert {f"class_{n}_{j:02d}.jpg" for n in NAMES for j in range(2)} <= set(one)
  assert "classes.png" in one
