"""The JPEG grammar: real photographs accepted, damage rejected no earlier
than it happens, random walks through it decode cleanly (Pillow and the
codec as independent oracles)."""

import functools
import io
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from scipy import sparse
from scipy.sparse import csgraph

from codeclm.codecs import jpeg
from codeclm.sampling import jpeg_grammar
from codeclm.sampling import token_grammar
from codeclm.tokenizer import ByteBPE

# Every photograph scikit-image ships (its drawings and logos left out).
PHOTOS = ("astronaut", "brick", "camera", "cat", "chelsea", "coffee", "coins",
          "grass", "gravel", "hubble_deep_field", "immunohistochemistry",
          "moon", "page", "retina", "rocket", "text")
SIZES = (64, 256)
# The other photographs scikit-image has offline: four more (stereo_motorcycle
# gives two), and faces of Labeled Faces in the Wild (25x25 greyscale).
MORE_PHOTOS = ("cell", "clock", "microaneurysms")
FACES = 24


@functools.lru_cache(maxsize=None)
def codec(size):
  return jpeg.JpegCodec(size, size)


@functools.lru_cache(maxsize=None)
def automaton(size):
  return jpeg_grammar.build(codec(size))


@functools.lru_cache(maxsize=None)
def streams(size) -> tuple[bytes, ...]:
  """Each photo's centre crop, and the centre half of it, encoded."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  out = []
  for name in PHOTOS:
    image = getattr(data, name)()
    h, w = image.shape[:2]
    out.append(codec(size).encode(image))
    out.append(codec(size).encode(image[h // 4:h - h // 4, w // 4:w - w // 4]))
  return tuple(out)


@functools.lru_cache(maxsize=None)
def more_streams(size) -> tuple[bytes, ...]:
  """The centre crop of every other photograph offline, encoded."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  images = [getattr(data, name)() for name in MORE_PHOTOS]
  images += data.stereo_motorcycle()[:2]
  faces = data.lfw_subset()[:FACES]  # The first 100 are faces, in [0, 1].
  images += list(np.round(faces * 255).astype(np.uint8))
  return tuple(codec(size).encode(image) for image in images)


def all_streams(size) -> tuple[bytes, ...]:
  return streams(size) + more_streams(size)


@functools.lru_cache(maxsize=None)
def grammar(size, vocab=320):
  tokenizer = ByteBPE.train(streams(size)[::2], vocab)
  return token_grammar.build(automaton(size), tokenizer), tokenizer


def decodes_cleanly(size, data: bytes) -> bool:
  """Pillow reads the file with no warning; the codec finds every MCU clean."""
  c = codec(size)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with Image.open(io.BytesIO(c.wrap(data))) as im:
      im.load()
      assert im.size == (size, size)
  report = c.decode(data)[1]
  return report.clean == report.expected == report.found


def token_walk(g, ids):
  """(state, count) after token ids, or None where one is refused (numpy,
  the sampler's counter rule written out)."""
  a, state, count = g.automaton, 0, 0
  for t in ids:
    k = int(state == a.marker)
    after = count + g.step[k, t]
    if (g.next[state, t] < 0 or not g.ok[k, t]
        or g.first[k, t] not in (-1, count % 8) or after > a.num_mcus - 1
        or (g.final[k, t] and after != a.num_mcus - 1)):
      return None
    state, count = int(g.next[state, t]), int(after)
  return state, count


@pytest.mark.parametrize("size", SIZES)
def test_every_photo_is_accepted_with_its_mcu_count(size):
  a = automaton(size)
  assert a.num_mcus == codec(size).num_mcus
  assert len(streams(size)) == 2 * len(PHOTOS)
  # Distinct photographs: 16 + 5 scikit-image ones, 24 faces.
  assert len(PHOTOS) + len(more_streams(size)) >= 40
  for data in all_streams(size):
    walk = a.walk(data)
    assert walk.accepted and walk.state == a.done
    assert walk.count == a.num_mcus - 1  # N - 1 restart markers.
    # Cut anywhere: a live prefix, with the MCUs so far.
    cut = len(data) // 3
    part = a.walk(data[:cut])
    assert part.accepted and part.state != a.done
    assert part.count == codec(size).count_mcus(data[:cut])


@pytest.mark.parametrize("size", SIZES)
def test_every_photo_is_accepted_as_tokens(size):
  g, tokenizer = grammar(size)
  a = g.automaton
  for data in all_streams(size):  # The BPE saw only half of streams().
    assert token_walk(g, tokenizer.encode(data)) == (a.done, a.num_mcus - 1)
    ids = np.append(tokenizer.encode(data), tokenizer.eos_id)
    assert token_walk(g, ids) == (a.done, a.num_mcus - 1)  # EOS after EOI.
  # EOS before the end, BOS anywhere, a marker out of turn: refused.
  ids = tokenizer.encode(streams(size)[0])
  assert token_walk(g, np.append(ids[:50], tokenizer.eos_id)) is None
  assert token_walk(g, np.append(ids[:50], tokenizer.bos_id)) is None
  prompt = codec(size).prompt(streams(size)[0], 0.5)
  state, count = token_walk(g, tokenizer.encode(prompt))
  assert (state, count) == g.start(prompt)
  assert (state, count) == (a.mcu_start, codec(size).count_mcus(prompt))


def test_every_state_can_finish():
  a = automaton(64)
  src, byte = np.nonzero(a.next >= 0)
  graph = sparse.csr_matrix((np.ones(len(src)), (a.next[src, byte], src)),
                            shape=(a.num_states,) * 2)
  alive = csgraph.breadth_first_order(graph, a.done, return_predecessors=False)
  assert len(alive) == a.num_states


def test_minimised_automaton_agrees_with_the_full_one(monkeypatch):
  a = automaton(64)
  monkeypatch.setattr(jpeg_grammar, "_minimise", lambda *args: args)
  full = jpeg_grammar.build.__wrapped__(codec(64))  # Not the cached one.
  assert a.num_states < 0.7 * full.num_states  # 43,103 of 66,725 here.
  rng = np.random.default_rng(7)
  for data in all_streams(64)[::4] + tuple(full.random_walks(8, rng)):
    for pos in rng.integers(0, len(data), 12):
      mutated = bytearray(data)
      mutated[pos] = rng.integers(256)
      mine, theirs = a.walk(bytes(mutated)), full.walk(bytes(mutated))
      assert mine.rejected_at == theirs.rejected_at
      assert mine.count == theirs.count
      assert (mine.state == a.done) == (theirs.state == full.done)
      assert (mine.state == a.marker) == (theirs.state == full.marker)


@pytest.mark.parametrize("size", SIZES)
def test_mutations_are_rejected_no_earlier_than_the_damage(size):
  a, rng = automaton(size), np.random.default_rng(size)
  prefix = a.prefix_len
  rejected = accepted = 0
  for data in streams(size)[:8]:
    positions = np.concatenate([rng.integers(0, prefix, 4),
                                rng.integers(prefix, len(data), 40)])
    for pos in positions:
      mutated = bytearray(data)
      mutated[pos] = (mutated[pos] + rng.integers(1, 256)) % 256
      walk = a.walk(bytes(mutated))
      if walk.accepted and walk.state == a.done:
        assert pos >= prefix  # Headers are fixed.
        assert decodes_cleanly(size, bytes(mutated))  # A valid other image.
        accepted += 1
      else:
        assert walk.rejected_at is None or walk.rejected_at >= pos
        rejected += 1
  assert rejected > accepted > 0


@pytest.mark.parametrize("size,n", [(64, 250), (256, 50)])
def test_random_byte_walks_decode_cleanly(size, n):
  a = automaton(size)
  for data in a.random_walks(n, np.random.default_rng(0)):
    assert a.walk(data).state == a.done
    assert decodes_cleanly(size, data)


@functools.partial(jax.jit, static_argnames=("steps", "n"))
def _token_walks(constraint, done, key, steps, n):
  """Uniform walks over allowed tokens through the sampler's own masks."""

  def body(carry):
    i, state, count, out, _ = carry
    row = constraint.next_state[state]
    allowed = (row >= 0) & constraint.counter.allows(state, count)
    token = jax.random.categorical(jax.random.fold_in(key, i),
                                   jnp.where(allowed, 0.0, -jnp.inf))
    count = constraint.counter.advance(state, count, token)
    # EOS is allowed only in DONE: a walk ends with the token drawn there.
    ended = state == done
    state = jnp.take_along_axis(row, token[:, None], axis=1)[:, 0]
    return i + 1, state, count, out.at[:, i].set(token), ended

  def cond(carry):
    return (carry[0] < steps) & ~carry[4].all()

  zeros = jnp.zeros(n, jnp.int32)
  return jax.lax.while_loop(cond, body, (
      0, zeros, zeros, jnp.zeros((n, steps), jnp.int32), zeros > 0))


@pytest.mark.parametrize("size,n,steps", [(64, 200, 2048), (256, 25, 24576)])
def test_random_token_walks_decode_cleanly(size, n, steps):
  g, tokenizer = grammar(size)
  steps_run, _, _, tokens, _ = _token_walks(g.constraint, g.automaton.done,
                            jax.random.key(size), steps, n)
  for ids in np.asarray(tokens):
    stop = np.flatnonzero(ids == tokenizer.eos_id)
    assert len(stop), "a walk did not reach EOS within the step budget"
    assert (ids[stop[0]:steps_run] == tokenizer.eos_id).all()  # DONE: EOS.
    data = tokenizer.decode(ids[:stop[0]])
    assert g.automaton.walk(data).state == g.automaton.done
    assert decodes_cleanly(size, data)


def test_tables_come_from_the_codec_header():
  layout = jpeg_grammar.layout_of(codec(64))
  assert layout.prefix == streams(64)[0][:len(layout.prefix)]
  assert len(layout.blocks) == 6  # 4:2:0: four luma blocks, two chroma.
  assert layout.blocks[0][0] is layout.blocks[3][0]
  assert layout.blocks[0][0] is not layout.blocks[4][0]
  with pytest.raises(ValueError, match="not a canonical stream"):
    grammar(64)[0].start(b"\xff\xd8\xff\xdb")
