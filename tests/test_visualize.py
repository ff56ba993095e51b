"""reproduction.visualize: Fig. 3's conv1 grid and colour score, Fig. 4's fc7 neighbours (§6.1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from packing import colour_set
from PIL import Image

from reproduction.config import RunConfig, override
from reproduction.data import PackedSet, eval_batches, load_stats
from reproduction.model import AlexNet
from reproduction.training.checkpoints import config_dict, save_checkpoint
from reproduction.visualize import (
    centre_views,
    colour_specificity,
    fc7_features,
    filter_grid,
    main,
    nearest,
    neighbour_grid,
)

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")


def make_checkpoint(folder, *, towers: int, seed: int = 0):
    """A randomly initialised 4-class net in the run-folder format. init_std 0.02 and bias 0.1
    (as in test_predict) so fc7 differs clearly between images rather than being all bias."""
    config = override(RunConfig(), {"num_classes": 4, "towers": towers, "init_std": 0.02, "init_bias": 0.1})
    torch.manual_seed(seed)
    model = AlexNet(config.model)
    folder.mkdir(parents=True)
    save_checkpoint(folder / "checkpoint.pt", {"model": model.state_dict(), "optimizer": None, "position": None,
                                               "config": config_dict(config), "epoch": 0})
    return folder / "checkpoint.pt", model.eval(), config


@pytest.fixture(scope="module")
def two_tower(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("two") / "run", towers=2)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    """8 train and 4 val images of 4 colour classes (32 px, upsampled to 256 at load)."""
    return colour_set(tmp_path_factory.mktemp("tiny"), train=8, val=4, seed=0)


# ------------------------------------------------------------------------- colour specificity

def test_colour_specificity_is_0_for_grey_1_for_pure_chroma_and_the_chroma_share_between():
    g = torch.Generator().manual_seed(0)
    grey = torch.randn(1, 1, 11, 11, generator=g).expand(1, 3, 11, 11)  # R = G = B at every pixel
    raw = torch.randn(1, 3, 11, 11, generator=g)
    chroma = raw - raw.mean(dim=1, keepdim=True)  # every pixel sums to 0 over R, G, B
    # grey ⟂ chroma, so a·grey + b·chroma has chroma share b²|chroma|² / (a²|grey|² + b²|chroma|²)
    a2, b2 = 1 / grey.square().sum(), 3 / chroma.square().sum()  # energies 1 and 3 → 0.75
    mixed = a2.sqrt() * grey + b2.sqrt() * chroma
    scores = colour_specificity(torch.cat([grey, chroma, mixed, torch.zeros(1, 3, 11, 11)]))
    torch.testing.assert_close(scores, torch.tensor([0.0, 1.0, 0.75, 0.0]), atol=1e-6, rtol=0)
    # scale does not matter, and i.i.d. weights average 2/3 (the docstring's chance level)
    torch.testing.assert_close(colour_specificity(mixed * 1e-4), torch.tensor([0.75]), atol=1e-6, rtol=0)
    random = colour_specificity(torch.randn(2000, 3, 11, 11, generator=g))
    assert abs(random.mean().item() - 2 / 3) < 0.01


def test_colour_specificity_refuses_non_rgb_kernels():
    with pytest.raises(ValueError, match="N×3×h×w"):
        colour_specificity(torch.zeros(4, 48, 5, 5))


# ------------------------------------------------------------------------------ filter grid

def test_filter_grid_puts_tower_a_above_tower_b_16_per_row():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 3, 11, 11, generator=g) * 0.01
    ramp = torch.arange(11.0)
    w[0] = 0
    w[0, 0] = ramp.expand(11, 11)        # kernel 0: red growing to the right
    w[48] = 0
    w[48, 2] = ramp[:, None].expand(11, 11)  # kernel 48: blue growing downwards
    scale, gap, tower_gap = 4, 2, 10
    image = filter_grid(w, towers=2, scale=scale, gap=gap, tower_gap=tower_gap)
    c = 11 * scale
    block = 3 * c + 2 * gap  # 3 rows of 16 per tower
    assert image.shape == (2 * gap + 2 * block + tower_gap, 2 * gap + 16 * c + 15 * gap, 3) == (286, 738, 3)
    assert image.dtype == np.uint8

    def tile(top, left):
        return image[top:top + c, left:left + c]

    expected = np.zeros((c, c, 3), np.uint8)
    expected[..., 0] = np.repeat(np.round(np.arange(11) / 10 * 255), scale)[None, :]
    np.testing.assert_array_equal(tile(gap, gap), expected)                      # kernel 0: top-left
    expected = np.zeros((c, c, 3), np.uint8)
    expected[..., 2] = np.repeat(np.round(np.arange(11) / 10 * 255), scale)[:, None]
    np.testing.assert_array_equal(tile(gap + block + tower_gap, gap), expected)  # kernel 48: first of the lower block
    # every kernel is stretched to 0..255 on its own; gaps are background
    for i in range(96):
        t, j = divmod(i, 48)
        top = gap + t * (block + tower_gap) + (j // 16) * (c + gap)
        left = gap + (j % 16) * (c + gap)
        assert tile(top, left).min() == 0 and tile(top, left).max() == 255, i
    assert (image[:, gap + c:gap + c + gap] == 255).all()                         # between columns 0 and 1
    assert (image[gap + block:gap + block + tower_gap] == 255).all()              # between the towers


def test_filter_grid_one_tower_and_bad_splits():
    w = torch.randn(48, 3, 11, 11, generator=torch.Generator().manual_seed(2))
    assert filter_grid(w, towers=1, scale=2, gap=1).shape == (2 + 3 * 22 + 2, 2 + 16 * 22 + 15, 3)
    assert filter_grid(w[:8], towers=2, scale=1, gap=1).shape == (2 + 2 * 11 + 10, 2 + 4 * 11 + 3, 3)  # 4 per row
    with pytest.raises(ValueError, match="do not divide"):
        filter_grid(w[:5], towers=2)


# ------------------------------------------------------------------------------- neighbours

def test_nearest_on_a_hand_made_bank_in_any_chunk_size():
    queries = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    bank = torch.tensor([[3.0, 4.0], [0.0, -2.0], [9.0, 9.0], [100.0, 0.0], [1.0, 0.0], [10.0, 13.0]])
    for chunk in (1, 2, 4, 100):
        d, i = nearest(queries, bank, k=3, chunk=chunk)
        assert i.tolist() == [[4, 1, 0], [2, 5, 0]], chunk
        torch.testing.assert_close(d, torch.tensor([[1.0, 2.0, 5.0], [2 ** 0.5, 3.0, 85 ** 0.5]]))
    d, i = nearest(queries, bank.half(), k=1)  # a float16 bank (memory) gives the same answer here
    assert i.tolist() == [[4], [2]]
    ties = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # all at distance 1: lower index first
    assert nearest(queries[:1], ties, k=3, chunk=2)[1].tolist() == [[0, 1, 2]]
    with pytest.raises(ValueError, match="k must be"):
        nearest(queries, bank, k=7)


def test_fc7_features_are_what_fc8_reads(two_tower, tiny_set):
    """fc7 after the ReLU: in eval mode fc8 sees exactly these, times drop7's 0.5 (§4.2)."""
    _, model, config = two_tower
    dataset = PackedSet(tiny_set, "val")
    x = centre_views(dataset, [0, 1], load_stats(tiny_set), config.data)
    feats = fc7_features(model, x)
    assert feats.shape == (2, 4096) and (feats >= 0).all() and (feats > 0).any()
    with torch.no_grad():
        (logits,) = model.fc8([feats * (1 - config.model.dropout)])
        torch.testing.assert_close(logits, model(x))


def test_centre_views_match_eval_batches(tiny_set):
    dataset, stats = PackedSet(tiny_set, "train"), load_stats(tiny_set)
    config = RunConfig().data
    (x, _), *_ = eval_batches(dataset, stats, config, batch_size=8, workers=0)
    torch.testing.assert_close(centre_views(dataset, [2, 5], stats, config), x[[2, 5]], rtol=0, atol=0)


def test_neighbour_grid_size_and_placement():
    images = torch.arange(2 * 4, dtype=torch.uint8).reshape(2, 4, 1, 1, 1).expand(2, 4, 3, 5, 5) * 10
    grid = neighbour_grid(images, gap=1, query_gap=6)
    assert grid.shape == (2 + 2 * 5 + 1, 2 + 4 * 5 + 2 + 6, 3)
    assert (grid[1:6, 1:6] == 0).all() and (grid[1:6, 12:17] == 10).all()   # query, first neighbour
    assert (grid[7:12, 30 - 6:30 - 1] == 70).all()                           # last neighbour of row 2
    assert (grid[:, 6:12] == 255).all()                                      # the gap after the query


# ---------------------------------------------------------------------------- command line

def test_filters_command_writes_png_and_scores(two_tower, tmp_path, capsys):
    checkpoint, model, _ = two_tower
    out = tmp_path / "fig" / "conv1.png"
    assert main(["filters", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert Image.open(out).size == (738, 286) and Image.open(out).mode == "RGB"
    result = json.loads(out.with_suffix(".json").read_text())
    expected = colour_specificity(model.state_dict()["conv1.weight"])
    np.testing.assert_allclose(result["scores"], expected.numpy(), atol=1e-6)
    assert [t["tower"] for t in result["per_tower"]] == ["A", "B"] and [t["n"] for t in result["per_tower"]] == [48, 48]
    for t, part in zip(result["per_tower"], expected.chunk(2)):
        assert t["mean"] == pytest.approx(part.mean().item()) and t["sd"] == pytest.approx(part.std().item())
        assert abs(t["mean"] - 2 / 3) < 0.05  # random weights: chance level
        assert f"tower {t['tower']}: {t['mean']:.3f} ± {t['sd']:.3f}" in printed


def test_filters_command_on_a_one_tower_net(tmp_path, capsys):
    checkpoint, _, _ = make_checkpoint(tmp_path / "one", towers=1)
    out = tmp_path / "conv1.png"
    assert main(["filters", "--checkpoint", str(checkpoint), "--out", str(out), "--scale", "2"]) == 0
    assert Image.open(out).size == (2 * 2 + 16 * 22 + 15 * 2, 2 * 2 + 3 * 22 + 2 * 2)
    assert [t["n"] for t in json.loads(out.with_suffix(".json").read_text())["per_tower"]] == [48]
    assert "tower B" not in capsys.readouterr().out


def test_neighbours_command_matches_a_direct_search(two_tower, tiny_set, tmp_path, capsys):
    checkpoint, model, config = two_tower
    out = tmp_path / "nn.png"
    code = main(["neighbours", "--checkpoint", str(checkpoint), "--data", str(tiny_set), "--out", str(out),
                 "--queries", "2", "--k", "3", "--thumb", "16", "--batch-size", "3", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    assert Image.open(out).size == (2 * 2 + 4 * 16 + 2 * 2 + 10, 2 * 2 + 2 * 16 + 2)
    assert "8/8 images" in printed and "images/s" in printed
    result = json.loads(out.with_suffix(".json").read_text())
    assert [q["query"] for q in result["queries"]] == [0, 3]  # spread over the 4 val images
    stats = load_stats(tiny_set)
    bank = torch.cat([fc7_features(model, x) for x, _ in
                      eval_batches(PackedSet(tiny_set, "train"), stats, config.data, batch_size=8, workers=0)])
    q = fc7_features(model, centre_views(PackedSet(tiny_set, "val"), [0, 3], stats, config.data))
    d, i = nearest(q, bank, k=3)
    assert [r["neighbours"] for r in result["queries"]] == i.tolist()
    np.testing.assert_allclose([r["distances"] for r in result["queries"]], d.numpy(), rtol=1e-4)


def test_a_training_image_is_its_own_nearest_neighbour(two_tower, tiny_set, tmp_path, capsys):
    checkpoint, _, _ = two_tower
    out = tmp_path / "self.png"
    assert main(["neighbours", "--checkpoint", str(checkpoint), "--data", str(tiny_set), "--out", str(out),
                 "--split", "train", "--indices", "5", "--k", "2", "--thumb", "16", "--device", "cpu"]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["queries"]
    assert row["neighbours"][0] == 5 and row["distances"][0] < 1e-3 * row["distances"][1]
    grid = np.asarray(Image.open(out))
    np.testing.assert_array_equal(grid[2:18, 2:18], grid[2:18, 28:44])  # the query drawn again as neighbour 1
    code = main(["neighbours", "--checkpoint", str(checkpoint), "--data", str(tiny_set), "--out", str(out),
                 "--queries", "2", "--k", "9", "--device", "cpu"])
    assert code == 2 and "--k must be in [1, 8]" in capsys.readouterr().err


def test_report_shows_each_filter_picture_with_its_tower_scores(tmp_path):
    from reproduction import report
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "fig3.png").write_bytes(b"")
    per_tower = [{"tower": "A", "mean": 0.2, "sd": 0.05, "n": 48}, {"tower": "B", "mean": 0.7, "sd": 0.05, "n": 48}]
    (tmp_path / "runs" / "fig3.json").write_text(json.dumps(
        {"checkpoint": "runs/x/checkpoint.pt", "epochs_trained": 9, "towers": 2, "kernel_shape": [3, 11, 11],
         "image": "results/runs/fig3.png", "per_tower": per_tower, "scores": []}))
    lines = "\n".join(report.filter_sections(tmp_path))
    assert "![](runs/fig3.png)" in lines and "0.200 ± 0.050 (48)" in lines and "0.700 ± 0.050 (48)" in lines
    assert "+0.500 (beyond 2 s.e.)" in lines
    assert report.filter_sections(tmp_path / "runs" / "missing") == []
