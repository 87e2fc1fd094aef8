"""Sample grids for TensorBoard during training.

Signature: `TensorBoardSampler(sample_cfg, model, mesh, rules, tokenizer,
codec, data_dir)`, the config's sample section, never the whole config.
"""

from __future__ import annotations

import functools

from absl import logging
import numpy as np

from codeclm.sampling import files
from codeclm.sampling import workdir as workdir_lib

def eval_examples(data_dir: str, count: int) -> list[bytes]:
  """The first `count` held-out codec byte strings of prepared data."""
  import grain  # pylint: disable=g-import-not-at-top
  from codeclm.data import prepare  # pylint: disable=g-import-not-at-top
  manifest = prepare.load_manifest(data_dir)
  paths = prepare.shard_paths(data_dir, manifest, "eval")
  if not paths:
    return []
  source = grain.sources.ArrayRecordDataSource(paths)
  return [bytes(source[i]) for i in range(min(count, len(source)))]


class TensorBoardSampler:
  """Image grids of samples for the trainer's writer, every tb_every steps.

  Built once (the sampler compiles on the first call and is reused):

    tb = tensorboard.TensorBoardSampler(config.sample, setup.model,
                                        setup.mesh, setup.rules, tokenizer,
                                        codec, data_dir)
    ...
    if tb.due(step):
      writer.write_images(step, tb(state.params))

  The sampler enters the mesh and rules itself. A call returns
  {"samples/unconditional": [1, H, W, 3] uint8, "samples/completions":
  [1, H, W, 3] uint8 (rows: held-out images; columns: prompt | completions |
  original)}, with the same seed every time, so the grids show training
  progress on fixed prompts. It reads the config's sample section alone.
  """

  def __init__(self, sample_cfg, model, mesh, rules, tokenizer, codec,
               data_dir: str):
    self.cfg = sample_cfg
    self.tokenizer, self.codec = tokenizer, codec
    self.grammar = workdir_lib.grammar_of(self.cfg.constrained, codec,
                                          tokenizer)
    self.sampler = workdir_lib.sampler_of(self.cfg, model, tokenizer, mesh, rules)
    # Held-out examples whose prompt leaves room to generate in max_len (a
    # long video's 10-frame prompt may not): skipped with a warning rather
    # than stopping training.
    self.originals = []
    for original in eval_examples(data_dir, self.cfg.tb_images):
      prompt = codec.prompt(original, self.cfg.tb_ratio)
      if len(tokenizer.encode(prompt)) + 2 < model.config.max_len:
        self.originals.append(original)
      else:
        logging.warning(
            "TensorBoard samples skip a held-out example: its prompt "
            "(tb_ratio=%s) does not leave room in seq_len=%d.",
            self.cfg.tb_ratio, model.config.max_len)
    self.settings = workdir_lib.settings_of(self.cfg, self.cfg.max_new_tokens
                                or model.config.max_len)

  def due(self, step: int) -> bool:
    return bool(self.cfg.tb_every) and step % self.cfg.tb_every == 0

  def __call__(self, params) -> dict[str, np.ndarray]:
    draw_ = functools.partial(files.draw, self.sampler, params, self.tokenizer,
                              self.codec, seed=self.cfg.seed,
                              batch_size=self.cfg.batch_size,
                              grammar=self.grammar)
    n = self.cfg.tb_samples
    out = {}
    if n:
      results = draw_([files.Request(f"s{i}") for i in range(n)], self.settings)
      out["samples/unconditional"] = files.grid(
          [[self.codec.preview(r.pixels) for r in results]])
    if self.originals:
      per = self.cfg.completions
      prompts = [self.codec.prompt(o, self.cfg.tb_ratio)
                 for o in self.originals]
      requests = [files.Request(f"e{i}_{j}", prompt, self.cfg.tb_ratio)
                  for i, prompt in enumerate(prompts) for j in range(per)]
      results = draw_(requests, self.settings, first_id=n)
      rows = [[files.preview_bytes(self.codec, prompt)]
              + [self.codec.preview(r.pixels)
                 for r in results[i * per:(i + 1) * per]]
              + [files.preview_bytes(self.codec, original)]
              for i, (prompt, original) in enumerate(zip(prompts,
                                                         self.originals))]
      out["samples/completions"] = files.grid(rows)
    return {name: grid[None] for name, grid in out.items()}
