"""Every figure from a small synthetic runs root written through the real writers (the trainer's config,
lowrank.rundir.delta's ΔW and W0 files, lowrank.rundir.atomic's metrics.json): the files exist, the plotted data equal
the tables, a figure without its runs is skipped naming its sweep, and the same runs give the same files."""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from omegaconf import OmegaConf
from torch import nn

from analysis.figures import data as D
from analysis.figures import draw as F
from analysis import statistics as st
from analysis.figures.data import GIB, MIB
from analysis.figures.registry import FIGURES, figures_markdown, write_figures
from analysis.report import main as report_main
from analysis.report import make_figures, run_report
from analysis.report_cli import parse_args
from analysis.tables import markdown_table, table_path, write_csv
from analysis.wandb_sync import remove_older_offline_runs
from lowrank.rundir import atomic
from lowrank.rundir import layout as rundir
from lowrank.adapters.methods import Full, LoRA
from lowrank.rundir.delta import ensure_base_weights, linear_weights, write_delta
from lowrank.adapters.lora import inject_lora, lora_layers

from tests.conftest import compose_cfg

LAYERS, WIDTH, MLP = 3, 64, 96
ALL_ATTENTION = "[query,key,value,attention.output.dense]"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(WIDTH, WIDTH))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(WIDTH, WIDTH)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(WIDTH, MLP)
        self.output = nn.Module()
        self.output.dense = nn.Linear(MLP, WIDTH)


class TinyBert(nn.Module):
    """BERT's module names at a small width: `bert.encoder.layer.{i}.attention.self.query`, ..."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the same W0 for every run
        self.bert = nn.Module()
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(Block() for _ in range(LAYERS))


class TinyLlama(nn.Module):
    """SmolLM2's module names at a small width: `model.layers.{i}.self_attn.q_proj`, ..., `mlp.down_proj`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Module() for _ in range(LAYERS))
        for block in self.model.layers:
            block.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(block.self_attn, name, nn.Linear(WIDTH, WIDTH, bias=False))
            block.mlp = nn.Module()
            block.mlp.up_proj, block.mlp.down_proj = (nn.Linear(WIDTH, MLP, bias=False),
                                                      nn.Linear(MLP, WIDTH, bias=False))


def accuracy(method, rank, seed, size):
    """Made-up but structured numbers, so the figures have something to show."""
    base = 0.80 if method == "full" else 0.70 + 0.01 * np.log2(rank)
    return round(base + 0.01 * seed - (0.08 if size else 0.0), 4)


def write_run(root: Path, overrides: list[str], estimate: bool, model_cls=TinyBert) -> Path:
    cfg = compose_cfg(["name=syn", f"runs_root={root}", "logger=none", *overrides])
    run_dir = root / "syn" / ",".join(o for o in overrides if not o.startswith("method.targets")) / (
        "all" if any(o.startswith("method.targets") for o in overrides) else "qv")
    atomic.write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))  # unresolved, as Hydra writes it
    model = model_cls()
    base = ensure_base_weights(root, model_cls.__name__.lower(), model)
    g = torch.Generator().manual_seed(1000 * cfg.seed + (cfg.method.get("rank") or 0))
    m, size = cfg.method, cfg.task.train_size
    if m.name == "lora":
        targets = OmegaConf.to_object(m.targets)
        names = inject_lora(model, targets, m.rank, m.alpha)
        for layer in lora_layers(model).values():  # B = 0 at init: give the adapter a trained-looking update
            layer.lora_B.data = 0.05 * torch.randn(layer.lora_B.shape, generator=g)
        w0 = None
        scaling = m.alpha / m.rank
    else:
        names = [n for n, mod in model.named_modules() if isinstance(mod, nn.Linear)]
        w0 = linear_weights(model, names)
        for n in names:  # a spread-out full-rank update plus a strong rank-2 part
            w = model.get_submodule(n).weight
            u, v = torch.randn(w.shape[0], 2, generator=g), torch.randn(2, w.shape[1], generator=g)
            w.data += 0.001 * torch.randn(w.shape, generator=g) + 0.01 * u @ v
        scaling = 1.0
    write_delta(run_dir, model, LoRA(m) if m.name == "lora" else Full(), names, w0, base,
                {"scaling": scaling, "rank": m.get("rank"), "alpha": m.get("alpha"), "targets": names})
    lora = m.name == "lora"
    n_adapter = sum(p.numel() for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B))
    metrics = {"status": "complete", "method": m.name, "eval_accuracy": accuracy(m.name, m.get("rank"), cfg.seed, size),
               "train_accuracy": min(1.0, accuracy(m.name, m.get("rank"), cfg.seed, size) + (0.2 if size else 0.02)),
               "eval_loss": 0.5, "train_loss": 0.4, "tokens_per_second": (1500.0 if lora else 900.0) + 10 * cfg.seed,
               "peak_memory_bytes": int((0.9 if lora else 1.3) * GIB) + cfg.seed * 2 ** 24 + n_adapter * 16,
               "checkpoint_bytes": (n_adapter + 770) * 4 if lora else 22_713_216 * 4,
               "train_examples": size or 4000, "eval_examples": 400, "device": "cpu",
               "eval_history": [{"step": 10, "eval_accuracy": 0.6}], "wall_seconds": 1.0}
    if estimate:
        metrics["memory_estimate"] = {"weights_bytes": 91_000_000, "grads_bytes": n_adapter * 4,
                                      "optimizer_bytes": n_adapter * 8, "weight_copies_bytes": 0,
                                      "activations_bytes": 300_000_000, "total_bytes": 391_000_000 + n_adapter * 12}
        metrics["budget_bytes"] = None
    rundir.write_metrics(run_dir, metrics, OmegaConf.to_container(cfg, resolve=True))
    return run_dir


def build_root(root: Path) -> Path:
    """LoRA q,v at r 1, 8, 64 × seeds 0, 1 (memory estimates recorded), all-attention LoRA r 1 and 8, full
    fine-tuning × seeds 0, 1, and a data-scarce pair (100 examples: full and LoRA r=8)."""
    for rank in (1, 8, 64):
        for seed in (0, 1):
            write_run(root, [f"method.rank={rank}", f"seed={seed}"], estimate=True)
    for rank in (1, 8):
        write_run(root, [f"method.rank={rank}", "seed=0", f"method.targets={ALL_ATTENTION}"], estimate=False)
    for seed in (0, 1):
        write_run(root, ["method=full", f"seed={seed}"], estimate=False)
    write_run(root, ["method=full", "seed=0", "task.train_size=100"], estimate=False)
    write_run(root, ["method.rank=8", "seed=0", "task.train_size=100"], estimate=False)
    return root


@pytest.fixture(scope="module")
def report_run(tmp_path_factory) -> tuple[Path, dict, list]:
    """The report on the synthetic root: its folder, the tables as it handed them to the figures, and the figures
    as write_figures handed them back to it (in memory)."""
    import analysis.figures.registry as registry
    root = build_root(tmp_path_factory.mktemp("runs"))
    out = tmp_path_factory.mktemp("report")
    built, real = [], registry.write_figures

    def keep(*args, **kwargs):
        result = real(*args, **kwargs)
        built.extend(result)
        return result
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "write_figures", keep)  # what the report imports when it draws
        tables = run_report(parse_args([str(root), "--out", str(out), "--threads", "1"]))
    assert built
    return out, tables, built


@pytest.fixture(scope="module")
def out(report_run) -> Path:
    return report_run[0]


@pytest.fixture(scope="module")
def tables(report_run) -> dict:
    return report_run[1]


@pytest.fixture(scope="module")
def built(report_run) -> list:
    return report_run[2]


def artists(ax_or_fig, gid):
    """The artists drawn with this gid, in drawing order (bars: one rectangle per bar)."""
    found = [a for a in ax_or_fig.findobj() if a.get_gid() == gid]
    assert found, f"no artist {gid!r}"
    return found


def artist(ax_or_fig, gid):
    return artists(ax_or_fig, gid)[0]


# 11-13 are the causal LMs': tests/unit/analysis/figures/test_lm_figures.py
CLASSIFIER_FIGURES = [s for s in FIGURES if s.number <= 10]


def test_every_figure_and_its_data_are_written_and_embedded(out):
    report = (out / "report.md").read_text()
    for spec in CLASSIFIER_FIGURES:
        pngs = list((out / "figures").glob(f"fig{spec.number}_*.png"))  # figure N writes figN_* (and nothing else)
        assert len(pngs) == 1, (spec.number, pngs)
        for ext in ("png", "pdf", "csv"):
            assert pngs[0].with_suffix(f".{ext}").stat().st_size > 0, (pngs[0].stem, ext)
        assert f"![Figure {spec.number}](figures/{pngs[0].name})" in report
        assert spec.caption in report
    for number in range(1, 11):
        assert "Skipped" not in report.split(f"### Figure {number}\n")[1].split("### Figure")[0], number
    assert "| setup | configuration | r | n seeds | test accuracy |" in report   # figure 1's table
    assert "amplification (‖ΔW_r‖)" in report and "fraction_of_full" in report  # figures 5 and 10's tables
    for number in range(1, 11):   # every figure has its table
        section = report.split(f"### Figure {number}\n")[1].split("### Figure")[0]
        assert "\n| " in section and "|---|" in section, number


def test_report_lists_the_setups_and_their_runs(out, tables):
    report = (out / "report.md").read_text()
    setups, runs = tables["setups"], tables["runs"]
    assert list(setups.setup) == ["S1", "S2"] and list(setups.n_runs) == [10, 2]
    assert setups.set_index("setup").loc["S2", "label"] == "task.train_size=100"
    assert "## Setups (2)" in report
    for row in setups.itertuples():
        line = next(ln for ln in report.splitlines() if ln.startswith(f"- **{row.setup}**"))
        held = sorted(runs.loc[runs.setup == row.setup, "run_id"])
        assert held == sorted(row.runs.split(" ")) and all(f"`{r}`" in line for r in held)
    # runs are listed with their setup and target set
    assert "| run_id | setup | method.name | method.rank | targets | seed |" in report


def test_the_frames_handed_on_in_memory_are_the_files_written(out, tables, built, tmp_path):
    """The report hands its tables to the figures in memory, and a figure's plotted data and table go to W&B and
    report.md from memory: each is what its CSV file holds, and report.md shows the table file's numbers."""
    def same_as_file(df, path):
        write_csv(tmp_path / "again.csv", df)
        return (tmp_path / "again.csv").read_bytes() == path.read_bytes()
    for name in ["runs", "setups", "spectrum", "singular_values", "subspace", "amplification"]:
        assert same_as_file(tables[name], table_path(out, name)), name
    built = [b for b in built if b.spec.number in (1, 5, 6, 10)]  # as the report's own run drew them
    assert len(built) == 4
    for b in built:
        assert same_as_file(b.drawn.data, b.drawn.path.with_suffix(".csv")), b.drawn.path.stem
    tabled = [b.drawn for b in built if b.drawn.table is not None]
    assert [d.path.stem for d in tabled] == ["fig1_accuracy_vs_rank", "fig5_amplification", "fig6_spectra",
                                             "fig10_checkpoint_size"]
    section = figures_markdown(built, out)
    for drawn in tabled:
        table_file = drawn.path.with_name(f"{drawn.path.stem}_table.csv")
        assert same_as_file(drawn.table, table_file)
        assert markdown_table(pd.read_csv(table_file).fillna("")) in section


def test_figure_1_accuracy_vs_rank(tables):
    runs = tables["runs"]
    data = D.accuracy_by_rank(runs)
    full_data = runs[runs["task.train_size"].isna()]
    qv = full_data[(full_data["method.name"] == "lora") & (full_data["method.targets"] == '["query", "value"]')]
    want = qv.groupby("method.rank").eval_accuracy
    got = data["summary"][data["summary"].targets == "q,v"].set_index("rank")
    assert np.allclose(got["mean"], want.mean())
    assert list(got.n) == [2, 2, 2] and set(data["summary"].setup) == {"S1"}   # S2 (100 examples): figure 9
    for rank, values in want:   # the seed interval: the bootstrap of the seeds' values (at n=2, their range)
        assert (got.loc[rank, "seed_lo"], got.loc[rank, "seed_hi"]) == pytest.approx(st.seed_interval(values.values))
        assert got.loc[rank, "seed_lo"] == pytest.approx(values.min())
    lo, hi = st.wilson_interval(got["mean"].values, 400)
    assert np.allclose(got.test_lo, lo) and np.allclose(got.test_hi, hi)
    fig = F.plot_accuracy_vs_rank(data)
    line = artist(fig, "mean:LoRA (q,v)")
    assert list(line.get_xdata()) == [1, 8, 64] and np.allclose(line.get_ydata(), want.mean())
    full = full_data[full_data["method.name"] == "full"].eval_accuracy
    assert np.allclose(artist(fig, "mean:full").get_ydata(), full.mean())
    assert "Setup S2 is not shown" in data["note"] and "eval_label_counts" in data["note"]
    table = D.accuracy_table(data["summary"])
    assert list(table.columns) == ["setup", "configuration", "r", "n seeds", "test accuracy", "seed interval (95 %)",
                                   "test-set interval (Wilson 95 %)"]
    row = table[(table.configuration == "LoRA (q,v)") & (table.r == 8)].iloc[0]
    assert (row["test accuracy"] == pytest.approx(want.mean()[8])
            and row["seed interval (95 %)"].endswith("(range of 2)"))
    assert table[table.configuration == "LoRA (q,k,v,o)"]["seed interval (95 %)"].eq("n=1: none").all()


def _phi(tables, run_a, run_b, layer, kind, side="input"):
    s = tables["subspace"]
    g = s[(s.run_a == run_a) & (s.run_b == run_b) & (s.layer == layer) & (s.matrix_type == kind) & (s.side == side)]
    return g.pivot(index="i", columns="j", values="phi").to_numpy()


def test_figures_2_to_4_show_the_phi_grids_of_the_tables(tables):
    data = D.phi_rank_data(tables["subspace"], tables["runs"])
    assert (data.rank_a.iloc[0], data.rank_b.iloc[0], data.seed.iloc[0], data.layer.iloc[0]) == (8, 64, 0, 1)
    fig = F.plot_phi_rank(data)
    a, b = "syn/method.rank=8,seed=0/qv", "syn/method.rank=64,seed=0/qv"
    for kind in ("query", "value"):
        grid = artist(fig, f"{kind}:full").get_array()
        assert grid.shape == (8, 64) and np.allclose(grid, _phi(tables, a, b, 1, kind))
        assert np.allclose(artist(fig, f"{kind}:zoom").get_array(), _phi(tables, a, b, 1, kind)[:8, :8])
    i, j = np.meshgrid(np.arange(1, 9), np.arange(1, 65), indexing="ij")
    assert np.allclose(artist(fig, "random:full").get_array(), np.maximum(i, j) / WIDTH)
    table = D.phi_table(data).set_index("matrix_type")
    assert table.loc["query", "φ(1,1)"] == pytest.approx(_phi(tables, a, b, 1, "query")[0, 0])

    data = D.phi_seed_data(tables["subspace"], tables["runs"])
    fig = F.plot_phi_seed(data)
    a, b = "syn/method.rank=64,seed=0/qv", "syn/method.rank=64,seed=1/qv"
    assert np.allclose(artist(fig, "value:full").get_array(), _phi(tables, a, b, 1, "value"))
    assert artist(fig, "value:full").get_array().shape == (64, 64)
    assert np.allclose(artist(fig, "value:zoom").get_array(), _phi(tables, a, b, 1, "value")[:8, :8])  # as figure 2

    data = D.phi_layers_data(tables["subspace"], tables["runs"])
    assert sorted(data.layer.unique()) == [0, 1, 2]
    fig = F.plot_phi_layers(data)
    assert np.allclose(artist(fig, "seeds 0 vs 1, r=64:query:2").get_array(), _phi(tables, a, b, 2, "query"))
    ra, rb = "syn/method.rank=8,seed=0/qv", "syn/method.rank=64,seed=0/qv"
    assert np.allclose(artist(fig, "r=8 vs r=64, seed 0:value:0").get_array(), _phi(tables, ra, rb, 0, "value"))
    assert np.allclose(artist(fig, "r=8 vs r=64, seed 0:random:1").get_array(), np.maximum(i, j) / WIDTH)
    labels = {ax.get_ylabel() for ax in fig.axes}
    assert "layer 0\ni (A, r=8)" in labels and "layer 2\ni (A, seed 0)" in labels   # not a bare 'i'


def test_figure_5_amplification(tables):
    data = D.amplification_data(tables["amplification"], tables["runs"])
    amps = tables["amplification"]
    full = amps[amps.run_id.isin(["syn/method=full,seed=0/qv",
                                  "syn/method=full,seed=1/qv"]) & (amps.matrix_type == "query")]
    sums = full.groupby("r")[["delta_top_fro", "proj_delta"]].sum()
    want = sums.delta_top_fro / sums.proj_delta       # the ratio of sums over layers and seeds, ΔW's top-r part
    assert list(want.index) == [1, 8, 64]           # full fine-tuning at the LoRA ranks found
    assert set(data["summary"].matrix_type) == {"query", "value"}  # the types every LoRA target set adapted
    fig = F.plot_amplification(data)
    line = artist(fig, "amp:full:query")
    assert list(line.get_xdata()) == [1, 8, 64] and np.allclose(line.get_ydata(), want)
    phi = amps[amps.run_id.isin(full.run_id.unique()) & (amps.matrix_type == "value")].groupby("r").phi_out.mean()
    assert np.allclose(artist(fig, "phi:full:value").get_ydata(), phi)
    assert artist(fig, "phi:random:value").get_zorder() > artist(fig, "phi:full:value").get_zorder()  # on top
    lora = amps[amps.run_id.isin(["syn/method.rank=8,seed=0/qv", "syn/method.rank=8,seed=1/qv"])
                & (amps.matrix_type == "value")]
    got = data["summary"].set_index(["config", "matrix_type", "r"]).loc[("LoRA r=8 (q,v)", "value", 8)]
    assert got.amplification == pytest.approx(lora.delta_top_fro.sum() / lora.proj_delta.sum())
    assert got.amplification == pytest.approx(got.delta_top_fro / got.proj_delta)  # the table's means divide to it
    assert lora.delta_top_fro.values == pytest.approx(lora.delta_fro.values)          # LoRA at rank r: ΔW_r = ΔW
    assert got.n == 2 and got.matrices == 2 * LAYERS and got.amp_lo <= got.amplification <= got.amp_hi
    assert artist(fig, "amp:LoRA (q,v):value").get_linestyle() == "None"   # LoRA ranks are different runs: no line


def test_figure_6_spectra(tables):
    data = D.spectra_data(tables["singular_values"], tables["spectrum"], tables["runs"])
    sv = tables["singular_values"]
    full = sv[sv.run_id.isin(["syn/method=full,seed=0/qv", "syn/method=full,seed=1/qv"])
              & (sv.matrix_type == "intermediate.dense")].copy()
    full["norm"] = full.sigma / full.groupby(["run_id", "layer"]).sigma.transform("first")
    want = full.groupby("index").norm.mean()
    fig = F.plot_spectra(data)
    axes = [ax for ax in fig.axes if ax.get_title() == "S1: ΔW (intermediate.dense)"]
    line = artist(axes[0], "sigma:full")
    assert len(line.get_xdata()) == WIDTH and np.allclose(line.get_ydata(), want)
    spec = tables["spectrum"]
    r90 = spec[spec.run_id.isin(full.run_id.unique()) & (spec.matrix_type == "intermediate.dense")].r90.mean()
    assert np.allclose(artist(axes[0], "r90:full").get_xdata(), r90)
    assert axes[0].get_ylim()[0] == pytest.approx(F.SPECTRUM_FLOOR)   # not stretched by the last singular value
    lora_ax = [ax for ax in fig.axes if ax.get_title().startswith("S1: ΔW_q ")][0]
    lora = artist(lora_ax, "sigma:LoRA r=8 (q,v)")
    assert len(lora.get_xdata()) == 8                # a rank-8 update has 8 singular values
    mark = data["r90"].set_index(["config", "matrix_type"]).loc[("LoRA r=8 (q,v)", "query")]
    assert f"r90={F._r90_text(mark.r90)}, n=2" in lora.get_label()
    assert F._r90_text(1.5) == "1.5" and F._r90_text(65.0) == "65"   # no rounding 1.5 to "2"
    table = D.energy_rank_table(data["r90"]).set_index(["config", "matrix_type"])
    assert table.loc[("full", "output.dense"), "width min(out, in)"] == min(WIDTH, MLP)


def test_figure_7_memory(tables):
    data = D.memory_data(tables["runs"])
    s = data["summary"].set_index("config")
    assert s.loc["full", "device"] == "cpu" and np.isnan(s.loc["full", "estimate_weights_bytes"])
    assert s.loc["LoRA r=8 (q,v)", "estimate_activations_bytes"] == 300_000_000
    assert set(s.measured) == {"CPU peak RSS"} and "includes the Python and PyTorch runtime" in data["note"]
    fig = F.plot_memory(data)
    order = list(data["summary"].config)
    assert order[0] == "full"
    with_estimate = [c for c in order if not np.isnan(s.loc[c, "estimate_weights_bytes"])]
    for part in ("weights_bytes", "activations_bytes"):  # stacked bars: one rectangle per config
        widths = dict(zip(order, [b.get_width() for b in artists(fig, f"estimate:{part}")]))
        assert widths == pytest.approx((s[f"estimate_{part}"].fillna(0) / GIB).to_dict())
    assert widths["LoRA r=8 (q,v)"] == pytest.approx(300_000_000 / GIB) and widths["full"] == 0
    assert with_estimate == ["LoRA r=1 (q,v)", "LoRA r=8 (q,v)", "LoRA r=64 (q,v)"]
    measured = [b.get_width() for b in artists(fig, "measured_bar")]   # every configuration's measured peak
    assert measured == pytest.approx([s.loc[c, "peak_mean"] / GIB for c in order])
    assert not [a for a in fig.findobj() if str(a.get_gid()).startswith("estimate_vs_peak")]  # CPU: not compared
    runs = tables["runs"]
    peaks = runs[runs.run_id.str.startswith("syn/method.rank=64,") & runs.run_id.str.endswith("/qv")]
    peaks = peaks[peaks["task.train_size"].isna()].peak_memory_bytes / GIB
    offsets = artist(fig, "peak:LoRA r=64 (q,v)").get_offsets()
    assert sorted(offsets[:, 0]) == pytest.approx(sorted(peaks))
    assert np.allclose(offsets[:, 1], order.index("LoRA r=64 (q,v)"))
    tps = dict(zip(order, [b.get_width() for b in artists(fig, "tokens_per_second")]))
    assert tps["full"] == pytest.approx(runs[(runs["method.name"] == "full") & runs["task.train_size"].isna()]
                                        .tokens_per_second.mean())
    assert any("steady steps\n(as recorded by each run)" in ax.get_xlabel() for ax in fig.axes)


def test_figure_8_accuracy_vs_memory(tables):
    data = D.accuracy_memory_data(tables["runs"])
    runs = tables["runs"]
    points, summary = data["points"], data["summary"]
    assert len(points) == runs["task.train_size"].isna().sum() == 10 and len(summary) == 6
    fig = F.plot_accuracy_memory(data)
    full = runs[(runs["method.name"] == "full") & runs["task.train_size"].isna()]
    got = artist(fig, "runs:full").get_offsets()
    assert sorted(map(tuple, got)) == sorted(zip(full.peak_memory_bytes / GIB, full.eval_accuracy))
    row = summary.set_index("config").loc["full"]
    assert row["mean"] == pytest.approx(full.eval_accuracy.mean()) and row.n == 2
    front = summary[summary.pareto].sort_values("peak_gib")
    assert front["mean"].is_monotonic_increasing and front["mean"].iloc[-1] == summary["mean"].max()
    for r in summary.itertuples():  # on the front iff no configuration cheaper or as cheap is at least as accurate
        better = summary[(summary.peak_gib <= r.peak_gib) & (summary["mean"] >= r.mean) & (summary.config != r.config)]
        assert r.pareto == better.empty


def test_figure_9_data_scarce(tables):
    data = D.data_scarce_data(tables["runs"], tables["setups"])
    summary = data["summary"]
    assert set(summary.config) == {"full", "LoRA r=8 (q,v)"} and set(summary.group) == {"S1+S2"}
    full = summary[summary.config == "full"]
    assert list(full.train_examples) == [100, 4000] and list(full.n) == [1, 2]
    runs = tables["runs"]
    f = runs[runs["method.name"] == "full"]
    assert full.test_mean.tolist() == pytest.approx([f[f.train_examples == 100].eval_accuracy.mean(),
                                                     f[f.train_examples == 4000].eval_accuracy.mean()])
    assert np.isnan(full.test_seed_lo.iloc[0]) and np.isfinite(full.test_lo.iloc[0])  # n=1: Wilson, no seeds
    fig = F.plot_data_scarce(data)
    assert np.allclose(artist(fig, "train:full").get_ydata(), full.train_mean)
    assert list(artist(fig, "test:full").get_xdata()) == [100, 4000]
    assert sorted(t.get_text() for t in artists(fig, "n")) == ["n=1", "n=2"]   # n under each size, once
    table = D.data_scarce_table(summary)
    assert table[table["train examples"] == 100]["seed interval"].eq("n=1: none").all()


def test_figure_10_checkpoint_size(tables):
    data = D.checkpoint_data(tables["runs"])["data"]
    fig = F.plot_checkpoints(data)
    runs = tables["runs"]
    for config, rank in (("full", None), ("LoRA r=64 (q,v)", 64)):
        sel = runs["method.name"] == "full" if rank is None else (
            (runs["method.rank"] == rank) & (runs["method.targets"] == '["query", "value"]'))
        bar = artist(fig, f"ckpt:{config}")
        assert bar.get_width() == pytest.approx(runs[sel].checkpoint_bytes.mean() / MIB)
    row = data.set_index("config").loc["LoRA r=8 (q,v)"]
    assert row.fraction_of_full == pytest.approx(row.checkpoint_bytes / (22_713_216 * 4))
    texts = [t for t in fig.findobj(Text) if "MiB" in t.get_text() and "%" in t.get_text()]
    assert texts and all(t.get_rotation() == 0 and t.get_fontsize() >= 7 for t in texts)  # readable bar labels


# ---- what a reviewer checks by eye, checked on the rendered figures ------------------------------------------------

DRAW = {  # figure number -> its drawing from the tables, as figure_N draws it
    1: lambda t: F.plot_accuracy_vs_rank(D.accuracy_by_rank(t["runs"])),
    2: lambda t: F.plot_phi_rank(D.phi_rank_data(t["subspace"], t["runs"])),
    3: lambda t: F.plot_phi_seed(D.phi_seed_data(t["subspace"], t["runs"])),
    4: lambda t: F.plot_phi_layers(D.phi_layers_data(t["subspace"], t["runs"])),
    5: lambda t: F.plot_amplification(D.amplification_data(t["amplification"], t["runs"])),
    6: lambda t: F.plot_spectra(D.spectra_data(t["singular_values"], t["spectrum"], t["runs"])),
    7: lambda t: F.plot_memory(D.memory_data(t["runs"])),
    8: lambda t: F.plot_accuracy_memory(D.accuracy_memory_data(t["runs"])),
    9: lambda t: F.plot_data_scarce(D.data_scarce_data(t["runs"], t["setups"])),
    10: lambda t: F.plot_checkpoints(D.checkpoint_data(t["runs"])["data"]),
}
REFERENCE = ("random", "majority", "Pareto")   # legend entries that are not series of runs
N_IN_TICKS = {7, 10}                           # bar charts: n in each configuration's tick label
HEAT_MAPS = {2, 3, 4}                          # one pair of runs: the title says so


def _in_view(axis, locs, labels):
    lo, hi = sorted(axis.get_view_interval())
    pad = 1e-9 * abs(hi - lo)
    return [t for loc, t in zip(locs, labels) if lo - pad <= loc <= hi + pad]


def drawn_texts(fig) -> list[Text]:
    """Every piece of text the canvas drew: titles, axis labels, tick labels in view, annotations, legends."""
    texts = list(dict.fromkeys(t for t in fig.texts + [fig._suptitle] if t is not None))
    for ax in fig.axes:
        if not ax.get_visible() or not ax.axison:
            continue
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label] + list(ax.texts)
        for axis in (ax.xaxis, ax.yaxis):
            for minor in (False, True):
                texts += _in_view(axis, axis.get_ticklocs(minor=minor), axis.get_ticklabels(minor=minor))
        if ax.get_legend() is not None:
            texts += list(ax.get_legend().get_texts())
    for legend in fig.legends:
        texts += list(legend.get_texts())
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


def overlaps(a, b, tolerance: float = 0.5) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > tolerance) and (min(a.y1, b.y1) - max(a.y0, b.y0) > tolerance)


def inside(b, box, tolerance: float = 1.0) -> bool:
    return (b.x0 >= box.x0 - tolerance and b.x1 <= box.x1 + tolerance and b.y0 >= box.y0 - tolerance
            and b.y1 <= box.y1 + tolerance)


@pytest.mark.parametrize("number", sorted(DRAW))
def test_figures_pass_a_reviewers_look(tables, number):
    """Each figure rendered from the small real study: every panel has a title and axis labels, no two texts
    overlap (tight boxes after drawing), texts and legends lie inside the figure, every series says its n and
    every panel its setup."""
    fig = DRAW[number](tables)
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    data_axes = [ax for ax in fig.axes if ax.axison and ax.get_label() != "<colorbar>"]
    assert data_axes
    rows = {}
    for ax in data_axes:
        assert ax.get_xlabel().strip(), (number, ax.get_title(), "no x label")
        rows.setdefault(round(ax.get_position().y0, 3), []).append(ax)
        column = [a for a in data_axes if round(a.get_position().x0, 3) == round(ax.get_position().x0, 3)]
        assert any(a.get_title().strip() for a in column), (number, "a column without a title")
    for row in rows.values():   # each row says what its y axis is, by a label or by tick labels
        assert any(a.get_ylabel().strip() or any(t.get_text() for t in a.get_yticklabels()) for a in row), number
    for cbar in (ax for ax in fig.axes if ax.get_label() == "<colorbar>"):
        assert cbar.get_ylabel() == "φ(i, j)"
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in drawn_texts(fig)]
    for text, b in boxes:
        assert inside(b, fig.bbox), (number, text, "outside the figure")
    clashes = [(ta, tb) for k, (ta, a) in enumerate(boxes) for tb, b in boxes[k + 1:] if overlaps(a, b)]
    assert not clashes, (number, clashes[:5])
    for ax in data_axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        assert inside(legend.get_window_extent(renderer), fig.bbox), (number, "legend outside the figure")
        if number not in N_IN_TICKS:
            for t in legend.get_texts():
                label = t.get_text()
                assert "n=" in label or "n per point" in label or any(w in label for w in REFERENCE), (number, label)
                if "n per point" in label:   # then each point says its n
                    assert any(a.get_gid() == "n" and a.get_text().startswith("n=") for a in ax.texts), number
    if number in N_IN_TICKS:
        ticks = [t.get_text() for ax in data_axes for t in ax.get_yticklabels() if t.get_text()]
        assert ticks and all("(n=" in t for t in ticks), (number, ticks)
    if number in HEAT_MAPS:
        title = fig._suptitle.get_text().replace("\n", " ")   # wrapped to the figure's width
        assert "one pair" in title and "setup S1" in title
    else:
        assert all("S1" in ax.get_title() or "S2" in ax.get_title() for ax in data_axes if ax.get_title()), number


def test_a_second_model_is_a_setup_of_its_own_and_shown(tmp_path):
    """A report over two models: SmolLM2's LoRA-only runs are a setup of their own, never pooled with MiniLM's;
    figure 6 shows them (the matrices they adapted) beside MiniLM's instead of dropping them, and passes the look."""
    for rank in (1, 8):
        write_run(tmp_path, [f"method.rank={rank}", "seed=0"], estimate=False)
        write_run(tmp_path, ["model=smollm2", f"method.rank={rank}", "seed=0"], estimate=False, model_cls=TinyLlama)
    write_run(tmp_path, ["method=full", "seed=0"], estimate=False)
    t = run_report(parse_args([str(tmp_path), "--out", str(tmp_path / "out"), "--no-figures", "--threads", "1"]))
    setups = t["setups"].set_index("setup")
    assert len(setups) == 2 and ["model.name=minilm" in x for x in setups.label].count(True) == 1
    runs = t["runs"].set_index("run_id")
    assert runs.loc[runs["model.name"] == "smollm2", "setup"].nunique() == 1
    data = D.spectra_data(t["singular_values"], t["spectrum"], t["runs"])
    smol = setups.index[setups.label.str.contains("model.name=smollm2")][0]
    assert set(data["r90"].loc[data["r90"].setup == smol, "matrix_type"]) == {"q_proj", "v_proj"}
    summary = D.accuracy_by_rank(t["runs"])["summary"]
    assert summary.groupby(["setup", "rank"]).n.max().max() == 1   # one run per point: nothing pooled across models
    for number in (1, 5, 6):
        test_figures_pass_a_reviewers_look(t, number)


def test_on_cuda_the_estimate_is_compared_with_max_allocated(tables):
    """CUDA runs record max allocated, the quantity the memory model estimates: figure 7 draws the two together
    and says which it measured, and still passes the look."""
    cuda = tables | {"runs": tables["runs"].assign(device="NVIDIA H200")}
    data = D.memory_data(cuda["runs"])
    assert set(data["summary"].measured) == {"CUDA max allocated"} and "RSS" not in data["note"]
    fig = F.plot_memory(data)
    assert artists(fig, "estimate_vs_peak:LoRA r=8 (q,v)")
    assert any(ax.get_xlabel() == "CUDA max allocated (GiB)" for ax in fig.axes)
    test_figures_pass_a_reviewers_look(cuda, 7)


def test_same_runs_give_the_same_tables_and_files(out, tables, tmp_path):
    root = Path(tables["runs"].path.iloc[0]).parents[2]
    again = tmp_path / "again"
    report_main([str(root), "--out", str(again), "--threads", "1"])
    for sub in ("tables", "figures"):
        names = sorted(p.name for p in (out / sub).iterdir())
        assert names == sorted(p.name for p in (again / sub).iterdir())
        for name in names:
            assert (again / sub / name).read_bytes() == (out / sub / name).read_bytes(), name


def test_a_figure_without_its_runs_is_skipped_naming_its_sweep(tables, tmp_path):
    full_data = tables | {"runs": tables["runs"][tables["runs"]["task.train_size"].isna()]}
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "fig9_data_scarce.png").write_bytes(b"stale")
    built = {b.spec.number: b for b in write_figures(tmp_path, full_data, numbers=[8, 9])}
    assert built[9].drawn is None and "data_scarce" in built[9].reason
    assert not (tmp_path / "figures" / "fig9_data_scarce.png").exists()   # no stale picture
    assert built[8].drawn is not None
    assert "### Figure 9\n\nSkipped: no configuration run at two training-set sizes" in figures_markdown(
        list(built.values()), tmp_path)


def test_analysis_run_goes_to_wandb_in_the_sweeps_group(tables, tmp_path, monkeypatch):
    runs = tables["runs"].copy()
    runs["logger.name"], runs["logger.project"], runs["logger.mode"] = "wandb", "lowrank", np.nan
    runs["logger.entity"], runs["logger.group"] = np.nan, np.nan
    logged_runs = tables | {"runs": runs}
    calls = {}

    class FakeRun:
        def log(self, data):
            calls.setdefault("logged", {}).update(data)

        def finish(self):
            calls["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.setdefault("init", kw) and FakeRun(),
                                 Image=lambda path, caption=None: ("image", Path(path).name),
                                 Table=lambda dataframe: ("table", len(dataframe)),
                                 Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    make_figures(tmp_path, logged_runs, "auto", numbers=[1, 5])
    init = calls["init"]
    assert (init["name"], init["group"], init["project"], init["job_type"]) == (
        "analysis", "syn", "lowrank", "analysis")
    assert calls["finished"]
    assert calls["logged"]["figures/fig1_accuracy_vs_rank"] == ("image", "fig1_accuracy_vs_rank.png")
    assert calls["logged"]["tables/runs"] == ("table", len(runs))
    assert "tables/fig5_amplification" in calls["logged"]
    assert init["resume"] == "allow" and init["id"].startswith("analysis-")   # a re-run updates this run
    first_id = init["id"]
    calls.clear()
    make_figures(tmp_path, logged_runs, "auto", numbers=[1])
    assert calls["init"]["id"] == first_id
    calls.clear()
    make_figures(tmp_path, logged_runs, "off", numbers=[1])
    assert "init" not in calls


def test_older_offline_folders_of_the_analysis_run_are_removed(tmp_path):
    wandb_dir = tmp_path / "wandb"
    old, new, other = (wandb_dir / f"offline-run-2026010{k}_000000-{i}" for k, i in
                       ((1, "analysis-abc"), (2, "analysis-abc"), (3, "analysis-xyz")))
    for d in (old, new, other):
        (d / "files").mkdir(parents=True)
    remove_older_offline_runs(tmp_path, "analysis-abc", new / "files")
    assert not old.exists() and new.exists() and other.exists()


def test_target_labels_stay_short_for_module_paths():
    """An exported run's or imported adapter's target_modules are full module paths: the label is their matrix types
    and how many there are, not hundreds of characters; suffixes keep the paper's letters."""
    paths = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("value", "query")]
    assert D.targets_label(json.dumps(paths)) == "q,v; 12 modules"
    assert D.targets_label(json.dumps(["value", "query", "intermediate.dense"])) == "v,q,intermediate.dense"
    assert D.targets_label('"all-linear"') == "all-linear"
