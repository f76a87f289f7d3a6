"""BitConfig and LayerBits: names, JSON round trip, validation against a model."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mpq.config import FLOAT, BitConfig, LayerBits
from mpq.errors import ConfigError
from mpq.space import validate_config

bits_strategy = st.one_of(
    st.just(FLOAT),
    st.builds(LayerBits, st.integers(2, 8), st.sampled_from([None, 8, 16]),
              st.sampled_from([None, 16, 32, 64, 128, 256, 512]), st.just("int"), st.sampled_from([None, True, False])),
)


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True), bits_strategy, max_size=8))
def test_json_round_trip(layers):
    cfg = BitConfig(layers, meta={"model": "x"})
    back = BitConfig.from_json(cfg.to_json())
    assert back == cfg
    assert dict(back.layers) == dict(cfg.layers)
    assert back.meta["model"] == "x"


@given(bits_strategy)
def test_layer_bits_name_round_trip(bits):
    assert LayerBits.parse(bits.name) == bits


def test_names():
    assert LayerBits(8, 8).name == "w8a8"
    assert LayerBits(4, 16, 128).name == "w4a16g128"
    assert LayerBits(4, None, 32).name == "w4afg32"
    assert LayerBits.parse("w4g32") == LayerBits(4, None, 32)
    assert LayerBits.parse("float") == FLOAT
    assert LayerBits(3, 16, 64, symmetric=True).name == "w3a16g64sym"
    assert LayerBits(2, 16, 32, symmetric=False).name == "w2a16g32asym"
    assert LayerBits.parse("w4a16sym") == LayerBits(4, 16, None, symmetric=True)
    assert LayerBits.parse("w4a16g128") != LayerBits.parse("w4a16g128sym")  # None: the kernel's one scheme


def test_version_2_files_read():
    old = {"format": "mpq.bitconfig", "version": 2, "layers": {"fc": {"w_bits": 4, "a_bits": 16, "group_size": 128}}}
    assert BitConfig.from_dict(old)["fc"] == LayerBits(4, 16, 128)
    assert "symmetric" not in BitConfig.from_dict(old).to_dict()["layers"]["fc"]


@pytest.mark.parametrize("kwargs, words", [
    (dict(w_bits=1), ["weight bits 1", "2..8"]),
    (dict(w_bits=9), ["weight bits 9", "2..8"]),
    (dict(w_bits=8, a_bits=4), ["activation bits 4", "(8, 16)"]),
    (dict(w_bits=4, group_size=48), ["group size 48", "128"]),
    (dict(group_size=32), ["group size 32", "float weights"]),
    (dict(symmetric=True), ["symmetric=True", "integer weights"]),
    (dict(w_bits=8, a_bits=8, fmt="e4m3", symmetric=True), ["symmetric=True", "FP8"]),
])
def test_bad_layer_bits(kwargs, words):
    with pytest.raises(ConfigError) as e:
        LayerBits(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_bad_json():
    with pytest.raises(ConfigError, match="format"):
        BitConfig.from_json(json.dumps({"format": "other", "version": 1, "layers": {}}))
    with pytest.raises(ConfigError, match="version 99"):
        BitConfig.from_json(json.dumps({"format": "mpq.bitconfig", "version": 99, "layers": {}}))
    with pytest.raises(ConfigError, match="not valid JSON"):
        BitConfig.from_json("{")
    with pytest.raises(ConfigError, match="unknown layer-bits keys"):
        BitConfig.from_json(json.dumps({"format": "mpq.bitconfig", "version": 1, "layers": {"a": {"bits": 4}}}))


def test_save_load(tmp_path):
    cfg = BitConfig({"fc1": "w8a8", "fc2": LayerBits(4, 16, 32)})
    path = cfg.save(tmp_path / "c.json")
    assert BitConfig.load(path) == cfg
    assert cfg["missing"] == FLOAT
    assert cfg.histogram() == {"w4a16g32": 1, "w8a8": 1}


def test_frozen():
    cfg = BitConfig({"a": "w8a8"})
    with pytest.raises((AttributeError, TypeError)):
        cfg.layers["a"] = FLOAT
    with pytest.raises(AttributeError):
        cfg.layers = {}


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.dw = nn.Conv1d(8, 8, 3, groups=8)

    def forward(self, x):
        return self.norm(self.fc(x))


def test_validate_names_missing_layer():
    with pytest.raises(ConfigError) as e:
        validate_config(BitConfig({"fc9": "w8a8"}), _Net())
    msg = str(e.value)
    assert "'fc9'" in msg and "lacks" in msg and "fc" in msg


def test_validate_names_non_quantizable_layer():
    with pytest.raises(ConfigError) as e:
        validate_config(BitConfig({"norm": "w8a8"}), _Net())
    assert "'norm'" in str(e.value) and "LayerNorm" in str(e.value) and "cannot quantize" in str(e.value)


def test_validate_bits_without_kernel():
    with pytest.raises(ConfigError) as e:
        validate_config(BitConfig({"fc": "w3a16"}), _Net(), device="cpu")
    msg = str(e.value)
    assert "'fc'" in msg and "w3a16" in msg and "allowed" in msg and "w8a8" in msg and "w4a16g32" in msg


def test_validate_depthwise_conv_only_int8():
    with pytest.raises(ConfigError) as e:
        validate_config(BitConfig({"dw": "w4a16g32"}), _Net())
    assert "allowed: float, w8a8" in str(e.value)
    validate_config(BitConfig({"dw": "w8a8", "fc": "w4a16g64"}), _Net())
