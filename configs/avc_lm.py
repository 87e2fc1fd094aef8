r"""Avc-LM: a Llama-2 over canonical H.264 (AVC) bytes (Han et al., 2024).

The paper's setup (no arg): 7B; each video resampled to 3 fps, its first 5 s
(15 frames) kept and letterboxed to 256x144, encoded by libx264 at QP 37
with one macroblock per slice (the x264 flags below); a 1024-entry byte BPE
from 10K videos; windows of 32,768 tokens (about two videos); peak LR 3e-4.
Sampling prompts with the first 10 frames and generates the last 5.

Data: the paper's video corpus is not public. The default is UCF101 from
TFDS (13K clips of 101 actions, 320x240 at 25 fps; TFDS keeps no frame rate,
so tfds_source.TFDS_VIDEO_FPS supplies it), config ucf101_1 (the original size:
the default ucf101_1_256 squashes frames to a square). It must be built once
where it can download (6.5 GB; TFDS needs ffmpeg to cut the clips):

  tfds build ucf101/ucf101_1 --data_dir=~/tensorflow_datasets

  # CPU demo: prepares the built-in synthetic clips, trains, checkpoints.
  python -m codeclm.main --config=configs/avc_lm.py:demo --workdir=/tmp/avc_demo

  # UCF101, 1B, on a pod slice: prepare once, then train.
  python -m codeclm.main --config=configs/avc_lm.py:1b --workdir=gs://b/avc1b \
      --mode=prepare
  python -m codeclm.main --config=configs/avc_lm.py:1b --workdir=gs://b/avc1b

  # A folder of video files (.mp4 .mov .mkv .webm ...; each file's own rate).
  python -m codeclm.main --config=configs/avc_lm.py:100m --workdir=/tmp/avc \
      --config.data.source=folder:/data/clips --mode=prepare

Other TFDS video datasets need their frame rate given:
--config.data.source=tfds:NAME --config.data.tfds_fps=FPS.

Args: "demo", "100m", "1b", "7b" (default "7b").
"""

from codeclm import config_base


def get_config(arg: str = ""):
  size = arg or "7b"
  c = config_base.lm_config(size)
  c.codec = dict(
      name="avc", width=256, height=144, fps=3.0, frames=15, qp=37,
      short="pad",  # a clip of 5 s or less repeats its last frame
      # libx264, as the paper: baseline, one macroblock per slice, cheap
      # motion search, no B-frames, psy or trellis; one thread (determinism).
      profile="baseline", bframes=0, slice_max_mbs=1, trellis=0, me="dia",
      subme=0, psy=0, mixed_refs=0, fast_pskip=0, partitions="none", refs=3,
      threads=1,
      # False: slices only, SPS/PPS/SEI stripped (constant per setting, kept in
      # codec.header()). True: x264's stream as written, the paper's form.
      keep_headers=False)
  c.data.source = "tfds:ucf101/ucf101_1"  # needs `tfds build`; see above
  c.data.vocab_size = 1_024
  c.data.tokenizer_examples = 10_000
  c.seq_len = 32_768
  # Prompt with the first 10 of 15 frames (the codec cuts at a frame start).
  c.sample.ratios = (2 / 3,)
  c.sample.tb_ratio = 2 / 3

  if size == "demo":
    # 32x32 clips of 15 frames (4 macroblocks a frame) so that a 2-core CPU
    # prepares and trains in minutes. Measured (1024-entry BPE on 500 clips):
    # 1,410 bytes and 950 tokens a clip on average (median 860, p95 1,870,
    # max 2,340), so a window of 2,048 holds about two clips, as the paper's
    # 32K windows hold two videos, and every 10-frame prompt (at most ~1,560
    # tokens) fits for sampling. 48x32 clips take ~1,200 tokens (max 3,200)
    # and 64x48 ones ~2,100: windows long enough for their prompts cost a
    # CPU too much attention. Batch 2: 4K tokens a step, like jpeg:demo.
    c.codec.width = c.codec.height = 32
    c.data.source = "synthetic"
    c.seq_len = 2_048
    c.batch_size = 2
    c.data.num_examples = 1_024
    c.data.eval_examples = 64
    c.data.examples_per_shard = 256
    c.data.tokenizer_examples = 1_000
    c.model.dtype = "float32"     # CPUs have no fast bf16
    c.model.remat_policy = "none"
    # 60 steps (the loss levels off by ~20 at this size). Measured on 2 CPU
    # cores: 2.6 s a step, ~40 s per TensorBoard grid, 4 min end to end.
    c.train.steps = 60
    c.train.warmup_steps = 6
    c.train.log_every = 10
    c.train.eval_every = 30
    c.train.eval_batches = 4
    c.train.ckpt_every = 30
    c.sample.tb_every = 30
  return c
