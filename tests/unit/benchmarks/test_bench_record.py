"""benchmarks.harness.record: one writer for every benchmark result, `{name}.json` + `{name}.md`, each written whole,
with the metadata that says where the numbers came from."""
import json
import os
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

from lowrank.rundir import atomic
from benchmarks.harness import record as bench_record
from benchmarks.harness.record import (Column, collect_metadata, git_state, markdown_table, plain_cell, read_result,
                                  result_name, write_result)

ROWS = [dict(model="m", impl="ours", rank=16, tokens_per_second=1234.5678, note="a|b", runs=[1.0, 2.0]),
        dict(model="m", impl="torch", rank=None, tokens_per_second=1000.0, note=None, runs=[3.0])]


def table_cells(md: str, header_starts: str) -> list[list[str]]:
    """The cells of the markdown table whose header line starts with `header_starts` (header row included)."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header_starts))
    rows = []
    for ln in [lines[start]] + lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip().replace("\\|", "|") for c in ln.strip("|").split(" | ")])
    assert lines[start + 1] == "|" + "---|" * len(rows[0])
    return rows


def test_write_result_writes_json_and_markdown_with_where_the_numbers_came_from(tmp_path):
    j, m = write_result(tmp_path / "out", "speed_cpu", ROWS, dict(seed=0), title="Speed", description="Setup text.",
                        sections=["More."], details=dict(parity=None), meta=collect_metadata("cpu"))
    assert (j, m) == (tmp_path / "out" / "speed_cpu.json", tmp_path / "out" / "speed_cpu.md")
    data = read_result(j)
    assert data["rows"] == ROWS and data["settings"] == dict(seed=0) and data["details"] == dict(parity=None)
    meta = data["meta"]
    argv = sys.orig_argv
    assert meta["command"] == shlex.join([Path(argv[0]).name, *argv[1:]]) and meta["executable"] == sys.executable
    assert meta["versions"]["torch"] == torch.__version__
    assert set(meta["versions"]) == {"python", "torch", "transformers", "peft", "triton"}
    assert meta["device"] == bench_record.cpu_name() and "cores" in meta["device"]
    assert datetime.fromisoformat(meta["date"]).tzinfo is not None
    try:
        head = os.environ.get(bench_record.COMMIT_ENV) or subprocess.run(
            ["git", "-C", str(bench_record.ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
            check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        head = None
    assert meta["commit"] == head and meta["dirty"] in (True, False, None)
    md = m.read_text()
    assert md.startswith("# Speed\n")
    commit = f"`{head[:12]}`" if head else "no commit recorded"
    assert commit in md and f"Command: `{meta['command']}`" in md and f"torch {meta['versions']['torch']}" in md
    assert meta["device"] in md and "Settings: seed=0." in md and "Setup text." in md and md.rstrip().endswith("More.")


def test_markdown_table_matches_the_rows(tmp_path):
    _, m = write_result(tmp_path, "t", ROWS, meta=dict(commit=None, command="c", device="d", versions={}))
    cells = table_cells(m.read_text(), "| model")
    assert cells[0] == list(ROWS[0])  # one column per key, in order
    assert cells[1:] == [[plain_cell(r.get(k)).replace("\\|", "|") for k in ROWS[0]] for r in ROWS]
    assert cells[1] == ["m", "ours", "16", "1235", "a|b", "[1.0,2.0]"] and cells[2][2] == cells[2][4] == "–"
    columns = [Column("impl", "impl"), Column("tokens/s", "tokens_per_second", ",.0f"),
               Column("×", lambda r: r["rank"] and r["rank"] / 8, ".2f", "×")]
    assert table_cells(markdown_table(ROWS, columns), "| impl") == [["impl", "tokens/s", "×"],
                                                                    ["ours", "1,235", "2.00×"],
                                                                    ["torch", "1,000", "–×"]]


def test_both_files_are_written_whole_by_a_rename(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "replace", spy)
    meta = dict(commit="abc", command="c", device="d", versions={})
    write_result(tmp_path, "r", ROWS, meta=meta)
    assert [dst.name for _, dst in renames] == ["r.json", "r.md"]
    assert all(src.parent == tmp_path and src.name.startswith(f".{dst.name}~") for src, dst in renames)
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    with pytest.raises(TypeError):  # a row that is not JSON: nothing is half-written, the last result stays
        write_result(tmp_path, "r", [dict(x=object())], meta=meta)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_git_state_asks_git_unless_the_commit_is_given(tmp_path, monkeypatch):
    monkeypatch.delenv(bench_record.COMMIT_ENV, raising=False)
    assert git_state(tmp_path) == dict(commit=None, dirty=None)  # no checkout there
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)  # git is on every machine that builds this project
    (repo / "f").write_text("1")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "m"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_state(repo) == dict(commit=head, dirty=False)
    (repo / "f").write_text("2")
    assert git_state(repo) == dict(commit=head, dirty=True)
    monkeypatch.setenv(bench_record.COMMIT_ENV, "0123abc")  # set where a copy of the tree was made: it wins
    assert git_state(repo) == git_state(tmp_path) == dict(commit="0123abc", dirty=None)


def test_result_names_end_in_the_device_and_results_are_checked_on_reading(tmp_path):
    assert result_name("svd", "cpu") == "svd_cpu"
    (tmp_path / "x.json").write_text(json.dumps(dict(rows=[])))
    with pytest.raises(ValueError, match="not a benchmark result"):
        read_result(tmp_path / "x.json")
