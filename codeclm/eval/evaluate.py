r"""Sharded FID evaluation of a checkpoint (the Jpeg-LM protocol): the job.

Protocol (Han et al., 2024): for each of N reference images, the prompt is
the first `ratio` of its MCU rows (`codec.prompt`) and the model completes
it; FID is computed between the completions and the reference images, per
ratio (ImageNet: 5,000 validation images, ratios 0.25/0.5/0.75; FFHQ: 1,000
images, 0.375/0.4375/0.5). Unconditional samples (from [BOS] alone, N of
them) are scored against the same references. Every (ratio, seed) is
sampled with each seed of `eval.seeds`; results.json reports FID per seed
and its mean and (population, ddof=0) std over seeds, with the decode report:
the mean share of clean MCUs and the fraction of samples that ended with EOS.
A prompt that fills the model's max_len is scored as the prompt alone
(no_room_fraction counts these) rather than dropped or failing the job.
Labelled references add FID per class of the completions; a class-
conditional workdir adds guided samples per scale of eval.guidance, scored
by class-conditional FID and class agreement (per_class.py).

The parts: the references and the downscaled variant (references.py); the
work, its sample ids and each process's slice (work.py); one slice's
prompts, completions and features (completions.py); the slices on disk and
their merge into results.json (results.py). Here, the job: it evaluates
this process's slice (skipped when done with the same settings) and, once
every slice is present, merges and writes TensorBoard scalars in
<workdir>/eval.

Two ways to run the slices, with the same numbers:
- One jax.distributed job (config.distributed.initialize=True; a model
  sharded over hosts needs it): process p of n writes slice p of n. The
  sampler is one collective over every host: each process feeds its own
  references into the global batch and keeps its own rows. The processes
  all sample or all skip (a rerun redoes every slice unless all are done);
  process 0 merges once all have written, so out_dir must be shared
  (gs://, NFS).
- Independent JAX jobs (one per host or GPU, no jax.distributed), each with
  its own mesh (eval.mesh_shape) and eval.process_index/process_count.

  # Demo: the synthetic held-out images of a CPU demo run.
  python -m codeclm.main --config=configs/jpeg_lm.py:demo \
      --workdir=/tmp/jpeg_demo --mode=eval \
      --config.eval.inception_weights=fid_inception.npz
  # One job over every host of a pod (launch/tpu_pod.sh runs this on each):
  python -m codeclm.main --config=configs/jpeg_lm.py:1b --workdir=gs://b/run \
      --mode=eval --config.distributed.initialize=True \
      --config.eval.inception_weights=fid_inception.npz
  # ImageNet (5,000 validation images), 8 hosts: one job per host, then
  # (if no job found all slices) a merge.
  python -m codeclm.eval.evaluate --config=configs/jpeg_lm.py:1b --workdir=DIR \
      --config.eval.inception_weights=fid_inception.npz \
      --config.eval.process_index=$HOST --config.eval.process_count=8
  python -m codeclm.eval.evaluate --config=configs/jpeg_lm.py:1b --workdir=DIR \
      --merge_only
  # FFHQ (1,000 images) from a folder.
  ... --config.eval.source=folder:/data/ffhq --config.eval.num_examples=1000 \
      --config.eval.ratios='(0.375,0.4375,0.5)'
  # The class demo: FID per class, guided samples at s = 0 and 3 (the
  # default for a class-conditional workdir) and their class agreement.
  python -m codeclm.main --config=configs/jpeg_lm.py:demo_classes \
      --workdir=/tmp/jpeg_classes --mode=eval \
      --config.eval.inception_weights=fid_inception.npz \
      --config.eval.guidance='(0.0,1.0,3.0)'

Video (AVC) checkpoints are not supported yet: `run` raises
NotImplementedError for a codec other than JPEG.
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import jax
import ml_collections

from codeclm.data import conditioning
from codeclm.data import prepare
from codeclm.eval import completions
from codeclm.eval import inception
from codeclm.eval import references
from codeclm.eval import results as results_lib
from codeclm.eval import work
from codeclm.runtime import distributed as distributed_lib
from codeclm.runtime import storage
from codeclm.sampling import workdir as workdir_lib

_FORMAT = 2  # 2: reference labels and guided samples in the slices.


# -- the job -------------------------------------------------------------------


def guidance_scales(ec, workdir_data) -> tuple[float, ...]:
  """eval.guidance, or its default: (0.0, 3.0) for a class-conditional
  workdir (`workdir_data`: its config.json's data section), else ()."""
  class_conditional = conditioning.enabled(workdir_data)
  if ec.guidance is None:
    return (0.0, 3.0) if class_conditional else ()
  scales = tuple(float(s) for s in ec.guidance)
  if scales and not class_conditional:
    raise ValueError(f"eval.guidance={scales} needs a class-conditional "
                     "workdir (data.conditioning='class'); this one is "
                     "unconditional: leave eval.guidance unset or '()'.")
  if len(set(scales)) != len(scales):
    raise ValueError(f"eval.guidance={scales} repeats a scale.")
  return scales


def _settings(ec, sc, *, step: int, spec: str, codec, max_len: int,
              weights_hash: str, constrained: bool,
              scales: tuple[float, ...]) -> dict:
  """What a slice's numbers depend on: equal settings, mergeable slices.
  `ec` and `sc`: the config's eval and sample sections."""
  return json.loads(json.dumps(dict(
      format=_FORMAT,
      checkpoint_step=step,
      reference=dict(source=spec,
                     split=references.split_of(spec, ec.num_examples),
                     num_examples=ec.num_examples),
      ratios=list(ec.ratios), unconditional=ec.unconditional,
      seeds=list(ec.seeds), guidance=list(scales),
      sampler=dict(temperature=sc.temperature, top_k=sc.top_k,
                   top_p=sc.top_p, max_new_tokens=sc.max_new_tokens,
                   max_len=max_len, cache_dtype=sc.cache_dtype,
                   constrained=constrained,
                   sample_ids=f"round(ratio*{work.RATIO_SCALE})*"
                              f"{work.ID_STRIDE}+index; guided: "
                              f"{work.GUIDED_CODE}*{work.ID_STRIDE}+index"),
      codec=codec.settings(),
      images=dict(
          reference="codec.load: centre crop, LANCZOS resize to the codec "
                    "size; uint8 RGB",
          fid_input=f"uint8 RGB, bilinear resize to {inception.INPUT_SIZE}x"
                    f"{inception.INPUT_SIZE} (no antialias), pytorch-fid "
                    "normalisation",
          downscale=ec.downscale),
      inception_sha256=weights_hash,
  )))


def _extractor(ec) -> inception.FeatureExtractor:
  if not ec.inception_weights:
    raise FileNotFoundError(
        "config.eval.inception_weights is empty: FID needs the Inception "
        f"weights. Download {inception.WEIGHTS_URL}, convert them once with "
        f"`{inception.CONVERT_COMMAND}` and pass "
        "--config.eval.inception_weights=fid_inception.npz.")
  return inception.FeatureExtractor.from_file(ec.inception_weights,
                                              batch_size=ec.feature_batch)


def _step_and_out_dir(ec, workdir: str) -> tuple[int, str]:
  from codeclm.train import checkpoint_steps  # pylint: disable=g-import-not-at-top
  _, step = checkpoint_steps.committed_step_dir(workdir, ec.step or None)
  return step, out_dir_of(ec, workdir, step)


def out_dir_of(ec, workdir: str, step: int) -> str:
  """Where step's slices and results.json go: eval.out_dir, else
  <workdir>/eval/step_<step>."""
  return os.fspath(storage.path(ec.out_dir or storage.path(workdir) /
                                "eval" / f"step_{step}"))


def finish(out_dir: str, workdir: str, fid_method: str = "sqrtm",
           min_per_class: int = 5) -> dict:
  """Merges, writes TensorBoard scalars in <workdir>/eval, logs a table."""
  results = results_lib.merge(out_dir, fid_method, min_per_class)
  results_lib.write_tensorboard(results, storage.path(workdir) / "eval")
  logging.info("FID at step %d (%s):\n%s", results["step"],
               storage.path(out_dir) / results_lib.RESULTS,
               results_lib.summary_table(results))
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Evaluates this process's slice; returns the results if it merged.

  Reads config.eval (the job), config.sample (temperature, top_k, top_p,
  max_new_tokens, cache_dtype, min_bucket) and config.data (the default
  reference source, and how it is labelled: labels_from_folders,
  num_classes); the model, tokenizer, codec and whether the model is
  class-conditional come from `workdir`.
  """
  from codeclm import codecs  # pylint: disable=g-import-not-at-top
  ec = config.eval
  distributed = jax.process_count() > 1
  p, count = prepare.resolve_process(
      None if ec.process_index < 0 else ec.process_index,
      None if ec.process_count <= 0 else ec.process_count)
  if distributed and (p, count) != (jax.process_index(),
                                    jax.process_count()):
    raise ValueError(
        f"eval.process_index={ec.process_index} and eval.process_count="
        f"{ec.process_count} name separate jobs, but this is a "
        f"{jax.process_count()}-process jax.distributed run, whose process i "
        "writes slice i itself: leave them unset (-1 and 0).")
  if distributed and ec.num_examples < count:
    raise ValueError(f"eval.num_examples={ec.num_examples} is fewer than the "
                     f"{count} processes; each needs one reference at least.")
  if ec.num_examples < 2 or not ec.seeds or ec.batch_size < 1:
    raise ValueError(f"eval.num_examples={ec.num_examples} (need >= 2), "
                     f"eval.seeds={ec.seeds} (need one), eval.batch_size="
                     f"{ec.batch_size} (need >= 1).")
  if ec.num_examples > work.ID_STRIDE or len(set(ec.seeds)) != len(ec.seeds):
    raise ValueError(f"eval.num_examples must be <= {work.ID_STRIDE} and "
                     f"eval.seeds={ec.seeds} distinct.")
  work.slots_of(ec.ratios, ec.unconditional)
  step, out_dir = _step_and_out_dir(ec, workdir)
  codec = codecs.from_settings(
      storage.read_json(storage.path(workdir) / "manifest.json")["codec"])
  if codec.name != "jpeg":
    raise NotImplementedError(
        f"FID evaluation supports JPEG checkpoints only; {workdir} uses the "
        f"{codec.name!r} codec.")
  trained = storage.read_json(storage.path(workdir) / "config.json")
  scales = guidance_scales(ec, trained.get("data", {}))
  extractor = _extractor(ec)
  spec = references.reference_spec(ec, config.data)
  settings = _settings(ec, config.sample, step=step, spec=spec, codec=codec,
                       max_len=trained["seq_len"],
                       weights_hash=extractor.weights_hash,
                       constrained=bool(config.sample.constrained),
                       scales=scales)
  name = work.slice_name(p, count)
  lo, hi = work.slice_bounds(ec.num_examples, p, count)
  done = results_lib.finished_slice(out_dir, name, settings)
  if distributed:  # One collective job: every process samples, or none.
    done = bool(distributed_lib.gather_ints([done]).all())
  if done:
    logging.info("%s is done; skipping it.",
                 storage.path(out_dir) / results_lib.SLICES / name)
  else:
    start = time.time()
    source = references.open_reference(ec, config.data, spec, codec)
    loaded = workdir_lib.load(workdir, step, ec.mesh_shape or None)
    arrays, summary = completions.evaluate_slice(
        ec, config.sample, loaded, extractor, source, range(lo, hi), scales)
    results_lib.write_slice(out_dir, name, arrays, dict(
        settings=settings, process_index=p, process_count=count,
        indices=list(range(lo, hi)), slots=summary,
        label_names=source.label_names,
        seconds=round(time.time() - start, 1)))
    logging.info("Wrote %s (indices %d:%d).",
                 storage.path(out_dir) / results_lib.SLICES / name, lo, hi)
  if distributed:  # Process 0 merges once every slice is written.
    distributed_lib.arrive_together("eval slices written")
    if p:
      return None
  slices = storage.path(out_dir) / results_lib.SLICES
  present = all((slices / f"{work.slice_name(j, count)}.json").exists()
                for j in range(count))
  if not (ec.merge and present):
    logging.info("%s; merge later with `python -m codeclm.eval.evaluate ... "
                 "--merge_only`.", "Not merging (eval.merge=False)" if present
                 else "Slices of other processes are missing")
    return None
  return finish(out_dir, workdir, ec.fid_method, ec.min_per_class)


# -- command line --------------------------------------------------------------


def main(argv):
  from absl import app  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _MERGE_ONLY.value:
    results = finish(_step_and_out_dir(config.eval, workdir)[1], workdir,
                     config.eval.fid_method, config.eval.min_per_class)
  else:
    results = run(config, workdir)
  if results is not None:
    print(json.dumps(results["metrics"], indent=1))


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "The run's config, e.g. configs/jpeg_lm.py:demo.",
      lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir.")
  _MERGE_ONLY = flags.DEFINE_bool(
      "merge_only", False, "Only merge the slices already written.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
