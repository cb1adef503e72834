"""Evaluation of sweep members (``policy``: on-policy KL, gold, win rate) and the best-of-n estimator (``bon``, NumPy only).

Import the submodules directly; this package file stays free of JAX so that analysis can
use ``gpo_jax.evaluation.bon`` without initialising a backend.
"""
