"""python -m reproduction.predict on the real ImageNet sample images, with checkpoints made here."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from packing import pack_set
from reproduction.caffe import CAFFE
from reproduction.config import RunConfig, override
from reproduction.data import load_stats
from reproduction.model import AlexNet
from reproduction.predict import load_image, main, predict
from reproduction.training.checkpoints import config_dict, save_checkpoint
IMAGES = ["n01440764_tench.JPEG", "n01530575_brambling.JPEG", "n01855672_goose.JPEG"]
LINE = re.compile(r"^  (\d)\. (\d\.\d{4})  +(\d+)  (.+)$")


def make_checkpoint(folder, config: RunConfig, mean: np.ndarray, seed: int):
    """A randomly initialised net in our checkpoint format, stats.npz beside it. init_std 0.02
    so that the 1000 probabilities are not all ≈ 0.001."""
    config = override(config, {"init_std": 0.02, "init_bias": 0.1})
    torch.manual_seed(seed)
    model = AlexNet(config.model)
    folder.mkdir(parents=True)
    save_checkpoint(folder / "checkpoint.pt", {"model": model.state_dict(), "optimizer": None, "position": None,
                                               "config": config_dict(config), "epoch": 0})
    np.savez(folder / "stats.npz", mean=mean.astype(np.float32), eigval=np.zeros(3), eigvec=np.eye(3))
    return folder / "checkpoint.pt", model.eval(), config


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A 1000-class net of the paper's config (224 patches, mean = the mean image's centre)."""
    mean = np.random.default_rng(0).uniform(90, 140, (3, 256, 256))
    return make_checkpoint(tmp_path_factory.mktemp("ours") / "run", RunConfig(), mean, seed=0)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def parse(out: str) -> dict[str, list[tuple[float, int, str]]]:
    result, current = {}, None
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            result[current].append((float(m[2]), int(m[3]), m[4]))
        else:
            current = line.split(" (")[0]
            result[current] = []
    return result


def test_prints_the_top5_with_imagenet_names(ours, shared_data, capsys):
    checkpoint, _, _ = ours
    sample = shared_data / "imagenet-sample"
    index = json.loads((sample / "imagenet_class_index.json").read_text())
    code, out, err = run(capsys, "--checkpoint", checkpoint, *(sample / n for n in IMAGES))
    assert code == 0, err
    result = parse(out)
    assert list(result) == [str(sample / n) for n in IMAGES]
    for rows in result.values():
        probs = [p for p, _, _ in rows]
        assert len(rows) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-4
        assert len({k for _, k, _ in rows}) == 5
        for _, k, name in rows:
            assert name == f"{index[str(k)][1]} ({index[str(k)][0]})"
    assert "10 patches, 224×224" in out


def test_ten_patches_are_the_average_of_ten_softmaxes(ours, shared_data):
    checkpoint, model, config = ours
    stats = load_stats(checkpoint.parent)
    image = load_image(shared_data / "imagenet-sample" / IMAGES[0])
    assert image.shape == (3, 256, 256) and image.dtype == torch.uint8
    ten = predict(model, image[None], stats, config.data)[0]
    centre_mean = stats.mean[:, 16:240, 16:240]  # DataConfig mean="centre": the same for every patch
    softmaxes = []
    for top, left in [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]:
        for flip in (False, True):
            patch = image[:, top:top + 224, left:left + 224].float()
            patch = patch.flip(-1) if flip else patch
            with torch.no_grad():
                softmaxes.append(model((patch - centre_mean)[None]).softmax(-1)[0])
    torch.testing.assert_close(ten, torch.stack(softmaxes).mean(0), rtol=1e-5, atol=1e-7)
    centre = predict(model, image[None], stats, config.data, ten_patch=False)[0]
    torch.testing.assert_close(centre, softmaxes[8], rtol=1e-5, atol=1e-7)  # (16, 16), not flipped
    assert not torch.allclose(centre, ten, rtol=1e-3, atol=0)


def test_a_caffe_config_net_takes_227_patches_and_the_offset_mean(tmp_path, shared_data, capsys):
    mean = np.random.default_rng(1).uniform(90, 140, (3, 256, 256))
    checkpoint, model, config = make_checkpoint(tmp_path / "caffe", CAFFE, mean, seed=1)
    path = shared_data / "imagenet-sample" / IMAGES[1]
    image = load_image(path)
    probs = predict(model, image[None], load_stats(checkpoint.parent), config.data)[0]
    # Caffe's data layer subtracts the mean at the patch's offset, then mirrors image and mean together
    centred = (image.double() - torch.from_numpy(mean)).float()
    softmaxes = []
    for top, left in [(0, 0), (0, 29), (29, 0), (29, 29), (14, 14)]:
        for flip in (False, True):
            patch = centred[:, top:top + 227, left:left + 227]
            with torch.no_grad():
                softmaxes.append(model((patch.flip(-1) if flip else patch)[None]).softmax(-1)[0])
    torch.testing.assert_close(probs, torch.stack(softmaxes).mean(0), rtol=1e-4, atol=1e-6)
    code, out, err = run(capsys, "--checkpoint", checkpoint, "--centre", path)
    assert code == 0 and "centre patch, 227×227" in out, err
    top5 = parse(out)[str(path)]
    assert [k for _, k, _ in top5] == softmaxes[8].topk(5).indices.tolist()


def test_errors_are_clear(ours, shared_data, tmp_path, capsys):
    checkpoint, _, _ = ours
    good = shared_data / "imagenet-sample" / IMAGES[0]
    code, _, err = run(capsys, "--checkpoint", tmp_path / "absent.pt", good)
    assert code == 2 and "no checkpoint at" in err
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(b"not an image")
    code, out, err = run(capsys, "--checkpoint", checkpoint, broken, tmp_path / "missing.jpg", good, "--centre")
    assert code == 1 and "broken.JPEG: cannot decode" in err and "missing.jpg: cannot read" in err
    assert list(parse(out)) == [str(good)]  # the readable image is still classified
    ten = pack_set(tmp_path / "ten", {"train": [(np.zeros((8, 8, 3), np.uint8), 0)]}, num_classes=10)
    code, _, err = run(capsys, "--checkpoint", checkpoint, "--data", ten, good)
    assert code == 2 and "the checkpoint has 1000 classes" in err and "lists 10" in err
