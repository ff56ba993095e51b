"""Export a checkpoint's net to ONNX, for inference runtimes (onnxruntime, TensorRT, OpenVINO):

    python -m reproduction.export CHECKPOINT --onnx FILE
    reproduction.export.to_onnx(model, FILE)

The graph is the paper's net at test time, each mechanism as the runtimes' own operator:
- conv2, conv4 and conv5 are grouped `Conv` nodes (group 2: each tower reads only its own
  maps, §3.2); conv1, conv3 and fc6-fc8 read every map, as one `Conv` / `Gemm` each;
- each tower's response normalisation (§3.3) is one ONNX `LRN` node. ONNX, like Caffe and
  Krizhevsky's code, divides alpha by size, so ONNX's alpha is the config's α (`form="code"`;
  α·size for the literal `form="paper"`), its bias is k;
- dropout at test time is §4.2's ×0.5 (a `Mul`);
- the input "image" is N×3×224×224 float32, mean-subtracted as `transforms()` makes it (the
  batch dimension is dynamic); the output "logits" is N×classes (softmax not applied).

The net's own forward is traced: each tower layer is swapped for one grouped operation over
both towers' maps, which computes the same numbers.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reproduction.errors import UserError, run_cli, writable_file
from reproduction.model import AlexNet, LocalResponseNorm, Towers, TowerConv2d
from reproduction.training.checkpoints import load_checkpoint, model_from_checkpoint

OPSET = 18


class Merged(nn.Module):
    """A tower layer as one operation over the towers' concatenated maps: a grouped convolution
    (groups = towers) where each tower reads its own maps, a whole one where it reads all."""

    def __init__(self, layer: Towers) -> None:
        super().__init__()
        self.conv = isinstance(layer, TowerConv2d)
        self.stride, self.padding = (layer.stride, layer.padding) if self.conv else (1, 0)
        self.groups = 1 if layer.cross else layer.towers
        self.weight = nn.Parameter(torch.cat([w.detach() for w in layer.parts("weight")]), requires_grad=False)
        self.bias = nn.Parameter(torch.cat([b.detach() for b in layer.parts("bias")]), requires_grad=False)

    def forward(self, h: list[Tensor]) -> list[Tensor]:
        x = torch.cat(h, dim=1) if len(h) > 1 else h[0]
        if self.conv:
            return [F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding, groups=self.groups)]
        return [F.linear(x, self.weight, self.bias)]


class GroupedLRN(nn.Module):
    """§3.3's LRN over the towers' concatenated maps, each tower's window stopping at its edge:
    the reproduction::lrn operator with groups = towers (one ONNX LRN node per tower)."""

    def __init__(self, lrn: LocalResponseNorm, groups: int) -> None:
        super().__init__()
        self.size, self.beta, self.k, self.groups = lrn.size, lrn.beta, lrn.k, groups
        self.alpha = lrn.alpha * lrn.size if lrn.form == "paper" else lrn.alpha

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.reproduction.lrn(x, self.size, self.alpha, self.beta, self.k, self.groups)


def deployable(model: AlexNet) -> AlexNet:
    """A copy of `model` on the CPU in eval mode whose tower layers are Merged and whose LRNs
    are GroupedLRN: the same function, as single tensors."""
    net = copy.deepcopy(model).cpu().eval()
    net.place("cpu")
    towers = net.config.towers if net.config.lrn_scope == "tower" else 1
    for name, module in list(net.named_children()):
        if isinstance(module, Towers):
            setattr(net, name, Merged(module))
        elif isinstance(module, LocalResponseNorm):
            setattr(net, name, GroupedLRN(module, towers))
    return net


def _onnx_lrn(x, size: int, alpha: float, beta: float, k: float, groups: int):
    """reproduction::lrn as ONNX: one LRN node per group (Split and Concat around them)."""
    from onnxscript import opset18 as op
    if groups == 1:
        return op.LRN(x, size=size, alpha=alpha, beta=beta, bias=k)
    parts = op.Split(x, axis=1, num_outputs=groups)
    return op.Concat(*[op.LRN(p, size=size, alpha=alpha, beta=beta, bias=k) for p in parts], axis=1)


def to_onnx(model: AlexNet, path: str | Path) -> Path:
    """Write `model` (plain or fused LRN, any device) as an ONNX graph to `path`."""
    net = deployable(model)
    size = net.config.input_size
    example = torch.zeros(2, net.config.in_channels, size, size)
    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=["image"], output_names=["logits"],
                                dynamic_shapes=({0: batch},), opset_version=OPSET,
                                custom_translation_table={torch.ops.reproduction.lrn.default: _onnx_lrn},
                                verbose=False)
    program.save(str(path))
    return Path(path)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduction.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint.pt of this project (trained, or from reproduction.caffe)")
    parser.add_argument("--onnx", type=Path, required=True, metavar="FILE", help="the ONNX file to write")
    args = parser.parse_args(argv)
    writable_file(args.onnx, "--onnx", inputs=[args.checkpoint])
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise UserError("exporting needs the onnx and onnxscript packages: pip install -r requirements.txt") from None
    model, config = model_from_checkpoint(load_checkpoint(args.checkpoint), path=args.checkpoint)
    to_onnx(model, args.onnx)
    print(f"{args.checkpoint} -> {args.onnx}: input image N×{config.model.in_channels}×{config.model.input_size}×"
          f"{config.model.input_size} (mean-subtracted), output logits N×{config.model.num_classes}; opset {OPSET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
