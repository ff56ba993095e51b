"""Importing Caffe's bvlc_alexnet (reproduction/caffe.py), checked layer by layer against
computations in the file's own layout: HWIO kernels, BGR input, NHWC flatten, inverted dropout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reproduction.caffe import SHAPES, caffe_mean_rgb, main, read_npy
from reproduction.data import load_stats
from reproduction.runs import load_checkpoint, model_from_checkpoint

GROUPS = {"conv1": 1, "conv2": 2, "conv3": 1, "conv4": 2, "conv5": 2}
PADS = {"conv1": 0, "conv2": 2, "conv3": 1, "conv4": 1, "conv5": 1}


def synthetic_layers(seed: int = 0) -> dict:
    """Random arrays of the real shapes, std √(2/fan-in) so activations keep their size and the
    LRN (k=1) changes them visibly; biases nonzero so a dropped bias shows."""
    rng = np.random.default_rng(seed)
    layers = {}
    for name, shape in SHAPES.items():
        shape = tuple(1000 if s is None else s for s in shape)
        fan_in = int(np.prod(shape[:-1]))
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        layers[name] = [w, rng.uniform(-1, 1, shape[-1]).astype(np.float32)]
    return layers


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A synthetic bvlc_alexnet.npy saved as the ports' file is (a pickled dict with bytes keys
    inside .npy), a synthetic BGR mean, and the import of both."""
    root = tmp_path_factory.mktemp("caffe")
    layers = synthetic_layers()
    np.save(root / "bvlc_alexnet.npy", {k.encode(): v for k, v in layers.items()}, allow_pickle=True)
    mean_bgr = np.stack([np.full((256, 256), v) for v in (104.0, 117.0, 123.0)])
    mean_bgr[:, :10, :20] += 7.0  # a corner that shows whether the mean was flipped or moved
    np.save(root / "mean.npy", mean_bgr)
    assert main([str(root / "bvlc_alexnet.npy"), "--out", str(root / "ckpt" / "checkpoint.pt"),
                 "--mean", str(root / "mean.npy")]) == 0
    model, config = model_from_checkpoint(load_checkpoint(root / "ckpt" / "checkpoint.pt"))
    return layers, mean_bgr, model.eval(), config, root


def caffe_reference(layers: dict, x_bgr_nhwc: torch.Tensor, *, lrn_within_groups: bool) -> torch.Tensor:
    """Caffe's deploy net, written in the file's layout: NHWC BGR 227×227 input, HWIO kernels
    split into groups along in and out (as caffe-tensorflow does), LRN x/(1 + 2e-5·Σx²)^0.75 over
    5 maps, max-pool 3/2, NHWC flatten into fc6, inverted dropout (identity at test).
    lrn_within_groups=True clips each LRN window at the group boundary (what model.py does)."""
    t = {k: (torch.from_numpy(w).double(), torch.from_numpy(b).double()) for k, (w, b) in layers.items()}

    def conv(h, name):  # h: N×H×W×C
        w, b = t[name]
        g = GROUPS[name]
        outs = []
        for hi, wi in zip(h.chunk(g, dim=3), w.chunk(g, dim=3)):
            y = F.conv2d(hi.permute(0, 3, 1, 2), wi.permute(3, 2, 0, 1), stride=4 if name == "conv1" else 1,
                         padding=PADS[name])
            outs.append(y.permute(0, 2, 3, 1))
        return torch.relu(torch.cat(outs, dim=3) + b)

    def lrn(h, groups):  # across the channel axis (last), window 5 clipped at the edges
        outs = []
        for hi in h.chunk(groups, dim=3):
            sq = F.pad(hi * hi, (2, 2))
            s = sum(sq[..., i:i + hi.shape[3]] for i in range(5))
            outs.append(hi / (1.0 + 1e-4 / 5 * s) ** 0.75)
        return torch.cat(outs, dim=3)

    def pool(h):
        return F.max_pool2d(h.permute(0, 3, 1, 2), 3, 2).permute(0, 2, 3, 1)

    g = 2 if lrn_within_groups else 1
    h = pool(lrn(conv(x_bgr_nhwc.double(), "conv1"), g))
    h = pool(lrn(conv(h, "conv2"), g))
    h = pool(conv(conv(conv(h, "conv3"), "conv4"), "conv5"))
    h = h.reshape(len(h), -1)                                   # NHWC flatten, as the ports do
    h = torch.relu(h @ t["fc6"][0] + t["fc6"][1])
    h = torch.relu(h @ t["fc7"][0] + t["fc7"][1])
    return h @ t["fc8"][0] + t["fc8"][1]


def rgb_input(seed: int = 1, n: int = 2) -> torch.Tensor:
    """Mean-centred-like RGB images, N×3×227×227, large enough that the LRN matters."""
    return torch.from_numpy(np.random.default_rng(seed).uniform(-120, 120, (n, 3, 227, 227)).astype(np.float32))


def test_the_config_is_caffes_arithmetic(imported):
    _, _, model, config, _ = imported
    m, d = config.model, config.data
    assert (m.input_size, m.lrn, m.lrn_alpha, m.lrn_k, m.lrn_beta, m.lrn_size) == (227, "code", 1e-4, 1.0, 0.75, 5)
    assert m.lrn_scope == "all"  # Caffe's norm1/norm2 span both groups
    assert (d.crop, d.mean, d.lighting) == (227, "offset", "none")
    assert m.num_classes == 1000 and m.dropout == 0.5


def test_conv1_reads_rgb_and_matches_the_files_hwio_kernels(imported):
    layers, _, model, _, _ = imported
    x = rgb_input(n=1)
    with torch.no_grad():
        ours = torch.relu(torch.cat(model.conv1([x]), 1))[0]  # 96×55×55
    w, b = layers["conv1"]
    bgr = x[0].numpy()[::-1].transpose(1, 2, 0)  # H×W×C, BGR: what the ports feed
    for i, j, o in [(0, 0, 0), (54, 54, 95), (13, 40, 47), (27, 3, 48)]:
        patch = bgr[4 * i:4 * i + 11, 4 * j:4 * j + 11, :]
        direct = max(0.0, float(np.einsum("hwc,hwc->", patch.astype(np.float64), w[:, :, :, o])) + b[o])
        assert ours[o, i, j].item() == pytest.approx(direct, rel=1e-4, abs=1e-3)


def test_conv2_groups_as_caffe_does(imported):
    layers, _, model, _, _ = imported
    h = torch.from_numpy(np.random.default_rng(2).uniform(0, 5, (1, 96, 27, 27)).astype(np.float32))
    with torch.no_grad():
        out = torch.cat(model.conv2(list(h.chunk(2, 1))), 1)[0]
    w, b = layers["conv2"]
    padded = np.pad(h[0].numpy().astype(np.float64), ((0, 0), (2, 2), (2, 2)))
    for i, j, o in [(0, 0, 0), (13, 13, 127), (26, 5, 128), (3, 26, 255)]:
        maps = slice(0, 48) if o < 128 else slice(48, 96)  # group 2's outputs read maps 48-95 only
        direct = np.einsum("chw,hwc->", padded[maps, i:i + 5, j:j + 5], w[:, :, :, o]) + b[o]
        assert out[o, i, j].item() == pytest.approx(direct, rel=1e-4, abs=1e-3)
    changed = h.clone()
    changed[:, :48] += 1.0  # group 1's input maps
    with torch.no_grad():
        out2 = torch.cat(model.conv2(list(changed.chunk(2, 1))), 1)[0]
    assert torch.equal(out2[128:], out[128:]) and not torch.equal(out2[:128], out[:128])


def test_fc6_rows_are_permuted_from_the_ports_nhwc_flatten(imported):
    layers, _, model, _, _ = imported
    pool5 = torch.from_numpy(np.random.default_rng(3).uniform(0, 3, (2, 256, 6, 6)).astype(np.float32))
    with torch.no_grad():
        ours = torch.cat(model.fc6([pool5.flatten(1)]), 1)
    w, b = layers["fc6"]
    nhwc = pool5.permute(0, 2, 3, 1).reshape(2, -1).double().numpy()  # tf.reshape of N×6×6×256
    assert np.allclose(ours.double().numpy(), nhwc @ w + b, rtol=1e-4, atol=1e-3)


def test_the_whole_net_is_caffes_function(imported):
    """Every layer at once (fc7/fc8's ×2 against our ×0.5 dropout, LRN windows across both groups
    as Caffe's norm1/norm2 run them), against the reference in the file's own layout."""
    layers, _, model, _, _ = imported
    x = rgb_input()
    with torch.no_grad():
        ours = model(x).double()
    ref = caffe_reference(layers, x.flip(1).permute(0, 2, 3, 1), lrn_within_groups=False)
    assert ref.std() > 1.0  # a live net, not one that collapsed to its biases
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # ...and the paper's per-tower LRN would not be: the reference tells the two apart.
    within = caffe_reference(layers, x.flip(1).permute(0, 2, 3, 1), lrn_within_groups=True)
    assert not torch.allclose(within, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_the_mean_is_written_as_rgb_beside_the_checkpoint(imported):
    _, mean_bgr, _, _, root = imported
    stats = load_stats(root / "ckpt")
    assert torch.equal(stats.mean, torch.from_numpy(mean_bgr[::-1].astype(np.float32)))
    assert stats.mean[2, 0, 0] == 104.0 + 7.0 and stats.mean[0, 100, 100] == 123.0  # B last, R first
    assert torch.equal(stats.eigval, torch.zeros(3, dtype=torch.float64))  # trained without relighting


def test_the_real_caffe_mean_is_read(shared_data):
    mean = caffe_mean_rgb(shared_data / "constants" / "ilsvrc_2012_mean.npy")
    assert mean.shape == (3, 256, 256) and mean.dtype == np.float32
    # README: channel means B 104.01, G 116.67, R 122.68 -> RGB order after the import
    assert np.allclose(mean.mean(axis=(1, 2)), [122.68, 116.67, 104.01], atol=0.01)


def test_bad_files_get_clear_errors(tmp_path):
    np.save(tmp_path / "short.npy", {"conv1": [np.zeros((11, 11, 3, 96)), np.zeros(96)]}, allow_pickle=True)
    with pytest.raises(ValueError, match="no layer"):
        read_npy(tmp_path / "short.npy")
    layers = {name: [np.zeros(1), np.zeros(1)] for name in SHAPES}  # checked in order: conv2 fails first
    layers["conv1"] = [np.zeros((11, 11, 3, 96)), np.zeros(96)]
    layers["conv2"] = [np.zeros((5, 5, 256, 48)), np.zeros(256)]  # in and out swapped
    np.save(tmp_path / "swapped.npy", layers, allow_pickle=True)
    with pytest.raises(ValueError, match="conv2 weights"):
        read_npy(tmp_path / "swapped.npy")
    assert main([str(tmp_path / "absent.npy"), "--out", str(tmp_path / "c.pt")]) == 2
