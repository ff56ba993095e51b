"""python -m reproduction.gpu: the stages' orchestration, by their --dry-run (CPU, seconds):
prepare on two classes of a made-up source (the real data_prep; no data needed), check and
ablations with their GPU parts as stand-ins, the packed runs and collect; and the boxing
itself (a part that fails or overruns its deadline never stops the next)."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from packing import encode
from reproduction import gpu


def fake_source(root: Path) -> Path:
    """What prepare reads from ../shared/data, made up (so CI needs no data): an extracted
    Tiny-ImageNet folder of 3 classes (5 train, 1 val image each) and 14 imagenet-sample JPEGs."""
    rng = np.random.default_rng(0)
    jpeg = lambda size: encode(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), quality=90)
    tiny = root / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    (tiny / "val" / "images").mkdir(parents=True)
    (tiny / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    (tiny / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in wnids))
    ann = []
    for w in wnids:
        (tiny / "train" / w / "images").mkdir(parents=True)
        for i in range(5):
            (tiny / "train" / w / "images" / f"{w}_{i}.JPEG").write_bytes(jpeg(64))
        (tiny / "val" / "images" / f"val_{len(ann)}.JPEG").write_bytes(jpeg(64))
        ann.append(f"val_{len(ann)}.JPEG\t{w}\t0\t0\t63\t63\n")
    (tiny / "val" / "val_annotations.txt").write_text("".join(ann))
    (root / "imagenet-sample").mkdir()
    for i in range(14):
        (root / "imagenet-sample" / f"n0000{i:04d}_x.JPEG").write_bytes(jpeg(80))
    return root


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    source = fake_source(root / "source")
    assert gpu.main(["prepare", "--dry-run", "--source", str(source), "--bundle", str(root / "bundle"),
                     "--out", str(root / "prepare")]) == 0
    return root


def table(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


def test_prepare_builds_the_bundle_folder(stages):
    c = stages / "bundle"
    assert (c / "tiny-imagenet-2" / "manifest.json").is_file()
    assert len(list((c / "imagenet-sample").glob("*.JPEG"))) == gpu.SAMPLES
    rows = table((stages / "prepare" / "prepare-summary.md").read_text())
    assert set(rows) == {"data_prep tiny-imagenet", "imagenet-sample", "size"}
    assert all(r[0] == "ok" for r in rows.values())


CHECK_PARTS = ["versions", "gpu tests", "train 1 epoch, fast path", "bench model fp32/128", "bench eval ten-patch",
               "bench train", "bench model bf16/512 (+ compile)", "gpu compile test"]


def test_check_dry_run_prints_the_arithmetic_and_the_table_last(stages, capsys):
    out = stages / "check"
    assert gpu.main(["check", "--dry-run", "--bundle", str(stages / "bundle"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = table(printed[printed.rindex("## check"):])
    assert list(rows) == CHECK_PARTS
    assert all(r[0] == "ok" for r in rows.values())
    assert "CUDA " in rows["versions"][2]  # the real part ran: its last line is in the note
    # the budget arithmetic, before any part runs: each deadline, their sum, the worst case
    head = printed[:printed.index("--- versions")]
    assert "budget: versions 20 + gpu tests 140 + " in head and f"= 470 s of {gpu.BUDGET['check']:.0f} s" in head
    assert f"= {gpu.BUDGET['check'] + gpu.GRACE + gpu.DRAIN:.0f} s of the {gpu.CALL_SECONDS:.0f} s one command may take" in head
    log = (out / "check.log").read_text()
    assert "python -m pytest -m gpu" in log and "--batch-sizes 512 --precisions bf16" in log
    assert (out / "check-summary.md").read_text() in printed
    # one JSON line per part, in order; the bench rows written as measured are in their part's
    lines = [json.loads(line) for line in (out / "check.jsonl").read_text().splitlines()]
    parts = [e for e in lines if "part" in e]
    assert [e["part"] for e in parts] == CHECK_PARTS and all(e["status"] == "ok" for e in parts)
    by_name = {e["part"]: e for e in parts}
    assert by_name["bench eval ten-patch"]["rows"] == [{"bench": "eval", "img_s": 1.0, "dry_run": True}]
    assert by_name["bench train"]["rows"][0]["bench"] == "train" and by_name["versions"]["rows"] == []
    assert by_name["train 1 epoch, fast path"]["final"]["epochs"] == 1  # kept though the run folder is not
    assert "CUDA " in " ".join(by_name["versions"]["tail"])


def test_check_plan_deadlines_sum_to_the_budget_slow_parts_last(tmp_path):
    parts = gpu.check_parts(tmp_path / "data", tmp_path / "bundle", tmp_path / "work", tmp_path / "out", dry_run=False)
    assert [p.name for p in parts] == CHECK_PARTS  # no second run of the two-device tests
    assert sum(p.seconds for p in parts) == gpu.BUDGET["check"]
    assert gpu.BUDGET["check"] + gpu.GRACE + gpu.DRAIN <= gpu.CALL_SECONDS
    # the torch.compile parts last; the gpu tests in the given file order, the compile test only at the end
    tests, compile_test = parts[1].command, parts[-1].command
    files = [w for w in tests if w.startswith("tests/")]
    assert files == gpu.GPU_TEST_FILES + [gpu.COMPILE_TEST] and tests[tests.index(gpu.COMPILE_TEST) - 1] == "--deselect"
    assert compile_test[-1] == gpu.COMPILE_TEST and "compile" in parts[-2].name
    path, name = gpu.COMPILE_TEST.split("::")
    assert f"def {name}(" in (gpu.ROOT / path).read_text()
    assert all((gpu.ROOT / f).is_file() for f in gpu.GPU_TEST_FILES)
    for p in parts:  # bench eval/train write their rows into the stage's JSON lines
        if p.command[3:4] in (["eval"], ["train"]) and "reproduction.bench" in p.command:
            assert p.command[p.command.index("--json") + 1] == str(tmp_path / "out" / "check.jsonl")


@pytest.mark.parametrize("change", ["budget", "call"])
def test_a_plan_over_its_budget_is_refused_before_it_runs(stages, capsys, monkeypatch, change):
    if change == "budget":
        monkeypatch.setitem(gpu.BUDGET, "check", 400.0)
    else:
        monkeypatch.setattr(gpu, "CALL_SECONDS", 480.0)
    out = stages / f"over-{change}"
    assert gpu.main(["check", "--dry-run", "--bundle", str(stages / "bundle"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: check: ")
    assert ("470 s, over the stage's 400 s budget" if change == "budget" else "exceeds the 480 s one command may take") in err
    assert "reproduction/gpu.py" in err and not out.exists()  # nothing ran


def test_ablations_and_prepare_plans_fit_their_budgets(stages, capsys):
    assert gpu.main(["ablations", "--dry-run", "--bundle", str(stages / "bundle"), "--out", str(stages / "abl-plan"),
                     "--experiments", "paper", "no_lrn"]) == 0
    head = capsys.readouterr().out.split("--- ")[0]
    assert "budget: train paper 215 + fig3 paper 30 + train no_lrn 215 + packing 20 = 480 s of 480 s" in head
    text = (stages / "prepare" / "prepare.log").read_text()
    assert "budget: data_prep tiny-imagenet 840 + imagenet-sample 30 + size 30 = 900 s of 900 s" in text


def test_ablations_pack_into_few_files_and_collect_files_them(stages, capsys, tmp_path):
    out = stages / "ablations"
    assert gpu.main(["ablations", "--dry-run", "--seed", "3", "--bundle", str(stages / "bundle"), "--out", str(out)]) == 0
    rows = table(capsys.readouterr().out.split("## ablations")[-1])
    assert list(rows) == ["train paper", "fig3 paper", "train no_lrn", "train no_overlap_pool",
                          "train one_tower", "train no_pca_lighting"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "ablations-summary.md" in files  # a log, JSON lines, the table, one archive per run
    archives = sorted(out.glob("ablation-*-seed3.tar.gz"))
    assert len(archives) == 5
    with tarfile.open(out / "ablation-paper-seed3.tar.gz") as tar:
        names = tar.getnames()
    assert "paper/seed3/final.json" in names and not any(n.endswith(".pt") for n in names)
    # collect: dry-run archives never go into results/ unasked; into a folder of one's own they do
    assert gpu.main(["collect", str(out)]) == 2
    into = tmp_path / "gpu-50"
    assert gpu.main(["collect", str(out), "--into", str(into), "--allow-dry-run"]) == 0
    final = json.loads((into / "one_tower" / "seed3" / "final.json").read_text())
    assert final["experiment"] == "one_tower"
    copied = sorted(p.name for p in into.iterdir() if p.is_file())
    assert [n.split("-2")[0] for n in copied] == ["ablations", "ablations", "ablations-summary"]  # dated copies
    assert {n.rsplit(".", 1)[1] for n in copied} == {"log", "jsonl", "md"}
    assert gpu.main(["collect", str(out), "--into", str(into), "--allow-dry-run"]) == 2  # no silent replace


def test_a_failing_or_overrunning_part_never_stops_the_next(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "GRACE", 2.0)
    parts = [gpu.Part("fails", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"], 10),
             gpu.Part("hangs", [sys.executable, "-c", "import time; print('waiting', flush=True); time.sleep(60)"], 1.5),
             gpu.Part("works", [sys.executable, "-c", "print('done')"], 10, after=lambda: "packed"),
             gpu.Part("late", [sys.executable, "-c", "print('never')"], 10)]
    rows = gpu.run_parts("box", parts, tmp_path, budget=8.0)
    status = {r["part"]: r["status"] for r in rows}
    assert status["fails"] == "failed (exit 3)" and status["hangs"].startswith("timeout")
    assert status["works"] == "ok" and rows[2]["note"] == "done; packed"
    assert status["late"] in ("ok", "skipped (no time left)")
    assert rows[0]["note"] == "boom" and "waiting" in (tmp_path / "box.log").read_text()
    assert rows[1]["seconds"] < 6  # killed at its deadline, not at the child's 60 s
    # the killed part has its JSON line too, with what it printed
    lines = {e["part"]: e for e in map(json.loads, (tmp_path / "box.jsonl").read_text().splitlines())}
    assert lines["hangs"]["status"].startswith("timeout") and lines["hangs"]["tail"] == ["waiting"]
    assert set(lines) == {"fails", "hangs", "works", "late"}


def test_a_part_gets_the_seconds_the_parts_before_it_left(tmp_path):
    """Deadlines 4 + 2 in a budget of 6: the first ends at once, so the second (which needs ~3 s)
    may run until the budget's end, while a part after it would keep its own deadline."""
    parts = [gpu.Part("quick", [sys.executable, "-c", "print('fast')"], 4),
             gpu.Part("slow", [sys.executable, "-c", "import time; time.sleep(3); print('done')"], 2)]
    rows = gpu.run_parts("slack", parts, tmp_path, budget=6.0)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    limits = [e["limit"] for e in map(json.loads, (tmp_path / "slack.jsonl").read_text().splitlines())]
    assert limits[0] == pytest.approx(4, abs=0.5) and limits[1] > 4


def test_check_refuses_without_a_gpu_unless_dry_run(stages, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: check would run for real")
    assert gpu.main(["check", "--bundle", str(stages / "bundle"), "--out", str(stages / "x")]) == 2
    assert "--dry-run" in capsys.readouterr().err
