"""The demo configs shrunk for tests: a 2-layer width-32 model.

  get_config() or get_config("jpeg"): Jpeg-LM on 32x32 images.
  get_config("avc"): Avc-LM on the demo's videos.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import avc_lm  # pylint: disable=g-import-not-at-top,wrong-import-position
import jpeg_lm  # pylint: disable=g-import-not-at-top,wrong-import-position

from codeclm.model import llama_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = "jpeg"):
  """The tiny config of one codec: "jpeg" (the default) or "avc"."""
  arg = arg or "jpeg"
  if arg not in ("jpeg", "avc"):
    raise ValueError(f"tests/tiny_config.py:{arg}: use jpeg or avc.")
  c = (jpeg_lm if arg == "jpeg" else avc_lm).get_config("demo")
  c.model.update(llama_config.SIZES["tiny"])
  c.codec.width = c.codec.height = 32
  if arg == "jpeg":
    c.seq_len = 128
    c.data.update(num_examples=48, eval_examples=8, examples_per_shard=16,
                  tokenizer_examples=40)
  else:
    c.seq_len = 256
    c.data.update(num_examples=24, eval_examples=4, examples_per_shard=8,
                  tokenizer_examples=20)
  c.batch_size = 8
  c.data.vocab_size = 300
  c.data.prepare_workers = 1
  c.train.update(steps=4, warmup_steps=2, lr=1e-3, log_every=1, eval_every=0,
                 ckpt_every=2, async_checkpoints=True)
  c.sample.tb_every = 0
  return c
