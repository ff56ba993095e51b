"""The config: paper defaults, validation with helpful messages, strict overrides."""

import dataclasses
import re

import pytest

from reproduction.config import PAPER, AlexNetConfig, from_dict, override


def test_paper_defaults():
    assert (PAPER.num_classes, PAPER.activation, PAPER.towers, PAPER.dropout) == (1000, "relu", 2, 0.5)
    assert (PAPER.lrn, PAPER.lrn_size, PAPER.lrn_alpha, PAPER.lrn_beta, PAPER.lrn_k) == ("code", 5, 1e-4, 0.75, 2.0)
    assert PAPER.pool_kernel == 3
    assert (PAPER.init_std, PAPER.init_bias) == (0.01, 1.0)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PAPER.towers = 1


@pytest.mark.parametrize("field, value, allowed", [
    ("activation", "sigmoid", "'relu' or 'tanh'"),
    ("lrn", "caffe", "'code', 'paper' or 'none'"),
    ("lrn_size", 4, "odd integer"),
    ("lrn_k", 0.0, "> 0"),
    ("lrn_alpha", -1e-4, ">= 0"),
    ("pool_kernel", 5, "3 (overlapping"),
    ("towers", 4, "2 (the paper) or 1"),
    ("dropout", 1.0, "[0, 1)"),
    ("num_classes", 0, ">= 1"),
    ("init_std", 0.0, "> 0"),
    ("init_bias", float("nan"), "finite"),
])
def test_invalid_values_say_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=f"{field} = .* is not allowed; it must be .*{re.escape(allowed)}"):
        dataclasses.replace(PAPER, **{field: value})


@pytest.mark.parametrize("field, value", [("towers", "2"), ("towers", 2.0), ("towers", True),
                                          ("dropout", "0.5"), ("activation", 1)])
def test_wrong_types_are_rejected(field, value):
    with pytest.raises(ValueError, match=f"{field} must be of type"):
        dataclasses.replace(PAPER, **{field: value})


def test_an_int_for_a_float_field_becomes_a_float():
    config = dataclasses.replace(PAPER, lrn_k=1)
    assert config.lrn_k == 1.0 and isinstance(config.lrn_k, float)


def test_override_from_strings():
    config = override(PAPER, ["towers=1", "activation=tanh", "dropout=0.25", "lrn='none'"])
    assert (config.towers, config.activation, config.dropout, config.lrn) == (1, "tanh", 0.25, "none")
    assert override(PAPER, {"pool_kernel": 2}).pool_kernel == 2
    assert override(PAPER, []) == PAPER


def test_override_rejects_unknown_keys_listing_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown AlexNetConfig key.*lrn_n.*allowed keys: num_classes"):
        override(PAPER, ["lrn_n=5"])
    with pytest.raises(ValueError, match="not of the form key=value"):
        override(PAPER, ["towers"])


def test_round_trip_through_a_dict():
    config = dataclasses.replace(PAPER, towers=1, lrn="paper")
    assert from_dict(AlexNetConfig, dataclasses.asdict(config)) == config
    with pytest.raises(ValueError, match="unknown"):
        from_dict(AlexNetConfig, {**dataclasses.asdict(config), "extra": 1})
