"""reproduction/experiments.py: each ILSVRC experiment changes exactly the fields it claims."""

from __future__ import annotations

import dataclasses

from reproduction.config import RunConfig
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
