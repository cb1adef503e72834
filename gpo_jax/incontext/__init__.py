"""In-context alignment (SPEC §6): demonstration retrieval and ICDPO.

Modules: ``retrieval`` (the gold-labelled demo pool, the random / BM25 / embedding
retrievers, stored retrievals) and ``icdpo`` (the ICDPO scorer, selection and its
evaluation against best-of-n baselines).
"""

from gpo_jax.incontext.retrieval import (
    DemoPool, Demos, RetrievalSettings, load_or_retrieve, retrieve)
from gpo_jax.incontext.icdpo import ICDPOConfig, ICDPOResult, evaluate, score, select

__all__ = ["DemoPool", "Demos", "RetrievalSettings", "load_or_retrieve", "retrieve",
           "ICDPOConfig", "ICDPOResult", "evaluate", "score", "select"]
