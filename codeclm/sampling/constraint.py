"""The sampler's constraint hook: a token automaton applied every step.

A per-row automaton state is carried through the decode loop; each step
keeps only the tokens `next_state[state_b]` allows and then moves to
`next_state[state_b, token_b]`. An optional per-row `Counter` restricts the
tokens further, for a grammar whose one non-regular part is a count. The
JPEG grammar (jpeg_grammar.py, lifted to tokens by token_grammar.py) plugs in
here as a state x token table with its restart-marker counter.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Counter:
  """A per-row count carried beside the automaton state.

  For a grammar whose one non-regular part is a count (JPEG: which restart
  marker comes next, and EOI only after the last MCU). A token's kind is 1
  in `state` (JPEG: right after a marker's FF) and 0 elsewhere. Drawing token
  t adds step[kind, t] to the count; t is allowed only where ok[kind, t],
  first[kind, t] < 0 or == count % modulus, and count + step <= limit, with
  equality where final[kind, t].
  """
  state: jax.Array     # int32 scalar
  limit: jax.Array     # int32 scalar
  modulus: jax.Array   # int32 scalar
  step: jax.Array      # int32 [2, V]
  first: jax.Array     # int32 [2, V]
  final: jax.Array     # bool [2, V]
  ok: jax.Array        # bool [2, V]

  def allows(self, state: jax.Array, count: jax.Array) -> jax.Array:
    """bool [B, V]: the tokens the counts of rows in `state` [B] allow."""
    kind = (state == self.state).astype(jnp.int32)
    step, first = self.step[kind], self.first[kind]
    after = count[:, None] + step
    return (self.ok[kind] & ((first < 0) | (first == count[:, None]
                                             % self.modulus))
            & (after <= self.limit)
            & (~self.final[kind] | (after == self.limit)))

  def advance(self, state: jax.Array, count: jax.Array,
              token: jax.Array) -> jax.Array:
    kind = (state == self.state).astype(jnp.int32)
    return count + self.step[kind, token]


@flax.struct.dataclass
class Constraint:
  """A token automaton: a states x vocabulary table, applied every step.

  next_state: int32 [S, V]; the state after drawing a token, -1 where the
    token is not allowed (every state must allow at least one token).
  initial_state: int32 scalar; a row's state after its prompt unless the
    call gives per-row `starts`.
  counter: an optional per-row count that further restricts tokens.
  """
  next_state: jax.Array
  initial_state: jax.Array
  counter: Counter | None = None

  @classmethod
  def create(cls, allowed, next_state, initial_state: int = 0,
             counter: Counter | None = None) -> Constraint:
    """From separate tables: allowed bool [S, V], next_state int [S, V]."""
    allowed = np.asarray(allowed, bool)
    next_state = np.asarray(next_state, np.int32)
    if allowed.ndim != 2 or allowed.shape != next_state.shape:
      raise ValueError(
          f"Constraint tables must both be [states, vocab]; got allowed "
          f"{allowed.shape} and next_state {next_state.shape}.")
    return cls.from_table(np.where(allowed, next_state, -1), initial_state,
                          counter)

  @classmethod
  def from_table(cls, next_state, initial_state: int = 0,
                 counter: Counter | None = None) -> Constraint:
    """From one table: int [S, V] with -1 where a token is not allowed."""
    next_state = np.asarray(next_state, np.int32)
    if next_state.ndim != 2:
      raise ValueError(f"Constraint table must be [states, vocab]; got "
                       f"{next_state.shape}.")
    s = next_state.shape[0]
    empty = (next_state < 0).all(axis=1)
    if empty.any():
      raise ValueError(
          f"Constraint states {np.flatnonzero(empty).tolist()[:10]} allow no "
          "token; every state must allow at least one.")
    if next_state.max() >= s or not 0 <= initial_state < s:
      raise ValueError(f"Constraint states must lie in [0, {s}); check "
                       "next_state and initial_state.")
    return cls(jnp.asarray(next_state), jnp.asarray(initial_state, jnp.int32),
               counter)
