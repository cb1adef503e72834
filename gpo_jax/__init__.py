"""gpo_jax: controlled reward-overoptimization studies of generalized preference optimization.

Naming: arrays carry their shape as a suffix where it helps — ``B`` batch, ``T`` time,
``V`` vocabulary, ``K`` tabular actions, ``M`` sweep members, ``P`` prompt length —
so ``logp_BxT`` is a ``[B, T]`` array of token log-probabilities. See ARCHITECTURE.md
for the module map and the contracts between modules.
"""

__version__ = "0.1.0"
