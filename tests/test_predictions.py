"""evaluate --predictions: the challenge's submission file is written only with the set's own
class ids (ILSVRC20xx_ID) and only when every image of the split was predicted exactly once."""

from __future__ import annotations

import json

import pytest
import torch

from packing import colour_set
from reproduction.training import checkpoints
from reproduction.config import RunConfig, override
from reproduction.data import PackedSet
from reproduction.evaluate import main as evaluate_main, write_predictions

IDS = [7, 3, 9, 1]  # the set's 1-based ids of classes 0..3


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """The same 5-image val split with and without ilsvrc_id in its manifest; stored image i is
    file 4 - i, so file-name order is the reverse of stored order."""
    root = tmp_path_factory.mktemp("pred")
    plain = colour_set(root / "plain", train=4, val=5, seed=2)
    (plain / "val.names.txt").write_text("".join(f"ILSVRC2010_test_{4 - i:08d}.JPEG\n" for i in range(5)))
    with_ids = root / "with_ids"
    with_ids.mkdir()
    for f in plain.iterdir():
        (with_ids / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((plain / "manifest.json").read_text())
    for c, sid in zip(manifest["classes"], IDS):
        c["ilsvrc_id"] = sid
    (with_ids / "manifest.json").write_text(json.dumps(manifest))
    # Refused before the model is built: a checkpoint with the right class count and no weights will do.
    ckpt = root / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    checkpoints.save_checkpoint(ckpt, {"model": {}, "config": checkpoints.config_dict(override(RunConfig(), {"num_classes": 4})),
                                "epoch": 0})
    return plain, with_ids, ckpt


def test_a_set_without_ilsvrc_ids_is_refused_before_evaluating(sets, tmp_path, capsys):
    plain, _, ckpt = sets
    pred, out = tmp_path / "top5.txt", tmp_path / "eval.json"
    code = evaluate_main(["--checkpoint", str(ckpt), "--data", str(plain), "--device", "cpu",
                          "--output", str(out), "--predictions", str(pred)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --predictions needs the challenge's class ids") and "no ilsvrc_id" in err
    assert "drop --predictions" in err and "data_prep" in err
    assert not pred.exists() and not out.exists()  # nothing written, and no evaluation ran


def batches(rows: list[list[int]], batch_size: int) -> list[torch.Tensor]:
    t = torch.tensor(rows)
    return list(t.split(batch_size))


def test_a_complete_split_is_written_in_file_name_order(sets, tmp_path):
    _, with_ids, _ = sets
    dataset = PackedSet(with_ids, "val")
    rows = [[i % 4, (i + 1) % 4, (i + 2) % 4, (i + 3) % 4, i % 4] for i in range(5)]  # stored order
    assert write_predictions(tmp_path / "p.txt", dataset, batches(rows, 2), batch_size=2) == "the manifest's ilsvrc_id"
    lines = (tmp_path / "p.txt").read_text().splitlines()
    assert lines == [" ".join(str(IDS[k]) for k in rows[i]) for i in reversed(range(5))]


@pytest.mark.parametrize("case", ["one skipped", "one twice", "a batch short, one extra"])
def test_an_incomplete_split_writes_nothing(sets, tmp_path, case):
    _, with_ids, _ = sets
    dataset = PackedSet(with_ids, "val")
    rows = [[i % 4] * 5 for i in range(5)]
    got = {"one skipped": batches(rows[:2] + rows[3:], 2),            # 4 lines: every later line shifted
           "one twice": batches(rows + rows[4:], 2),                   # 6 lines
           "a batch short, one extra": [torch.tensor(rows[:1]), torch.tensor(rows[1:3]), torch.tensor(rows[3:])],
           }[case]
    with pytest.raises(ValueError, match="not every image exactly once, in order; nothing written"):
        write_predictions(tmp_path / "p.txt", dataset, got, batch_size=2)
    assert not (tmp_path / "p.txt").exists()


def test_names_that_cannot_be_ordered_write_nothing(sets, tmp_path):
    _, with_ids, _ = sets
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in with_ids.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "val.names.txt").write_text("a/x.JPEG\nb/x.JPEG\nc.JPEG\nd.JPEG\ne.JPEG\n")  # x.JPEG twice
    rows = [[0] * 5 for _ in range(5)]
    with pytest.raises(ValueError, match="4 distinct file names"):
        write_predictions(tmp_path / "p.txt", PackedSet(broken, "val"), batches(rows, 5), batch_size=5)
    assert not (tmp_path / "p.txt").exists()
