"""ONNX export (reproduction/export.py): the graph holds ONNX's own LRN per tower and grouped
convolutions, and onnxruntime computes what the PyTorch net computes on real photographs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reproduction.config import PAPER, DataConfig, RunConfig, override
from reproduction.export import main as export_main
from reproduction.model import AlexNet
from reproduction.training import checkpoints
from reproduction import weights

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def checkpoint(tmp_path: Path, changes: dict, seed: int = 0) -> tuple[Path, AlexNet]:
    config = override(RunConfig(), {"num_classes": 10, **changes})
    torch.manual_seed(seed)
    model = AlexNet(config.model)
    with torch.no_grad():  # logits of a visible spread, as a trained net's
        model.fc8.weight_a.mul_(20)
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    checkpoints.save_checkpoint(path, {"model": model.state_dict(), "config": checkpoints.config_dict(config),
                                       "epoch": 1})
    return path, model.eval()


def photographs(shared: Path, n: int) -> torch.Tensor:
    """n real ImageNet photographs as the net's input: §2's 256 view, the centre patch, minus a mean."""
    view = weights.TestTransform(torch.full((3, 256, 256), 115.0), DataConfig())
    files = sorted((shared / "imagenet-sample").glob("*.JPEG"))[:n]
    return torch.stack([view(Image.open(f)) for f in files])


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": x.numpy()})[0]


@pytest.mark.parametrize("fused", [False, True])
def test_export_agrees_with_the_net_on_photographs(shared_data, tmp_path, capsys, fused):
    """onnxruntime against the PyTorch net (plain or fused LRN) on real photographs, at two
    batch sizes; and the graph: ONNX's LRN per tower with the paper's constants in ONNX's
    convention, group-2 convolutions where a tower reads only its own maps, §4.2's ×0.5."""
    path, model = checkpoint(tmp_path, {"fused_lrn": fused})
    model.set_fused_lrn(fused)
    out = tmp_path / "alexnet.onnx"
    assert export_main([str(path), "--onnx", str(out)]) == 0
    assert "input image N×3×224×224" in capsys.readouterr().out
    x = photographs(shared_data, 5)
    for batch in (x[:1], x):  # the batch dimension is dynamic
        with torch.no_grad():
            want = model(batch).numpy()
        got = run_onnx(out, batch)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + 1e-6
    assert (got.argmax(1) == want.argmax(1)).all()
    check_graph(onnx.load(str(out)).graph)


def check_graph(graph) -> None:
    ops = Counter(n.op_type for n in graph.node)
    assert ops["LRN"] == 4 and "Dropout" not in ops and "AveragePool" not in ops and "Pow" not in ops
    for node in (n for n in graph.node if n.op_type == "LRN"):  # ONNX divides alpha by size, as the code
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["size"] == 5 and attrs["alpha"] == pytest.approx(PAPER.lrn_alpha)
        assert attrs["beta"] == pytest.approx(0.75) and attrs["bias"] == pytest.approx(2.0)
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1) for n in graph.node if n.op_type == "Conv"]
    assert groups == [1, 2, 1, 2, 2]  # conv1, conv2, conv3, conv4, conv5 (§3.2)
    assert ops["Gemm"] == 3 and ops["Mul"] == 2  # fc6-fc8; §4.2's ×0.5 after fc6 and fc7
    (image,) = graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and dims[1:] == [3, 224, 224] and isinstance(dims[0], str)
    assert [o.name for o in graph.output] == ["logits"]


def test_one_tower_without_lrn_exports_too(shared_data, tmp_path):
    path, model = checkpoint(tmp_path, {"towers": 1, "lrn": "none"}, seed=1)
    out = tmp_path / "one.onnx"
    assert export_main([str(path), "--onnx", str(out)]) == 0
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert "LRN" not in ops and "Split" not in ops
    x = photographs(shared_data, 2)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(run_onnx(out, x) - want).max() <= 1e-5 * np.abs(want).max() + 1e-6


def test_export_refuses_bad_paths_in_one_line(tmp_path, capsys):
    assert export_main([str(tmp_path / "none.pt"), "--onnx", str(tmp_path / "a.onnx")]) == 2
    assert capsys.readouterr().err.startswith("error: no checkpoint at")
    path, _ = checkpoint(tmp_path, {})
    assert export_main([str(path), "--onnx", str(path)]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert not (tmp_path / "a.onnx").exists()
