"""The aggregation rules of every table and figure: which runs may be pooled (setups), how a set of matrices is
summarised (amplification: a ratio of sums), and how uncertain a number is (test-set and seed intervals). Pure
functions over arrays and tables, with no drawing, so each rule is tested on its own.

    setups = find_setups(runs, setup_columns(identity_keys))   # run_id -> S1, S2, ...: never pooled together
    wilson_interval(0.78, 400)                                 # (0.737, 0.817): one test-set accuracy, 95 %
    seed_interval(np.array([0.77, 0.79, 0.80]))                # (lo, hi): stratified bootstrap over seeds
    amplification_summary(delta_top_fro, proj_delta)           # one number for many matrices: Σ / Σ

Rules, and why:
- A *setup* is every identity key of a run's config (rundir.NOT_IDENTITY left out: runs_root, name, logger.*,
  trainer.progress_bar; the same keys `config_hash` covers) except the seed, the configuration a figure compares
  (`method.*` and `trainer.lr`, which is set per method) and the figure's swept axis (figure 9: task.train_size).
  Runs of different setups (another eval_size, max_length, steps, model, ...) are never averaged together.
- A *configuration* within a setup is its `method.*` and `trainer.lr` values: runs averaged over seeds share
  all of them. Its method (plain LoRA, DoRA, PiSSA, LoRA+, ReLoRA, rsLoRA, full, subspace, imported) follows from
  those keys; analysis.variants reads it in one place, for every label and pairing.
- Amplification over several matrices (layers, seeds) is Σ‖ΔW_r‖_F / Σ‖UᵀWV‖_F, the ratio of the summed
  norms (equivalently of their means), never the mean of per-matrix ratios: one matrix whose projection is near zero
  would make that mean as large as its own ratio (2270 where the summed norms give 22.9). The table's mean
  norms therefore divide to its amplification. ‖ΔW_r‖_F is ΔW's top-r part (the directions U, V are taken
  from), so full fine-tuning (ΔW of full rank) is compared with LoRA (ΔW of rank r, ΔW_r = ΔW) like for like.
- A test-set accuracy is a binomial proportion over n = eval_examples: Wilson's 95 % interval (good at small n
  and near 0 or 1, unlike the normal one). Seeds that share a test set share its error, so the interval of a
  seed mean uses the same n.
- Seed variation: a percentile interval from a stratified bootstrap (rliable's: runs resampled with replacement
  within each stratum, e.g. each layer; 2000 resamples, a fixed seed so the same runs give the same numbers). One
  run gives no seed interval (NaN: figures say n=1); at n = 2 the interval is the range of the two values, which
  the figures say.
"""
import json
import math

import numpy as np
import pandas as pd

from lowrank.rundir.layout import ABSENT, NOT_IDENTITY, identity_value

Z95 = 1.959963984540054     # the standard normal's 97.5 % quantile: two-sided 95 % intervals
RESAMPLES = 2000            # bootstrap resamples (rliable's default is 2000 too)
BOOTSTRAP_SEED = 0
SEED_KEY = "seed"
CONFIGURATION_KEYS = ("method", "trainer.lr")  # key prefixes: what a figure compares within one setup


# ---- setups: which runs may be pooled --------------------------------------------------------------------------

def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def is_identity_key(key: str) -> bool:
    """Whether a flattened config key can change a run's results (rundir.NOT_IDENTITY's keys cannot)."""
    return not _under(key, NOT_IDENTITY)


def is_configuration_key(key: str) -> bool:
    """`method.*` and `trainer.lr`: what a figure compares within one setup."""
    return _under(key, CONFIGURATION_KEYS)


def setup_columns(identity_keys, axis=()) -> list[str]:
    """The flattened config keys that define a setup: identity keys but the seed, the configuration and the
    figure's swept `axis` (keys or key prefixes). Sorted."""
    return sorted(k for k in identity_keys if is_identity_key(k) and k != SEED_KEY and not is_configuration_key(k)
                  and not _under(k, axis))


def add_setups(table: pd.DataFrame, config_keys) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The runs table with a `setup` column after run_id (find_setups over every identity key among the runs'
    flattened `config_keys` but the seed and the configuration), and the setups table."""
    ids, setups = find_setups(table, setup_columns(sorted(k for k in set(config_keys) if is_identity_key(k))))
    if table.empty:
        return table.assign(setup=pd.Series(dtype=object)), setups
    table = table.copy()
    table.insert(1, "setup", ids.loc[table.run_id].values)
    return table, setups


def canonical(value) -> object:
    """One spelling per value, so that equal settings group together: NaN and None alike, 100 and 100.0 alike."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return int(value) if float(value).is_integer() else float(value)
    return str(value)


def _order(value) -> tuple:
    """A sort key for canonical values of one column: null first, then numbers by size, then text."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, (bool, int, float)):
        return (1, float(value), "")
    return (2, 0, str(value))


def _show(value) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, bool) else str(value)


def setup_number(setup: str) -> int:
    """The n of a setup named "S<n>" (find_setups' names), for ordering; 0 for any other name."""
    return int(setup[1:]) if setup[1:].isdigit() else 0


def find_setups(runs: pd.DataFrame, columns: list[str]) -> tuple[pd.Series, pd.DataFrame]:
    """Group runs (one row each, with `run_id` and the setup `columns`) into setups: runs with equal values in
    every column. Returns (setup id per run_id: 'S1', 'S2', ..., the setup with the most runs first, ties in the
    order of their values (null first, numbers by size), and
    one row per setup: setup, label (the values of the columns in which setups differ, as `key=value`, ', '
    joined; '' for a single setup), key (JSON of every column's value), n_runs, runs (sorted run ids, space
    joined))."""
    if runs.empty:
        return (pd.Series(dtype=object, name="setup"),
                pd.DataFrame(columns=["setup", "label", "key", "n_runs", "runs"]))
    # each setting as the run-directory hash reads it: runs from before a key's default changed share their setup
    values = [{c: canonical(None if (v := identity_value(c, row.get(c))) is ABSENT else v) for c in columns}
              for row in runs.to_dict("records")]
    keys = [json.dumps(v, sort_keys=True) for v in values]
    count = {k: keys.count(k) for k in keys}
    per_key = {k: v for k, v in zip(keys, values)}
    ranked = sorted(count, key=lambda k: (-count[k], [_order(per_key[k][c]) for c in columns]))
    order = {k: f"S{i + 1}" for i, k in enumerate(ranked)}
    ids = pd.Series([order[k] for k in keys], index=runs.run_id.values, name="setup")
    differ = [c for c in columns if len({json.dumps(per_key[k][c]) for k in order}) > 1]
    rows = []
    for key, setup in sorted(order.items(), key=lambda kv: setup_number(kv[1])):
        held = sorted(ids.index[ids == setup])
        rows.append({"setup": setup, "label": ", ".join(f"{c}={_show(per_key[key][c])}" for c in differ),
                     "key": key, "n_runs": len(held), "runs": " ".join(held)})
    return ids, pd.DataFrame(rows)


def common_settings(setups: pd.DataFrame, keys=("model.name", "task.name", "task.eval_size", "task.train_size",
                                                "trainer.max_steps", "trainer.batch_size",
                                                "trainer.max_length")) -> str:
    """The settings every setup shares, among `keys`, as 'key=value' joined by ', ' (for report.md)."""
    parsed = [json.loads(k) for k in setups.key]
    same = [k for k in keys if parsed and all(k in p for p in parsed) and len({json.dumps(p[k]) for p in parsed}) == 1]
    return ", ".join(f"{k}={_show(parsed[0][k])}" for k in same)


# ---- intervals -----------------------------------------------------------------------------------------------

def wilson_interval(accuracy, n, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a binomial proportion. accuracy: (...) in [0, 1], n: (...) trials (the test
    examples), broadcast together. Returns (lo, hi) arrays; NaN where n is missing or < 1."""
    p = np.asarray(accuracy, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        n = np.where(n >= 1, n, np.nan)
        denom = 1 + z ** 2 / n
        centre = (p + z ** 2 / (2 * n)) / denom
        half = z / denom * np.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
    return centre - half, centre + half


def _mean_statistic(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=(-2, -1))


def stratified_bootstrap(scores, statistic=_mean_statistic, n_resamples: int = RESAMPLES, level: float = 0.95,
                         seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile interval of `statistic` under rliable's stratified bootstrap.
    scores: (runs, strata) array, or a tuple of such arrays resampled together (e.g. numerators and
    denominators of one ratio); each resample draws, for every stratum (column) on its own, `runs` row indices
    with replacement. statistic: maps the resampled arrays, each (n_resamples, runs, strata), to
    (n_resamples,); the default is the mean over runs and strata. Returns (lo, hi), NaN for fewer than 2 runs."""
    arrays = scores if isinstance(scores, tuple) else (scores,)
    arrays = tuple(np.asarray(a, dtype=float) for a in arrays)
    arrays = tuple(a[:, None] if a.ndim == 1 else a for a in arrays)
    runs, strata = arrays[0].shape
    if any(a.shape != (runs, strata) for a in arrays):
        raise ValueError(f"score arrays differ in shape: {[a.shape for a in arrays]}")
    if runs < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, runs, size=(n_resamples, runs, strata))   # per stratum, its own draw
    col = np.arange(strata)[None, None, :]
    values = statistic(*(a[idx, col] for a in arrays))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def seed_interval(values, **kwargs) -> tuple[float, float]:
    """Interval of the mean of one value per seed (values: (n,)): stratified_bootstrap with one stratum.
    NaN at n = 1; at n = 2, the range of the two values."""
    return stratified_bootstrap(np.asarray(values, dtype=float)[:, None], **kwargs)


def seed_summary(values) -> dict:
    """mean, seed_lo, seed_hi (seed_interval) and n of one value per seed (values: (n,))."""
    v = np.asarray(values, dtype=float)
    lo, hi = seed_interval(v)
    return {"mean": float(v.mean()) if len(v) else math.nan, "seed_lo": lo, "seed_hi": hi, "n": len(v)}


def n_label(n: int, unit: str = "seed") -> str:
    """'n=1 seed: no interval' or 'n=3 seeds', as figures print it."""
    return f"n={n} {unit}: no interval" if n == 1 else f"n={n} {unit}s"


# ---- summaries of many matrices -----------------------------------------------------------------------------

def ratio_of_sums(numerator, denominator) -> float:
    """Σ numerator / Σ denominator over arrays of one shape (inf when the denominator sums to 0)."""
    num, den = float(np.sum(numerator)), float(np.sum(denominator))
    return num / den if den > 0 else math.inf


def amplification_summary(delta_fro, proj_delta) -> float:
    """One amplification factor for a set of matrices (layers, seeds): Σ‖ΔW‖_F / Σ‖UᵀWV‖_F. delta_fro,
    proj_delta: (m,) per matrix, the numerator and denominator of Table 7's factor (pass ‖ΔW_r‖_F, ΔW's top-r
    part, for a comparison of full fine-tuning with LoRA). See the module docstring for why not the mean of the
    per-matrix ratios."""
    return ratio_of_sums(delta_fro, proj_delta)


def amplification_interval(delta_fro: np.ndarray, proj_delta: np.ndarray, **kwargs) -> tuple[float, float]:
    """Seed interval of amplification_summary: delta_fro, proj_delta (seeds, matrices), stratified bootstrap
    over seeds within each matrix (layer). NaN for one seed."""
    return stratified_bootstrap((delta_fro, proj_delta),
                                lambda num, den: num.sum(axis=(-2, -1)) / den.sum(axis=(-2, -1)), **kwargs)


def majority_fraction(label_counts) -> float:
    """The majority-class rate of a test set: the largest label count over the total. label_counts: (k,) counts
    (NaN entries ignored); NaN when there are none."""
    c = np.asarray(label_counts, dtype=float)
    c = c[~np.isnan(c)]
    return float(c.max() / c.sum()) if len(c) and c.sum() > 0 else math.nan
