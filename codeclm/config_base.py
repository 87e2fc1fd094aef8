"""The fields every codeclm config has, with the paper's defaults.

configs/jpeg_lm.py and configs/avc_lm.py start from `lm_config(size)` and set
the codec, data and sequence fields of their modality. Every knob the code
reads is defined here, so a typo in a command-line override fails loudly.
"""

import ml_collections

from codeclm.model import llama_config
from codeclm.model import sharding

# Per size: model dims come from llama_config.SIZES; these are the training
# shapes.
# Batch is global (all hosts); tokens per step = batch_size * seq_len.
# Mesh (data, fsdp, context, tensor): data parallelism while a replicated fp32
# state (params + two Adam moments, 12 bytes a parameter) fits a device (100M:
# 1.0 GiB). From 1B the layout is "auto": the planner (codeclm/train/
# planner.py) picks the mesh, micro-batches, remat and offloads for the
# devices it runs on (or --mode=compile's slice) before anything is built;
# any of them set explicitly is kept, e.g. --config.mesh.shape='(1,-1,8,1)'.
_AUTO = dict(mesh="auto", grad_accum="auto", remat="auto", offload="auto",
             param_offload="auto", gather="auto")
_SET = dict(mesh=(-1, 1, 1, 1), grad_accum=1, remat="full", offload=False,
            param_offload=False, gather="per_micro_batch")
TRAIN_SHAPES = {
    "demo": dict(batch_size=8, steps=100, warmup_steps=10, lr=3e-3, **_SET),
    "100m": dict(batch_size=64, steps=20_000, warmup_steps=500, lr=6e-4,
                 **_SET),
    "1b": dict(batch_size=128, steps=50_000, warmup_steps=1_000, lr=3e-4,
               **_AUTO),
    "7b": dict(batch_size=256, steps=100_000, warmup_steps=2_000, lr=3e-4,
               **_AUTO),
}


def _layout(value):
  """A field the planner may fill: "auto" or a value of the field's kind
  (typed object, so both parse from Python and the command line)."""
  return ml_collections.FieldReference(value, field_type=object)


def lm_config(size: str) -> ml_collections.ConfigDict:
  """All fields but the modality's; `size` picks the model and its shapes."""
  if size not in TRAIN_SHAPES:
    raise ValueError(f"Unknown size {size!r}; use one of {sorted(TRAIN_SHAPES)}.")
  shapes = TRAIN_SHAPES[size]
  c = ml_collections.ConfigDict()
  c.size = size
  c.seed = 0
  c.seq_len = 12_288
  c.batch_size = shapes["batch_size"]

  # Set by the modality config.
  c.codec = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      source="synthetic",         # synthetic | synthetic_classes |
                                  # folder:PATH | tfds:NAME[:SPLIT]
      num_classes=4,              # synthetic_classes: how many (hues)
      dir="",                     # prepared shards; "" = <workdir>/data
      tfds_data_dir=None,
      tfds_fps=None,              # video frame rate; None = sources' table
      num_examples=None,          # cap on source examples (synthetic: how many)
      eval_examples=1_000,        # held out, deterministic
      labels_from_folders=False,
      # "class": one class token after BOS (ids after EOS, one per label name
      # and one "no class"; needs labelled data); "none": unconditional.
      conditioning="none",
      examples_per_shard=1_024,
      prepare_workers=0,          # 0 = all local cores
      tokenizer="",               # existing tokenizer.json; "" = train one
      vocab_size=320,             # BPE entries counting the 256 bytes
      tokenizer_examples=10_000,  # paper: BPE from 10K examples
      packing="concat",           # paper: concatenate and cut; or "pack"
      drop_long=False,
      # Independent window streams; global row r comes from stream
      # r // (batch_size / streams). The data position is theirs, so it does
      # not depend on the process count. 0 = one per row (batch_size); fewer
      # means every process that holds a row of a stream reads all of it.
      streams=0,
      loader_workers=0,           # worker processes per stream
  ))

  c.model = ml_collections.ConfigDict(dict(
      **llama_config.SIZES[size],
      norm_eps=1e-5,
      rope_theta=1e4,
      dtype="bfloat16",
      param_dtype="float32",
      scan_layers=True,
      remat_policy=_layout(shapes["remat"]),  # llama_config's, or
      # "offload_layer_inputs", or "auto"
      attention_impl="auto",      # splash on TPU, cuDNN on GPU, XLA on CPU
      qk_norm=False,
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=shapes["steps"],
      warmup_steps=shapes["warmup_steps"],
      lr=shapes["lr"],            # peak; paper 3e-4
      end_lr_ratio=0.1,           # cosine decays to lr * end_lr_ratio
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      grad_clip=1.0,
      grad_accum=_layout(shapes["grad_accum"]),  # micro-batches per step
      # "per_micro_batch": every micro-batch gathers the fsdp-sharded weights
      # (forward and backward) and reduce-scatters its grads; "per_step":
      # one gather per step of a compute-dtype copy, grads summed per batch
      # shard in fp32 and reduced once (a full copy + accumulator per device)
      weight_gather=_layout(shapes["gather"]),
      # Optimizer state in pinned host memory between steps (brought in for
      # the update).
      optimizer_offload=_layout(shapes["offload"]),
      # The fp32 weights in pinned host memory too: the step uses a
      # compute-dtype copy and brings them in for the update
      # (weight_gather "per_micro_batch").
      param_offload=_layout(shapes["param_offload"]),
      z_loss=0.0,                 # PaLM z-loss weight; 0 = off (Llama-2)
      label_dropout=0.1,          # data.conditioning="class": this share of
                                  # examples get "no class" (for guidance),
                                  # chosen by (seed, example position)
      log_every=50,
      eval_every=1_000,
      eval_batches=16,            # 0 = the whole eval split
      ckpt_every=1_000,
      keep_last=3,
      keep_every=0,               # also keep every K steps; 0 = off
      restore_tries=2,            # a failed restore is retried (transient
      restore_retry_s=2.0,        # read errors) before its step is skipped
      restart_from_scratch=False,  # when the workdir has checkpoint steps
                                  # and none restores: False stops with an
                                  # error naming each step; True moves them
                                  # to <workdir>/previous_runs/<UTC time>/
                                  # and starts at step 0 (a step that
                                  # restores is resumed either way)
      async_checkpoints=True,
      compilation_cache=True,     # JAX's persistent cache in <workdir>/jax_cache
      profile=False,              # a profiler trace of a few steps in workdir
      fault_kill_at_step=0,       # tests only: SIGKILL ourselves at this step
      init_from="",               # workdir (e.g. an import_hf one) whose params
                                  # start a new run: fresh optimizer, step 0
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      shape=_layout(shapes["mesh"]),  # (data, fsdp, context, tensor); -1 =
                                  # the rest; "auto" = the planner's
      max_state_fraction=0.5,     # params+optimizer per device / its memory
      # Logical axis -> mesh axes (the table in codeclm/model/sharding.py):
      # parameters over fsdp and context (ZeRO-3) and tensor, the batch over
      # data+fsdp, the length of activations over context.
      rules=sharding.DEFAULT_RULES,
      # context > 1: shard i of C holds window chunks i and 2C-1-i of 2C, so
      # every shard has the same causal attention work (the natural split
      # leaves the last shard most of it). The model reorders its inputs and
      # restores its logits' order (codeclm/model/context_attention.py).
      context_load_balance=True,
      context_strategy="all_gather",  # or "ring": K/V passed around the axis
  ))

  c.distributed = ml_collections.ConfigDict(dict(
      initialize=False,           # jax.distributed.initialize() at start
      coordinator_address="",     # "" = auto-detect (TPU, SLURM, ...)
      num_processes=0,            # 0 = auto-detect
      process_id=-1,              # -1 = auto-detect
      timeout_s=300,
  ))

  # Sampling (codeclm/sampling/): --mode=sample and TensorBoard samples.
  c.sample = ml_collections.ConfigDict(dict(
      step=0,                     # checkpoint step; 0 = the latest
      mesh_shape=(),              # () = the training mesh.shape
      out_dir="",                 # "" = <workdir>/samples/step_<step>
      num_samples=4,              # unconditional samples (from [BOS])
      images="",                  # comma-separated image files to complete
      ratios=(0.25, 0.5, 0.75),   # prompt = this fraction of the MCU rows
      completions=2,              # per image and ratio
      temperature=1.0,            # 0 = greedy
      top_k=40,                   # paper: 40 or 80; 0 = off
      top_p=0.9,                  # paper: 0.9 or 1.0
      max_new_tokens=0,           # 0 = up to the model's max_len (seq_len)
      # JPEG: draw only bytes the stream's grammar allows, so every sample
      # that ends decodes with every MCU clean (codeclm/sampling/
      # token_grammar.py); False = the paper's unconstrained sampling.
      # Ignored for AVC (no grammar for H.264 slices).
      constrained=True,
      # Class-conditional samples (a model trained with data.conditioning=
      # "class"): comma-separated class names or ids, or "all"; per_class
      # samples each, one grid per class. guidance: the classifier-free
      # guidance scale s, logits = uncond + s * (cond - uncond) (0 = the
      # "no class" model, 1 = plain conditional).
      classes="",
      per_class=4,
      guidance=3.0,
      seed=0,
      batch_size=8,               # rows per sampler call
      cache_dtype="bfloat16",
      min_bucket=64,              # shortest prompt / cache length compiled
      # Params cast to the model dtype and replicated over data/fsdp (split
      # over tensor) once before decoding: no weight all-gathers per token.
      # False keeps the trained layout, for a model that fits the devices
      # only sharded (7B in bf16 replicated is 13.5 GB per device). "auto":
      # replicated unless that copy would take over max_copy_fraction of a
      # device's memory (unknown, as on CPU: replicated); --mode=compile
      # decides the same with the slice's HBM. Typed object: True, False and
      # "auto" are all accepted, from Python or the command line.
      reshard_params=ml_collections.FieldReference("auto", field_type=object),
      max_copy_fraction=0.5,
      # Scanned layers split and run unrolled while sampling: XLA (on CPU)
      # copies a scanned layer's weights before each matmul, every token.
      # False: one layer body to compile (faster compiles, slower decode).
      # Only with reshard_params (sharded weights are gathered per layer).
      unroll_layers=True,
      tb_every=50 if size == "demo" else 0,  # TensorBoard samples; 0 = off
      tb_samples=4,               # unconditional samples in the TB grid
      tb_images=2,                # held-out images completed in the TB grid
      tb_ratio=0.5,
  ))

  # Ahead-of-time compilation for a TPU slice (codeclm/train/compile.py):
  # --mode=compile.
  c.compile = ml_collections.ConfigDict(dict(
      topology="",                # v5e-16 (= v5litepod-16), v5p-128, v4-32, v6e-64
      steps=("train", "eval", "sample"),  # sample: its prefill and decode
      sample_prompt_len=0,        # the sampler prefill compiled; 0 = seq_len/2
  ))

  # FID evaluation (codeclm/eval/evaluate.py): --mode=eval. Sampler settings
  # (temperature, top_k, top_p, max_new_tokens, cache_dtype) come from
  # config.sample.
  c.eval = ml_collections.ConfigDict(dict(
      step=0,                     # checkpoint step; 0 = the latest
      mesh_shape=(),              # () = the training mesh.shape
      out_dir="",                 # "" = <workdir>/eval/step_<step>
      source="",                  # "" = data.source (tfds: its validation split)
      num_examples=5_000,         # reference images (paper: ImageNet 5,000)
      ratios=(0.25, 0.5, 0.75),   # prompt = this fraction of the MCU rows
      unconditional=True,         # also num_examples samples from [BOS]
      seeds=(0, 1, 2),            # FID mean and std over these
      inception_weights="",       # converted .npz (codeclm/eval/inception.py)
      batch_size=8,               # sampler rows per call
      feature_batch=50,           # Inception batch (CPU: 4-8 is faster)
      fid_method="sqrtm",         # pytorch-fid's; "low_rank": fast below 2048
      downscale=False,            # half-size images in a black canvas
      # Labelled references (codeclm/eval/per_class.py): FID per class of
      # the completions; a class with fewer references is listed, not scored.
      min_per_class=5,
      # Guidance scales of class-conditional samples (one per reference, of
      # its class) scored by FID and class agreement; None = (0.0, 3.0) for
      # a class-conditional workdir, () otherwise.
      guidance=ml_collections.FieldReference(None, field_type=tuple),
      process_index=-1,           # -1 = jax.process_index()
      process_count=0,            # 0 = jax.process_count()
      merge=True,                 # merge when every slice is present
  ))
  return c


def model_config(config, vocab_size: int) -> llama_config.LlamaConfig:
  """The model a config describes; the vocabulary comes from the tokenizer."""
  fields = {k: v for k, v in config.model.items() if k != "vocab_size"}
  # Absent in a bare {model, seq_len} (params_io) and older config.json files.
  fields["context_load_balance"] = config.get("mesh", {}).get(
      "context_load_balance", True)
  fields["context_strategy"] = config.get("mesh", {}).get(
      "context_strategy", "all_gather")
  return llama_config.LlamaConfig(vocab_size=vocab_size,
                                  max_len=config.seq_len, **fields)
