"""import_hf / export_hf against transformers, on checkpoints built here.

The foreign checkpoint is what the Jpeg-LM release looks like, shrunk: a
LlamaForCausalLM saved by `save_pretrained` in bf16 over several safetensors
shards, with a Llama-style BPE (byte fallback, "▁" prefix) trained here over
JPEG bytes written as Braille characters.
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from codeclm import codecs  # pylint: disable=g-import-not-at-top,wrong-import-position
from codeclm.hf import import_hf  # pylint: disable=g-import-not-at-top,wrong-import-position
from codeclm.model import llama  # pylint: disable=g-import-not-at-top,wrong-import-position
from codeclm.sampling import sampler as sampling_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from codeclm.sampling import workdir as sampling_workdir  # pylint: disable=g-import-not-at-top,wrong-import-position
from codeclm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from codeclm.train import checkpoint_steps  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests import tiny_config  # pylint: disable=g-import-not-at-top,wrong-import-position

_LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]


def _jpegs(n: int, seed: int = 0) -> list[bytes]:
  """Canonical JPEG bytes (the tiny config's codec) of smooth random images."""
  codec = codecs.from_config(tiny_config.get_config().codec)
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    ramp = np.linspace(0, 255, 32)[None, :, None] * rng.uniform(0.2, 1, 3)
    pixels = np.clip(ramp + rng.normal(0, 30, (32, 32, 3)), 0, 255)
    out.append(codec.encode(pixels.astype(np.uint8)))
  return out


def llama_style_tokenizer(byte_fallback: bool = True, limit_alphabet=None):
  """A Llama-2-style BPE trained over JPEG bytes as Braille characters.

  Laid out as Llama-2's: <unk>, <s>, </s> are ids 0-2, then (with byte
  fallback) the 256 byte tokens <0x00>..<0xFF> as ordinary entries, then the
  learned characters and merges.
  """
  from tokenizers import Tokenizer, decoders, models, normalizers, trainers  # pylint: disable=g-import-not-at-top,g-multiple-import
  limit = {"limit_alphabet": limit_alphabet} if limit_alphabet else {}
  learner = Tokenizer(models.BPE(unk_token="<unk>"))
  learner.normalizer = normalizers.Sequence(
      [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  learner.train_from_iterator(
      [tokenizer_lib.to_chars(x) for x in _jpegs(24)],
      trainers.BpeTrainer(vocab_size=400, show_progress=False, **limit))
  learned = json.loads(learner.to_str())["model"]
  front = _LLAMA_SPECIALS + ([f"<0x{b:02X}>" for b in range(256)]
                             if byte_fallback else [])
  vocab = {t: i for i, t in enumerate(front)}
  for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
    vocab.setdefault(t, len(vocab))
  tok = Tokenizer(models.BPE(
      vocab=vocab, merges=[tuple(m) for m in learned["merges"]],
      unk_token="<unk>", byte_fallback=byte_fallback, fuse_unk=True))
  tok.normalizer = learner.normalizer
  tok.decoder = decoders.Sequence([
      decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
      decoders.Strip(" ", 1, 0)])
  tok.add_special_tokens(_LLAMA_SPECIALS)
  return tok


def save_foreign(directory, tok, *, layers=2, shard="60KB", max_len=512):
  """A tiny LlamaForCausalLM in bf16 safetensors shards + its tokenizer."""
  os.makedirs(directory, exist_ok=True)
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
      num_attention_heads=4, num_key_value_heads=2,
      vocab_size=tok.get_vocab_size() + 5,  # Padded, as released models are.
      rms_norm_eps=1e-5, rope_theta=5e4, max_position_embeddings=max_len,
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0, 0.3)  # Confident logits: greedy decoding is stable.
  model.to(torch.bfloat16).save_pretrained(directory, max_shard_size=shard)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
  return directory


def base_config(**model):
  c = tiny_config.get_config()
  c.model.update(dtype="float32", remat_policy="none", **model)
  c.mesh.shape = (1, 1, 1, 1)
  return c


@functools.lru_cache(maxsize=None)
def _foreign_dir(root: str) -> str:
  return save_foreign(os.path.join(root, "jpeg_lm"), llama_style_tokenizer())


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
  return _foreign_dir(str(tmp_path_factory.mktemp("hf")))


@pytest.fixture(scope="module")
def imported(foreign, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("imported") / "w")
  return import_hf.run(foreign, workdir, base_config())


def _hf_logits(directory, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens))).logits.numpy()


def _codeclm_logits(workdir, tokens):
  loaded = sampling_workdir.load(workdir, mesh_shape=(1, 1, 1, 1))
  return np.asarray(jax.jit(loaded.model.apply)(
      {"params": loaded.params}, np.asarray(tokens, np.int32)))


def test_foreign_checkpoint_is_sharded_bf16(foreign):
  shards = [n for n in os.listdir(foreign) if n.endswith(".safetensors")]
  assert len(shards) > 1
  assert json.load(open(os.path.join(foreign, "config.json")))["dtype"] == (
      "bfloat16")


def test_import_logits_equal_transformers(foreign, imported):
  loaded = sampling_workdir.load(imported, mesh_shape=(1, 1, 1, 1))
  assert isinstance(loaded.tokenizer, tokenizer_lib.ByteCharTokenizer)
  assert (loaded.tokenizer.bos_id, loaded.tokenizer.eos_id) == (1, 2)
  cfg = loaded.model.config
  assert (cfg.num_kv_heads, cfg.rope_theta, cfg.max_len) == (2, 5e4, 512)
  tok = loaded.tokenizer
  data = _jpegs(2, seed=7)
  tokens = np.stack([np.concatenate([[tok.bos_id], tok.encode(d)[:40]])
                     for d in data])
  np.testing.assert_allclose(_codeclm_logits(imported, tokens),
                             _hf_logits(foreign, tokens), atol=1e-4,
                             rtol=1e-4)


def test_tokenizer_matches_the_hf_tokenizer_on_jpeg_bytes(foreign, imported):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  hf_tok = Tokenizer.from_file(os.path.join(foreign, "tokenizer.json"))
  ours = tokenizer_lib.load(os.path.join(imported, "tokenizer.json"))
  vocab = hf_tok.get_vocab()
  assert [b for b in range(256)  # Some bytes take the byte-fallback path.
          if tokenizer_lib.to_chars(bytes([b])) not in vocab]
  for data in _jpegs(3, seed=3) + [bytes(range(256))]:
    ids = ours.encode(data)
    assert ids.tolist() == hf_tok.encode(
        tokenizer_lib.to_chars(data), add_special_tokens=False).ids
    assert ours.decode(ids) == data
  # Specials, padding ids past the tokenizer and bare byte-fallback tokens
  # decode without failing.
  assert ours.decode([1, 2, ours.vocab_size - 1]) == b""


def test_greedy_continuation_equals_transformers_generate(foreign, imported):
  loaded = sampling_workdir.load(imported, mesh_shape=(1, 1, 1, 1))
  tok, codec = loaded.tokenizer, loaded.codec
  full = _jpegs(1, seed=11)[0]
  prompt = codec.prompt(full, 0.5)  # Cut after whole MCUs, as released.
  ids = np.concatenate([[tok.bos_id], tok.encode(prompt)]).astype(np.int32)
  new = 24
  model = transformers.AutoModelForCausalLM.from_pretrained(
      foreign, dtype=torch.float32).eval()
  with torch.no_grad():
    out = model.generate(torch.from_numpy(ids[None]), do_sample=False,
                         max_new_tokens=new, eos_token_id=tok.eos_id,
                         pad_token_id=tok.eos_id)[0, len(ids):].numpy()
  want = out[:np.flatnonzero(out == tok.eos_id)[0]] if (
      out == tok.eos_id).any() else out
  sampler = sampling_lib.Sampler(loaded.model, eos_id=tok.eos_id,
                           pad_id=tok.pad_id, cache_dtype="float32",
                           min_bucket=64)
  got = sampler(loaded.params, [ids], sampling_lib.Settings(
      temperature=0.0, max_new_tokens=new))[0]
  assert len(want) >= 8
  np.testing.assert_array_equal(got.tokens, want)
  assert tok.decode(got.tokens) == tok.decode(want)
  assert len(tok.decode(got.tokens)) > 0


# -- bad input: a clear error naming the file, nothing left behind -------------


def _assert_fails_cleanly(src, tmp_path, match):
  workdir = tmp_path / "w"
  with pytest.raises(ValueError, match=match):
    import_hf.run(str(src), str(workdir), base_config())
  assert not workdir.exists()
  assert not [n for n in os.listdir(tmp_path) if ".importing-" in n]


def test_missing_config_json(foreign, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(foreign, src)
  os.remove(src / "config.json")
  _assert_fails_cleanly(src, tmp_path, r"src/config\.json is missing")


def test_non_llama_architecture(foreign, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(foreign, src)
  c = json.load(open(src / "config.json"))
  c.update(architectures=["MistralForCausalLM"], model_type="mistral")
  json.dump(c, open(src / "config.json", "w"))
  _assert_fails_cleanly(src, tmp_path, r"config\.json describes.*Mistral")


def test_truncated_safetensors(foreign, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(foreign, src)
  shard = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))[-1]
  data = (src / shard).read_bytes()
  (src / shard).write_bytes(data[:len(data) - 1000])
  _assert_fails_cleanly(src, tmp_path, f"{shard} is not a complete")


def test_tokenizer_that_misses_byte_characters(foreign, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(foreign, src)
  # No byte fallback, and an alphabet of the 200 most frequent characters:
  # some of the 256 Braille characters have no token.
  llama_style_tokenizer(byte_fallback=False, limit_alphabet=200).save(
      str(src / "tokenizer.json"))
  _assert_fails_cleanly(src, tmp_path,
                        r"tokenizer\.json cannot encode .* of the 256")


def test_workdir_that_exists_is_not_overwritten(foreign, imported):
  with pytest.raises(FileExistsError, match="not empty"):
    import_hf.run(foreign, imported, base_config())


# -- export of a trained workdir ----------------------------------------------


@pytest.fixture(scope="module")
def trained():
  from tests import test_sample  # pylint: disable=g-import-not-at-top
  return test_sample.tiny_workdir()


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  from codeclm.hf import export_hf  # pylint: disable=g-import-not-at-top
  dst = str(tmp_path_factory.mktemp("export") / "hf")
  # Tiny shards: the index and several files are exercised.
  return export_hf.run(trained, dst, dtype="float32", max_shard_mb=0)


def test_export_loads_in_transformers_with_equal_logits(trained, exported):
  names = sorted(os.listdir(exported))
  assert {"config.json", "generation_config.json", "README.md",
          "model.safetensors.index.json", "tokenizer.json",
          "tokenizer_config.json", "special_tokens_map.json"} <= set(names)
  shards = [n for n in names if n.endswith(".safetensors")]
  assert len(shards) > 1 and shards[0] == (
      f"model-00001-of-{len(shards):05d}.safetensors")
  index = json.load(open(os.path.join(exported, "model.safetensors.index.json")))
  assert set(index["weight_map"].values()) == set(shards)
  tok = transformers.AutoTokenizer.from_pretrained(exported)
  ours = tokenizer_lib.load(os.path.join(trained, "tokenizer.json"))
  data = _jpegs(2, seed=5)
  ids = tok(tokenizer_lib.to_chars(data[0]))["input_ids"]
  assert ids == [ours.bos_id] + ours.encode(data[0]).tolist()
  assert (tok.bos_token_id, tok.eos_token_id) == (ours.bos_id, ours.eos_id)
  text = tok.decode(ids, skip_special_tokens=True)
  assert tokenizer_lib.from_chars(text) == data[0]
  tokens = np.stack([np.concatenate([[ours.bos_id], ours.encode(d)[:30]])
                     for d in data])
  np.testing.assert_allclose(_hf_logits(exported, tokens),
                             _codeclm_logits_f32(trained, tokens), atol=1e-4,
                             rtol=1e-4)
  readme = open(os.path.join(exported, "README.md")).read()
  assert "chr(0x2800 + b)" in readme and "JPEG" in readme


def _codeclm_logits_f32(workdir, tokens):
  loaded = sampling_workdir.load(workdir, mesh_shape=(1, 1, 1, 1))
  model = llama.Llama(dataclasses.replace(loaded.model.config,
                                          dtype="float32"))
  return np.asarray(jax.jit(model.apply)({"params": loaded.params},
                                         np.asarray(tokens, np.int32)))


def test_import_of_the_export_is_bit_identical(trained, exported, tmp_path):
  workdir = import_hf.run(exported, str(tmp_path / "w"), base_config())
  before = sampling_workdir.load(trained, mesh_shape=(1, 1, 1, 1))
  after = sampling_workdir.load(workdir, mesh_shape=(1, 1, 1, 1))
  assert after.model.config == dataclasses.replace(
      before.model.config, dtype=after.model.config.dtype,
      remat_policy=after.model.config.remat_policy)
  jax.tree.map(np.testing.assert_array_equal, after.params, before.params)
  # The tokenizer is the exact inverse of the export: the same file.
  assert open(os.path.join(workdir, "tokenizer.json")).read() == open(
      os.path.join(trained, "tokenizer.json")).read()
  assert after.codec.settings() == before.codec.settings()


def test_exported_tokenizer_round_trips_arbitrary_bytes(trained, exported):
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  ours = tokenizer_lib.load(os.path.join(trained, "tokenizer.json"))
  hf_tok = Tokenizer.from_file(os.path.join(exported, "tokenizer.json"))
  back = tokenizer_lib.from_hf(hf_tok)
  rng = np.random.default_rng(0)
  cases = [b"", bytes(range(256)), b"\x00" * 7, "⟨bos⟩<|eos|>".encode()] + [
      rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1, 50, 999)]
  for data in cases:
    ids = hf_tok.encode(tokenizer_lib.to_chars(data),
                        add_special_tokens=False).ids
    assert ids == ours.encode(data).tolist() == back.encode(data).tolist()
    assert tokenizer_lib.from_chars(hf_tok.decode(ids)) == data
    assert back.decode(ids) == data


# -- loop.init_from ------------------------------------------------------------


def _finetune_config(imported, **train):
  """The tiny config with the imported model's shapes and tokenizer."""
  c = tiny_config.get_config()
  source = json.load(open(os.path.join(imported, "config.json")))
  c.model.update({k: source["model"][k] for k in (
      "num_layers", "emb_dim", "num_heads", "num_kv_heads", "mlp_dim",
      "norm_eps", "rope_theta")}, dtype="float32", remat_policy="none")
  c.data.tokenizer = os.path.join(imported, "tokenizer.json")
  c.data.num_examples = 24
  c.data.examples_per_shard = 24
  c.train.update(steps=1, log_every=1, ckpt_every=1, async_checkpoints=False,
                 compilation_cache=False, init_from=imported, **train)
  return c


def test_init_from_first_loss_is_the_imported_models_loss(foreign, imported,
                                                           tmp_path):
  from codeclm.train import loop  # pylint: disable=g-import-not-at-top
  from codeclm.data import loader  # pylint: disable=g-import-not-at-top
  c = _finetune_config(imported)
  workdir = str(tmp_path / "finetune")
  metrics = loop.train(c, workdir)
  data_dir = loop.data_dir_of(c.data, workdir)
  tok = tokenizer_lib.load(os.path.join(data_dir, "tokenizer.json"))
  assert isinstance(tok, tokenizer_lib.ByteCharTokenizer)
  batch = next(loader.TrainBatches(c.data, data_dir, tok, seq_len=c.seq_len,
                                   batch_size=c.batch_size, seed=c.seed))
  model = transformers.AutoModelForCausalLM.from_pretrained(
      foreign, dtype=torch.float32).eval()
  with torch.no_grad():
    logits = model(torch.from_numpy(batch["inputs"]).long(), position_ids=
                   torch.from_numpy(batch["positions"]).long()).logits
  nll = torch.nn.functional.cross_entropy(
      logits.flatten(0, 1), torch.from_numpy(batch["targets"]).long().flatten(),
      reduction="none").numpy()
  mask = batch["loss_mask"].reshape(-1).astype(bool)
  want = nll[mask].mean()
  assert metrics["loss"] == pytest.approx(want, rel=1e-4)
  # Step 0 was not a restore: the run started its own count and optimizer.
  assert checkpoint_steps.committed_steps(workdir) == [1]


def test_init_from_with_another_vocabulary_names_both_sizes(imported,
                                                           tmp_path):
  from codeclm.train import loop  # pylint: disable=g-import-not-at-top
  c = _finetune_config(imported)
  c.data.tokenizer = ""  # A BPE trained on the new data: 300 + BOS/EOS ids.
  imported_vocab = tokenizer_lib.load(
      os.path.join(imported, "tokenizer.json")).vocab_size
  with pytest.raises(ValueError) as info:
    loop.train(c, str(tmp_path / "w"))
  assert f"vocab_size {imported_vocab}" in str(info.value)
  assert "vocab_size 302" in str(info.value)
  assert not os.path.isdir(tmp_path / "w" / "checkpoints" / "1")


def test_sentencepiece_tokenizer_model_is_converted(tmp_path):
  """A tokenizer.model (no tokenizer.json) gives SentencePiece's own ids."""
  spm = pytest.importorskip("sentencepiece")
  import io  # pylint: disable=g-import-not-at-top
  texts = [tokenizer_lib.to_chars(x) for x in _jpegs(24)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, model_type="bpe",
      vocab_size=700, byte_fallback=True, character_coverage=0.99,
      hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      max_sentence_length=1 << 16, minloglevel=2)
  (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  tok = import_hf.read_tokenizer(str(tmp_path), dict(
      vocab_size=sp.get_piece_size(), bos_token_id=1, eos_token_id=2))
  assert isinstance(tok, tokenizer_lib.ByteCharTokenizer)
  fallback = 0
  for data in _jpegs(3, seed=9) + [bytes(range(256))]:
    ids = tok.encode(data)
    want = sp.encode(tokenizer_lib.to_chars(data))
    assert ids.tolist() == want
    fallback += sum(sp.id_to_piece(i).startswith("<0x") for i in want)
    assert tok.decode(ids) == data
  assert fallback  # Some characters took the byte-fallback path.
  with pytest.raises(ValueError, match=rf"outside \[0, {tok.vocab_size}\)"):
    tok.decode([tok.vocab_size])
  with pytest.raises(ValueError, match="1-D sequence of int"):
    tok.decode([[1, 2]])
