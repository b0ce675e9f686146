"""Every figure from a small synthetic runs root written through the real writers (the trainer's config,
lowrank.delta's ΔW and W0 files, lowrank.atomic's metrics.json): the files exist, the plotted data equal the
tables, a figure without its runs is skipped naming its sweep, and the same runs give the same files."""
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from analysis import figure_data as D
from analysis import figures as F
from analysis.figure_data import GIB, MIB
from analysis.figure_registry import FIGURES, figures_markdown, write_figures
from analysis.report import main as report_main
from analysis.report import make_figures, run_report
from analysis.report_cli import parse_args
from analysis.tables import markdown_table, table_path, write_csv
from lowrank import atomic, rundir
from lowrank.delta import ensure_base_weights, linear_weights, write_delta
from lowrank.lora import inject_lora, lora_layers

from .conftest import compose_cfg

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


def accuracy(method, rank, seed, size):
    """Made-up but structured numbers, so the figures have something to show."""
    base = 0.80 if method == "full" else 0.70 + 0.01 * np.log2(rank)
    return round(base + 0.01 * seed - (0.08 if size else 0.0), 4)


def write_run(root: Path, overrides: list[str], estimate: bool) -> Path:
    cfg = compose_cfg(["name=syn", f"runs_root={root}", "logger=none", *overrides])
    run_dir = root / "syn" / ",".join(o for o in overrides if not o.startswith("method.targets")) / (
        "all" if any(o.startswith("method.targets") for o in overrides) else "qv")
    atomic.write_text(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg))  # unresolved, as Hydra writes it
    model = TinyBert()
    base = ensure_base_weights(root, "tiny", model)
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
    write_delta(run_dir, model, m.name, names, w0, base, {"scaling": scaling, "rank": m.get("rank"),
                                                         "alpha": m.get("alpha"), "targets": names})
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
def report_run(tmp_path_factory) -> tuple[Path, dict]:
    """The report on the synthetic root: its folder, and the tables as it handed them to the figures."""
    root = build_root(tmp_path_factory.mktemp("runs"))
    out = tmp_path_factory.mktemp("report")
    return out, run_report(parse_args([str(root), "--out", str(out), "--threads", "1"]))


@pytest.fixture(scope="module")
def out(report_run) -> Path:
    return report_run[0]


@pytest.fixture(scope="module")
def tables(report_run) -> dict:
    return report_run[1]


def artists(ax_or_fig, gid):
    """The artists drawn with this gid, in drawing order (bars: one rectangle per bar)."""
    found = [a for a in ax_or_fig.findobj() if a.get_gid() == gid]
    assert found, f"no artist {gid!r}"
    return found


def artist(ax_or_fig, gid):
    return artists(ax_or_fig, gid)[0]


def test_every_figure_and_its_data_are_written_and_embedded(out):
    report = (out / "report.md").read_text()
    for spec in FIGURES:
        pngs = list((out / "figures").glob(f"fig{spec.number}_*.png"))  # figure N writes figN_* (and nothing else)
        assert len(pngs) == 1, (spec.number, pngs)
        for ext in ("png", "pdf", "csv"):
            assert pngs[0].with_suffix(f".{ext}").stat().st_size > 0, (pngs[0].stem, ext)
        assert f"![Figure {spec.number}](figures/{pngs[0].name})" in report
        assert spec.caption in report
    assert "Skipped" not in report
    assert "| setup | targets | r=1 | r=8 | r=64 | full FT |" in report       # figure 1's table
    assert "amplification" in report and "fraction_of_full" in report      # figures 5 and 10's tables


def test_the_frames_handed_on_in_memory_are_the_files_written(out, tables, tmp_path):
    """The report hands its tables to the figures in memory, and a figure's plotted data and table go to W&B and
    report.md from memory: each is what its CSV file holds, and report.md shows the table file's numbers."""
    def same_as_file(df, path):
        write_csv(tmp_path / "again.csv", df)
        return (tmp_path / "again.csv").read_bytes() == path.read_bytes()
    for name in ["runs", "spectrum", "singular_values", "subspace", "amplification"]:
        assert same_as_file(tables[name], table_path(out, name)), name
    built = write_figures(tmp_path, tables, numbers=[1, 5, 6, 10])
    for b in built:
        assert same_as_file(b.drawn.data, b.drawn.path.with_suffix(".csv")), b.drawn.path.stem
    tabled = [b.drawn for b in built if b.drawn.table is not None]
    assert [d.path.stem for d in tabled] == ["fig1_accuracy_vs_rank", "fig5_amplification", "fig10_checkpoint_size"]
    section = figures_markdown(built, tmp_path)
    for drawn in tabled:
        table_file = drawn.path.with_name(f"{drawn.path.stem}_table.csv")
        assert same_as_file(drawn.table, table_file)
        assert markdown_table(pd.read_csv(table_file).fillna("")) in section


def test_figure_1_accuracy_vs_rank(tables):
    runs = tables["runs"]
    data = D.accuracy_by_rank(runs)
    full_data = runs[runs["task.train_size"].isna()]
    qv = full_data[(full_data["method.name"] == "lora") & (full_data["method.targets"] == '["query", "value"]')]
    want = qv.groupby("method.rank").eval_accuracy.agg(["mean", "std"])
    got = data["summary"][data["summary"].targets == "q,v"].set_index("rank")
    assert np.allclose(got["mean"], want["mean"]) and np.allclose(got["std"], want["std"])
    assert list(got.n) == [2, 2, 2]
    fig = F.plot_accuracy_vs_rank(data)
    line = artist(fig, "mean:q,v")
    assert list(line.get_xdata()) == [1, 8, 64] and np.allclose(line.get_ydata(), want["mean"])
    full = full_data[full_data["method.name"] == "full"].eval_accuracy
    assert np.allclose(artist(fig, "mean:full").get_ydata(), full.mean())
    table = D.accuracy_table(data["summary"])
    assert list(table.columns) == ["setup", "targets", "r=1", "r=8", "r=64", "full FT"]
    assert table.set_index("targets").loc["q,v", "r=8"].startswith(f"{want.loc[8, 'mean']:.3f} ±")


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

    data = D.phi_seed_data(tables["subspace"], tables["runs"])
    fig = F.plot_phi_seed(data)
    a, b = "syn/method.rank=64,seed=0/qv", "syn/method.rank=64,seed=1/qv"
    assert np.allclose(artist(fig, "value").get_array(), _phi(tables, a, b, 1, "value"))
    assert artist(fig, "value").get_array().shape == (64, 64)

    data = D.phi_layers_data(tables["subspace"], tables["runs"])
    assert sorted(data.layer.unique()) == [0, 1, 2]
    fig = F.plot_phi_layers(data)
    assert np.allclose(artist(fig, "seeds 0 vs 1, r=64:query:2").get_array(), _phi(tables, a, b, 2, "query"))
    ra, rb = "syn/method.rank=8,seed=0/qv", "syn/method.rank=64,seed=0/qv"
    assert np.allclose(artist(fig, "r=8 vs r=64, seed 0:value:0").get_array(), _phi(tables, ra, rb, 0, "value"))


def test_figure_5_amplification(tables):
    data = D.amplification_data(tables["amplification"], tables["runs"])
    amps = tables["amplification"]
    full = amps[amps.run_id.isin(["syn/method=full,seed=0/qv", "syn/method=full,seed=1/qv"])]
    want = full[full.matrix_type == "query"].groupby("r").amplification.mean()
    assert list(want.index) == [1, 8, 64]           # full fine-tuning at the LoRA ranks found
    assert set(data["summary"].matrix_type) == {"query", "value"}  # the types every LoRA target set adapted
    fig = F.plot_amplification(data)
    line = artist(fig, "amp:full:query")
    assert list(line.get_xdata()) == [1, 8, 64] and np.allclose(line.get_ydata(), want)
    phi = full[full.matrix_type == "value"].groupby("r").phi_out.mean()
    assert np.allclose(artist(fig, "phi:full:value").get_ydata(), phi)
    lora = amps[amps.run_id.str.contains("rank=8,seed=") & amps.run_id.str.endswith("/qv")]
    lora = lora[lora.run_id.isin(tables["runs"].loc[tables["runs"]["task.train_size"].isna(), "run_id"])]
    got = data["summary"].set_index(["config", "matrix_type", "r"]).loc[("LoRA r=8 (q,v)", "value", 8)]
    assert got.amplification == pytest.approx(lora[lora.matrix_type == "value"].amplification.mean())
    assert got.n == 2 * LAYERS


def test_figure_6_spectra(tables):
    data = D.spectra_data(tables["singular_values"], tables["spectrum"], tables["runs"])
    sv = tables["singular_values"]
    full = sv[sv.run_id.isin(["syn/method=full,seed=0/qv", "syn/method=full,seed=1/qv"])
              & (sv.matrix_type == "intermediate.dense")].copy()
    full["norm"] = full.sigma / full.groupby(["run_id", "layer"]).sigma.transform("first")
    want = full.groupby("index").norm.mean()
    fig = F.plot_spectra(data)
    axes = [ax for ax in fig.axes if ax.get_title() == "ΔW (intermediate.dense)"]
    line = artist(axes[0], "sigma:full")
    assert len(line.get_xdata()) == WIDTH and np.allclose(line.get_ydata(), want)
    spec = tables["spectrum"]
    r90 = spec[spec.run_id.isin(full.run_id.unique()) & (spec.matrix_type == "intermediate.dense")].r90.mean()
    assert np.allclose(artist(axes[0], "r90:full").get_xdata(), r90)
    lora = artist([ax for ax in fig.axes if ax.get_title().startswith("ΔW_q ")][0], "sigma:LoRA r=8 (q,v)")
    assert len(lora.get_xdata()) == 8                # a rank-8 update has 8 singular values


def test_figure_7_memory(tables):
    data = D.memory_data(tables["runs"])
    s = data["summary"].set_index("config")
    assert s.loc["full", "device"] == "cpu" and np.isnan(s.loc["full", "estimate_weights_bytes"])
    assert s.loc["LoRA r=8 (q,v)", "estimate_activations_bytes"] == 300_000_000
    fig = F.plot_memory(data)
    order = list(data["summary"].config)
    assert order[0] == "full"
    for part in ("weights_bytes", "activations_bytes"):  # stacked bars: one rectangle per config
        heights = dict(zip(order, [b.get_height() for b in artists(fig, f"estimate:{part}")]))
        assert heights == pytest.approx((data["summary"].set_index("config")[f"estimate_{part}"].fillna(0)
                                         / GIB).to_dict())
    assert heights["LoRA r=8 (q,v)"] == pytest.approx(300_000_000 / GIB) and heights["full"] == 0
    without = [c for c in order if np.isnan(s.loc[c, "estimate_weights_bytes"])]  # the measured peak is the bar
    assert without == ["full", "LoRA r=1 (q,k,v,o)", "LoRA r=8 (q,k,v,o)"]
    measured = [b.get_height() for b in artists(fig, "measured_bar")]
    assert measured == pytest.approx([s.loc[c, "peak_mean"] / GIB for c in without])
    runs = tables["runs"]
    peaks = runs[runs.run_id.str.startswith("syn/method.rank=64,") & runs.run_id.str.endswith("/qv")]
    peaks = peaks[peaks["task.train_size"].isna()].peak_memory_bytes / GIB
    offsets = artist(fig, "peak:LoRA r=64 (q,v)").get_offsets()
    assert sorted(offsets[:, 1]) == pytest.approx(sorted(peaks))
    assert np.allclose(offsets[:, 0], order.index("LoRA r=64 (q,v)"))
    tps = dict(zip(order, [b.get_height() for b in artists(fig, "tokens_per_second")]))
    assert tps["full"] == pytest.approx(runs[(runs["method.name"] == "full") & runs["task.train_size"].isna()]
                                        .tokens_per_second.mean())


def test_figure_8_accuracy_vs_memory(tables):
    data = D.accuracy_memory_data(tables["runs"])
    runs = tables["runs"]
    assert len(data) == runs["task.train_size"].isna().sum() == 10
    fig = F.plot_accuracy_memory(data)
    full = runs[(runs["method.name"] == "full") & runs["task.train_size"].isna()]
    got = artist(fig, "runs:full").get_offsets()
    assert sorted(map(tuple, got)) == sorted(zip(full.peak_memory_bytes / GIB, full.eval_accuracy))
    front = data[data.pareto].sort_values("peak_gib")
    assert front.eval_accuracy.is_monotonic_increasing and front.eval_accuracy.iloc[-1] == data.eval_accuracy.max()
    for row in data.itertuples():  # on the front iff nothing cheaper is at least as accurate
        cheaper = data[(data.peak_gib < row.peak_gib) & (data.eval_accuracy >= row.eval_accuracy)]
        assert row.pareto == cheaper.empty


def test_figure_9_data_scarce(tables):
    data = D.data_scarce_data(tables["runs"])
    assert set(data.config) == {"full", "LoRA r=8 (q,v)"}
    full = data[data.config == "full"]
    assert list(full.train_examples) == [100, 4000]
    runs = tables["runs"]
    f = runs[runs["method.name"] == "full"]
    assert full.test_mean.tolist() == pytest.approx([f[f.train_examples == 100].eval_accuracy.mean(),
                                                     f[f.train_examples == 4000].eval_accuracy.mean()])
    fig = F.plot_data_scarce(data)
    lr = full.lr.iloc[0]
    assert np.allclose(artist(fig, f"train:full:{lr}").get_ydata(), full.train_mean)
    assert list(artist(fig, f"test:full:{lr}").get_xdata()) == [100, 4000]


def test_figure_10_checkpoint_size(tables):
    data = D.checkpoint_data(tables["runs"])
    fig = F.plot_checkpoints(data)
    runs = tables["runs"]
    for config, rank in (("full", None), ("LoRA r=64 (q,v)", 64)):
        sel = runs["method.name"] == "full" if rank is None else (
            (runs["method.rank"] == rank) & (runs["method.targets"] == '["query", "value"]'))
        bar = artist(fig, f"ckpt:{config}")
        assert bar.get_height() == pytest.approx(runs[sel].checkpoint_bytes.mean() / MIB)
    row = data.set_index("config").loc["LoRA r=8 (q,v)"]
    assert row.fraction_of_full == pytest.approx(row.checkpoint_bytes / (22_713_216 * 4))


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
    assert (init["name"], init["group"], init["project"], init["job_type"]) == ("analysis", "syn", "lowrank", "analysis")
    assert calls["finished"]
    assert calls["logged"]["figures/fig1_accuracy_vs_rank"] == ("image", "fig1_accuracy_vs_rank.png")
    assert calls["logged"]["tables/runs"] == ("table", len(runs))
    assert "tables/fig5_amplification" in calls["logged"]
    calls.clear()
    make_figures(tmp_path, logged_runs, "off", numbers=[1])
    assert "init" not in calls
