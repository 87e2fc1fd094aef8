r"""Exports a workdir's checkpoint as a Hugging Face LlamaForCausalLM folder.

  python -m codeclm.hf.export_hf --workdir=W --dst=DIR [--step=N] \
      [--dtype=bfloat16] [--max_shard_mb=2000]

DIR gets `config.json` (LlamaForCausalLM), `generation_config.json`,
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`, the
tokenizer (`tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json`; AutoTokenizer loads them) and a README that says
how bytes become a prompt and tokens become a file again. This is the layout
transformers' and vLLM's Llama loaders read (vLLM is not run in the tests).

Parameters are restored from the checkpoint one at a time and written shard by
shard, so host memory holds one parameter plus one shard. codeclm's ByteBPE
is exported over Braille characters (byte b -> chr(0x2800 + b)), as the
Jpeg-LM releases read bytes; `import_hf` maps it back exactly.
"""

import json
import os
import shutil
import tempfile

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer

from codeclm import config_base
from codeclm.hf import import_hf
from codeclm.hf import weights as hf_weights
from codeclm.model import llama
from codeclm.model import llama_config
from codeclm.runtime import storage
from codeclm import tokenizer as tokenizer_lib
from codeclm.train import checkpoint_steps
from codeclm.train import params_io

_README = """\
# {name}: a codeclm {codec} model in Hugging Face format

Exported by `python -m codeclm.hf.export_hf` from step {step} of a codeclm
workdir. A plain Llama ({layers} layers, width {width}, vocabulary
{vocab_size}, context {max_len} tokens) over the bytes of {codec} files
({settings}).

## Bytes in, bytes out

Each byte b of the file is the character chr(0x2800 + b) (the Braille block),
and the tokenizer turns that text into ids; it puts BOS (id {bos_id}) first.

```python
import torch, transformers
tok = transformers.AutoTokenizer.from_pretrained(DIR)
model = transformers.AutoModelForCausalLM.from_pretrained(DIR)
prompt = open("prompt.{ext}", "rb").read()          # e.g. the first rows of MCUs
ids = tok("".join(chr(0x2800 + b) for b in prompt), return_tensors="pt")
out = model.generate(**ids, do_sample=True, top_k=40, top_p=0.9,
                     max_new_tokens={max_new})
text = tok.decode(out[0], skip_special_tokens=True)
data = bytes(ord(c) - 0x2800 for c in text if 0x2800 <= ord(c) < 0x2900)
```
`data` is the whole {codec} stream (prompt included); generation stops at EOS
(id {eos_id}). {decode_note}
{classes_note}"""

_JPEG_NOTE = (
    "The JPEG bytes are headerless (quantization and Huffman tables stripped, "
    "as Pillow's `streamtype=2` writes them); put the codec's tables back "
    "after SOI to view one: in codeclm, `codecs.from_settings(settings)"
    ".decode(data)`, which also repairs a truncated stream.")
_AVC_NOTE = ("Decode the H.264 Annex B stream with ffmpeg or PyAV, or "
             "`codecs.from_settings(settings).decode(data)` in codeclm.")


def hf_config(c: llama_config.LlamaConfig, tokenizer, dtype: str) -> dict:
  """config.json of a LlamaForCausalLM with codeclm's architecture."""
  if c.qk_norm:
    raise ValueError("This model has qk_norm, which LlamaForCausalLM lacks; "
                     "only models trained with model.qk_norm=False export.")
  return dict(
      architectures=["LlamaForCausalLM"], model_type="llama",
      vocab_size=c.vocab_size, hidden_size=c.emb_dim,
      intermediate_size=c.mlp_dim, num_hidden_layers=c.num_layers,
      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
      head_dim=c.head_dim, hidden_act="silu", rms_norm_eps=c.norm_eps,
      rope_theta=c.rope_theta, rope_scaling=None,
      max_position_embeddings=c.max_len, attention_bias=False,
      attention_dropout=0.0, mlp_bias=False, tie_word_embeddings=False,
      bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
      pad_token_id=tokenizer.pad_id, initializer_range=0.02,
      torch_dtype=dtype, use_cache=True)


def hf_tokenizer_files(tokenizer, max_len: int) -> dict[str, str]:
  """tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
  if isinstance(tokenizer, tokenizer_lib.ByteBPE):
    hf_tok = tokenizer_lib.to_hf(tokenizer)
  else:
    hf_tok = Tokenizer.from_str(tokenizer.hf_json())
  bos = hf_tok.id_to_token(tokenizer.bos_id)
  eos = hf_tok.id_to_token(tokenizer.eos_id)
  specials = dict(bos_token=bos, eos_token=eos, pad_token=eos)
  if getattr(tokenizer, "class_names", ()):  # Class tokens, then no class.
    specials["additional_special_tokens"] = [
        hf_tok.id_to_token(i) for i in range(tokenizer.eos_id + 1,
                                             tokenizer.no_class_id + 1)]
  config = dict(tokenizer_class="PreTrainedTokenizerFast",
                model_max_length=max_len, clean_up_tokenization_spaces=False,
                **specials)
  return {"tokenizer.json": hf_tok.to_str(pretty=True),
          "tokenizer_config.json": json.dumps(config, indent=1,
                                              ensure_ascii=False),
          "special_tokens_map.json": json.dumps(specials, indent=1,
                                                ensure_ascii=False)}


def _restore_leaf(step_dir: str, path: tuple, leaf):
  """One parameter of a step, on the host (a partial restore)."""
  target = leaf
  for key in reversed(path):
    target = {key: target}
  restored = params_io.restore_params(step_dir, target)
  for key in path:
    restored = restored[key]
  return np.asarray(jax.device_get(restored))


def hf_tensors(step_dir: str, c: llama_config.LlamaConfig, abstract, dtype):
  """(HF name, numpy tensor) pairs, restoring one codeclm leaf at a time."""
  flat = {tuple(k.key for k in p): leaf for p, leaf
          in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  for path, (names, kind) in import_hf.leaf_sources(c).items():
    x = _restore_leaf(step_dir, path, flat[path])
    if kind == "embedding":
      yield names[0], np.ascontiguousarray(x.astype(dtype))
    elif kind == "head":
      yield names[0], np.ascontiguousarray(x.T.astype(dtype))
    else:
      for i, name in enumerate(names):
        layer = x[i] if len(names) > 1 else x
        yield name, hf_weights.convert_to_hf(layer.astype(dtype), kind, c)
    del x


def write_shards(tensors, dst: str, max_shard_bytes: int) -> dict:
  """Writes safetensors shards and their index; returns the index."""
  shards, current, size, total = [], {}, 0, 0

  def flush():
    name = f"shard-{len(shards)}.tmp"
    save_file(current, os.path.join(dst, name), metadata={"format": "pt"})
    shards.append((name, list(current)))

  for name, x in tensors:
    if current and size + x.nbytes > max_shard_bytes:
      flush()
      current, size = {}, 0
    current[name] = x
    size += x.nbytes
    total += x.nbytes
  if current:
    flush()
  weight_map = {}
  for i, (tmp, names) in enumerate(shards):
    final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    os.rename(os.path.join(dst, tmp), os.path.join(dst, final))
    weight_map.update({n: final for n in names})
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=1)
  return index


def run(workdir: str, dst: str, step: int | None = None,
        dtype: str = "bfloat16", max_shard_mb: int = 2000) -> str:
  """Exports `workdir` (its newest step, or `step`) into a new folder `dst`."""
  workdir, dst = storage.path(workdir), os.path.abspath(dst)
  if os.path.exists(dst) and os.listdir(dst):
    raise FileExistsError(f"--dst={dst} exists and is not empty; export into "
                          "a new folder.")
  config = ml_collections.ConfigDict(storage.read_json(workdir / "config.json"))
  manifest = storage.read_json(workdir / "manifest.json")
  tokenizer = tokenizer_lib.load(workdir / "tokenizer.json")
  c = config_base.model_config(config, tokenizer.vocab_size)
  np_dtype = jnp.dtype(dtype)
  step_dir, step = checkpoint_steps.committed_step_dir(workdir, step)
  model = llama.Llama(c)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 1), jnp.int32))["params"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      nn.meta.unbox(abstract))
  parent = os.path.dirname(dst)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".exporting-",
                         dir=parent)
  try:
    write_shards(hf_tensors(step_dir, c, abstract, np_dtype), tmp,
                 max_shard_mb * 2**20)
    files = hf_tokenizer_files(tokenizer, c.max_len)
    files["config.json"] = json.dumps(hf_config(c, tokenizer, dtype),
                                      indent=1)
    files["generation_config.json"] = json.dumps(dict(
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id), indent=1)
    files["README.md"] = readme(os.path.basename(dst), c, tokenizer,
                                manifest["codec"], step)
    for name, text in files.items():
      with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
        f.write(text)
    if os.path.isdir(dst):
      os.rmdir(dst)
    os.rename(tmp, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("Exported %s step %d to %s.", workdir, step, dst)
  return dst


def readme(name: str, c: llama_config.LlamaConfig, tokenizer,
           settings: dict, step: int) -> str:
  jpeg = settings.get("name") == "jpeg"
  return _README.format(
      name=name, codec="JPEG" if jpeg else "H.264", step=step,
      layers=c.num_layers, width=c.emb_dim, vocab_size=c.vocab_size,
      max_len=c.max_len, settings=json.dumps(settings), bos_id=tokenizer.bos_id,
      eos_id=tokenizer.eos_id, ext="jpg" if jpeg else "h264",
      max_new=min(c.max_len, 8192), decode_note=_JPEG_NOTE if jpeg else _AVC_NOTE,
      classes_note=_classes_note(tokenizer))


def _classes_note(tokenizer) -> str:
  """The README's paragraph on class tokens ("" for an unconditional model)."""
  names = getattr(tokenizer, "class_names", ())
  if not names:
    return ""
  table = ", ".join(f"{n!r}: {tokenizer.class_id(i)}"
                    for i, n in enumerate(names))
  return (
      "\n## Classes\n\nTrained class-conditional: every sequence starts "
      "[BOS, class token], then the bytes. Put the class id right after BOS "
      f"({table}; 'no class': {tokenizer.no_class_id}). For classifier-free "
      "guidance at scale s run the prompt with the class and with 'no class' "
      "and draw from uncond + s * (cond - uncond).\n")


def main():
  """Flags are defined here, not at import, so tests can import run()."""
  flags.DEFINE_string("workdir", None, "codeclm workdir to export.")
  flags.DEFINE_string("dst", None, "New folder for the HF model.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default the newest.")
  flags.DEFINE_string("dtype", "bfloat16", "Dtype of the safetensors.")
  flags.DEFINE_integer("max_shard_mb", 2000, "Largest safetensors shard.")
  flags.mark_flags_as_required(["workdir", "dst"])
  f = flags.FLAGS

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run(f.workdir, f.dst, f.step, f.dtype, f.max_shard_mb)

  app.run(_main)


if __name__ == "__main__":
  main()
