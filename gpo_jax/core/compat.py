"""Version-independent JAX helpers (code must run on jax 0.10 through 0.12)."""

import jax
import numpy as np

_TRACED_ERRORS = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                  jax.errors.TracerBoolConversionError)


def concrete_value(x) -> np.ndarray | None:
  """``x`` as a NumPy array, or None when it is traced and has no value yet.

  Asks NumPy for the value instead of testing ``isinstance(x, jax.core.Tracer)``:
  ``jax.core`` is a legacy module whose symbols newer JAX releases remove.
  """
  try:
    return np.asarray(x)
  except _TRACED_ERRORS:
    return None
