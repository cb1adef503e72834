# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # GPO theory on the exact tabular lab
#
# Every number here is an exact sum over `K` actions or `K x K` pairs
# (`gpo_jax.lab.tabular`), so nothing is sampled. Four checks of SPEC §1:
#
# 1. **Population minimisers with soft labels**: minimising `p f(z) + (1-p) f(-z)` gives
#    `z* = logit p` (logistic, savage), `½ logit p` (exponential), `2p − 1` (squared,
#    truncated quadratic) and `1` (hinge).
# 2. **Offline regulariser vs KL**: with pairs `μ` on a subset of actions and a policy whose
#    actions share features, the μ-weighted squared loss `offline_reg = ½ E_μ ρ²` stays where
#    it is while `KL(π‖π_ref)` grows off the data support.
# 3. **β normalisation**: the KL reached at the optimum of each family, against `β` and
#    against `beta_eff = β f''(0)/|f'(0)|`; the curves align against `beta_eff`.
# 4. **The on-policy identity** `∇ ½ E_{y,y'~π}[(h(y) − h(y'))²] = 2 ∇ KL(π‖π_ref)`,
#    `h = log π/π_ref`, checked numerically.
#
# `GPO_NB_STEPS` sets the number of optimiser steps (the tests use a small value; the
# figures below are meant to be read with the default).

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from gpo_jax.objectives import losses
from gpo_jax.lab import tabular
from gpo_jax.analysis import plots

# gpo_jax.analysis.plots selects the Agg backend on import (it writes files); draw inline here.
# %matplotlib inline

STEPS = int(os.environ.get("GPO_NB_STEPS", "3000"))
FAMILIES = list(losses.GPO_FUNCTIONS)
STYLE = plots.family_style(FAMILIES)
LR, OPT = 0.05, "adam"
pd.set_option("display.precision", 4)

# %% [markdown]
# ## 1. Population minimisers per family with soft labels
#
# Two actions, one pair `(0, 1)` with soft label `p = P(0 ≻ 1)`, `β = 1`: the exact loss is
# `p f(ρ) + (1 − p) f(−ρ)`, and gradient descent on the policy logits finds its minimiser
# `ρ* = z*`. The lines are the closed forms of SPEC §1.

# %%
p_N = np.linspace(0.55, 0.95, 9)
ref2 = jnp.zeros(2)
mu2 = jnp.array([[0.0, 1.0], [0.0, 0.0]])
P_Nx2x2 = jnp.asarray(np.stack([[[0.5, p], [1 - p, 0.5]] for p in p_N]), jnp.float32)

closed_form = {
    "logistic": np.log(p_N / (1 - p_N)), "savage": np.log(p_N / (1 - p_N)),
    "exponential": 0.5 * np.log(p_N / (1 - p_N)),
    "squared": 2 * p_N - 1, "truncated_quadratic": 2 * p_N - 1, "hinge": np.ones_like(p_N),
}
z_star = {}
for f in FAMILIES:
  run = jax.vmap(lambda P: tabular.train_offline(ref2, mu2, 1.0, f, P_KxK=P, steps=STEPS,
                                                 learning_rate=LR, optimizer=OPT))(P_Nx2x2)
  z_star[f] = np.asarray(run.logits_K[:, 0] - run.logits_K[:, 1])

fig, ax = plots.figure(figsize=(6, 4))
for f in FAMILIES:
  st = STYLE[f]
  ax.plot(p_N, closed_form[f], color=st["color"], linestyle=st["linestyle"], label=f"{f} (closed form)")
  ax.plot(p_N, z_star[f], linestyle="none", marker=st["marker"], color=st["color"], markerfacecolor="none")
ax.set(xlabel="soft label p = P(y_w ≻ y_l)", ylabel="minimiser z* = β ρ*",
       title="Population minimisers (markers: gradient descent, lines: closed form)")
ax.grid(alpha=0.3)
ax.legend(fontsize=6)
plt.show()

pd.DataFrame({f: [np.max(np.abs(z_star[f] - closed_form[f]))] for f in FAMILIES},
             index=["max |z_gd − z*|"])

# %% [markdown]
# Hinge: for `|ρ| ≤ 1` the loss is `1 − (2p − 1)ρ`, and past `ρ = 1` it rises again, so the
# minimum is the kink at `ρ = 1`; steps with a fixed learning rate hover around a kink, hence
# the larger error there.
#
# ## 2. Offline regulariser vs KL
#
# `K = 8` actions; `μ` puts its mass on the pairs among the first `S = 3` actions (the data
# support) with Bradley–Terry soft labels. Two policies start at `π_ref` (uniform):
#
# * **tabular**: one free logit per action;
# * **feature-shared**: `logits = Φ w` with `Φ` random `K x 2` features (larger norm on the
#   unseen actions), so moving the on-support margins also moves the unseen actions.
#
# Both reach the same on-support margins, so `offline_reg` ends at the same value, but the
# feature-shared policy moves almost all probability to actions the data never shows and
# its KL grows far beyond what `offline_reg` reports.

# %%
K, S, D = 8, 3, 2
rng = np.random.default_rng(0)
ref_K = jnp.zeros(K)
r_K = jnp.asarray(np.r_[[0.6, 0.0, -0.6], np.zeros(K - S)], jnp.float32)
phi = rng.normal(size=(K, D))
phi[:S] *= 0.5
phi[S:] *= 2.0
Phi_KxD = jnp.asarray(phi, jnp.float32)
mu_sub = np.zeros((K, K))
mu_sub[:S, :S] = 1 - np.eye(S)
mu_sub = jnp.asarray(mu_sub / mu_sub.sum(), jnp.float32)
P_KxK = tabular.bradley_terry(r_K, 1.0)

runs = {name: tabular.train_offline(ref_K, mu_sub, 1.0, "logistic", P_KxK=P_KxK, features_KxD=feats,
                                    steps=STEPS, learning_rate=LR, optimizer=OPT)
        for name, feats in (("tabular", None), ("feature-shared", Phi_KxD))}

fig, axes = plots.figure(1, 3, figsize=(12, 3.6))
for (name, run), ls in zip(runs.items(), ("-", "--")):
  tr = {k: np.asarray(v) for k, v in run.trajectory.items()}
  t = np.arange(1, len(tr["kl"]) + 1)
  axes[0].plot(t, tr["offline_reg"], linestyle=ls, color="C0", label=f"offline_reg, {name}")
  axes[0].plot(t, tr["kl"], linestyle=ls, color="C3", label=f"KL, {name}")
  axes[1].plot(tr["kl"], tr["offline_reg"], linestyle=ls, label=name)
axes[0].set(xscale="log", xlabel="step", ylabel="nats", title="offline_reg and KL during training")
axes[1].set(xlabel="KL(π‖π_ref)", ylabel="offline_reg = ½ E_μ ρ²", title="offline_reg vs KL")
width = 0.4
for i, (name, run) in enumerate(runs.items()):
  axes[2].bar(np.arange(K) + (i - 0.5) * width, np.asarray(jax.nn.softmax(run.logits_K)), width, label=name)
axes[2].axvspan(-0.5, S - 0.5, color="0.9", zorder=-1, label="support of μ")
axes[2].axhline(1 / K, color="k", linewidth=0.8, linestyle=":", label="π_ref")
axes[2].set(xlabel="action", ylabel="final π", title="where the probability went")
for ax in axes:
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
plt.show()

pd.DataFrame({name: {"offline_reg": float(run.trajectory["offline_reg"][-1]),
                     "KL": float(run.trajectory["kl"][-1]),
                     "mass off the support": float(jax.nn.softmax(run.logits_K)[S:].sum())}
              for name, run in runs.items()}).T

# %% [markdown]
# ## 3. β normalisation: KL reached vs β and vs beta_eff
#
# `K = 6` actions, `μ` uniform over all pairs, soft Bradley–Terry labels close to ½ (label
# temperature 2). For each family and each `β`, train to the optimum and record the exact
# KL. The Taylor view says the minimiser of `f(0) + f'(0)(2p−1)z + ½f''(0)z²` is
# `ρ* = (2p − 1)/beta_eff`, so the KL reached should depend on `β` only through
# `beta_eff = β f''(0)/|f'(0)|` (`gpo_jax.objectives.losses.beta_eff`). Hinge has `f''(0) = 0` and is
# drawn only in the left panel.

# %%
K6 = 6
ref6 = jnp.asarray(np.random.default_rng(1).normal(size=K6) * 0.5, jnp.float32)
r6 = jnp.asarray(np.linspace(-1, 1, K6), jnp.float32)
mu6 = 1 - np.eye(K6)
mu6 = jnp.asarray(mu6 / mu6.sum(), jnp.float32)
P6 = tabular.bradley_terry(r6, 2.0)
betas = np.geomspace(0.02, 2.0, 9)

kl_reached = {}
for f in FAMILIES:
  run = jax.vmap(lambda b: tabular.train_offline(ref6, mu6, b, f, P_KxK=P6, steps=STEPS,
                                                 learning_rate=LR, optimizer=OPT))(jnp.asarray(betas, jnp.float32))
  kl_reached[f] = np.asarray(run.trajectory["kl"][:, -1])
beta_eff = {f: np.asarray(losses.beta_eff(f, betas)) for f in FAMILIES}

fig, axes = plots.figure(1, 2, figsize=(10, 4), sharey=True)
for f in FAMILIES:
  st = STYLE[f]
  kw = dict(marker=st["marker"], linestyle=st["linestyle"], color=st["color"], label=f)
  axes[0].plot(betas, kl_reached[f], **kw)
  if beta_eff[f][0] > 0:
    axes[1].plot(beta_eff[f], kl_reached[f], **kw)
axes[0].set(xscale="log", yscale="log", xlabel="β", ylabel="KL(π‖π_ref) at the optimum", title="KL vs β")
axes[1].set(xscale="log", yscale="log", xlabel="beta_eff = β f''(0)/|f'(0)|", title="KL vs beta_eff")
for ax in axes:
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
plt.show()


# %% [markdown]
# How well do the curves align? On the common range of each x-axis, interpolate `log KL`
# of every family with `beta_eff > 0` and average the spread (standard deviation across
# families) over the range. A smaller number means the curves lie on top of each other.

# %%
def mean_log_spread(xs: dict) -> float:
  """Mean over a common log-x grid of the across-family std of log KL."""
  lo = max(np.log(x).min() for x in xs.values())
  hi = min(np.log(x).max() for x in xs.values())
  grid = np.linspace(lo, hi, 64)
  curves = np.stack([np.interp(grid, np.log(xs[f]), np.log(kl_reached[f])) for f in xs])
  return float(curves.std(axis=0).mean())


curved = [f for f in FAMILIES if beta_eff[f][0] > 0]
pd.DataFrame({"x-axis": ["β", "beta_eff"],
              "mean spread of log KL": [mean_log_spread({f: betas for f in curved}),
                                        mean_log_spread({f: beta_eff[f] for f in curved})]})

# %% [markdown]
# ## 4. The on-policy identity ∇½E[(h − h')²] = 2∇KL
#
# `tabular.onpolicy_squared_loss` is `½ Σ_{y,y'} π(y)π(y') (h(y) − h(y'))²` with the sampling
# distribution held fixed (stop-gradient). Its gradient equals `2 ∇ KL(π‖π_ref)` at every
# `π`; the offline regulariser with `μ = π ⊗ π` (held fixed) is the same function, while an
# offline `μ` that differs from `π ⊗ π` (uniform over pairs) gives a different gradient.

# %%
K8 = 8


@jax.jit
def gradients(theta, ref):
  """2∇KL and the gradients of the three regularisers at logits ``theta``."""
  pi = jax.nn.softmax(theta)
  mu_pi = jnp.outer(pi, pi)
  mu_unif = (1 - jnp.eye(K8)) / (K8 * (K8 - 1))
  return {"2∇KL": 2 * jax.grad(tabular.kl_divergence)(theta, ref),
          "on-policy": jax.grad(tabular.onpolicy_squared_loss)(theta, ref),
          "offline μ=π⊗π": jax.grad(tabular.offline_regulariser)(theta, ref, mu_pi),
          "offline μ uniform": jax.grad(tabular.offline_regulariser)(theta, ref, mu_unif)}


rows, pts = [], []
for seed in range(5):
  k1, k2 = jax.random.split(jax.random.key(seed))
  theta, ref = 1.5 * jax.random.normal(k1, (K8,)), jax.random.normal(k2, (K8,))
  g = {k: np.asarray(v) for k, v in gradients(theta, ref).items()}
  rows.append({"seed": seed, "KL": float(tabular.kl_divergence(theta, ref)), "max |2∇KL|": np.abs(g["2∇KL"]).max(),
               **{f"{k}: max err": np.abs(g[k] - g["2∇KL"]).max()
                  for k in ("on-policy", "offline μ=π⊗π", "offline μ uniform")}})
  pts.append((g["2∇KL"], g["on-policy"], g["offline μ uniform"]))

fig, ax = plots.figure(figsize=(4.8, 4.4))
x = np.concatenate([p[0] for p in pts])
ax.plot(x, np.concatenate([p[1] for p in pts]), "o", markerfacecolor="none", label="∇ on-policy ½E[(h−h')²]")
ax.plot(x, np.concatenate([p[2] for p in pts]), "x", label="∇ offline_reg, μ uniform")
lim = np.abs(x).max() * 1.1
ax.plot([-lim, lim], [-lim, lim], "k:", linewidth=0.8, label="y = x")
ax.set(xlabel="2 ∇KL(π‖π_ref) (per logit)", ylabel="gradient of the regulariser",
       title="On-policy identity (5 random π, π_ref)")
ax.grid(alpha=0.3)
ax.legend(fontsize=6)
plt.show()
pd.DataFrame(rows)
