"""Where users get an AlexNet from: torch.hub (hubconf.py), the builder reproduction.alexnet and its
weights record (reproduction/weights.py), Caffe's net in memory, and train.py's best.pt."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import AlexNet_Weights

import caffe_wire
import reproduction
from packing import colour_set
from reproduction.training import checkpoints
from reproduction import train as train_module
from reproduction import caffe as caffe_module
from reproduction.caffe import BVLC_SHA1, BVLC_URL, CAFFE
from reproduction.config import RunConfig, override
from reproduction.data import load_stats
from reproduction.model import AlexNet
from reproduction.training.runfolder import BEST
from reproduction.weights import BVLC, Weights, caffe_licence

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities")

REPO = Path(__file__).resolve().parents[1]
TINY = override(RunConfig(), {"batch_size": 4, "epochs": 3, "seed": 3, "stuck_steps": 10_000})


def hub(*args, **kwargs):
    return torch.hub.load(str(REPO), *args, source="local", trust_repo=True, **kwargs)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return colour_set(tmp_path_factory.mktemp("tiny"), train=8, val=6, seed=0)


@pytest.fixture(scope="module")
def staged_run(tiny_set, tmp_path_factory):
    """A 3-epoch run whose centre-patch val top-1 errors are scripted 0.5, 0.3, 0.4 (the real
    evaluation replaced), run as two stages so that the checkpoint after epoch 2, the best,
    can be kept for comparison."""
    out = tmp_path_factory.mktemp("runs") / "run"
    errors = iter([0.5, 0.3, 0.4])
    real = train_module.evaluate

    def scripted(model, dataset, stats, config, *, ten_patch, **kw):
        e = next(errors)
        return {"top1_error": e, "top5_error": e / 2, "loss": 1.0, "images": len(dataset)}

    train_module.evaluate = scripted
    try:
        kw = dict(devices=(torch.device("cpu"),), workers=0, log=lambda s: None)
        train_module.train(TINY, tiny_set, out, max_epochs=2, **kw)
        after_two = checkpoints.load_checkpoint(out / checkpoints.CHECKPOINT)["model"]
        best_then = checkpoints.load_checkpoint(out / BEST)
        train_module.train(TINY, tiny_set, out, resume=True, **kw)
    finally:
        train_module.evaluate = real
    return out, after_two, best_then


def test_hub_alexnet_is_the_papers_net_or_any_config():
    model = hub("alexnet")
    assert isinstance(model, AlexNet) and model.weights is None
    assert sum(p.numel() for p in model.parameters()) == 60_965_224
    one = hub("alexnet", towers=1, num_classes=10)
    assert one.config.towers == 1 and one.config.num_classes == 10
    with pytest.raises(TypeError, match="unknown config field"):
        reproduction.alexnet(learning_rate=0.1)


def test_best_pt_is_the_lowest_val_error_and_says_it_is_optimistic(staged_run):
    out, after_two, best_then = staged_run
    best = checkpoints.load_checkpoint(out / BEST)
    assert best["best"]["epochs_trained"] == 2 and best["best"]["val_top1_error"] == 0.3  # not the last (0.4)
    assert best_then["epoch"] == 2  # written at epoch 2, kept through epoch 3 and the resume
    for k, v in after_two.items():
        assert torch.equal(best["model"][k], v), k
    assert best["optimizer"] is None and best["position"] is None
    final = json.loads((out / "final.json").read_text())
    assert final["best_checkpoint"]["epochs_trained"] == 2 and "optimistic" in final["best_checkpoint"]["note"]
    assert best["best"]["epochs_trained"] == 2
    assert checkpoints.load_checkpoint(out / checkpoints.CHECKPOINT)["epoch"] == 3


def test_hub_loads_a_checkpoint_with_its_weights_record(staged_run, tiny_set):
    out, _, _ = staged_run
    model = hub("alexnet", weights=out / checkpoints.CHECKPOINT)
    w = model.weights
    assert not model.training and w.config.model.num_classes == 4
    manifest = json.loads((tiny_set / "manifest.json").read_text())
    assert len(w.classes) == 4 and w.classes[0].startswith(manifest["classes"][0]["name"])
    assert torch.equal(w.mean, load_stats(tiny_set).mean) and w.image_size == 32
    final = json.loads((out / "final.json").read_text())
    [m] = w.metrics  # final.json, measured on the run's val split
    assert m["centre"] == final["centre"] and m["ten_patch"] == final["ten_patch"]
    assert m["measured_on"]["split"] == "val" and m["measured_on"]["images"] == 6
    assert w.recipe["train"]["epochs"] == 3 and w.selection is None and "not stated" in w.licence
    json.dumps(w.meta)  # everything but the tensors is JSON
    b = reproduction.alexnet(weights=out / BEST).weights
    assert "optimistic" in b.selection
    [m] = b.metrics  # final.json measured checkpoint.pt, not best.pt: only best.pt's own val figures
    assert m["centre"]["top1_error"] == 0.3 and m["measured_on"]["epochs_trained"] == 2
    with pytest.raises(TypeError, match="takes its architecture from the checkpoint"):
        reproduction.alexnet(weights=out / BEST, towers=1)


def test_transforms_are_the_papers_test_pipeline(staged_run):
    """PIL image or uint8 tensor of any size → §2 (shorter side, central square) → centre patch
    minus the mean's centre (mean="centre"); ten_patch: §4.1's ten views."""
    out, _, _ = staged_run
    w = reproduction.alexnet(weights=out / checkpoints.CHECKPOINT).weights
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)  # taller than wide
    pil = Image.fromarray(pixels)
    x = w.transforms()(pil)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # by hand: 40 px wide → 32, height 48·32/40 = 38.4 → 38, central 32×32, bilinear to 256, centre 224
    square = np.array(pil.resize((32, 38), Image.Resampling.BICUBIC).crop((0, 3, 32, 35)))
    up = torch.nn.functional.interpolate(torch.from_numpy(square).permute(2, 0, 1)[None].float(), size=(256, 256),
                                         mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(x, up[:, 16:240, 16:240] - w.mean[:, 16:240, 16:240])
    assert torch.equal(w.transforms()(torch.from_numpy(pixels).permute(2, 0, 1)), x)  # a tensor: the same
    ten = w.transforms(ten_patch=True)(pil)
    assert ten.shape == (10, 3, 224, 224) and torch.equal(ten[4], x) and torch.equal(ten[9], x.flip(-1))
    with pytest.raises(ValueError, match="must hold 0–1"):
        w.transforms()(torch.full((3, 50, 50), 2.0))


@pytest.fixture(scope="module")
def caffemodel(tmp_path_factory):
    """A bvlc_alexnet-shaped .caffemodel of random weights (so not BVLC's sha1), and its blobs."""
    path = tmp_path_factory.mktemp("caffe") / "bvlc_alexnet.caffemodel"
    blobs = caffe_wire.caffe_blobs(seed=9)
    caffe_wire.write_caffemodel(path, blobs, v1=True)
    return path, blobs


def test_hub_alexnet_caffe_reads_a_caffemodel_with_bvlcs_record(caffemodel, tmp_path):
    path, blobs = caffemodel
    mean = np.stack([np.full((256, 256), v) for v in (104.0, 117.0, 123.0)])
    np.save(tmp_path / "mean.npy", mean)
    with pytest.warns(UserWarning, match=f"is not that of BVLC's bvlc_alexnet.caffemodel \\({BVLC_SHA1}"):
        model = hub("alexnet_caffe", path, mean=tmp_path / "mean.npy")
    assert not model.training and model.config == CAFFE.model
    state = model.state_dict()
    assert torch.equal(state["conv2.weight"], torch.from_numpy(blobs["conv2"][0]))
    assert torch.equal(state["fc8.weight"], torch.from_numpy(2 * blobs["fc8"][0]))
    w = model.weights
    assert w.source["format"] == "caffemodel" and w.source["bvlc_alexnet"] is False
    assert w.mean[0, 0, 0] == 123.0 and w.mean[2, 0, 0] == 104.0  # RGB
    assert len(w.classes) == 1000 and w.metrics == [] and w.reported["centre"]["top1_error"] == 0.429
    assert "not BVLC's bvlc_alexnet.caffemodel" in w.licence  # random weights, another sha1
    assert w.transforms()(Image.new("RGB", (300, 260))).shape == (3, 227, 227)


@pytest.mark.parametrize("call", ["weights='DEFAULT'", "weights='IMAGENET1K_V1'", "pretrained=True",
                                  "weights=AlexNet_Weights.DEFAULT", "builder: weights='DEFAULT'"])
def test_torchvision_habits_point_to_alexnet_caffe_and_bvlcs_file(call):
    kwargs = {"weights='DEFAULT'": {"weights": "DEFAULT"}, "weights='IMAGENET1K_V1'": {"weights": "IMAGENET1K_V1"},
              "pretrained=True": {"pretrained": True}, "weights=AlexNet_Weights.DEFAULT":
              {"weights": AlexNet_Weights.DEFAULT}, "builder: weights='DEFAULT'": {"weights": "DEFAULT"}}[call]
    load = reproduction.alexnet if call.startswith("builder") else lambda **kw: hub("alexnet", **kw)
    with pytest.raises(ValueError) as e:
        load(**kwargs)
    message = str(e.value)
    assert "alexnet_caffe" in message and BVLC_URL in message and BVLC_SHA1 in message, message
    assert "ships no weights" in message and "--" not in message  # the Python API's words, not flags
    assert hub("alexnet", pretrained=False).weights is None  # torchvision's spelling of no weights
    with pytest.raises(ValueError, match=f"downloaded from {BVLC_URL}"):
        hub("alexnet_caffe")


def test_alexnet_caffe_needs_no_mean_file(caffemodel, tmp_path):
    """From a hub cache there is only the .caffemodel: Caffe's per-channel mean stands in for the
    mean image (DEVIATION(§2)); a mean file stays an option; errors name Python arguments."""
    path, _ = caffemodel
    with pytest.warns(UserWarning, match="not that of BVLC's"):
        model = hub("alexnet_caffe", path)
    w = model.weights
    rgb = torch.tensor([122.67891434, 116.66876762, 104.00698793], dtype=torch.float32)
    assert w.mean.shape == (3, 256, 256) and torch.equal(w.mean, rgb[:, None, None].expand(3, 256, 256))
    assert "per-channel" in w.mean_source and "per-channel" in w.source["mean"]
    assert w.transforms()(Image.new("RGB", (300, 260), (122, 116, 104))).abs().max() < 1.0
    with pytest.raises(FileNotFoundError) as e:
        reproduction.alexnet_caffe(path, mean=tmp_path / "absent.npy")
    assert "mean=" in str(e.value) and "--mean" not in str(e.value)
    np.save(tmp_path / "ports.npy", {}, allow_pickle=True)
    with pytest.raises(ValueError) as e:
        reproduction.alexnet_caffe(tmp_path / "ports.npy", prototxt=tmp_path / "deploy.prototxt")
    assert "prototxt=" in str(e.value) and "--prototxt" not in str(e.value)


def test_bvlcs_own_sha1_gets_no_warning(caffemodel, monkeypatch):
    path, _ = caffemodel
    monkeypatch.setattr(caffe_module, "BVLC_SHA1", hashlib.sha1(path.read_bytes()).hexdigest())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = reproduction.alexnet_caffe(path)
    assert model.weights.source["bvlc_alexnet"] is True and "sha1 matches" in model.weights.licence


def record(**fields) -> Weights:
    """A weights record for a 1000-class net without a checkpoint: the transforms need only this."""
    base = dict(path=None, config=RunConfig(), classes=[f"class {i}" for i in range(1000)],
                mean=torch.full((3, 256, 256), 120.0), mean_source="test", image_size=256, metrics=[],
                recipe="test", licence="test")
    return Weights(**(base | fields))


def test_transforms_take_what_torchvisions_preset_takes():
    """torchvision's ImageClassification takes PIL images and tensors ...×C×H×W, uint8 0–255 or
    float 0–1; ours takes the same, and each gives the same leading shape."""
    theirs, ours, ten = AlexNet_Weights.IMAGENET1K_V1.transforms(), record().transforms(), record().transforms(ten_patch=True)
    u8 = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (3, 40, 48), dtype=np.uint8))
    cases = {"PIL": Image.fromarray(u8.permute(1, 2, 0).numpy()), "uint8": u8, "float32": u8 / 255,
             "float64": u8.double() / 255, "uint8 batch": torch.stack([u8, u8.flip(-1), u8]),
             "float batch": torch.stack([u8, u8.flip(-1)]) / 255}
    for name, x in cases.items():
        a, b = theirs(x), ours(x)
        assert a.shape[:-3] == b.shape[:-3] and b.shape[-3:] == (3, 224, 224) and b.dtype == torch.float32, name
        assert ten(x).shape == (*a.shape[:-3], 10, 3, 224, 224), name
    single = ours(u8)
    assert torch.equal(ours(u8 / 255), single)  # k/255 converts back to k exactly
    batch = ours(cases["uint8 batch"])
    assert torch.equal(batch[0], single) and torch.equal(batch[1], ours(u8.flip(-1)))
    assert torch.equal(ten(cases["float batch"])[1], ten(u8.flip(-1)))
    # Where ours is stricter: floats outside 0–1 (a 0–255 float image) would be garbage in both.
    theirs(u8.float())
    with pytest.raises(ValueError, match="must hold 0–1.*divide 0–255 values by 255"):
        ours(u8.float())
    with pytest.raises(ValueError, match="at least one image"):
        ours(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))


def test_transforms_refuse_or_convert_what_would_be_silently_wrong():
    """int tensors holding 0–255 are those pixels (not black, as a dtype-range conversion
    would make them); empty images, strings and out-of-range integers are refused; a strip
    (1×5,000 px) is cropped without resizing all of it."""
    ours = record().transforms()
    u8 = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (3, 40, 48), dtype=np.uint8))
    for dtype in (torch.int16, torch.int32, torch.int64):
        assert torch.equal(ours(u8.to(dtype)), ours(u8)), dtype
    with pytest.raises(ValueError, match="must hold 0–255"):
        ours(u8.to(torch.int32) * 2)
    with pytest.raises(ValueError, match="H and W >= 1"):
        ours(torch.zeros(3, 0, 0, dtype=torch.uint8))
    with pytest.raises(TypeError, match="PIL.Image.open"):
        ours("cat.jpg")
    strip = ours(Image.new("RGB", (5000, 1), (200, 10, 10)))
    assert strip.shape == (3, 224, 224) and torch.isfinite(strip).all()


def test_meta_names_the_categories_as_torchvision_does():
    w = record()
    assert "categories" in AlexNet_Weights.IMAGENET1K_V1.meta
    assert w.meta["categories"] == w.classes and len(w.meta["categories"]) == w.meta["num_classes"]
    json.dumps(w.meta)


def test_the_bvlc_licence_is_the_readmes():
    own = caffe_licence({"bvlc_alexnet": True})
    assert "This model is released for unrestricted use." in own and "sha1 matches" in own
    assert "conversion" in caffe_licence({"bvlc_alexnet": None})
    assert "non-commercial" in BVLC["licence"]  # ImageNet's terms of access are stated beside it
