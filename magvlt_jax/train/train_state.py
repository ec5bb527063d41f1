"""The transformer train state: a flax struct pytree that orbax saves and jit shards as a whole."""
from typing import Any

import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  """step: optimizer updates applied. nonfinite_in_row / nonfinite_total: skipped updates (a
  non-finite loss or gradient), the first reset by every good step; saved so a resumed run keeps
  counting."""
  step: jnp.ndarray
  params: Any
  opt_state: Any
  nonfinite_in_row: jnp.ndarray
  nonfinite_total: jnp.ndarray

  @classmethod
  def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               nonfinite_in_row=jnp.zeros((), jnp.int32), nonfinite_total=jnp.zeros((), jnp.int32))
