# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lab explorer
#
# A look inside a built lab (`gpo_jax.lab`): the reference policy π_ref, the gold reward
# model and the preference data, against the synthetic corpus they come from
# (`gpo_jax.lab.corpus`).
#
# * gold score distribution under π_ref, and by latent style of the corpus;
# * label noise: how often the Bradley–Terry labels agree with the gold ordering, against
#   what the Bradley–Terry model predicts;
# * in-context learning gain from demonstrations, against the Bayes-optimal gain;
# * π_ref's entropy, overall and per style;
# * decoded episodes, π_ref samples and preference pairs.
#
# Set `GPO_LAB_DIR` (or edit `LAB_DIR`) to a built lab directory. If it is empty the
# `small` lab is built (or reused) under `labs/`, which takes a few minutes the first time.
# `GPO_NB_SAMPLES` sets how many responses are sampled and scored here.

# %%
import os
import pathlib

import jax
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from flax import nnx
from IPython.display import display

import gpo_jax
from gpo_jax.lab import corpus as corpus_lib
from gpo_jax import lab as lab_lib
from gpo_jax.lab import gold as gold_lib
from gpo_jax.lab import steps as lab_build
from gpo_jax.analysis import plots

# gpo_jax.analysis.plots selects the Agg backend on import (it writes files); draw inline here.
# %matplotlib inline

LAB_DIR = os.environ.get("GPO_LAB_DIR", "")
N_SAMPLES = int(os.environ.get("GPO_NB_SAMPLES", "2048"))
REPO = pathlib.Path(gpo_jax.__file__).resolve().parents[1]
pd.set_option("display.precision", 4)

# %%
if LAB_DIR:
  lab = lab_lib.load_lab(LAB_DIR)
else:
  lab = lab_lib.build_or_load(lab_lib.load_config(str(REPO / "configs" / "lab.py") + ":small"),
                              str(REPO / "labs"))
corpus = lab.corpus
cfg, s = lab.cfg, lab.stats
graphdef, _ = nnx.split(lab.policy())
gold_graphdef, _ = nnx.split(lab.gold())
models = lab_build.Models(graphdef, lab.ref_state, gold_graphdef, lab.gold_state, lab.gold_mean, lab.gold_std,
                          lab.gold_terms, gold_lib.tables(lab.corpus))
print(lab_lib.summary(lab))

# %% [markdown]
# ## π_ref's supervised training
#
# Held-out loss of the SFT run that made π_ref (whole episodes, and response tokens only),
# with the corpus's Bayes-optimal loss (style marginalised) and the true-style loss as
# floors.

# %%
curve = pd.DataFrame(s["sft/curve"])
fig, ax = plots.figure(figsize=(5.5, 3.6))
ax.plot(curve["step"], curve["train"], "o-", label="train")
ax.plot(curve["step"], curve["heldout"], "s--", label="held-out episodes")
ax.plot(curve["step"], curve["heldout_response"], "^:", label="held-out responses")
ax.axhline(s["corpus/bayes_nll_per_token"], color="k", linestyle="-.", linewidth=0.8,
           label="Bayes mixture (responses)")
ax.axhline(s["corpus/true_style_nll_per_token"], color="0.5", linestyle=(0, (1, 1)), linewidth=0.8,
           label="true style (responses)")
ax.set(xlabel="SFT step", ylabel="nats / token", title="π_ref SFT")
ax.grid(alpha=0.3)
ax.legend(fontsize=6)
plt.show()

# %% [markdown]
# ## Gold score distribution
#
# Gold scores are normalised to mean 0, std 1 under π_ref samples at build time. Left:
# fresh π_ref samples on the lab's eval prompts. Right: responses drawn from the corpus in
# each latent style (π_ref's own samples carry no style label).

# %%
rng = np.random.default_rng(0)
ctx = lab.eval_prompts[rng.integers(0, len(lab.eval_prompts), N_SAMPLES)]
resp, mask = lab_build.sample_responses(graphdef, lab.ref_state, ctx, jax.random.key(0),
                                        response_len=cfg.corpus.response_len,
                                        temperature=cfg.sample_temperature, batch_size=cfg.batch_size)


def gold_of(ctx_NxC, resp_NxT, mask_NxT):
  """The lab's gold scores of responses to contexts (``Lab.gold_score``)."""
  return lab.gold_score(ctx_NxC, resp_NxT, mask_NxT)


gold_ref = gold_of(ctx, resp, mask)

by_style = {}
for style in range(cfg.corpus.n_styles):
  prompts = corpus.sample_prompts(rng, N_SAMPLES)
  r_style, m_style = corpus.sample_responses(rng, prompts, np.full(N_SAMPLES, style))
  by_style[style] = dict(prompts=prompts, resp=r_style, mask=m_style,
                         gold=gold_of(corpus.context(prompts), r_style, m_style))

fig, axes = plots.figure(1, 2, figsize=(10, 3.6), sharex=True)
bins = np.linspace(-4, 4, 41)
axes[0].hist(gold_ref, bins=bins, color="C0", alpha=0.8)
axes[0].axvline(gold_ref.mean(), color="k", linestyle="--", label=f"mean {gold_ref.mean():+.3f}")
axes[0].set(xlabel="gold score", ylabel="count", title=f"π_ref samples (n={N_SAMPLES})")
for style, d in by_style.items():
  axes[1].hist(d["gold"], bins=bins, histtype="step", linewidth=1.2,
               linestyle=plots.LINESTYLES[style % len(plots.LINESTYLES)],
               label=f"style {style}: mean {d['gold'].mean():+.3f}")
axes[1].set(xlabel="gold score", title="corpus responses by latent style")
for ax in axes:
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
plt.show()

pd.DataFrame([{"responses": "π_ref samples", "mean": gold_ref.mean(),
               "se": gold_ref.std() / np.sqrt(len(gold_ref)), "std": gold_ref.std(),
               "mean length": mask.sum(-1).mean()}]
             + [{"responses": f"corpus style {k}", "mean": d["gold"].mean(),
                 "se": d["gold"].std() / np.sqrt(len(d["gold"])), "std": d["gold"].std(),
                 "mean length": d["mask"].sum(-1).mean(),
                 "build-time mean": s["gold/by_style"][str(k)]["mean"]} for k, d in by_style.items()])

# %% [markdown]
# ## Label noise
#
# Each training pair's label was sampled from Bradley–Terry on the gold scores with label
# temperature `label_temp` (optionally hard labels and label flips). The observed fraction of
# labels that agree with the gold ordering should match the model's prediction, overall and
# as a function of the gold margin.

# %%
pairs = lab.pairs("train")
g_c, g_r = pairs["gold_chosen"].astype(np.float64), pairs["gold_rejected"].astype(np.float64)
observed, n_untied = lab_build.observed_agreement(g_c, g_r)
predicted = lab_build.predicted_agreement(g_c, g_r, cfg.label_temp, cfg.hard_labels, cfg.label_flip)
print(f"{len(g_c)} train pairs ({n_untied} untied): labels agree with gold on {observed:.3f} "
      f"(± {np.sqrt(observed * (1 - observed) / n_untied):.3f}); Bradley–Terry predicts {predicted:.3f} "
      f"(label_temp={cfg.label_temp}, hard={cfg.hard_labels}, flip={cfg.label_flip})")

margin = np.abs(g_c - g_r)
edges = np.quantile(margin, np.linspace(0, 1, 9))
which = np.clip(np.searchsorted(edges, margin, side="right") - 1, 0, len(edges) - 2)
rows = []
for b in range(len(edges) - 1):
  sel = (which == b) & (g_c != g_r)
  obs, n = lab_build.observed_agreement(g_c[sel], g_r[sel])
  rows.append({"|gold margin|": margin[sel].mean(), "observed": obs, "se": np.sqrt(obs * (1 - obs) / n),
               "predicted": lab_build.predicted_agreement(g_c[sel], g_r[sel], cfg.label_temp,
                                                          cfg.hard_labels, cfg.label_flip), "pairs": n})
noise = pd.DataFrame(rows)

fig, axes = plots.figure(1, 2, figsize=(10, 3.6))
axes[0].errorbar(noise["|gold margin|"], noise["observed"], yerr=noise["se"], fmt="o", capsize=2,
                 label="observed (octiles of |margin|)")
axes[0].plot(noise["|gold margin|"], noise["predicted"], "k--", label="Bradley–Terry prediction")
axes[0].set(xlabel="|gold(y_a) − gold(y_b)|", ylabel="P(label agrees with gold)", title="label noise vs margin")
axes[1].hist(pairs["label_p"], bins=20, color="C2")
axes[1].set(xlabel="label_p = P(chosen ≻ rejected) under gold BT", ylabel="pairs", title="soft labels")
for ax in axes:
  ax.grid(alpha=0.3)
axes[0].legend(fontsize=6)
plt.show()
noise

# %% [markdown]
# ## In-context learning gain
#
# `log π_ref(y | 2 same-style demonstrations, x) − log π_ref(y | x)` on held-out corpus
# episodes, against the Bayes-optimal gain from the exact style posterior (build-time
# statistics). A positive gain means demonstrations carry style information π_ref uses.

# %%
icl = pd.DataFrame({"nats / response": [s["icl/gain"], s["icl/bayes_gain"]],
                    "se": [s["icl/gain_se"], np.nan]}, index=["π_ref", "Bayes-optimal"])
nll = pd.Series({"π_ref, no demos": s["ref/response_nll_per_token"],
                 "π_ref, 2 demos": s["ref/response_nll_per_token_with_demos"],
                 "Bayes mixture": s["corpus/bayes_nll_per_token"],
                 "true style": s["corpus/true_style_nll_per_token"]})
fig, axes = plots.figure(1, 2, figsize=(10, 3.4))
axes[0].bar(icl.index, icl["nats / response"], yerr=icl["se"].fillna(0), capsize=3, color=["C0", "0.6"])
axes[0].set(ylabel="log-prob gain [nats / response]", title=f"ICL gain ({s['icl/n_episodes']} episodes)")
axes[1].bar(nll.index, nll.values, color=["C0", "C1", "0.6", "0.8"])
axes[1].set(ylabel="response NLL [nats / token]", title="response likelihood with and without demos")
axes[1].tick_params(axis="x", labelsize=6)
for ax in axes:
  ax.grid(alpha=0.3, axis="y")
plt.show()
icl

# %% [markdown]
# ## π_ref entropy
#
# Mean per-token entropy of π_ref's next-token distribution over response positions, on its
# own samples and on corpus responses of each style, against `log V` (uniform over the
# vocabulary). Entropy well above zero leaves room to optimise.

# %%
entropy = {"π_ref samples": lab_build.ref_entropy(models, ctx, resp, mask, cfg.batch_size)}
for style, d in by_style.items():
  entropy[f"style {style}"] = lab_build.ref_entropy(models, corpus.context(d["prompts"]), d["resp"],
                                                    d["mask"], cfg.batch_size)
fig, ax = plots.figure(figsize=(6, 3.4))
ax.bar(list(entropy), list(entropy.values()), color=["C0"] + ["C1"] * cfg.corpus.n_styles)
ax.axhline(s["ref/log_vocab"], color="k", linestyle="--", label=f"log V = {s['ref/log_vocab']:.3f}")
ax.set(ylabel="entropy [nats / token]", title="π_ref entropy on response positions")
ax.grid(alpha=0.3, axis="y")
ax.legend(fontsize=6)
plt.show()
pd.Series(entropy, name="nats / token").to_frame()

# %% [markdown]
# ## Decoded samples
#
# Token ids `>= 5` are content tokens (shown as numbers); the special tokens are spelled out.

# %%
def decode(tokens) -> str:
  """Token ids as text, PAD dropped."""
  return " ".join(corpus_lib.SPECIAL_NAMES.get(int(t), str(int(t))) for t in tokens if t != corpus_lib.PAD)


episodes = corpus.sample_episodes(np.random.default_rng(1), 4)
for i in range(4):
  print(f"style {episodes['styles'][i]}, {episodes['n_demos'][i]} demos: {decode(episodes['tokens'][i])}")

# %%
order = np.argsort(gold_ref)
pd.DataFrame([{"which": which, "gold": gold_ref[i], "context": decode(ctx[i]), "response": decode(resp[i])}
              for which, i in (("lowest gold", order[0]), ("median gold", order[len(order) // 2]),
                               ("highest gold", order[-1]))])

# %%
pd.DataFrame([{"prompt": decode(pairs["prompt"][i]), "chosen": decode(pairs["chosen"][i]),
               "rejected": decode(pairs["rejected"][i]), "gold chosen": pairs["gold_chosen"][i],
               "gold rejected": pairs["gold_rejected"][i], "label_p": pairs["label_p"][i]}
              for i in range(5)])
