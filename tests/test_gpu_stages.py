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
def carry(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    source = fake_source(root / "source")
    assert gpu.main(["prepare", "--dry-run", "--source", str(source), "--carry", str(root / "carry"),
                     "--out", str(root / "prepare")]) == 0
    return root


def table(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


def test_prepare_builds_the_carry_folder(carry):
    c = carry / "carry"
    assert (c / "tiny-imagenet-2" / "manifest.json").is_file()
    assert len(list((c / "imagenet-sample").glob("*.JPEG"))) == gpu.SAMPLES
    rows = table((carry / "prepare" / "prepare-summary.md").read_text())
    assert set(rows) == {"data_prep tiny-imagenet", "imagenet-sample", "size"}
    assert all(r[0] == "ok" for r in rows.values())


def test_check_dry_run_prints_the_table_last(carry, capsys):
    out = carry / "check"
    assert gpu.main(["check", "--dry-run", "--carry", str(carry / "carry"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = table(printed[printed.rindex("## check"):])
    assert list(rows) == ["versions", "gpu tests", "two-device net (cuda:0 + cpu)", "train 1 epoch, fast path",
                          "bench model bf16/512", "bench model fp32/128", "bench eval ten-patch", "bench train"]
    assert all(r[0] == "ok" for r in rows.values())
    assert "CUDA " in rows["versions"][2]  # the real part ran: its last line is in the note
    log = (out / "check.log").read_text()
    assert "python -m pytest -m gpu" in log and "--batch-sizes 512 --precisions bf16" in log
    assert (out / "check-summary.md").read_text() in printed


def test_ablations_pack_at_most_eight_files_and_collect_files_them(carry, capsys, tmp_path):
    out = carry / "ablations"
    assert gpu.main(["ablations", "--dry-run", "--seed", "3", "--carry", str(carry / "carry"), "--out", str(out)]) == 0
    rows = table(capsys.readouterr().out.split("## ablations")[-1])
    assert list(rows) == ["train paper", "fig3 paper", "train no_lrn", "train no_overlap_pool",
                          "train one_tower", "train no_pca_lighting"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "ablations-summary.md" in files
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
    assert [n.split("-2")[0] for n in copied] == ["ablations", "ablations-summary"]  # dated copies
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


def test_check_refuses_without_a_gpu_unless_dry_run(carry, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: check would run for real")
    assert gpu.main(["check", "--carry", str(carry / "carry"), "--out", str(carry / "x")]) == 2
    assert "--dry-run" in capsys.readouterr().err
