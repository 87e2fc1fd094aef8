r"""Jpeg-LM: a Llama-2 over canonical JPEG bytes (Han et al., 2024).

The paper's setup (no arg): 7B, 256x256 images, Pillow JPEG at quality 25,
4:2:0, tables stripped, a restart marker after every MCU; a 320-entry byte BPE;
windows of 12,288 tokens; peak LR 3e-4.

  # CPU demo: prepares the built-in synthetic images, trains, checkpoints.
  python -m codeclm.main --config=configs/jpeg_lm.py:demo --workdir=/tmp/jpeg_demo

  # ImageNet, 1B, on a pod slice (data prepared once with --mode=prepare).
  python -m codeclm.main --config=configs/jpeg_lm.py:1b --workdir=gs://b/jpeg1b \
      --config.data.source=tfds:imagenet2012

  # FID (paper protocol: 5,000 ImageNet validation images, ratios
  # 0.25/0.5/0.75 and unconditional, 3 seeds); see codeclm/eval/evaluate.py.
  python -m codeclm.main --config=configs/jpeg_lm.py:1b --workdir=gs://b/jpeg1b \
      --config.data.source=tfds:imagenet2012 --mode=eval \
      --config.eval.inception_weights=fid_inception.npz

  # Class-conditional CPU demo: 4 classes of synthetic pictures told apart
  # by their hue, a class token after BOS (10% label dropout), same budget
  # as the demo; then guided samples, one grid per class.
  python -m codeclm.main --config=configs/jpeg_lm.py:demo_classes \
      --workdir=/tmp/jpeg_classes
  python -m codeclm.main --config=configs/jpeg_lm.py:demo_classes \
      --workdir=/tmp/jpeg_classes --mode=sample --config.sample.classes=all

Args: "demo", "demo_classes", "100m", "1b", "7b" (default "7b").
"""

from codeclm import config_base


def get_config(arg: str = ""):
  if arg == "demo_classes":
    return demo_classes()
  size = arg or "7b"
  c = config_base.lm_config(size)
  c.codec = dict(name="jpeg", width=256, height=256, quality=25,
                 subsampling="4:2:0")
  c.data.vocab_size = 320
  c.seq_len = 12_288
  c.data.source = "tfds:imagenet2012"  # needs the manual download; see README

  if size == "demo":
    # 64x64 images (16 MCUs) so a 2-core CPU trains in minutes. Measured:
    # 386 tokens per image on average, p95 597, max 789; windows of 1,024 let
    # every sample and 0.75-prompt completion finish. Batch 4: 4K tokens/step.
    c.codec.width = c.codec.height = 64
    c.data.source = "synthetic"
    c.seq_len = 1_024
    c.batch_size = 4
    c.data.num_examples = 2_048
    c.data.eval_examples = 64
    c.data.examples_per_shard = 512
    c.data.tokenizer_examples = 1_000
    c.model.dtype = "float32"     # CPUs have no fast bf16
    c.model.remat_policy = "none"
    c.train.log_every = 10
    c.train.eval_every = 50
    c.train.eval_batches = 4
    c.train.ckpt_every = 50
    # FID over the 64 held-out synthetic pictures, 2 seeds.
    c.eval.num_examples = 64
    c.eval.seeds = (0, 1)
    c.eval.fid_method = "low_rank"  # exact; a 2048^2 sqrtm is slow on CPU
    c.eval.feature_batch = 8
  return c


def demo_classes():
  """The demo on labelled pictures (synthetic_classes), class-conditional.

  Same model as "demo" and the same training compute: the class pictures
  (a flat background in the class's colour, 1-3 shapes) are 246 bytes on
  average (max 373), so windows of 512 hold them; 8 rows of 512 tokens are
  "demo"'s 4,096 tokens a step at 0.73 of its FLOPs per token (attention is
  half as long), so 140 steps cost what its 100 do. Classes are hues
  (codeclm/data/sources/synthetic_classes.py), which a checker can tell from
  the pixels.
  """
  c = get_config("demo")
  c.data.source = "synthetic_classes"
  c.data.num_classes = 4
  c.data.conditioning = "class"
  c.seq_len = 512
  c.batch_size = 8
  c.train.steps = 140
  c.train.label_dropout = 0.1
  c.sample.classes = "all"
  c.sample.guidance = 3.0
  return c
