"""Every shipped config builds, and its model matches the size it names."""

import importlib.util
import os

import pytest

from codeclm import codecs
from codeclm import config_base
from codeclm.model import llama
from codeclm.train import optimizer
from codeclm.train import planner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 322  # 320 BPE entries + BOS + EOS.


def load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def planned(c):
  """The config as a v5e-256 slice would run it (1B and 7B are "auto")."""
  return planner.resolve(c, 256, 16 * 2**30, host_bytes=48 * 2**30)[0]


@pytest.mark.parametrize("arg", ["", "demo", "100m", "1b", "7b"])
def test_jpeg_configs_build(arg):
  c = planned(load_config("jpeg_lm", arg))
  m = config_base.model_config(c, VOCAB)
  assert m.max_len == c.seq_len
  assert c.codec.name == "jpeg" and c.data.vocab_size == 320
  assert c.batch_size % c.train.grad_accum == 0
  assert c.train.warmup_steps < c.train.steps
  schedule = optimizer.make_schedule(c.train)  # The update at count c.
  assert float(schedule(c.train.warmup_steps - 1)) == pytest.approx(c.train.lr)
  assert 0 < float(schedule(0)) < c.train.lr


def test_default_is_the_paper_setup():
  c = load_config("jpeg_lm", "")
  assert (c.codec.width, c.codec.height, c.codec.quality,
          c.codec.subsampling) == (256, 256, 25, "4:2:0")
  assert c.seq_len == 12_288 and c.train.lr == 3e-4
  assert dict(c.model)["num_layers"] == 32 and c.model.emb_dim == 4096
  assert c.model.mlp_dim == 11008 and c.model.norm_eps == 1e-5
  assert c.model.rope_theta == 1e4 and not c.model.qk_norm
  assert c.train.z_loss == 0.0 and c.data.packing == "concat"


@pytest.mark.parametrize("size, low, high", [
    ("demo", 0.5e6, 3e6), ("100m", 80e6, 130e6), ("1b", 0.9e9, 1.3e9)])
def test_sizes_have_their_parameter_counts(size, low, high):
  c = planned(load_config("jpeg_lm", size))
  assert low < llama.param_count(config_base.model_config(c, VOCAB)) < high


def test_unknown_size_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown size"):
    config_base.lm_config("3b")


@pytest.mark.parametrize("arg", ["", "demo", "100m", "1b", "7b"])
def test_avc_configs_build(arg):
  c = planned(load_config("avc_lm", arg))
  m = config_base.model_config(c, 1_026)  # 1024 BPE entries + BOS + EOS.
  assert m.max_len == c.seq_len
  codec = codecs.from_config(c.codec)  # The codec accepts every field.
  assert codec.name == "avc" and c.data.vocab_size == 1_024
  assert c.batch_size % c.train.grad_accum == 0
  assert c.train.warmup_steps < c.train.steps
  assert c.sample.ratios == (2 / 3,)  # Prompt 10 frames, generate 5.
  assert round(codec.frames * c.sample.ratios[0]) == 10


def test_avc_default_is_the_paper_setup():
  c = load_config("avc_lm", "")
  codec = codecs.from_config(c.codec)
  assert (codec.width, codec.height, codec.fps, codec.frames, codec.qp) == (
      256, 144, 3.0, 15, 37)
  assert (codec.profile, codec.bframes, codec.slice_max_mbs, codec.refs,
          codec.partitions, codec.me, codec.threads) == (
              "baseline", 0, 1, 3, "none", "dia", 1)
  assert c.seq_len == 32_768 and c.train.lr == 3e-4
  assert c.data.tokenizer_examples == 10_000
  assert c.model.emb_dim == 4096 and dict(c.model)["num_layers"] == 32
  assert c.data.source.startswith("tfds:ucf101")


@pytest.mark.parametrize("name", ["jpeg_lm", "avc_lm"])
def test_layout_is_auto_from_1b_and_set_below(name):
  for arg in ("demo", "100m"):  # CPU demos and tests keep their layout.
    assert not planner.auto_fields(load_config(name, arg)), arg
  for arg in ("1b", "7b"):
    c = load_config(name, arg)
    assert planner.auto_fields(c) == [
        f"{sec}.{key}" for sec, key in planner.FIELDS], arg
    with pytest.raises(ValueError, match="call planner.resolve first"):
      planner.check_resolved(c)
    assert not planner.auto_fields(planned(c))
