"""Tests of the vmapped sweep train step: member isolation, no recompilation, divergence, data order."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpo_jax.objectives import losses
from gpo_jax.core import model as model_lib
from gpo_jax.algorithms import gpo
from gpo_jax.core import sequences
from gpo_jax.engine import data as data_lib
from gpo_jax.engine import program

import multidevice

P, T, V, N = 4, 5, 12, 48
BATCH = 8


def _beta_eff(members):
  """``beta f''(0)/|f'(0)|`` of every member in NumPy float32 (the evaluator's arithmetic)."""
  return np.asarray(members.beta, np.float32) * np.asarray(members.beta_eff_scale, np.float32)


def _setup():
  """A random tiny policy (as π_ref) and synthetic preference pairs with exact ref log-probs."""
  cfg = model_lib.TransformerConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                    max_len=P + T)
  policy = model_lib.Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  prompt = np.concatenate([np.ones((N, 1)), rng.integers(5, V, (N, P - 2)), 2 * np.ones((N, 1))],
                          1).astype(np.int32)
  lens = rng.integers(1, T + 1, (2, N))
  mask = (np.arange(T)[None, None] < lens[..., None]).astype(np.int32)
  resp = np.where(mask > 0, rng.integers(5, V, (2, N, T)), 0).astype(np.int32)

  def ref_lp(r, m):
    tok = jnp.concatenate([prompt, r], 1)
    full = jnp.concatenate([np.zeros_like(prompt), m], 1)
    return np.asarray(model_lib.response_logprobs(policy, tok, full))

  gold = rng.normal(size=(2, N)).astype(np.float32)
  pairs = dict(prompt=prompt, chosen=resp[0], rejected=resp[1], chosen_mask=mask[0],
               rejected_mask=mask[1], ref_chosen_logps=ref_lp(resp[0], mask[0]),
               ref_rejected_logps=ref_lp(resp[1], mask[1]), gold_chosen=gold[0],
               gold_rejected=gold[1])
  graphdef, params, rest = nnx.split(policy, nnx.Param, ...)
  return graphdef, params, rest, pairs, policy


SETUP = _setup()
TABLE = ("logistic", "squared", "savage", "exponential", "hinge")
TCFG = program.TrainConfig(batch_size=BATCH, grad_clip=0.0)
TRACES = []
# One jitted step shared by every test (it retraces only for a new member count), which
# also lets the recompilation test count traces of the real thing.
STEP = jax.jit(program.make_train_step(gpo.member_loss_fn(SETUP[0], SETUP[2], TABLE, False), TCFG,
                                     on_trace=lambda: TRACES.append(1)), donate_argnums=0)


def _members(*rows):
  """Members from (family, beta, seed, lr, gamma, data_size) rows over the shared table."""
  return gpo.from_rows(TABLE, rows)


def _run(members, steps, pairs=None, hparams=None):
  _, params, _, default_pairs, _ = SETUP
  state = program.init_state(params, members, TCFG)
  data = sequences.pair_arrays(default_pairs if pairs is None else pairs)
  hp = members.hparams() if hparams is None else hparams
  history = []
  for _ in range(steps):
    state, m = STEP(state, hp, data)
    history.append(jax.device_get(m))
  return state, history


def _member_params(state, m):
  return jax.tree.map(lambda x: np.asarray(x[m]), state["params"])


# Adam divides by sqrt(v) + 1e-8, which amplifies float32 rounding differences between
# a batched (vmap) and an unbatched matmul on near-zero gradients; the tolerance is ~1 %
# of one step's update (lr = 1e-2) and far below any cross-member leak.
ATOL = 1e-4

ROWS = (("logistic", 0.1, 0, 1e-2, 0.0, 48), ("squared", 2.0, 3, 1e-2, 1.5, 32),
        ("savage", 0.5, 1, 3e-3, 0.0, 16))


def test_member_equals_same_configuration_trained_alone():
  members = _members(*ROWS)
  state, hist = _run(members, steps=3)
  for j in (1, 2):
    alone, hist1 = _run(_members(ROWS[j]), steps=3)
    try:
      chex.assert_trees_all_close(_member_params(state, j), _member_params(alone, 0),
                                  rtol=1e-4, atol=ATOL)
    except AssertionError as e:
      raise AssertionError(f"member {ROWS[j]} trained inside a sweep differs from the same "
                           f"configuration trained alone: members leak into each other. {e}")
    np.testing.assert_allclose(hist[-1]["loss"][j], hist1[-1]["loss"][0], rtol=1e-4)


@pytest.mark.parametrize("groups, chunk", [(1, 1), (2, 1), (1, 3), (2, 2)])
def test_looped_member_layouts_equal_the_vmapped_step(groups, chunk):
  # Four members: (1, 3) leaves a remainder chunk, (2, 2) vmaps inside each loop step.
  members = _members(*ROWS, ("hinge", 1.0, 2, 1e-2, 0.0, 40))
  want, want_hist = _run(members, steps=3)
  looped = jax.jit(program.make_train_step(gpo.member_loss_fn(SETUP[0], SETUP[2], TABLE, False), TCFG,
                                         member_groups=groups, member_chunk=chunk),
                   donate_argnums=0)
  state = program.init_state(SETUP[1], members, TCFG)
  data, hp = sequences.pair_arrays(SETUP[3]), members.hparams()
  for _ in range(3):
    state, m = looped(state, hp, data)
  for a, b in zip(jax.tree.leaves(want["params"]), jax.tree.leaves(state["params"])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=ATOL, err_msg=(
        f"member layout groups={groups}, chunk={chunk} trains members differently from the "
        "vmapped step: members are misassigned or mixed"))
  np.testing.assert_allclose(np.asarray(m["loss"]), want_hist[-1]["loss"], rtol=1e-4)
  assert np.asarray(state["step"]) == 3


def test_member_layout_rejects_groups_that_do_not_divide_members():
  with pytest.raises(ValueError, match="member_groups=3 must be >= 1 and divide the 4"):
    program.map_members(lambda x: x, (jnp.zeros((4, 2)),), groups=3, chunk=1)
  with pytest.raises(ValueError, match="member_chunk=0"):
    program.map_members(lambda x: x, (jnp.zeros((4, 2)),), groups=1, chunk=0)


def test_first_step_loss_matches_independent_numpy_computation():
  """Batch loss vs NumPy: closed-form f, hard and soft labels, ρ set by shifted ref log-probs."""
  _, _, _, pairs, _ = SETUP
  members = _members(("logistic", 0.5, 0, 1e-2, 0.0, 48), ("exponential", 0.5, 1, 1e-2, 2.0, 40),
                     ("logistic", 1.5, 2, 1e-2, 1.0, 24))
  _, hist = _run(members, steps=1)
  for m in range(members.size):
    # At step 0 the policy equals π_ref, so ρ = 0 and the loss is p f(0) + (1-p) f(0) = f(0).
    f0 = {"logistic": np.log(2.0), "exponential": 1.0}[members.row(m)["family"]]
    np.testing.assert_allclose(hist[0]["loss"][m], f0, rtol=1e-6, err_msg=(
        "at step 0 the policy equals π_ref, so every GPO loss must equal f(0)"))
  # A non-trivial margin: shift the stored ref log-probs of chosen by a known amount.
  shift = np.linspace(-1.0, 1.0, N).astype(np.float32)
  pairs2 = dict(pairs, ref_chosen_logps=pairs["ref_chosen_logps"] - shift)
  _, hist = _run(members, steps=1, pairs=pairs2)
  met = hist[0]
  fs = {"logistic": lambda z: np.log1p(np.exp(-z)), "exponential": lambda z: np.exp(-z)}
  for m in range(members.size):
    row = members.row(m)
    idx = np.asarray(data_lib.batch_indices(row["seed"], row["data_size"], 0, BATCH))
    rho = shift[idx].astype(np.float64)       # policy == π_ref, so ρ is the shift
    z = row["beta"] * rho
    if row["gamma"] > 0:
      p = 1 / (1 + np.exp(-row["gamma"] * (pairs["gold_chosen"][idx]
                                           - pairs["gold_rejected"][idx])))
    else:
      p = np.ones_like(z)
    f = fs[row["family"]]
    want = np.mean(p * f(z) + (1 - p) * f(-z))
    np.testing.assert_allclose(met["loss"][m], want, rtol=1e-5, err_msg=(
        f"train-step loss of {row} differs from p f(βρ) + (1-p) f(-βρ) computed in NumPy"))
    np.testing.assert_allclose(met["rho/mean"][m], rho.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(met["rewards/margins"][m], row["beta"] * rho.mean(),
                               rtol=1e-5, atol=1e-6)


def test_changing_hyperparameter_values_never_recompiles():
  members = _members(*ROWS)
  hp = members.hparams()
  _, h1 = _run(members, steps=1)
  before = len(TRACES)
  hp2 = dict(hp, beta=hp["beta"] * 3.7, lr=hp["lr"] * 0.1, gamma=hp["gamma"] + 0.5,
             family_idx=(hp["family_idx"] + 1) % len(TABLE), seed=hp["seed"] + 11,
             data_size=hp["data_size"] - 8)
  _, h2 = _run(members, steps=2, hparams=hp2)
  assert len(TRACES) == before, (
      f"the train step was traced {len(TRACES) - before} more times; new values recompiled")
  assert not np.allclose(h1[0]["loss"], h2[0]["loss"]), "new hyperparameter values had no effect"


def test_diverging_member_is_frozen_and_flagged_without_affecting_others():
  good = ROWS[:2]
  state, hist = _run(_members(*good, ("logistic", 0.5, 0, 1e30, 0.0, 48)), steps=4)
  clean, _ = _run(_members(*good), steps=4)
  flags = np.asarray(state["diverged"])
  assert flags.tolist() == [False, False, True], f"diverged flags {flags}: only lr=1e30 must diverge"
  first = next(i for i, h in enumerate(hist) if h["diverged"][2])
  assert all(h["diverged"][2] for h in hist[first:]), "the diverged flag must stay set"
  frozen = _member_params(state, 2)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(frozen)), (
      "a diverged member's parameters must be frozen at their last finite values")
  for m in range(2):
    for a, b in zip(jax.tree.leaves(_member_params(state, m)),
                    jax.tree.leaves(_member_params(clean, m))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=ATOL, err_msg=(
          "a diverging member changed the training of a healthy one"))


@pytest.mark.parametrize("data_size", [8, 20, 48])
def test_batches_are_per_epoch_permutations_of_the_data_subset(data_size):
  steps = -(-3 * data_size // BATCH)
  idx = np.concatenate([np.asarray(data_lib.batch_indices(7, data_size, s, BATCH))
                        for s in range(steps)])
  assert idx.min() >= 0 and idx.max() < data_size, "batches must stay inside the subset"
  for e in range(3):
    epoch = idx[e * data_size:(e + 1) * data_size]
    np.testing.assert_array_equal(np.sort(epoch), np.arange(data_size), err_msg=(
        f"epoch {e} is not a permutation of arange({data_size})"))
  again = np.asarray(data_lib.batch_indices(7, data_size, 1, BATCH))
  np.testing.assert_array_equal(again, idx[BATCH:2 * BATCH],
                                err_msg="batch indices must depend only on (seed, step)")
  other = np.asarray(data_lib.batch_indices(8, data_size, 0, BATCH))
  if data_size > BATCH:
    assert not np.array_equal(other, idx[:BATCH]), "different seeds must shuffle differently"


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 31, 32, 33, 100, 4096, 4097, 65_537])
def test_permute_index_is_a_bijection_of_range_n_for_every_key(n):
  perm = jax.jit(jax.vmap(data_lib.permute_index, in_axes=(None, None, 0)))  # n traced
  keys = jnp.asarray([0, 1, 0xDEADBEEF, 2**32 - 1], jnp.uint32)
  out = np.asarray(perm(jnp.arange(n), n, keys))
  for k, row in zip(keys.tolist(), out):
    np.testing.assert_array_equal(np.sort(row), np.arange(n), err_msg=(
        f"key {k}: permute_index is not a permutation of range({n})"))
  if n >= 8:
    assert len({tuple(r) for r in out}) == len(keys), "different keys gave the same order"


def test_permute_index_is_close_to_uniform_over_keys():
  # Marginals: over 20,000 keys each input lands on each of the n outputs ~uniformly, and
  # the order of two inputs is a fair coin. A chi-square test at a fixed seed.
  from scipy import stats
  n, k = 12, 20_000
  keys = jax.random.bits(jax.random.key(3), (k,), jnp.uint32)
  out = np.asarray(jax.jit(jax.vmap(data_lib.permute_index, in_axes=(None, None, 0)))(
      jnp.arange(n), n, keys))
  for i in (0, 5, n - 1):
    counts = np.bincount(out[:, i], minlength=n)
    p = stats.chisquare(counts).pvalue
    assert p > 1e-4, f"input {i} lands non-uniformly: counts {counts} (chi-square p={p:.1e})"
  for i, j in ((0, 1), (3, 9)):
    frac = np.mean(out[:, i] < out[:, j])
    assert abs(frac - 0.5) < 4 * 0.5 / np.sqrt(k), (
        f"P(perm[{i}] < perm[{j}]) = {frac:.3f}; a random shuffle gives 1/2")


def test_make_members_validates_and_names_bad_values():
  with pytest.raises(ValueError, match="logistc"):
    gpo.make_members(["logistc"], [0.1], n_train=N, batch_size=BATCH)
  with pytest.raises(ValueError, match=r"-0\.5"):
    gpo.make_members(["logistic"], [0.1, -0.5], n_train=N, batch_size=BATCH)
  with pytest.raises(ValueError, match="0.0"):
    gpo.make_members(["logistic"], [0.1], lrs=(0.0,), n_train=N, batch_size=BATCH)
  with pytest.raises(ValueError, match="data_size=4"):
    gpo.make_members(["logistic"], [0.1], data_sizes=(4,), n_train=N, batch_size=BATCH)
  with pytest.raises(ValueError, match="savage"):
    gpo.make_members(["logistic", "savage"], {"logistic": [0.1]}, n_train=N,
                       batch_size=BATCH)
  m = gpo.make_members(["logistic", lambda z: jnp.exp(-z)], {"logistic": [0.1, 1.0],
                                                              "<lambda>": [2.0]},
                         seeds=(0, 1), n_train=N, batch_size=BATCH)
  assert m.size == 6
  np.testing.assert_allclose(_beta_eff(m), [0.05, 0.05, 0.5, 0.5, 2.0, 2.0], rtol=1e-6)
  assert losses.get_f(m.families[1])(jnp.zeros(())) == 1.0


@pytest.mark.multidevice
def test_sharded_sweep_equals_single_device_on_8_devices():
  result = multidevice.run_json("sweep_subprocess.py", timeout=1200)
  assert result["devices"] == 8
  assert result["train_delta"] > 1e-3, "training did not move the weights; the test is vacuous"
  for case in result["cases"]:
    label = f"{case['preset']} on {case['mesh']}"
    assert case["max_abs_diff"] < ATOL and case["loss_diff"] < 1e-4, (
        f"{label}: the sharded sweep differs from the one-device run by {case['max_abs_diff']} "
        "(members mixed up, or a wrong cross-device reduction)")
    assert case["looped_max_abs_diff"] < ATOL and case["looped_loss_diff"] < 1e-4, (
        f"{label}: looping over each shard's members (member_groups = sweep axis) differs "
        f"from the one-device run by {case['looped_max_abs_diff']}")
    assert case["placed_max_abs_diff"] < ATOL and case["placed_loss_diff"] < 1e-4, (
        f"{label}: the batch placed over `data` (program.place_on_data) differs from the "
        f"one-device run by {case['placed_max_abs_diff']}")
  dp, fsdp, fsdp_tp, dp_data = result["cases"]
  # Without the placement every `data` device of a member group repeats the member's whole
  # batch; with it each computes its quarter (XLA's per-device FLOPs of the compiled step).
  assert dp_data["placed_flops"] < 0.5 * dp_data["looped_flops"], dp_data
  assert dp["placed_flops"] == dp["looped_flops"], "data = 1: the placement must be a no-op"
  assert dp["looped_collectives"] == [], (
      "with one member per device the looped layout must need no cross-device data "
      f"movement, found {dp['looped_collectives']} (the member regrouping broke the sharding)")
  assert dp["w_up_spec"][0] == "sweep" and dp["unique_w_up_shards"] == 8
  assert fsdp["w_up_spec"][:2] == ["sweep", "data"], fsdp["w_up_spec"]
  assert fsdp_tp["w_up_spec"] == ["sweep", "data", "model"], fsdp_tp["w_up_spec"]


def test_hard_label_member_never_evaluates_f_at_minus_z():
  """A user f that overflows at -z must not turn a hard-label member into NaN (issue: the
  trainer used to compute p f(z) + (1-p) f(-z) with p = 1, i.e. 0 * inf = NaN)."""
  def steep(z):   # f'(0) = -1 < 0, finite for z >= -10, +inf (overflow) for z << 0
    return jnp.exp(-10.0 * z) / 10.0

  assert not np.isfinite(np.float32(steep(jnp.float32(-20.0))))
  table = ("logistic", steep)
  rows = [(steep, 50.0, 0, 1e-2, 0.0, 48), (steep, 50.0, 0, 1e-2, 1.0, 48)]
  members = gpo.from_rows(table, rows)
  shift = np.full(N, 1.0, np.float32)   # ρ = 1 at π_ref: z = 50, -z = -50 overflows
  pairs = dict(SETUP[3], ref_chosen_logps=SETUP[3]["ref_chosen_logps"] - shift)
  step = jax.jit(program.make_train_step(gpo.member_loss_fn(SETUP[0], SETUP[2], table, False),
                                         TCFG))
  state = program.init_state(SETUP[1], members, TCFG)
  state, m = step(state, members.hparams(), sequences.pair_arrays(pairs))
  loss, diverged = np.asarray(m["loss"]), np.asarray(m["diverged"])
  assert np.isfinite(loss[0]) and not diverged[0], (
      f"hard-label member: loss {loss[0]}, diverged {diverged[0]}; f(-z) leaked into it")
  np.testing.assert_allclose(loss[0], np.exp(-500.0) / 10.0, atol=1e-30)
  assert diverged[1], "the soft-label member really needs f(-z) = inf and must be frozen"


def test_gpo_loss_hard_mask_equals_plain_hard_loss_bitwise():
  rho = jnp.linspace(-3.0, 3.0, 64)
  for f in ("logistic", "squared", "exponential", "savage"):
    plain = losses.gpo_loss(rho, 0.7, f)
    masked = losses.gpo_loss(rho, 0.7, f, p=jnp.full_like(rho, 0.3), hard=True)
    np.testing.assert_array_equal(np.asarray(masked), np.asarray(plain))
    g_plain = jax.grad(lambda r: losses.gpo_loss(r, 0.7, f).sum())(rho)
    g_masked = jax.grad(lambda r: losses.gpo_loss(r, 0.7, f, p=jnp.full_like(r, 0.3),
                                                  hard=True).sum())(rho)
    np.testing.assert_array_equal(np.asarray(g_masked), np.asarray(g_plain))
  soft = losses.gpo_loss(rho, 0.7, "logistic", p=jnp.full_like(rho, 0.3), hard=False)
  np.testing.assert_allclose(soft, losses.gpo_loss(rho, 0.7, "logistic", p=jnp.full_like(rho, 0.3)))


def test_beta_eff_grid_converts_by_autodiff_and_hinge_by_its_margin():
  grid = (0.003, 0.1, 3.0)
  m = gpo.make_members(["logistic", "hinge", "squared", "savage"], beta_effs=grid,
                       n_train=N, batch_size=BATCH)
  got = {f: m.beta[m.family == f].tolist() for f in ("logistic", "hinge", "squared", "savage")}
  # f''(0)/|f'(0)|: logistic 1/2, squared 1, savage 1/2 (exact binary fractions); hinge 0,
  # placed at IPO's target margin 1/beta_eff.
  assert got == {"logistic": [0.006, 0.2, 6.0], "hinge": list(grid), "squared": list(grid),
                 "savage": [0.006, 0.2, 6.0]}, got
  eff = _beta_eff(m)
  np.testing.assert_allclose(eff[m.family == "squared"], grid, rtol=1e-6)
  assert np.all(eff[m.family == "hinge"] == 0.0), "hinge's beta_eff is 0 by definition"
  with pytest.raises(ValueError, match="exactly one of sweep.betas and sweep.beta_effs"):
    gpo.make_members(["logistic"], betas=(0.1,), beta_effs=(0.1,), n_train=N, batch_size=BATCH)
  with pytest.raises(ValueError, match="beta_effs \\(logistic\\).*got -1"):
    gpo.make_members(["logistic"], beta_effs=(-1,), n_train=N, batch_size=BATCH)
  with pytest.raises(ValueError, match="f''\\(0\\) = -"):
    losses.beta_from_beta_eff(lambda z: -z - z ** 2, 0.1)


def test_step_traces_once_across_new_values_with_chex():
  members = _members(*ROWS)
  counted = chex.assert_max_traces(n=1)(
      program.make_train_step(gpo.member_loss_fn(SETUP[0], SETUP[2], TABLE, False), TCFG))
  step = jax.jit(counted)
  data = sequences.pair_arrays(SETUP[3])
  hp = members.hparams()
  state = program.init_state(SETUP[1], members, TCFG)
  for scale in (1.0, 2.5, 0.1):
    state, _ = step(state, dict(hp, beta=hp["beta"] * scale, lr=hp["lr"] * scale), data)
  with pytest.raises(AssertionError):   # a new member count is a new program: chex sees it
    step(program.init_state(SETUP[1], _members(*ROWS[:2]), TCFG), _members(*ROWS[:2]).hparams(),
         data)
