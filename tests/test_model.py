"""The network of §3 and Fig. 2: shapes, counts, connectivity, LRN, placement, initialisation."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from reproduction.config import PAPER
from reproduction.model import AlexNet, LocalResponseNorm, layer_table, main, paper_init

# Each ablation as the config difference the experiments module will use.
ABLATIONS = {
    "paper": PAPER,
    "no_lrn": dataclasses.replace(PAPER, lrn="none"),
    "lrn_paper": dataclasses.replace(PAPER, lrn="paper"),
    "tanh": dataclasses.replace(PAPER, activation="tanh"),
    "no_overlap_pool": dataclasses.replace(PAPER, pool_kernel=2),
    "one_tower": dataclasses.replace(PAPER, towers=1),
    "no_dropout": dataclasses.replace(PAPER, dropout=0.0),
    "lrn_across_towers": dataclasses.replace(PAPER, lrn_scope="all"),
}

# Fig. 2 / §3.5 output sizes (channels × height × width for one image).
PAPER_SHAPES = {
    "conv1": (96, 55, 55), "lrn1": (96, 55, 55), "pool1": (96, 27, 27),
    "conv2": (256, 27, 27), "lrn2": (256, 27, 27), "pool2": (256, 13, 13),
    "conv3": (384, 13, 13), "conv4": (384, 13, 13), "conv5": (256, 13, 13),
    "pool5": (256, 6, 6), "fc6": (4096,), "fc7": (4096,), "fc8": (1000,),
}
# §3.2's comparison net: half the kernels in conv1-conv4, conv5 and the fc layers full size.
ONE_TOWER_SHAPES = {
    **PAPER_SHAPES,
    "conv1": (48, 55, 55), "lrn1": (48, 55, 55), "pool1": (48, 27, 27),
    "conv2": (128, 27, 27), "lrn2": (128, 27, 27), "pool2": (128, 13, 13),
    "conv3": (192, 13, 13), "conv4": (192, 13, 13),
}
# Parameters (weights + biases) and multiply-accumulates per layer, counted by hand from
# the kernel shapes (PAPER-SPEC.md §1).
PAPER_PARAMS = {"conv1": 34_944, "conv2": 307_456, "conv3": 885_120, "conv4": 663_936,
                "conv5": 442_624, "fc6": 37_752_832, "fc7": 16_781_312, "fc8": 4_097_000}
PAPER_MACS = {"conv1": 105_415_200, "conv2": 223_948_800, "conv3": 149_520_384,
              "conv4": 112_140_288, "conv5": 74_760_192, "fc6": 37_748_736,
              "fc7": 16_777_216, "fc8": 4_096_000}
EXPECTED_TOTAL_PARAMS = {name: 60_965_224 for name in ABLATIONS} | {"one_tower": 59_798_312}


def batch(n=2, seed=0):
    # Mean-centred raw RGB values (§2) have a spread of tens of grey levels.
    return 50 * torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ABLATIONS)
def test_layer_shapes_and_parameter_count(name):
    config = ABLATIONS[name]
    model = AlexNet(config)
    table = {row["layer"]: row for row in layer_table(model)}
    expected = ONE_TOWER_SHAPES if config.towers == 1 else PAPER_SHAPES
    assert {k: table[k]["shape"] for k in expected} == expected
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_TOTAL_PARAMS[name]
    assert sum(row["params"] for row in table.values()) == EXPECTED_TOTAL_PARAMS[name]
    assert model(batch(1)).shape == (1, 1000)


def test_paper_net_per_layer_params_and_macs():
    table = {row["layer"]: row for row in layer_table(AlexNet())}
    assert {k: table[k]["params"] for k in PAPER_PARAMS} == PAPER_PARAMS
    assert {k: table[k]["macs"] for k in PAPER_MACS} == PAPER_MACS
    assert sum(PAPER_MACS.values()) == 724_406_816
    # Each tower holds half of every layer's maps (Fig. 2), fc8 is one layer.
    assert table["conv1"]["split"] == "48 + 48" and table["conv5"]["split"] == "128 + 128"
    assert table["fc6"]["split"] == "2048 + 2048" and table["fc8"]["split"] == ""


def test_cli_prints_the_paper_totals(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    total = [line for line in out.splitlines() if line.startswith("total")][0]
    assert "60,965,224" in total and "724,406,816" in total
    assert main(["--set", "towers=1"]) == 0
    assert "59,798,312" in capsys.readouterr().out


def test_cli_rejects_bad_overrides(capsys):
    with pytest.raises(SystemExit):
        main(["--set", "towers=3"])
    assert "towers" in capsys.readouterr().err


def test_grey_input_and_caffe_input_size():
    grey = AlexNet(dataclasses.replace(PAPER, in_channels=1, num_classes=10))
    assert sum(p.numel() for p in grey.parameters()) == 60_965_224 - 34_944 + 11_712 - 4_097_000 + 40_970
    assert grey(torch.zeros(2, 1, 224, 224)).shape == (2, 10)
    # 227×227 (Caffe's crop) without the overhang is the 224 net fed the zero-padded patch.
    torch.manual_seed(0)
    caffe = AlexNet(dataclasses.replace(PAPER, input_size=227)).eval()
    ours = AlexNet().eval()
    caffe.load_state_dict(ours.state_dict())
    x = batch(1)
    torch.testing.assert_close(caffe(F.pad(x, (0, 3, 0, 3))), ours(x))
    assert [r["layer"] for r in layer_table(caffe)][:2] == ["input", "conv1"]
    with pytest.raises(ValueError, match="N×3×227×227"):
        caffe(x)


def test_state_dict_holds_the_grouped_tensors():
    sd = AlexNet().state_dict()
    # §3.5: conv2/4/5 read their own tower's 48/192/192 maps; conv3 reads all 256 (groups=2 layout).
    assert sd["conv1.weight"].shape == (96, 3, 11, 11)
    assert sd["conv2.weight"].shape == (256, 48, 5, 5)
    assert sd["conv3.weight"].shape == (384, 256, 3, 3)
    assert sd["conv4.weight"].shape == (384, 192, 3, 3)
    assert sd["conv5.weight"].shape == (256, 192, 3, 3)
    assert sd["fc6.weight"].shape == (4096, 9216)
    assert sd["fc8.weight"].shape == (1000, 4096)
    assert sorted(sd) == sorted(f"{layer}.{kind}" for layer in PAPER_PARAMS for kind in ("weight", "bias"))


# --- LRN (§3.3) --------------------------------------------------------------------------

def lrn_loop(a, n, alpha_per_term, beta, k):
    """b_i = a_i / (k + c·Σ_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j²)^β, written out map by map."""
    out = torch.empty_like(a)
    maps = a.shape[1]
    for i in range(maps):
        s = torch.zeros_like(a[:, 0])
        for j in range(max(0, i - n // 2), min(maps - 1, i + n // 2) + 1):
            s += a[:, j] ** 2
        out[:, i] = a[:, i] / (k + alpha_per_term * s) ** beta
    return out


@pytest.mark.parametrize("form, per_term", [("code", 1e-4 / 5), ("paper", 1e-4)])
def test_lrn_matches_the_formula(form, per_term):
    a = 300 * torch.rand(2, 12, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = LocalResponseNorm(5, 1e-4, 0.75, 2.0, form=form)(a)
    want = lrn_loop(a, 5, per_term, 0.75, 2.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # The inputs are large enough that normalisation changes them substantially.
    assert (got / a).min() < 0.5 * 2.0 ** -0.75


def test_lrn_forms_differ_by_the_factor_n():
    a = torch.full((1, 5, 1, 1), 200.0, dtype=torch.float64)
    code = LocalResponseNorm(5, 1e-4, 0.75, 2.0, form="code")(a)[0, 2, 0, 0]
    paper = LocalResponseNorm(5, 1e-4, 0.75, 2.0, form="paper")(a)[0, 2, 0, 0]
    assert code == pytest.approx(200 / (2 + 2e-5 * 5 * 200**2) ** 0.75)
    assert paper == pytest.approx(200 / (2 + 1e-4 * 5 * 200**2) ** 0.75)


@pytest.mark.parametrize("scope", ["tower", "all"])
def test_lrn_windows_stay_inside_a_tower_unless_asked(scope):
    """conv1's LRN sums over maps of its own tower: map 47 (last of A) never sees map 48.
    lrn_scope="all" (Caffe's grouped net) runs the windows across all 96 maps instead."""
    model = AlexNet(dataclasses.replace(PAPER, lrn_scope=scope)).eval()
    seen = {}
    model.conv1.register_forward_hook(lambda m, i, o: seen.update(conv1=torch.cat(o, 1)))
    model.lrn1.register_forward_hook(lambda m, i, o: seen.setdefault("lrn1", []).append(o))
    model(batch(1))
    relu = F.relu(seen["conv1"]).double()
    lrn = torch.cat(seen["lrn1"], 1).double()
    per_tower = torch.cat([lrn_loop(t, 5, 2e-5, 0.75, 2.0) for t in relu.split(48, 1)], 1)
    across = lrn_loop(relu, 5, 2e-5, 0.75, 2.0)
    torch.testing.assert_close(lrn, per_tower if scope == "tower" else across, rtol=1e-5, atol=1e-6)
    # The two differ exactly at the towers' edge maps.
    edge, inner = [46, 47, 48, 49], [0, 20, 60, 95]
    assert not torch.allclose(per_tower[:, edge], across[:, edge], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_tower[:, inner], across[:, inner], rtol=1e-5, atol=1e-6)


# --- one net, any placement -------------------------------------------------------------

def grouped_reference(sd, x, config=PAPER):
    """The same network as one ordinary grouped PyTorch net (groups=2, as in Caffe), built
    straight from a state_dict: the oracle the towers must equal. Eval mode (dropout = ×0.5)."""
    g = config.towers
    act = torch.relu if config.activation == "relu" else torch.tanh

    def lrn(h):
        if config.lrn == "none":
            return h
        alpha = config.lrn_alpha * (config.lrn_size if config.lrn == "paper" else 1)
        groups = h.chunk(g, 1) if config.lrn_scope == "tower" else [h]  # "all": Caffe's LRN
        return torch.cat([F.local_response_norm(t, config.lrn_size, alpha, config.lrn_beta, config.lrn_k)
                          for t in groups], 1)

    def pool(h):
        return F.max_pool2d(h, config.pool_kernel, 2)

    keep = 1 - config.dropout
    x = F.pad(x, (0, 3, 0, 3))
    h = pool(lrn(act(F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], stride=4))))
    h = pool(lrn(act(F.conv2d(h, sd["conv2.weight"], sd["conv2.bias"], padding=2, groups=g))))
    h = act(F.conv2d(h, sd["conv3.weight"], sd["conv3.bias"], padding=1))
    h = act(F.conv2d(h, sd["conv4.weight"], sd["conv4.bias"], padding=1, groups=g))
    h = pool(act(F.conv2d(h, sd["conv5.weight"], sd["conv5.bias"], padding=1, groups=g)))
    h = keep * act(F.linear(h.flatten(1), sd["fc6.weight"], sd["fc6.bias"]))
    h = keep * act(F.linear(h, sd["fc7.weight"], sd["fc7.bias"]))
    return F.linear(h, sd["fc8.weight"], sd["fc8.bias"])


def canonical_grads(model):
    """Each layer's gradient in the state_dict layout (towers concatenated)."""
    out = {}
    for name, module in model.named_children():
        if hasattr(module, "parts"):
            for kind in ("weight", "bias"):
                out[f"{name}.{kind}"] = torch.cat([p.grad.to("cpu") for p in module.parts(kind)])
    return out


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", ["paper", "one_tower", "no_lrn", "lrn_paper", "tanh", "no_overlap_pool",
                                  "lrn_across_towers"])
def test_towers_equal_the_grouped_net(name):
    """The tower net, on one device or split over two, is the grouped net of Caffe's layout:
    same logits and the same gradient for every parameter."""
    config = ABLATIONS[name]
    torch.manual_seed(0)
    x = batch(2)
    sd = AlexNet(config).state_dict()
    ref_params = {k: v.clone().requires_grad_() for k, v in sd.items()}
    ref = grouped_reference(ref_params, x, config)
    ref.square().mean().backward()
    placements = [None, ("cpu", "cpu")] if config.towers == 2 else [None]
    for devices in placements:
        model = AlexNet(config, devices=devices).eval()
        model.load_state_dict(sd)
        out = model(x)
        assert rel_err(out, ref) < 1e-5
        out.square().mean().backward()
        grads = canonical_grads(model)
        for key, p in ref_params.items():
            assert rel_err(grads[key], p.grad) < 1e-5, key


def test_state_dict_round_trip_across_placements(tmp_path):
    torch.manual_seed(1)
    one = AlexNet()
    path = tmp_path / "one_device.pt"
    torch.save(one.state_dict(), path)
    two = AlexNet(devices=("cpu", "cpu"))
    assert list(two.state_dict()) == list(one.state_dict())
    two.load_state_dict(torch.load(path))
    for k, v in one.state_dict().items():
        assert torch.equal(two.state_dict()[k], v), k
    # and back again
    torch.save(two.state_dict(), path)
    three = AlexNet()
    three.load_state_dict(torch.load(path))
    assert all(torch.equal(three.state_dict()[k], v) for k, v in one.state_dict().items())


def test_same_seed_same_weights_whatever_the_placement():
    torch.manual_seed(7)
    a = AlexNet().state_dict()
    torch.manual_seed(7)
    b = AlexNet(devices=("cpu", "cpu")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_load_state_dict_rejects_wrong_shapes_and_keys():
    model = AlexNet()
    sd = model.state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for conv2.weight"):
        model.load_state_dict({**sd, "conv2.weight": torch.zeros(256, 96, 5, 5)})
    with pytest.raises(RuntimeError, match="Missing key.*fc8.bias"):
        model.load_state_dict({k: v for k, v in sd.items() if k != "fc8.bias"})
    with pytest.raises(RuntimeError, match="Unexpected key.*conv2.weight_a"):
        model.load_state_dict({**sd, "conv2.weight_a": sd["conv2.weight"][:128]})
    one_tower = AlexNet(ABLATIONS["one_tower"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        one_tower.load_state_dict(sd)


def test_placement_arguments():
    model = AlexNet(devices="cpu")
    assert model.devices == (torch.device("cpu"),) * 2
    with pytest.raises(ValueError, match="one per tower"):
        AlexNet(devices=("cpu", "cpu", "cpu"))
    with pytest.raises(ValueError, match="one per tower"):
        AlexNet(ABLATIONS["one_tower"], devices=("cpu", "cpu"))



@pytest.mark.gpu
def test_two_devices_cuda_and_cpu_equal_one_device(no_tf32):
    """The model-parallel split with the towers on different devices: tower A on the GPU,
    tower B on the CPU, against the whole net on the CPU."""
    torch.manual_seed(0)
    x = batch(2)
    one = AlexNet().eval()
    two = AlexNet(devices=("cuda:0", "cpu")).eval()
    two.load_state_dict(one.state_dict())
    assert two.conv2.weight_a.is_cuda and not two.conv2.weight_b.is_cuda
    assert two.fc8.weight_a.is_cuda
    ref = one(x)
    out = two(x)
    assert out.is_cuda and rel_err(out.cpu(), ref) < 1e-5
    ref.square().mean().backward()
    out.square().mean().backward()
    want, got = canonical_grads(one), canonical_grads(two)
    for key in want:
        assert rel_err(got[key], want[key]) < 1e-5, key


# --- initialisation (§5) ------------------------------------------------------------------

def test_paper_initialisation():
    torch.manual_seed(0)
    sd = AlexNet().state_dict()
    for layer in PAPER_PARAMS:
        w = sd[f"{layer}.weight"]
        assert abs(w.mean().item()) < 3e-4, layer
        assert w.std().item() == pytest.approx(0.01, rel=0.03), layer
        bias = 1.0 if layer in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(sd[f"{layer}.bias"] == bias), layer


def test_init_is_a_callable_function_honouring_the_config():
    model = AlexNet(dataclasses.replace(PAPER, init_std=0.02, init_bias=0.1))
    with torch.no_grad():
        model.fc6.weight_a.zero_()
    paper_init(model)
    assert model.fc6.weight_a.std().item() == pytest.approx(0.02, rel=0.03)
    assert torch.all(model.conv4.bias_b == 0.1) and torch.all(model.conv3.bias_a == 0)


# --- every ablation trains ------------------------------------------------------------------

@pytest.mark.parametrize("name", ABLATIONS)
def test_training_step_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = AlexNet(ABLATIONS[name]).train()
    labels = torch.tensor([3, 999])
    loss = F.cross_entropy(model(batch(2)), labels)
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_dropout_follows_section_4_2():
    model = AlexNet()
    x = torch.ones(1000, 4096)
    model.train()
    kept = model.drop6(x)
    assert set(kept.unique().tolist()) == {0.0, 1.0}  # dropped or passed unscaled
    assert 0.45 < kept.mean().item() < 0.55
    model.eval()
    assert torch.equal(model.drop6(x), 0.5 * x)  # "multiply their outputs by 0.5"


def test_eval_mode_is_deterministic_and_train_mode_is_not():
    torch.manual_seed(0)
    model = AlexNet()
    x = batch(2)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


# --- wrong inputs fail before any layer runs ----------------------------------------------

@pytest.mark.parametrize("x, match", [
    (torch.zeros(3, 224, 224), "N×3×224×224"),
    (torch.zeros(1, 1, 224, 224), "N×3×224×224"),
    (torch.zeros(1, 3, 227, 227), r"\(1, 3, 227, 227\)"),
    (torch.zeros(1, 3, 224, 224, dtype=torch.uint8), "floating-point"),
])
def test_bad_inputs_raise_before_any_layer(x, match):
    model = AlexNet()
    ran = []
    model.conv1.register_forward_pre_hook(lambda m, i: ran.append(1))
    with pytest.raises((ValueError, TypeError), match=match):
        model(x)
    assert not ran


# --- depth variants: Table 2's sixth conv layer (§6), a middle conv layer removed (§7) ----------

# Counted by hand from the kernel shapes chosen in model.py (DEVIATION(§6), DEVIATION(§7)).
CONV6 = 256 * 128 * 3 * 3 + 256                   # 295,168: 256 kernels 3×3×128, own tower
DEPTH = {
    "conv6": (dataclasses.replace(PAPER, conv6=True), 60_965_224 + CONV6,
              {"conv5": (256, 13, 13), "pool5": (256, 6, 6), "conv6": (256, 6, 6), "fc6": (4096,)}),
    # conv3 then reads pool1→pool2's 96 maps: 384×96×3×3 instead of 384×256×3×3.
    "no_conv2": (dataclasses.replace(PAPER, remove_conv="conv2"),
                 60_965_224 - 307_456 - 885_120 + (384 * 96 * 9 + 384),
                 {"pool2": (96, 13, 13), "conv3": (384, 13, 13)}),
    # conv4 reads pool2's 256 maps from both towers: conv3's kernel shape, 384×256×3×3.
    "no_conv3": (dataclasses.replace(PAPER, remove_conv="conv3"), 60_965_224 - 663_936,
                 {"pool2": (256, 13, 13), "conv4": (384, 13, 13)}),
    # conv5 reads conv3's 192 maps per tower, as it read conv4's.
    "no_conv4": (dataclasses.replace(PAPER, remove_conv="conv4"), 60_965_224 - 663_936,
                 {"conv3": (384, 13, 13), "conv5": (256, 13, 13)}),
}


@pytest.mark.parametrize("name", DEPTH)
def test_depth_variants_shapes_counts_and_gradients(name):
    config, total, shapes = DEPTH[name]
    torch.manual_seed(0)
    model = AlexNet(config).train()
    table = {row["layer"]: row for row in layer_table(model)}
    assert {k: table[k]["shape"] for k in shapes} == shapes
    assert sum(p.numel() for p in model.parameters()) == total
    assert sum(row["params"] for row in table.values()) == total
    removed = {"conv2", "conv3", "conv4"} - set(model.layer_names)
    assert removed == ({config.remove_conv} if config.remove_conv != "none" else set())
    assert not any(k.split(".")[0] in removed for k in model.state_dict())
    assert ("conv6.weight" in model.state_dict()) == config.conv6
    if config.conv6:  # §5's rule extended to conv6 as to its siblings conv4, conv5: bias 1
        assert torch.all(model.conv6.bias_a == 1) and table["conv6"]["split"] == "128 + 128"
    loss = F.cross_entropy(model(batch(2)), torch.tensor([3, 999]))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    # Placement-independent state_dict, as for the paper's net.
    split = AlexNet(config, devices=("cpu", "cpu")).eval()
    split.load_state_dict(model.state_dict())
    assert torch.allclose(split(batch(1)), model.eval()(batch(1)), rtol=1e-4, atol=1e-5)


def test_fine_tuning_carries_the_sixth_layer(tmp_path):
    """Table 2's 1 CNN*: pre-trained with conv6 on another class set, then fine-tuned (--init-from
    takes the architecture from the checkpoint, load_pretrained copies every layer but fc8)."""
    from reproduction.training import checkpoints
    from reproduction.config import RunConfig, override
    from reproduction.training.build import load_pretrained
    source = override(RunConfig(), {"conv6": True, "num_classes": 7})
    torch.manual_seed(1)
    pre = AlexNet(source.model)
    path = tmp_path / "pre.pt"
    checkpoints.save_checkpoint(path, {"model": pre.state_dict(), "config": checkpoints.config_dict(source), "epoch": 0})
    torch.manual_seed(2)
    tuned = AlexNet(override(source.model, {"num_classes": 4}))
    note = load_pretrained(tuned, path)
    assert "fc8 re-initialised" in note
    assert torch.equal(tuned.state_dict()["conv6.weight"], pre.state_dict()["conv6.weight"])
    with pytest.raises(Exception, match="does not fit"):  # a net without conv6 cannot take it
        load_pretrained(AlexNet(dataclasses.replace(PAPER, num_classes=4)), path)


def test_remove_conv_accepts_only_middle_layers():
    with pytest.raises(ValueError, match="middle conv layers"):
        dataclasses.replace(PAPER, remove_conv="conv5")


def test_features_of_a_named_layer_are_the_nets_own_activations():
    """model.features(x, layer): pool5's maps and fc6/fc7 after their ReLU, tower A first, as
    the forward pass computes them in eval mode; fc8 the logits. torch.fx tracing (torchvision's
    create_feature_extractor) is refused with a pointer to it."""
    from torchvision.models.feature_extraction import create_feature_extractor
    torch.manual_seed(0)
    model = AlexNet().train()
    x = torch.randn(2, 3, 224, 224)
    seen = {}
    for name in ("pool5", "fc7"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: seen.setdefault(name, []).append(o))
    model.eval()
    logits = model(x)
    model.train()
    pool5 = model.features(x, "pool5")
    assert pool5.shape == (2, 256, 6, 6) and torch.equal(pool5, torch.cat(seen["pool5"][:2], dim=1))
    fc7 = model.features(x, "fc7")
    assert fc7.shape == (2, 4096) and torch.equal(fc7, torch.relu(torch.cat(seen["fc7"][0], dim=1)))
    assert (fc7 >= 0).all() and model.features(x, "fc6").shape == (2, 4096)
    assert torch.equal(model.features(x, "fc8"), logits) and model.training  # its mode is kept
    with pytest.raises(ValueError, match="give one of pool1, pool2, pool5, fc6, fc7, fc8"):
        model.features(x, "conv9")
    with pytest.raises(TypeError, match=r"model.features\(x, \"fc7\"\)"):
        create_feature_extractor(model, {"fc7": "fc7"})
