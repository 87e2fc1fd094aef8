"""The Avc-LM demo config shrunk for tests: a 2-layer width-32 model."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
import avc_lm  # pylint: disable=g-import-not-at-top,wrong-import-position

from codeclm.model import llama  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg: str = ""):
  del arg
  c = avc_lm.get_config("demo")
  c.model.update(llama.SIZES["tiny"])
  c.codec.width = c.codec.height = 32
  c.seq_len = 256
  c.batch_size = 8
  c.data.num_examples = 24
  c.data.eval_examples = 4
  c.data.examples_per_shard = 8
  c.data.tokenizer_examples = 20
  c.data.vocab_size = 300
  c.data.prepare_workers = 1
  c.train.update(steps=4, warmup_steps=2, lr=1e-3, log_every=1, eval_every=0,
                 ckpt_every=2, async_checkpoints=True)
  c.sample.tb_every = 0
  return c
