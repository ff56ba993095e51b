"""report: the ledger's Fig. 3 row states the newest conv1 record, and a tower split of either
sign counts (§6.1: "modulo a renumbering of the GPUs")."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from reproduction import report
from reproduction.stats import tower_gap, towers_specialise

ROOT = Path(__file__).resolve().parents[1]


def fig3_record(path: Path, a: tuple[float, float], b: tuple[float, float], epochs: int) -> Path:
    """A conv1 record as `visualize filters` writes it: two towers of 48 kernels, (mean, sd) each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    towers = [{"tower": t, "n": 48, "mean": m, "sd": sd} for t, (m, sd) in zip("AB", (a, b))]
    path.write_text(json.dumps({"checkpoint": f"runs/{path.parent.name}/checkpoint.pt", "epochs_trained": epochs,
                                "towers": 2, "kernel_shape": [3, 11, 11], "image": str(path.with_suffix(".png")),
                                "per_tower": towers, "scores": []}))
    return path


def ledger_row(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("| §6.1, Fig. 3"))


# The two committed records' towers (results/runs/), to the digits they hold: rounded to four
# places, 0.7473 - 0.5638 would print +0.183 where the records give +0.184.
SMOKE = ((0.6615667939, 0.0345355570), (0.6646947861, 0.0306539405), 2)  # 2-epoch smoke run: +0.003, within
LONG = ((0.5638145804, 0.2325506359), (0.7473428249, 0.1414246708), 6)   # main job's 6 epochs: +0.184, beyond


def test_the_ledger_counts_every_net_and_needs_three_that_split(tmp_path):
    """Each trained net is one observation of §6.1's claim; one net, or a mix, is not a finding."""
    results = tmp_path / "results"
    fig3_record(results / "runs/a-smoke/fig3.json", *SMOKE)
    fig3_record(results / "runs/b-long/fig3.json", *LONG)
    row = ledger_row(report.write_report(results).read_text())
    assert "measured: 1 of 2 trained nets split beyond 2 s.e." in row and "| 2 |" in row
    assert "inconclusive (1 of 2 nets split, fewer than 3)" in row and "agrees" not in row


@pytest.mark.parametrize("a, b, splits", [
    ((0.7473, 0.1414), (0.5638, 0.2326), True),   # tower A the colour-specific one
    ((0.5638, 0.2326), (0.7473, 0.1414), True),   # tower B
    ((0.70, 0.05), (0.67, 0.05), True),           # −0.03, s.e. 0.0102
    ((0.68, 0.05), (0.67, 0.05), False),
])
def test_a_split_of_either_sign_beyond_two_standard_errors_counts(tmp_path, a, b, splits):
    results = tmp_path / "results"
    fig3_record(results / "runs/r/fig3.json", a, b, 6)
    text = report.write_report(results).read_text()
    assert f"measured: {int(splits)} of 1 trained nets split" in ledger_row(text)
    assert "agrees" not in ledger_row(text)  # one net
    table = next(line for line in text.splitlines() if line.startswith("| ![](runs/r/fig3.png)"))
    assert ("(beyond 2 s.e.)" in table) == splits
    for k in (1, 2):  # three nets that all split, in either order: the claim holds at this scale
        fig3_record(results / f"runs/r{k}/fig3.json", *((a, b) if k == 1 else (b, a)), 6)
    assert ("agrees (every net splits)" in ledger_row(report.write_report(results).read_text())) == splits


def test_tower_gap_and_its_standard_error():
    towers = [{"mean": 0.70, "sd": 0.05, "n": 48}, {"mean": 0.67, "sd": 0.05, "n": 48}]
    diff, se = tower_gap(towers)
    assert diff == pytest.approx(-0.03) and se == pytest.approx((2 * 0.05 ** 2 / 48) ** 0.5)
    assert towers_specialise(towers) and towers_specialise(towers[::-1])
    assert not towers_specialise([{"mean": 0.68, "sd": 0.05, "n": 48}, towers[1]])


def git(repo: Path, *args: str, date: str | None = None) -> None:
    env = {**os.environ, **({"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date} if date else {})}
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                    "-c", "core.hooksPath=/dev/null", *args], cwd=repo, env=env, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_committed_record_is_dated_by_its_commit_not_its_mtime(tmp_path):
    """A checkout gives every file the same fresh mtime: committed records are ordered by the
    commit that filed them, and one written since (not committed) is the newest."""
    results = tmp_path / "results"
    older = fig3_record(results / "runs/b/fig3.json", *SMOKE)
    newer = fig3_record(results / "runs/a/fig3.json", *LONG)
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", str(older))
    git(tmp_path, "commit", "-q", "-m", "smoke", date="2020-01-01T00:00:00Z")
    git(tmp_path, "add", str(newer))
    git(tmp_path, "commit", "-q", "-m", "long", date="2021-01-01T00:00:00Z")
    os.utime(older, (4_000_000_000, 4_000_000_000))  # a later mtime does not make it newer
    records = report.fig3_records(results)
    assert report.newest(records)[0] == newer
    fig3_record(results / "runs/c/fig3.json", *SMOKE)  # written now, not committed yet: the newest
    assert report.newest(report.fig3_records(results))[0] == results / "runs/c/fig3.json"


def test_the_committed_ledger_never_says_agrees_from_fewer_than_three_nets():
    ledger = ledger_row((ROOT / "results" / "README.md").read_text())
    n = int(re.search(r"of (\d+) trained nets", ledger).group(1))
    assert "agrees" not in ledger or n >= 3
