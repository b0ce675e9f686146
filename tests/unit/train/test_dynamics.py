"""Rank over training time (lowrank.train.dynamics): snapshots against closed-form cases."""
import math

import torch
from torch import nn

from lowrank.train.dynamics import Dynamics, summary, tracked
from lowrank.adapters.lora import inject_lora, lora_layers
from lowrank.adapters.methods import LoRA, Full


def test_full_snapshot_sees_a_planted_rank_and_phi_tracks_direction_change():
    torch.manual_seed(0)
    model = nn.ModuleDict({"q": nn.Linear(20, 30), "v": nn.Linear(20, 30)})
    w0 = {n: model[n].weight.detach().clone() for n in ("q", "v")}
    dyn = Dynamics(model, ["q", "v"], w0, Full())
    u, v = torch.linalg.qr(torch.randn(30, 3))[0], torch.linalg.qr(torch.randn(20, 3))[0]
    with torch.no_grad():
        model["q"].weight += u @ torch.diag(torch.tensor([3.0, 2.0, 1.0])) @ v.T   # rank 3, σ = 3, 2, 1
        model["v"].weight += 0.5 * u[:, :1] @ v[:, :1].T                             # rank 1
    first = {r["module"]: r for r in dyn.snapshot(10)}
    assert first["q"]["r99"] == 3 and first["v"]["r99"] == 1
    assert math.isclose(first["q"]["fro_norm"], math.sqrt(14), rel_tol=1e-6)
    assert math.isclose(first["q"]["stable_rank"], 14 / 9, rel_tol=1e-5)
    assert math.isnan(first["q"]["phi_1"])  # nothing to compare with yet
    with torch.no_grad():  # q's top direction grows; v gets a new, orthogonal top direction
        model["q"].weight += 1.0 * u[:, :1] @ v[:, :1].T
        model["v"].weight += 5.0 * u[:, 2:3] @ v[:, 2:3].T
    second = {r["module"]: r for r in dyn.snapshot(20)}
    assert math.isclose(second["q"]["phi_1"], 1.0, abs_tol=1e-9)
    assert second["v"]["phi_1"] < 1e-9
    assert set(summary(list(second.values()))) >= {"dynamics/r90", "dynamics/phi_1"}


def test_lora_snapshot_equals_the_spectrum_of_its_delta():
    torch.manual_seed(1)
    block = nn.ModuleDict({"query": nn.Linear(16, 24), "value": nn.Linear(16, 24)})
    model = nn.ModuleDict({"layers": nn.ModuleList([block])})
    inject_lora(model, ["query", "value"], rank=4, alpha=8)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B)
    rows = Dynamics(model, list(lora_layers(model)), None, LoRA(mc=None)).snapshot(5)
    assert len(rows) == 2
    for row in rows:
        S = torch.linalg.svdvals(lora_layers(model)[row["module"]].delta_weight().double())
        assert math.isclose(row["fro_norm"], float(S.square().sum().sqrt()), rel_tol=1e-6)  # B A formed in fp32
        assert row["r99"] <= 4


def test_tracked_picks_by_suffix():
    names = ["l.0.attention.self.query", "l.0.attention.self.value", "l.0.output.dense"]
    assert tracked(names, "all") == names
    assert tracked(names, ["query"]) == names[:1]


def test_tracked_entry_matching_nothing_names_the_key():
    """The targets' suffix rule, with its error (it used to match nothing silently)."""
    import pytest
    from lowrank.errors import ConfigError
    with pytest.raises(ConfigError, match=r"trainer.dynamics_targets entry 'keys' matches no linear layer; valid "
                                          r"suffixes: .*query"):
        tracked(["l.0.attention.self.query"], ["keys"])
