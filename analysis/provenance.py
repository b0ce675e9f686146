"""Runs are pooled only when they were made from the same model and data: within a setup (analysis/statistics.py),
runs whose model digest (Hub commit or weight files' SHA-256) or data digests (metrics.json's `provenance`, written by
lowrank/rundir/provenance.py) differ are split into one setup per digest, with one line saying so; nothing is
dropped, since the newer inputs may be the right ones. Runs written before provenance was recorded pool as before;
only where a setup is split do they form their own part ('provenance unknown'), as their inputs cannot be matched.

    table, setups, lines = add_setups(table, config_keys)   # statistics.add_setups, split by digests
    provenance_lines(table)                                # report.md's table of versions, digests and devices

The training data's digest differs between seeds by design where the seed picks or orders the examples
(`provenance.data.train_seeded`: task.train_size, LM tasks' shuffle): it is then compared only between runs of one
seed, and the evaluation data and model between all runs.
"""

import pandas as pd

from analysis import statistics as st
from analysis.tables import markdown_table

GROUP = "provenance_group"  # runs.csv column: which digest group of a split setup a run is in (empty: not split)
KNOWN = "provenance.device"  # present in every run that recorded provenance
MODEL_KEYS = ("provenance.model.hub_commit", "provenance.model.files_sha256")  # what names the weights, in order
TRAIN, EVAL, SEEDED = "provenance.data.train_sha256", "provenance.data.eval_sha256", "provenance.data.train_seeded"
UNKNOWN = "provenance unknown"
SHORT = 10  # hex digits of a digest shown


def _get(row: dict, key: str):
    return st.canonical(row.get(key))


def _short(digest) -> str:
    return str(digest)[:SHORT] if digest is not None else "unknown"


def _known(row: dict) -> bool:
    return _get(row, KNOWN) is not None


def _digests(row: dict, with_train: bool) -> tuple:
    """(model, eval data, train data or None) of one run."""
    model = next((_get(row, k) for k in MODEL_KEYS if _get(row, k) is not None), None)  # Hub commit, else files'
    return model, _get(row, EVAL), _get(row, TRAIN) if with_train else None


def _groups(rows: list[dict]) -> dict[str, tuple] | None:
    """{run_id: digest key} for the runs of one setup when their digests differ, else None (they pool)."""
    known = sorted((r for r in rows if _known(r)), key=lambda r: r["run_id"])
    seeded = any(_get(r, SEEDED) for r in known)
    keys = {r["run_id"]: _digests(r, not seeded) for r in known}
    if seeded:  # one seed's runs trained on the same examples: those with another one's digest are split off
        for seed in sorted({r[st.SEED_KEY] for r in known}):
            same = [r for r in known if r[st.SEED_KEY] == seed]
            digests = [_get(r, TRAIN) for r in same]
            usual = max(dict.fromkeys(digests), key=digests.count)  # the most common; ties: the first run's
            for r in same:
                if _get(r, TRAIN) != usual:
                    keys[r["run_id"]] = keys[r["run_id"]][:2] + (_get(r, TRAIN),)
    return keys if len(set(keys.values())) > 1 else None


def _label(key: tuple) -> str:
    model, evaluation, train = key
    return f"model {_short(model)}, eval data {_short(evaluation)}" + (
        f", train data {_short(train)}" if train is not None else "")


def add_setups(table: pd.DataFrame, config_keys) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """statistics.add_setups, then every setup whose runs' digests differ split into one setup per digest group
    (the GROUP column; runs without provenance in such a setup are one more group). Returns (table, setups, one
    line per split setup naming its runs and digests)."""
    pooled, setups = st.add_setups(table, config_keys)
    if pooled.empty:
        return pooled, setups, []
    records = pooled.to_dict("records")
    split, labels = {}, {}
    for setup in sorted(set(pooled.setup), key=st.setup_number):
        runs = [r["run_id"] for r in records if r["setup"] == setup]
        keys = _groups([r for r in records if r["setup"] == setup])
        if keys is not None:
            split[setup] = (keys, sorted(set(runs) - set(keys)))
            labels |= {r: _label(keys[r]) if r in keys else UNKNOWN for r in runs}
    if not split:
        return pooled, setups, []
    table, setups = st.add_setups(table.assign(**{GROUP: [labels.get(i) for i in table.run_id]}),
                                  set(config_keys) | {GROUP})
    new_setup = dict(zip(table.run_id, table.setup))
    return table, setups, [_split_line(old, keys, unknown, new_setup) for old, (keys, unknown) in split.items()]


def _shown(digest, part: int) -> str:
    """A digest as a split line shows it; training data the seed picks is compared within a seed only, so runs whose
    key holds none trained on what the other runs of their seed did."""
    return "their seed's usual" if digest is None and part == 2 else _short(digest)


def _runs(runs) -> str:
    return f"run{'s' if len(runs) > 1 else ''} " + ", ".join(f"`{r}`" for r in sorted(runs))


def _split_line(old: str, keys: dict, unknown: list, new_setup: dict) -> str:
    """'setup S1: runs `a`, `b` have eval data digest 1f2e3d4c5b, run `c` has 9a8b7c6d5e; not pooled (now setups S1,
    S3)'."""
    names = ["model", "eval data", "train data"]
    varying = [i for i in range(3) if len({k[i] for k in keys.values()}) > 1]
    what = " and ".join(names[i] for i in varying) + " digest" + ("s" if len(varying) > 1 else "")
    parts = {}
    for run_id, key in sorted(keys.items()):
        parts.setdefault(tuple(key[i] for i in varying), []).append(run_id)
    said = [f"{_runs(runs)} {'have' if len(runs) > 1 else 'has'} " + (what + " " if i == 0 else "")
            + " / ".join(_shown(d, varying[k]) for k, d in enumerate(digests)) for i, (digests, runs) in
            enumerate(parts.items())]
    if unknown:
        said.append(f"{_runs(unknown)} {'have' if len(unknown) > 1 else 'has'} no provenance")
    now = sorted({new_setup[r] for r in list(keys) + unknown}, key=st.setup_number)
    return f"setup {old}: " + ", ".join(said) + f"; not pooled (now setups {', '.join(now)})"


def _values(rows: list[dict], show) -> str:
    return ", ".join(dict.fromkeys(show(r) for r in rows)) or "–"


def _code(row: dict) -> str:
    commit = _get(row, "provenance.lowrank.commit")
    return f"{_get(row, 'provenance.lowrank.version')} " + (
        f"{commit[:SHORT]}" + (" (dirty)" if _get(row, "provenance.lowrank.dirty") else "") if commit else "(no git)")


def _train(rows: list[dict]) -> str:
    digests = list(dict.fromkeys(_short(_get(r, TRAIN)) for r in rows))
    if len(digests) > 1 and any(_get(r, SEEDED) for r in rows):
        return f"{len(digests)} digests (the seed picks the examples)"
    return ", ".join(digests) or "–"


def provenance_lines(table: pd.DataFrame) -> list[str]:
    """report.md's provenance section: per setup, the versions, model and data digests and devices of its runs, and
    how many runs have none recorded (written before provenance was)."""
    if table.empty:
        return []
    rows = []
    for setup, g in sorted(table.groupby("setup"), key=lambda kv: int(kv[0][1:])):
        records = g.to_dict("records")
        known = [r for r in records if _known(r)]
        row = {"setup": setup, "runs": len(records),
               "provenance unknown": len(records) - len(known) or ""}
        row |= {"lowrank": _values(known, _code)}
        row |= {p: _values(known, lambda r, p=p: str(_get(r, f"provenance.packages.{p}")))
                for p in ("torch", "transformers", "peft", "hydra-core")}
        row |= {"model": _values(known, lambda r: _short(_digests(r, False)[0])), "train data": _train(known),
                "eval data": _values(known, lambda r: _short(_get(r, EVAL))),
                "devices": _values(known, lambda r: str(_get(r, KNOWN)))}
        rows.append(row)
    unknown = int(sum(1 for r in table.to_dict("records") if not _known(r)))
    return ["## Provenance (per setup)", "",
            "What the runs were made from (metrics.json `provenance`): lowrank's version and commit, library versions, "
            f"the model's revision (Hub commit or weight files' SHA-256) and the data's digests (first {SHORT} hex "
            "digits), devices. Runs whose model or data digests differ are never pooled (analysis/provenance.py)."
            + (f" Provenance is unknown for {unknown} run{'s' if unknown > 1 else ''} (written before it was "
               "recorded); they pool as before, but in a setup split by digests, where they are a part of their own."
               if unknown else ""), "", markdown_table(pd.DataFrame(rows)), ""]
