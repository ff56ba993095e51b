"""Importing Caffe's bvlc_alexnet (reproduction/caffe.py), checked layer by layer against
computations in the file's own layout: HWIO kernels, BGR input, NHWC flatten, inverted dropout
(the ports' .npy); and the .caffemodel route, on files written by tests/caffe_wire.py (an
independent protobuf wire encoder) in both layer formats, against the .npy route and against
Caffe's net computed in Caffe's own layout (OIHW, BGR, NCHW flatten)."""

from __future__ import annotations

import contextlib
import hashlib
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import caffe_wire
import reproduction
from reproduction.caffe import (BVLC_SHA1, BVLC_URL, CAFFE_CHANNEL_MEAN_BGR, SHAPES, caffe_mean_rgb, check_prototxt,
                               main, read_npy)
from reproduction.data import load_stats
from reproduction.training.checkpoints import load_checkpoint, model_from_checkpoint
from reproduction.weights import BVLC

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


def test_the_default_mean_is_the_mean_images_channel_means(shared_data):
    """CAFFE_CHANNEL_MEAN_BGR (used when no mean file is given) is what Caffe's own mean image
    averages to, channel by channel."""
    image = np.load(shared_data / "constants" / "ilsvrc_2012_mean.npy").astype(np.float64)
    assert np.allclose(image.mean(axis=(1, 2)), CAFFE_CHANNEL_MEAN_BGR, rtol=0, atol=1e-6)
    default = caffe_mean_rgb(None)
    assert default.shape == (3, 256, 256) and default.dtype == np.float32
    assert np.array_equal(default[:, 0, 0], np.float32(CAFFE_CHANNEL_MEAN_BGR[::-1]))
    # the size of the departure as caffe.py's comment and README's Departures state it: the centre crop
    off = (256 - 227) // 2
    gap = np.abs(image - image.mean(axis=(1, 2), keepdims=True))[:, off:off + 227, off:off + 227]
    assert round(gap.mean(), 1) == 4.6 and round(gap.max(), 1) == 13.9


def test_the_cli_needs_no_mean_file_and_its_errors_name_flags(imported, tmp_path, capsys):
    _, _, _, _, root = imported
    assert main([str(root / "bvlc_alexnet.npy"), "--out", str(tmp_path / "c" / "checkpoint.pt")]) == 0
    assert "per-channel" in capsys.readouterr().out
    stats = load_stats(tmp_path / "c")
    assert torch.equal(stats.mean, torch.from_numpy(caffe_mean_rgb(None)))
    assert "per-channel" in str(np.load(tmp_path / "c" / "stats.npz")["source"])
    assert main([str(root / "bvlc_alexnet.npy"), "--out", str(tmp_path / "d" / "checkpoint.pt"),
                 "--mean", str(tmp_path / "absent.npy")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --mean ") and "leave --mean out" in err and "mean=" not in err.replace("--mean", "")
    assert main([str(root / "bvlc_alexnet.npy"), "--out", str(tmp_path / "e" / "checkpoint.pt"),
                 "--prototxt", str(tmp_path / "deploy.prototxt")]) == 2
    assert "leave --prototxt out" in capsys.readouterr().err


def test_help_says_where_bvlcs_file_comes_from(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert BVLC_URL in out and BVLC_SHA1 in out and "--mean" in out


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


# ------------------------------------------------------------------------ the .caffemodel route

@pytest.fixture(scope="module")
def caffemodels(tmp_path_factory):
    """Random Caffe-layout weights of bvlc_alexnet's shapes, written as a V1-format .caffemodel
    (legacy 4-D blob dims, as bvlc's own file), a current-format one (shape{dim}), and the .npy
    caffe-tensorflow would make of them; each imported with main()."""
    root = tmp_path_factory.mktemp("caffemodel")
    blobs = caffe_wire.caffe_blobs(seed=4)
    mean = np.stack([np.full((256, 256), v) for v in (104.0, 117.0, 123.0)])
    np.save(root / "mean.npy", mean)
    np.save(root / "ports.npy", {k.encode(): v for k, v in caffe_wire.ports_layout(blobs).items()}, allow_pickle=True)
    (root / "deploy.prototxt").write_text(DEPLOY)
    files = {"v1": root / "v1.caffemodel", "current": root / "current.caffemodel", "npy": root / "ports.npy"}
    caffe_wire.write_caffemodel(files["v1"], blobs, v1=True)
    caffe_wire.write_caffemodel(files["current"], blobs, v1=False)
    nets, sources = {}, {}
    for kind, path in files.items():
        extra = ["--prototxt", str(root / "deploy.prototxt")] if kind == "current" else []
        with contextlib.redirect_stdout(io.StringIO()) as said:
            assert main([str(path), "--out", str(root / kind / "checkpoint.pt"), "--mean", str(root / "mean.npy"),
                         *extra]) == 0
        state = load_checkpoint(root / kind / "checkpoint.pt")
        nets[kind] = model_from_checkpoint(state)[0].eval()
        sources[kind] = state["source"] | {"sha1_here": hashlib.sha1(path.read_bytes()).hexdigest(),
                                           "checkpoint": root / kind / "checkpoint.pt", "said": said.getvalue()}
    for kind in ("v1", "current"):
        files[kind].unlink()  # 244 MB each
    return blobs, nets, sources


def test_every_layer_lands_where_the_npy_import_puts_it(caffemodels):
    _, nets, _ = caffemodels
    ref = nets["npy"].state_dict()
    for kind in ("v1", "current"):
        state = nets[kind].state_dict()
        assert state.keys() == ref.keys()
        for k in ref:
            assert torch.equal(state[k], ref[k]), (kind, k)


def test_caffe_blobs_arrive_unchanged_but_for_bgr_and_dropout(caffemodels):
    """Composed, the two layout changes cancel: Caffe's OIHW kernels and its NCHW-flattened fc6
    are our layout already; conv1's input maps go BGR → RGB, fc7/fc8 ×2 (§4.2's test-time ×0.5)."""
    blobs, nets, _ = caffemodels
    state = nets["v1"].state_dict()
    for name, (w, b) in blobs.items():
        expected = {"conv1": w[:, ::-1], "fc7": 2 * w, "fc8": 2 * w}.get(name, w)
        assert torch.equal(state[f"{name}.weight"], torch.from_numpy(np.ascontiguousarray(expected))), name
        assert torch.equal(state[f"{name}.bias"], torch.from_numpy(b)), name


def caffe_nchw_reference(blobs: dict, x_bgr: torch.Tensor) -> torch.Tensor:
    """Caffe's deploy net in Caffe's own layout: N×3×227×227 BGR, OIHW kernels with groups, LRN
    across all maps (window 5, 1 + 2e-5·Σx²), max-pool 3/2, NCHW flatten, dropout = identity."""
    t = {k: (torch.from_numpy(w).double(), torch.from_numpy(b).double()) for k, (w, b) in blobs.items()}

    def conv(h, name):
        c = caffe_wire.CONV[name]
        return torch.relu(F.conv2d(h, *t[name], stride=c["s"], padding=c["p"], groups=c["g"]))

    def lrn(h):
        sq = F.pad(h * h, (0, 0, 0, 0, 2, 2))
        s = sum(sq[:, i:i + h.shape[1]] for i in range(5))
        return h / (1.0 + 1e-4 / 5 * s) ** 0.75

    pool = lambda h: F.max_pool2d(h, 3, 2)
    h = pool(lrn(conv(x_bgr.double(), "conv1")))
    h = pool(lrn(conv(h, "conv2")))
    h = pool(conv(conv(conv(h, "conv3"), "conv4"), "conv5")).flatten(1)
    h = torch.relu(F.linear(h, *t["fc6"]))
    h = torch.relu(F.linear(h, *t["fc7"]))
    return F.linear(h, *t["fc8"])


def test_logits_are_caffes_and_the_npy_routes(caffemodels):
    blobs, nets, _ = caffemodels
    x = rgb_input(seed=5)
    with torch.no_grad():
        ours = {kind: net(x) for kind, net in nets.items()}
    ref = caffe_nchw_reference(blobs, x.flip(1))
    assert ref.std() > 1.0
    torch.testing.assert_close(ours["v1"].double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert torch.equal(ours["v1"], ours["npy"]) and torch.equal(ours["current"], ours["npy"])


def test_the_checkpoint_says_where_it_came_from(caffemodels):
    _, _, sources = caffemodels
    for kind in ("v1", "current"):
        s = sources[kind]
        assert s["format"] == "caffemodel" and s["weights_sha1"] == s["sha1_here"]
        assert s["bvlc_alexnet"] is False  # random weights: not BVLC's sha1
        assert f"not BVLC's own file: sha1 {s['weights_sha1']}, BVLC's is {BVLC_SHA1}" in s["said"]
    assert sources["current"]["prototxt"].endswith("deploy.prototxt")
    assert sources["npy"]["format"] == "npy" and sources["npy"]["bvlc_alexnet"] is None


def test_an_imported_checkpoint_carries_bvlcs_record(caffemodels):
    _, nets, sources = caffemodels
    model = reproduction.alexnet(weights=sources["v1"]["checkpoint"])
    assert torch.equal(model.state_dict()["fc6.weight"], nets["v1"].state_dict()["fc6.weight"])
    w = model.weights
    assert w.recipe == BVLC["recipe"] and w.reported == BVLC["reported"] and w.metrics == []
    assert "not BVLC's bvlc_alexnet.caffemodel" in w.licence and w.source["format"] == "caffemodel"
    assert len(w.classes) == 1000 and w.mean[0, 0, 0] == 123.0  # stats.npz beside it, RGB
    assert w.transforms()(torch.zeros(3, 256, 256, dtype=torch.uint8)).shape == (3, 227, 227)


def small_blobs(**shapes) -> dict:
    """Blobs too small for AlexNet: the layer-list checks come before the blob checks."""
    blobs = {name: (np.zeros(1, np.float32), np.zeros(1, np.float32)) for name in caffe_wire.SHAPES}
    blobs["fc8"] = (np.zeros(1, np.float32), np.zeros(1000, np.float32))
    return blobs | {k: (np.zeros(v, np.float32), np.zeros(v[0], np.float32)) for k, v in shapes.items()}


@pytest.mark.parametrize("v1", [True, False], ids=["v1", "current"])
@pytest.mark.parametrize("variant, message", [
    ({"caffenet_order": True}, "layer #3 'pool1' is Pooling where AlexNet has norm1 (LRN) (pooling before "
                               "normalisation is bvlc_reference_caffenet's order"),
    ({"lrn_alpha": 1e-3}, "layer #3 'norm1' (LRN) has alpha 0.001"),
    ({"conv2_group": 1}, "layer #5 'conv2' (Convolution) has group 1, where the import assumes 2"),
])
def test_a_net_that_is_not_alexnet_is_refused_at_its_first_difference(tmp_path, capsys, v1, variant, message):
    caffe_wire.write_caffemodel(tmp_path / "net.caffemodel", small_blobs(), v1=v1, **variant)
    assert main([str(tmp_path / "net.caffemodel"), "--out", str(tmp_path / "c.pt"),
                 "--mean", str(SHARED_MEAN_STAND_IN(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not bvlc_alexnet" in err and message in err, err
    assert not (tmp_path / "c.pt").exists()


def SHARED_MEAN_STAND_IN(folder):
    np.save(folder / "mean.npy", np.zeros((3, 256, 256)))
    return folder / "mean.npy"


def test_other_layers_and_shapes_are_refused(tmp_path, capsys):
    layers = caffe_wire.alexnet_layers(small_blobs())
    bn = [("conv1", *layers[1][1:]), ("bn1", "BatchNorm", {})] + layers[2:]
    (tmp_path / "bn.caffemodel").write_bytes(caffe_wire.net_message([layers[0]] + bn, v1=False))
    wrong = small_blobs(conv1=(96, 1, 11, 11))  # a grey-input net
    caffe_wire.write_caffemodel(tmp_path / "shape.caffemodel", wrong, v1=True)
    (tmp_path / "deploy.prototxt").write_text(DEPLOY)
    mean = str(SHARED_MEAN_STAND_IN(tmp_path))
    for name, expected in [("bn.caffemodel", "layer #2 'bn1' is BatchNorm where AlexNet has relu1 (ReLU)"),
                           ("shape.caffemodel", "layer 'conv1' weights are (96, 1, 11, 11), AlexNet's conv1 "
                                                "are (96, 3, 11, 11)"),
                           ("deploy.prototxt", "not a Caffe NetParameter in binary protobuf form")]:
        assert main([str(tmp_path / name), "--out", str(tmp_path / "c.pt"), "--mean", mean]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err


# bvlc_alexnet's deploy.prototxt as BVLC's model zoo ships it (current format), abridged to what
# matters: the same layers, settings and the input size; param/filler blocks are skipped.
DEPLOY = """name: "AlexNet"
layer { name: "data" type: "Input" top: "data" input_param { shape: { dim: 10 dim: 3 dim: 227 dim: 227 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 96 kernel_size: 11 stride: 4 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "norm1" type: "LRN" bottom: "conv1" top: "norm1" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "pool1" type: "Pooling" bottom: "norm1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 256 pad: 2 kernel_size: 5 group: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "norm2" type: "LRN" bottom: "conv2" top: "norm2" lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 } }
layer { name: "pool2" type: "Pooling" bottom: "norm2" top: "pool2" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "conv3" type: "Convolution" bottom: "pool2" top: "conv3" convolution_param { num_output: 384 pad: 1 kernel_size: 3 } }
layer { name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }
layer { name: "conv4" type: "Convolution" bottom: "conv3" top: "conv4"
  convolution_param { num_output: 384 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu4" type: "ReLU" bottom: "conv4" top: "conv4" }
layer { name: "conv5" type: "Convolution" bottom: "conv4" top: "conv5"
  convolution_param { num_output: 256 pad: 1 kernel_size: 3 group: 2 } }
layer { name: "relu5" type: "ReLU" bottom: "conv5" top: "conv5" }
layer { name: "pool5" type: "Pooling" bottom: "conv5" top: "pool5" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6" inner_product_param { num_output: 4096 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" inner_product_param { num_output: 4096 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 1000 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""


def v1_deploy(text: str) -> str:
    """The same net in the V1 text format of 2014's files: `layers`, enum types, input_dim."""
    types = {'"Convolution"': "CONVOLUTION", '"ReLU"': "RELU", '"LRN"': "LRN", '"Pooling"': "POOLING",
             '"InnerProduct"': "INNER_PRODUCT", '"Dropout"': "DROPOUT", '"Softmax"': "SOFTMAX"}
    lines = text.splitlines()
    out = [lines[0], 'input: "data"', *(f"input_dim: {d}" for d in (10, 3, 227, 227))]
    for line in lines[2:]:
        line = line.replace("layer {", "layers {").replace("param { lr_mult: 1 decay_mult: 1 } "
                                                         "param { lr_mult: 2 decay_mult: 0 }", "blobs_lr: 1 blobs_lr: 2")
        for new, old in types.items():
            line = line.replace(f"type: {new}", f"type: {old}")
        out.append(line)
    return "\n".join(out) + "\n"


def test_the_deploy_prototxt_is_checked_in_both_formats(tmp_path):
    for name, text in [("current", DEPLOY), ("v1", v1_deploy(DEPLOY))]:
        (tmp_path / name).write_text(text)
        check_prototxt(tmp_path / name, num_classes=1000)
    bad = {  # what the prototxt says → how the refusal names it
        "group: 2 } }\nlayer { name: \"relu4\"": ("group: 1 } }\nlayer { name: \"relu4\"",
                                                "'conv4' (Convolution) has group 1, where the import assumes 2"),
        "norm2\" lrn_param { local_size: 5 alpha: 0.0001": ("norm2\" lrn_param { local_size: 5 alpha: 0.0002",
                                                          "'norm2' (LRN) has alpha 0.0002"),
        "dim: 227 dim: 227": ("dim: 224 dim: 224", "the input is 10×3×224×224, where the import assumes N×3×227×227"),
        "num_output: 1000": ("num_output: 10", "'fc8' has num_output 10, the weights have 1000 classes"),
    }
    for old, (new, message) in bad.items():
        assert old in DEPLOY
        (tmp_path / "bad").write_text(DEPLOY.replace(old, new))
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_prototxt(tmp_path / "bad", num_classes=1000)
    (tmp_path / "garbage").write_text("layer { name: conv1 }}")
    with pytest.raises(ValueError, match="not a Caffe net definition in protobuf text format"):
        check_prototxt(tmp_path / "garbage", num_classes=1000)


def test_a_missing_or_cut_short_caffemodel_says_where_bvlcs_file_is(tmp_path, capsys):
    """The likely causes, no download yet or one cut short, get BVLC's URL and sha1."""
    caffe_wire.write_caffemodel(tmp_path / "net.caffemodel", small_blobs(), v1=True)
    whole = (tmp_path / "net.caffemodel").read_bytes()
    (tmp_path / "cut.caffemodel").write_bytes(whole[: len(whole) - 7])  # a download stopped early
    for name, what in [("absent.caffemodel", "no file at"), ("cut.caffemodel", "not a Caffe NetParameter")]:
        assert main([str(tmp_path / name), "--out", str(tmp_path / "c.pt")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and what in err, err
        assert BVLC_URL in err and BVLC_SHA1 in err, err
    with pytest.raises(FileNotFoundError, match=BVLC_SHA1):
        reproduction.alexnet_caffe(tmp_path / "absent.caffemodel")


def test_a_folder_given_as_the_weights_is_one_line(tmp_path, capsys):
    from reproduction import caffe
    from reproduction.weights import alexnet_caffe
    assert caffe.main([str(tmp_path), "--out", str(tmp_path / "out" / "checkpoint.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a folder" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="is a folder; give the weights file"):
        alexnet_caffe(tmp_path)
