"""reproduction/experiments.py: each ILSVRC experiment changes exactly the fields it claims."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from reproduction import experiments
from reproduction.config import CifarConfig, RunConfig, override
from reproduction.experiments import EXPERIMENTS

# The single difference of each entry from the paper's run (the report attributes an effect to it).
CLAIMED = {
    "paper": {},
    "no_lrn": {"lrn": "none"},
    "lrn_literal": {"lrn": "paper"},
    "tanh": {"activation": "tanh"},
    "no_overlap_pool": {"pool_kernel": 2},
    "one_tower": {"towers": 1},
    "no_pca_lighting": {"lighting": "none"},
    "mean_offset": {"mean": "offset"},
    "lighting_eigenvalues": {"lighting": "paper"},
    "no_lighting_rescale": {"lighting_rescale": False},
    "augment_literal": {"mean": "offset", "lighting": "paper", "lighting_rescale": False},
    "no_dropout": {"dropout": 0.0},
    "no_conv2": {"remove_conv": "conv2"},
    "no_conv3": {"remove_conv": "conv3"},
    "no_conv4": {"remove_conv": "conv4"},
    "conv6": {"conv6": True},
    "fashion_mnist": {"epochs": 10, "init_bias": 0.1},
}


def diff(config: RunConfig) -> dict:
    ran, paper = dataclasses.asdict(config), dataclasses.asdict(RunConfig())
    return {k: v for part in ran for k, v in ran[part].items() if v != paper[part][k]}


def test_each_experiment_changes_exactly_what_it_claims():
    assert set(EXPERIMENTS) == set(CLAIMED)
    for name, config in EXPERIMENTS.items():
        assert diff(config) == CLAIMED[name], name


def test_single_change_experiments_compose_to_augment_literal():
    parts = {**CLAIMED["mean_offset"], **CLAIMED["lighting_eigenvalues"], **CLAIMED["no_lighting_rescale"]}
    assert parts == CLAIMED["augment_literal"]


def test_lighting_rescale_is_its_own_switch():
    """lighting_rescale alone decides the ×1/(1 + lighting_std) after the noise, for either
    eigenvalue scale, so augment_literal's three changes can be run one at a time."""
    import torch

    from reproduction.config import DataConfig
    from reproduction.data import view_batch
    images = torch.full((2, 3, 256, 256), 100, dtype=torch.uint8)
    mean, noise = torch.zeros(3, 256, 256), torch.tensor([[5.0, -3.0, 2.0], [1.0, 0.0, -1.0]])
    at = dict(top=torch.tensor([0, 32]), left=torch.tensor([5, 0]), flip=torch.tensor([False, True]))
    for lighting in ("code", "paper"):
        kept = view_batch(images, mean, DataConfig(lighting=lighting), noise=noise, **at)
        plain = view_batch(images, mean, DataConfig(lighting=lighting, lighting_rescale=False), noise=noise, **at)
        assert torch.allclose(plain, 100 + noise[:, :, None, None].expand_as(plain))
        assert torch.allclose(kept, plain / 1.1)


def test_freeze_must_name_layers_the_net_has():
    import pytest

    from reproduction.config import override
    assert override(RunConfig(), {"conv6": True, "freeze": ("conv6",)}).train.freeze == ("conv6",)
    with pytest.raises(ValueError, match="conv3, which this net does not have"):
        override(RunConfig(), {"remove_conv": "conv3", "freeze": ("conv1", "conv3")})
    with pytest.raises(ValueError, match="conv6"):
        override(RunConfig(), {"freeze": ("conv6",)})


def set_examples(markdown: str) -> list[str]:
    """Every command line or inline code span of a markdown text that passes `--set`."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S)
    lines = [line for block in fenced for line in block.splitlines() if "--set" in line]
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", markdown, flags=re.M | re.S)
    spans = [s.replace("\n", " ") for s in re.findall(r"`([^`]+)`", prose) if "--set" in s]
    return lines + spans


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_documented_set_overrides_are_valid_shell(capsys):
    """`--set drop_epochs=(10,20)` is a shell syntax error: every documented --set must parse in
    bash, and the tuple form the README shows must parse as a tuple."""
    root = Path(__file__).resolve().parents[1]
    examples = [e for doc in ("README.md", "results/README.md") for e in set_examples((root / doc).read_text())]
    assert any("drop_epochs=" in e for e in examples)  # the README's tuple example is among them
    for example in examples:
        # on stdin: a span that starts with --set would be read as bash's own option after -c
        check = subprocess.run(["bash", "-n"], input=example, capture_output=True, text=True)
        assert check.returncode == 0, f"{example!r}: {check.stderr.strip()}"
    with pytest.raises(SystemExit):
        experiments.main(["--help"])
    assert "=(" not in capsys.readouterr().out
    assert override(RunConfig(), ["drop_epochs=10,20,25"]).train.drop_epochs == (10, 20, 25)
    assert override(CifarConfig(), ["drop_epochs=8,9"]).drop_epochs == (8, 9)


def test_a_shell_error_in_a_set_example_is_caught():
    assert subprocess.run(["bash", "-n"], input="python -m x --set drop_epochs=(10,20)", text=True,
                          capture_output=True).returncode != 0
    assert set_examples("a `--set a=1\nb=(2,3)` span\n```\npython -m x --set c=1\n```\n") == \
        ["python -m x --set c=1", "--set a=1 b=(2,3)"]
