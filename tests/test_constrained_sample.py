"""Grammar-constrained sampling end to end: a trained checkpoint's samples
under the constraint are whole, clean JPEG streams; without it they are not."""

import dataclasses
import functools

import jax
import numpy as np

from codeclm.model import llama
from codeclm.sampling import files
from codeclm.sampling import hosts
from codeclm.sampling import sampler as sampler_lib
from codeclm.sampling import workdir as workdir_lib
from tests import test_sample

# The tiny checkpoint trains windows of 256 tokens; a barely trained model
# writes long MCUs, so its samples get 1,024 (RoPE has no learned length).
MAX_LEN = 1024
SETTINGS = sampler_lib.Settings(temperature=1.0, top_k=40, top_p=0.9,
                                max_new_tokens=MAX_LEN)


@functools.lru_cache(maxsize=None)
def loaded_and_sampler():
  loaded = workdir_lib.load(test_sample.tiny_workdir(), mesh_shape=(1, 1, 1, 1))
  model = llama.Llama(dataclasses.replace(loaded.model.config,
                                          max_len=MAX_LEN))
  cfg = test_sample.sample_config(cache_dtype="float32", min_bucket=MAX_LEN)
  sampler = workdir_lib.sampler_of(cfg, model, loaded.tokenizer, loaded.mesh,
                                   loaded.rules)
  grammar = workdir_lib.grammar_of(cfg.constrained, loaded.codec,
                                   loaded.tokenizer)
  return loaded, sampler, grammar


def requests(codec, tmp_path):
  done, _ = files.completion_requests(
      codec, test_sample.photo_files(tmp_path), [0.5], 2)
  return [files.Request(f"u{i}") for i in range(4)] + done


def test_constrained_samples_are_clean_and_unconstrained_are_not(tmp_path):
  loaded, sampler, grammar = loaded_and_sampler()
  assert grammar is not None
  todo = requests(loaded.codec, tmp_path)
  draw = functools.partial(files.draw, sampler, loaded.params,
                           loaded.tokenizer, loaded.codec, todo, SETTINGS,
                           seed=0, batch_size=8)
  constrained, free = draw(grammar=grammar), draw()
  a = grammar.automaton
  for r in constrained:
    assert r.sample.ended  # EOS, allowed only after EOI.
    assert a.walk(r.data).state == a.done
    assert r.report.clean == r.report.expected == r.report.found
  share = lambda results: np.mean([r.report.clean_fraction for r in results])
  assert share(constrained) == 1.0
  assert share(free) < 1.0


def test_a_completion_starts_in_its_prompts_state(tmp_path):
  loaded, sampler, grammar = loaded_and_sampler()
  codec, tokenizer, a = loaded.codec, loaded.tokenizer, grammar.automaton
  todo = [r for r in requests(codec, tmp_path) if r.prompt]
  cols, rows = codec.mcu_grid
  k = cols * round(0.5 * rows)  # The prompt ends at the marker after MCU k.
  for r in todo:
    assert grammar.start(r.prompt) == (a.mcu_start, k)
  results = files.draw(sampler, loaded.params, tokenizer, codec, todo,
                       SETTINGS, seed=1, batch_size=8, grammar=grammar)
  for r in results:
    first = int(r.sample.tokens[0])
    assert grammar.next[a.mcu_start, first] >= 0
    # The new tokens alone run from the prompt's state to the end.
    walk = a.walk(tokenizer.decode(r.sample.tokens), a.mcu_start, k)
    assert walk.accepted and walk.state == a.done
    assert r.data.startswith(r.request.prompt)


def test_the_grammar_tables_go_to_the_devices_once(monkeypatch):
  """Two calls with the grammar: the second moves only its own prompts, rows
  and settings to the devices, not the tables again. Under the transfer
  guard nothing may move except through hosts.put, which records each
  array it moves."""
  loaded, shared, grammar = loaded_and_sampler()
  sampler = sampler_lib.Sampler(  # A new one: nothing placed yet.
      shared.model, eos_id=shared.eos_id, pad_id=shared.pad_id,
      mesh=shared.mesh, rules=shared.rules, cache_dtype=shared.cache_dtype,
      min_bucket=shared.min_bucket)
  constraint = grammar.constraint  # Built on a device once, before the calls.
  tables = [x for x in jax.tree.leaves(constraint) if x.ndim]
  table_bytes = sum(x.nbytes for x in tables)
  table_shapes = {(x.shape, x.dtype) for x in tables}
  moved = []
  put = hosts.put
  def recorded(x, where):
    moved[-1].append(x)
    with jax.transfer_guard_host_to_device("allow"):
      return put(x, where)
  monkeypatch.setattr(hosts, "put", recorded)
  prompts = [[loaded.tokenizer.bos_id]] * 8  # The module's bucket.
  settings = dataclasses.replace(SETTINGS, max_new_tokens=8)
  calls = []
  for _ in range(2):
    moved.append([])
    with jax.transfer_guard_host_to_device("disallow"):
      calls.append(sampler(loaded.params, prompts, settings, seed=4,
                           **grammar.sampler_args([b""] * 8)))
  first, second = moved
  assert {(x.shape, x.dtype) for x in second}.isdisjoint(table_shapes)
  assert sum(x.nbytes for x in second) < table_bytes
  # At most one copy of each table across both calls (a mesh of this
  # process's devices copies them from the device they were built on).
  assert sum((x.shape, x.dtype) in table_shapes for x in first) <= len(tables)
  assert len(sampler._placed) == 1  # pylint: disable=protected-access
  for a, b in zip(*calls):
    np.testing.assert_array_equal(a.tokens, b.tokens)
