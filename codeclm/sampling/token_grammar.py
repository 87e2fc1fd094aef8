"""The JPEG byte automaton lifted to a tokenizer's tokens: the sampler's
constraint.

next[state, token] walks the token's bytes through the byte automaton (-1
where any byte is refused). Restart markers inside tokens are checked by the
sampler's per-row counter (`constraint.Counter`): on a valid path FF followed by
D0..D7 / D9 is always a marker (a data FF is always followed by 00), so the
markers a token writes depend only on its bytes, except for a leading
D0..D7 / D9 written right after a marker's FF (the MARKER state): hence the
counter's two kinds. Per token and kind: how many restart markers it writes,
the number the first must have (count mod 8), whether it ends with EOI (only
allowed when the count then reaches num_mcus - 1), and whether its markers are
consecutive at all.

BOS and EOS: the prompt (with its BOS) is walked on the host to give each
row's start; BOS is never allowed. The model writes EOI itself, as in its
training data (... FF D9 EOS); EOS is allowed only after it, in DONE, where it
is the only token. So a constrained sample that ends with EOS is a whole,
valid stream.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from codeclm.sampling import constraint as constraint_lib
from codeclm.sampling import jpeg_grammar

_MARKER_CODES = frozenset(range(0xD0, 0xD8)) | {0xD9}


@dataclasses.dataclass(frozen=True)
class TokenGrammar:
  """State x token tables of one codec setting and one tokenizer."""
  automaton: jpeg_grammar.ByteAutomaton
  next: np.ndarray      # int32 [S, vocab_size]; -1 = not allowed
  step: np.ndarray      # int32 [2, vocab_size]: restart markers written
  first: np.ndarray     # int32 [2, vocab_size]: first marker's number, -1 none
  final: np.ndarray     # bool [2, vocab_size]: ends with EOI
  ok: np.ndarray        # bool [2, vocab_size]: markers consecutive

  @property
  def nbytes(self) -> int:
    return sum(x.nbytes for x in (self.next, self.step, self.first,
                                  self.final, self.ok))

  def start(self, prompt: bytes, name: str = "prompt") -> tuple[int, int]:
    """(state, count) after a prompt's bytes (b"": before SOI)."""
    walk = self.automaton.walk(prompt)
    if not walk.accepted:
      raise ValueError(
          f"The {name} ({len(prompt)} bytes) is not a canonical stream of this "
          f"codec setting: byte {walk.rejected_at} breaks the JPEG grammar. "
          "Prompts must come from codec.encode()/codec.prompt(), or sample "
          "with sample.constrained=False.")
    return walk.state, walk.count

  def sampler_args(self, prompts: Sequence[bytes],
                   names: Sequence[str] | None = None) -> dict:
    """Sampler keyword arguments for rows with these prompt bytes."""
    names = names or [f"prompt {i}" for i in range(len(prompts))]
    return dict(constraint=self.constraint,
                starts=[self.start(p, n) for p, n in zip(prompts, names)])

  @functools.cached_property
  def constraint(self) -> constraint_lib.Constraint:
    """The tables on the device (made once)."""
    a = self.automaton
    counter = constraint_lib.Counter(
        state=jnp.int32(a.marker), limit=jnp.int32(a.num_mcus - 1),
        modulus=jnp.int32(8), step=jnp.asarray(self.step),
        first=jnp.asarray(self.first), final=jnp.asarray(self.final),
        ok=jnp.asarray(self.ok))
    return constraint_lib.Constraint(jnp.asarray(self.next), jnp.int32(0),
                                     counter)


def _markers(piece: bytes, after_ff: bool) -> tuple[int, int, bool, bool]:
  """(restart markers, first one's number or -1, ends with EOI, consistent)
  of a token's bytes; after_ff: its first byte follows a marker's FF."""
  codes = [b for i, b in enumerate(piece) if b in _MARKER_CODES and (
      (i == 0 and after_ff) or (i > 0 and piece[i - 1] == 0xFF))]
  rst = [c - 0xD0 for c in codes if c != 0xD9]
  eoi = 0xD9 in codes
  ok = (not eoi or codes[-1] == 0xD9 and codes.count(0xD9) == 1) and all(
      (b - a) % 8 == 1 for a, b in zip(rst, rst[1:]))
  return len(rst), rst[0] if rst else -1, eoi, ok


def build(automaton: jpeg_grammar.ByteAutomaton, tokenizer) -> TokenGrammar:
  """Tables for `tokenizer` (a ByteBPE) over `automaton`."""
  s = automaton.num_states
  pieces = [tokenizer.decode([t]) for t in range(tokenizer.num_entries)]
  sink = np.concatenate([np.where(automaton.next >= 0, automaton.next, s),
                         np.full((1, 256), s, np.int32)]).astype(np.int32)
  table = np.full((tokenizer.vocab_size, s), -1, np.int32)  # token-major
  lengths = np.array([len(p) for p in pieces])
  for length in np.unique(lengths):
    ids = np.flatnonzero(lengths == length)
    data = np.array([list(pieces[t]) for t in ids], np.int32)  # [n, L]
    cur = np.broadcast_to(np.arange(s, dtype=np.int32)[None], (len(ids), s))
    for i in range(length):
      cur = sink[cur, data[:, i][:, None]]
    table[ids] = np.where(cur == s, -1, cur)
  table[tokenizer.eos_id, automaton.done] = automaton.done
  v = tokenizer.vocab_size
  step, first = np.zeros((2, v), np.int32), np.full((2, v), -1, np.int32)
  final, ok = np.zeros((2, v), bool), np.ones((2, v), bool)
  for kind in (0, 1):
    for t, piece in enumerate(pieces):
      step[kind, t], first[kind, t], final[kind, t], ok[kind, t] = _markers(
          piece, bool(kind))
  return TokenGrammar(automaton, np.ascontiguousarray(table.T), step, first,
                      final, ok)
