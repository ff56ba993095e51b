"""evaluate: ensembles of checkpoints (§6) and the challenge's predictions file.

Two untrained nets of different architectures (the paper's two towers, and one tower without
LRN) on a tiny 4-class set; the command's numbers are checked against a hand average of the
two nets' ten-patch softmax outputs.
"""

from __future__ import annotations

import json

import pytest
import torch

from packing import colour_set
from reproduction.training import checkpoints
from reproduction.config import RunConfig, override
from reproduction.data import PackedSet, average_softmax, eval_batches, load_stats
from reproduction.evaluate import main as evaluate_main
from reproduction.model import AlexNet

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")

IDS = [7, 3, 9, 1]  # the dataset's own 1-based ids of classes 0..3, not index + 1


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    data = colour_set(root / "data", train=4, val=3, seed=1)
    manifest = json.loads((data / "manifest.json").read_text())
    for c, sid in zip(manifest["classes"], IDS):
        c["ilsvrc_id"] = sid
    (data / "manifest.json").write_text(json.dumps(manifest))
    # Stored order is not file-name order: image i is named ..._{3 - i}.
    (data / "val.names.txt").write_text("".join(f"ILSVRC2010_test_{3 - i:08d}.JPEG\n" for i in range(3)))
    paths = []
    for k, diff in enumerate(({}, {"towers": 1, "lrn": "none"})):
        config = override(RunConfig(), {"num_classes": 4, **diff})
        torch.manual_seed(10 + k)
        model = AlexNet(config.model)
        with torch.no_grad():  # spread the logits so the two nets disagree visibly
            model.fc8.weight_a.mul_(50)
        path = root / f"m{k}" / "checkpoint.pt"
        path.parent.mkdir()
        checkpoints.save_checkpoint(path, {"model": model.state_dict(), "config": checkpoints.config_dict(config),
                                    "epoch": 0, "classes": [c["id"] for c in manifest["classes"]]})
        paths.append(path)
    return data, paths


def hand_probs(data, paths) -> tuple[list[torch.Tensor], torch.Tensor]:
    dataset, stats = PackedSet(data, "val"), load_stats(data)
    per_model = []
    for path in paths:
        model, config = checkpoints.model_from_checkpoint(checkpoints.load_checkpoint(path))
        model.eval()
        outs, labels = [], []
        with torch.no_grad():
            for x, y in eval_batches(dataset, stats, config.data, batch_size=3, ten_patch=True, workers=0):
                outs.append(average_softmax(model(x.flatten(0, 1)).unflatten(0, x.shape[:2])))
                labels.append(y)
        per_model.append(torch.cat(outs))
    return per_model, torch.cat(labels)


def test_ensemble_averages_the_models_softmax(members, tmp_path, capsys):
    data, paths = members
    per_model, y = hand_probs(data, paths)
    probs = (per_model[0] + per_model[1]) / 2
    out, pred = tmp_path / "ens.json", tmp_path / "pred.txt"
    assert evaluate_main(["--checkpoint", *map(str, paths), "--data", str(data), "--device", "cpu",
                          "--batch-size", "2", "--output", str(out), "--predictions", str(pred)]) == 0
    result = json.loads(out.read_text())
    ten = result["ten_patch"]
    assert ten["models"] == 2 and ten["images"] == 3 and ten["patches"] == 10
    hand_loss = torch.nn.functional.nll_loss(probs.log(), y).item()
    assert ten["loss"] == pytest.approx(hand_loss, rel=1e-5)
    assert ten["top1_error"] == pytest.approx((probs.argmax(1) != y).float().mean().item())
    # Each single model's loss differs from the ensemble's: the average is not one of them.
    singles = [torch.nn.functional.nll_loss(p.log(), y).item() for p in per_model]
    assert all(abs(s - ten["loss"]) > 1e-4 for s in singles)
    # Predictions: file-name order (stored image i is file 3 - i), ids from the manifest, best first.
    best = probs.topk(4, dim=1).indices
    expected = [" ".join(str(IDS[k]) for k in best[i].tolist()) for i in reversed(range(3))]
    assert pred.read_text().splitlines() == expected
    assert result["predictions"]["ids"] == "the manifest's ilsvrc_id"
    assert result["checkpoint"] == [str(p) for p in paths]


def test_per_class_errors_and_the_confusion_matrix_follow_the_predictions(members, tmp_path, capsys):
    """Beside the result: each class's top-1/top-5 error and the top-1 confusion matrix of the
    ten-patch predictions (checked against the hand average), its figure, and the most-confused
    pairs in the result and the printed summary."""
    from reproduction.perclass import most_confused, per_class
    data, paths = members
    per_model, y = hand_probs(data, paths)
    probs = (per_model[0] + per_model[1]) / 2
    out = tmp_path / "ens.json"
    assert evaluate_main(["--checkpoint", *map(str, paths), "--data", str(data), "--device", "cpu",
                          "--batch-size", "2", "--output", str(out)]) == 0
    table = json.loads((tmp_path / "ens-per-class.json").read_text())
    assert (tmp_path / "ens-confusion.png").stat().st_size > 0
    top1 = probs.argmax(1)
    for i, row in enumerate(table["classes"]):
        mine = y == i
        assert row["images"] == int(mine.sum()) and sum(table["confusion"][i]) == row["images"]
        if row["images"]:
            assert row["top1_error"] == pytest.approx((top1[mine] != i).float().mean().item())
        assert [table["confusion"][i][j] for j in range(4)] == [int((top1[mine] == j).sum()) for j in range(4)]
    result = json.loads(out.read_text())
    assert result["per_class"]["most_confused"] == table["most_confused"][:5]
    assert "most confused (true -> predicted, ten patches)" in capsys.readouterr().out
    # The pairs: largest off-diagonal cells first, with their share of the true class.
    confusion = torch.tensor([[5, 3, 0], [1, 4, 0], [0, 2, 2]])
    classes = [{"id": c} for c in "abc"]
    assert [(p["true"], p["predicted"], p["images"]) for p in most_confused(confusion, classes)] == [
        ("a", "b", 3), ("c", "b", 2), ("b", "a", 1)]
    assert most_confused(confusion, classes)[0]["share"] == pytest.approx(3 / 8)
    top5 = [torch.tensor([[0, 1, 2, 3, 4]]), torch.tensor([[1, 0, 2, 3, 4], [2, 1, 0, 3, 4]])]
    got = per_class(top5, torch.tensor([0, 0, 1]), [{"id": str(i)} for i in range(5)])
    assert [r["top1_error"] for r in got["classes"][:2]] == [0.5, 1.0] and got["classes"][1]["top5_error"] == 0.0
    assert got["classes"][4]["top1_error"] is None  # a class with no images has no error


def test_ensemble_refuses_other_class_lists(members, tmp_path, capsys):
    data, paths = members
    state = checkpoints.load_checkpoint(paths[1])
    state["classes"] = list(reversed(state["classes"]))
    other = tmp_path / "other.pt"
    checkpoints.save_checkpoint(other, state)
    code = exit_code(lambda: evaluate_main(["--checkpoint", str(paths[0]), str(other), "--data", str(data),
                                            "--device", "cpu", "--output", str(tmp_path / "x.json")]))
    assert code == 2 and "another class list" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    # An ensemble's result belongs to no single run: it needs its own output file.
    assert exit_code(lambda: evaluate_main(["--checkpoint", str(paths[0]), str(paths[1]), "--data", str(data)])) == 2
    assert "--output" in capsys.readouterr().err


def exit_code(call) -> int:
    """A command's exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return call()
    except SystemExit as e:
        return e.code
