"""Benchmarks (reproduction/bench.py) on tiny CPU settings, and the training step they time
(train.train_step, and the loop's deferred read-back of its loss)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from packing import colour_set
from reproduction.bench import main, model_table, profile_table
from reproduction.config import AlexNetConfig
from reproduction.training.distributed import Distributed
from reproduction.model import AlexNet
from reproduction.optim import PaperSGD, paper_param_groups
from reproduction.training.build import train_step
from reproduction.training.loop import Loop, Options, Task, TrainingStopped, zero_sums
from reproduction.training.runfolder import RunFolder

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return colour_set(tmp_path_factory.mktemp("tiny"), train=8, val=4, seed=0)


def table_rows(text: str) -> list[list[str]]:
    """The cells of the last Markdown table in `text`, header first, the |---| line dropped."""
    lines = text.splitlines()
    end = start = max(i for i, line in enumerate(lines) if line.startswith("|")) + 1
    while start > 0 and lines[start - 1].startswith("|"):
        start -= 1
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[start:end] if "---" not in line]


def test_model_table_sets_ours_against_torchvisions_better_layout_round_by_round():
    row = lambda variant, batch, precision, rounds, note="": {"variant": variant, "batch": batch,
                                                               "precision": precision, "rounds": rounds, "note": note}
    results = [
        row("torchvision", 128, "fp32", [0.128, 0.256, 0.128]),       # NCHW: median 0.128 s
        row("torchvision-cl", 128, "fp32", [0.100, 0.100, 0.400]),    # channels_last: median 0.100 s, the better
        row("fast", 128, "fp32", [0.080, 0.125, 0.200]),
        row("fast", 128, "bf16", [], "needs triton"),
        row("reference", 512, "fp32", [0.25, 0.25]),                 # no torchvision row at this batch
    ]
    header, *rows = table_rows(model_table(results))
    assert header == ["net", "variant", "batch", "precision", "img/s", "range", "vs torchvision", "its layout"]
    assert rows[0][4] == "1,000" and rows[0][5] == "500–1,000"     # the median round's img/s, the rounds' range
    assert rows[1][6] == "1.00× (1.00–1.00)" and rows[0][6] == "0.78× (0.39–3.12)" and rows[0][7] == "channels_last"
    # ours against torchvision channels_last in the same round: 0.100/0.080, 0.100/0.125, 0.400/0.200
    assert rows[2][6] == "1.25× (0.80–2.00)" and rows[2][7] == "channels_last"
    assert rows[3][4] == "n/a: needs triton" and rows[3][6] == "—"
    assert rows[4][6] == "—" and rows[4][5] == "2,048–2,048"


def test_profile_table_shows_total_and_split_per_layer():
    share = {"conv1": {"fwd": 0.1, "bwd": 0.2}, "optimiser": {"fwd": 0.7, "bwd": 0.0}}
    header, *rows = table_rows(profile_table({"b2 fp32": share}))
    assert header == ["layer", "b2 fp32"]
    cells = dict(rows)
    assert cells["conv1"] == "30.0 (10.0 / 20.0)" and cells["optimiser"] == "70.0" and cells["lrn1"] == "—"


def test_bench_model_on_the_cpu(capsys):
    """Through the command at fp32 (bf16's rows are the same code; the defaults test lists
    them): torchvision in both layouts, ours fast, interleaved, with the profile."""
    assert main(["model", "--device", "cpu", "--batch-sizes", "2", "--precisions", "fp32",
                 "--variants", "torchvision", "torchvision-cl", "fast", "--rounds", "2",
                 "--steps", "1", "--warmup", "1", "--profile"]) == 0
    out = capsys.readouterr().out
    header, *rows = table_rows(out)
    assert header[6] == "vs torchvision"
    assert [(r[1], r[3]) for r in rows] == [
        ("eager, torch.optim.SGD, NCHW", "fp32"), ("eager, torch.optim.SGD, channels_last", "fp32"),
        ("fast: LRN operator, one-pass update, channels_last, eager", "fp32")]
    assert all(" (" in r[6] and r[7] in ("NCHW", "channels_last") and float(r[4].replace(",", "")) > 0 for r in rows)
    assert "1.00× (1.00–1.00)" in {rows[0][6], rows[1][6]}  # torchvision's better layout is the base
    assert "native bf16: " in out and "LRN operator: " in out and "cpu: " in out and "flags: " in out
    assert "2 interleaved rounds of 1 timed steps per row" in out
    profile = out[out.index("Share of a training step"):]
    for layer in ("| conv1 |", "| lrn1 |", "| fc8 |", "| optimiser |"):
        assert layer in profile
    assert "torch " + torch.__version__ in out and "date: " in out


def test_bench_train_on_a_tiny_set(tiny_set, capsys):
    assert main(["train", "--data", str(tiny_set), "--device", "cpu", "--batch-size", "4", "--batches", "1",
                 "--warmup", "1", "--workers", "0", "--set", "dropout=0.25"]) == 0
    out = capsys.readouterr().out
    header, *rows = table_rows(out)
    assert header == ["measurement", "img/s", "vs model only"]
    assert [r[0].split(" (")[0] for r in rows] == ["loader only", "model only", "end to end"]
    assert rows[1][2] == "1.00×"
    ratio = float(rows[2][1].replace(",", "")) / float(rows[1][1].replace(",", ""))
    assert float(out.split("end to end / model only = ")[1].split()[0].rstrip(";,")) == pytest.approx(ratio, rel=0.02)


@pytest.mark.parametrize("ten_patch", [False, True])
def test_bench_eval_on_a_tiny_set(tiny_set, capsys, ten_patch):
    assert main(["eval", "--data", str(tiny_set), "--device", "cpu", "--batch-size", "4", "--workers", "0",
                 *(["--ten-patch"] if ten_patch else [])]) == 0
    header, row = table_rows(capsys.readouterr().out)
    assert header == ["protocol", "images", "seconds", "img/s", "patches/s", "50,000 images"]
    assert row[0].startswith("ten patches" if ten_patch else "centre") and row[1] == "4"
    rate, patches = float(row[3].replace(",", "")), float(row[4].replace(",", ""))
    assert patches == pytest.approx(rate * (10 if ten_patch else 1), rel=0.01, abs=1)
    assert row[5].endswith(" s")


def test_train_step_is_the_hand_written_paper_step():
    """Two steps of train_step against forward, mean cross-entropy, backward and PaperSGD written
    out: the same parameters, velocities, loss and error count."""
    config = AlexNetConfig(num_classes=4)
    torch.manual_seed(0)
    ours, hand = AlexNet(config), AlexNet(config)
    hand.load_state_dict(ours.state_dict())
    opt_ours = PaperSGD(paper_param_groups(ours), lr=0.01, momentum=0.9)
    opt_hand = PaperSGD(paper_param_groups(hand), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x, y = torch.randn(3, 3, 224, 224, generator=g) * 50, torch.randint(0, 4, (3,), generator=g)
        torch.manual_seed(10 + step)  # the same dropout masks
        loss, errors = train_step(ours, opt_ours, x, y, n=3)
        torch.manual_seed(10 + step)
        logits = hand(x)
        expected = F.cross_entropy(logits, y)  # §5: the mean over the batch
        opt_hand.zero_grad()
        expected.backward()
        opt_hand.step()
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=0)
        assert int(errors) == int((logits.argmax(1) != y).sum())
    for (name, p), q in zip(ours.named_parameters(), hand.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=name)
        torch.testing.assert_close(opt_ours.state[p]["velocity"], opt_hand.state[q]["velocity"],
                                   rtol=1e-5, atol=1e-9, msg=name)


def test_read_back_checks_every_pending_step_in_order(tmp_path):
    """The loop reads losses back every READ_EVERY steps: the guard still sees each step, and
    names the step whose loss went bad, not the step at which it was read."""
    task = Task(model=torch.nn.Linear(1, 1), step_fn=None, optimizer=None, images=28, classes=4, batches=None,
                validate=None, lr=None, finish=None)
    loop = Loop(task, Options(batch_size=4, epochs=1, seed=0, stuck_steps=1000), RunFolder(tmp_path),
                replicas=Distributed(), log=lambda s: None)
    sums = zero_sums()
    loop.position = {"epoch": 0, "batch": 2, "step": 7, "sums": sums}
    loop.pending = [(torch.tensor(1.5), torch.tensor(2), 4, 0), (torch.tensor(0.5), torch.tensor(1), 3, 1)]
    assert loop._read_back(False) is False
    assert sums == {"loss": 1.5 * 4 + 0.5 * 3, "errors": 3, "images": 7, "seconds": 0.0} and loop.pending == []
    loop.position["step"] = 10
    loop.pending = [(torch.tensor(v), torch.tensor(0), 4, k) for k, v in enumerate((1.0, float("nan"), 1.0))]
    with pytest.raises(TrainingStopped, match="loss became nan at step 9"):
        loop._read_back(False)


def test_bench_model_cpu_defaults_are_the_cpu_rows(monkeypatch, capsys):
    """With no --variants/--precisions on the CPU: torchvision in both layouts at fp32 and bf16,
    ours reference fp32, fast fp32 and bf16, each against torchvision at its precision; the rows
    of one precision are timed in interleaved rounds, in alternating order. (The steps are
    stubbed: this checks the table and the order, not the speed.)"""
    import reproduction.bench as bench
    built, timed = [], []

    def fake(variant, batch, precision, device):
        built.append((variant, precision))
        return (lambda: timed.append(variant)), None, None
    monkeypatch.setattr(bench, "ours_step", fake)
    monkeypatch.setattr(bench, "torchvision_step", lambda b, p, d, channels_last: fake(
        "torchvision-cl" if channels_last else "torchvision", b, p, d)[0])
    monkeypatch.setattr(bench, "step_times", lambda step, steps, **kw: [step() or 0.5 for _ in range(steps)])
    assert main(["model", "--device", "cpu", "--rounds", "2", "--steps", "1", "--warmup", "0"]) == 0
    header, *rows = table_rows(capsys.readouterr().out)
    assert built == [v for v in bench.CPU_ROWS]
    assert timed[:8] == ["torchvision", "torchvision-cl", "reference", "fast", "fast", "reference",
                         "torchvision-cl", "torchvision"]  # A B C D, D C B A
    assert [(r[2], r[3]) for r in rows] == [("32", p) for _, p in bench.CPU_ROWS]
    assert all(r[6] == "1.00× (1.00–1.00)" for r in rows)  # every stubbed step takes the same time
