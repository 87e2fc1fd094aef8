r"""Peak host memory of `codeclm.hf.import_hf` and `codeclm.hf.export_hf`.

  python benchmarks/import_memory.py --size=1b [--dir=/tmp/import_memory]

Writes a random Llama of llama_config.SIZES[size] as a Hugging Face folder
(bf16 safetensors in 2 GB shards, a Braille tokenizer), imports it in a child
process (float32 params, one CPU device), exports it back in another, and
prints each child's peak RSS next to the checkpoint and model sizes.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from codeclm.model import llama_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from codeclm import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

_SIZE = flags.DEFINE_string("size", "1b", "A key of llama_config.SIZES.")
_DIR = flags.DEFINE_string("dir", "/tmp/import_memory", "Scratch folder.")
_EXPORT = flags.DEFINE_bool("export", True, "Also measure export_hf.")


def write_hf(directory: str, size: str) -> int:
  """A random LlamaForCausalLM folder; returns the safetensors bytes."""
  rng = np.random.default_rng(0)
  bpe = tokenizer_lib.ByteBPE.train(
      [rng.integers(0, 256, 4000, dtype=np.uint8).tobytes()], 320)
  s = llama_config.SIZES[size]
  c = llama_config.LlamaConfig(vocab_size=bpe.vocab_size, **s)
  os.makedirs(directory)
  tokenizer_lib.to_hf(bpe).save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        vocab_size=c.vocab_size, hidden_size=c.emb_dim,
        intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=4096,
        bos_token_id=bpe.bos_id, eos_token_id=bpe.eos_id), f)
  d, f_, h, k, m = c.emb_dim, c.head_dim, c.num_heads, c.num_kv_heads, c.mlp_dim
  shapes = {"model.embed_tokens.weight": (c.vocab_size, d),
            "model.norm.weight": (d,), "lm_head.weight": (c.vocab_size, d)}
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (d,),
        p + "post_attention_layernorm.weight": (d,),
        p + "self_attn.q_proj.weight": (h * f_, d),
        p + "self_attn.k_proj.weight": (k * f_, d),
        p + "self_attn.v_proj.weight": (k * f_, d),
        p + "self_attn.o_proj.weight": (d, h * f_),
        p + "mlp.gate_proj.weight": (m, d), p + "mlp.up_proj.weight": (m, d),
        p + "mlp.down_proj.weight": (d, m)})
  shard, shard_bytes, shards, total = {}, 0, [], 0
  for name, shape in shapes.items():
    x = rng.standard_normal(shape, np.float32).astype(ml_dtypes.bfloat16)
    shard[name], shard_bytes, total = x, shard_bytes + x.nbytes, total + x.nbytes
    if shard_bytes > 2 << 30:
      shards.append(shard)
      shard, shard_bytes = {}, 0
  shards.append(shard)
  weight_map = {}
  for i, tensors in enumerate(shards):
    name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(tensors, os.path.join(directory, name),
              metadata={"format": "pt"})
    weight_map.update({n: name for n in tensors})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  return total


def child_peak_rss(argv: list[str]) -> tuple[float, float]:
  """(peak RSS in GiB, seconds) of a child process."""
  env = dict(os.environ, PYTHONPATH=_ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  t0 = time.perf_counter()
  pid = subprocess.Popen(argv, env=env, cwd=_ROOT).pid
  _, status, usage = os.wait4(pid, 0)
  if status:
    raise RuntimeError(f"{argv} exited with status {status}")
  return usage.ru_maxrss / 2**20, time.perf_counter() - t0


def main(argv):
  del argv
  shutil.rmtree(_DIR.value, ignore_errors=True)
  src = os.path.join(_DIR.value, "hf")
  ckpt_bytes = write_hf(src, _SIZE.value)
  workdir = os.path.join(_DIR.value, "workdir")
  rss_in, t_in = child_peak_rss([
      sys.executable, "-m", "codeclm.hf.import_hf", f"--src={src}",
      f"--workdir={workdir}", "--config=configs/jpeg_lm.py:demo",
      "--mesh_shape=(1,1,1,1)"])
  n = ckpt_bytes // 2
  print(f"size={_SIZE.value}: {n / 1e9:.2f}B params; bf16 safetensors "
        f"{ckpt_bytes / 2**30:.2f} GiB, float32 params {4 * n / 2**30:.2f} GiB")
  print(f"import_hf: peak RSS {rss_in:.2f} GiB in {t_in:.0f} s")
  if _EXPORT.value:
    rss_out, t_out = child_peak_rss([
        sys.executable, "-m", "codeclm.hf.export_hf", f"--workdir={workdir}",
        f"--dst={os.path.join(_DIR.value, 'export')}", "--dtype=bfloat16"])
    print(f"export_hf: peak RSS {rss_out:.2f} GiB in {t_out:.0f} s")
  print(f"(this process, writing the random checkpoint: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)")
  shutil.rmtree(_DIR.value, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
