"""Layer discovery: quantizable layers, MACs per sample, kept-float modules with reasons."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpq.errors import CalibrationError, NoQuantizableLayersError
from mpq.layers import discover_layers


def test_digits_cnn_layers_and_macs(digits_task):
    x = digits_task.calib[0][0]
    inv = discover_layers(digits_task.model, x)
    assert inv.names == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    macs = {l.name: l.macs for l in inv}
    # conv: H*W*Cout*Cin*k*k per sample (same padding); linear: in*out
    assert macs["conv1"] == 8 * 8 * 32 * 1 * 9
    assert macs["conv2"] == 8 * 8 * 64 * 32 * 9
    assert macs["conv3"] == 4 * 4 * 128 * 64 * 9
    assert macs["fc1"] == 512 * 256 and macs["fc2"] == 256 * 10
    assert inv["conv2"].input_shape == (x.shape[0], 32, 8, 8)
    assert inv["fc1"].params == 512 * 256 + 256
    assert inv.kept_float == []


def test_char_lm_layers(lm_task):
    x = lm_task.calib[0][0]
    inv = discover_layers(lm_task.model, x)
    assert len(inv) == 4 * 4 + 1 + 2  # 4 blocks of 4 linears, the head, two embeddings
    assert inv["tok"].kind == "embedding" and inv["tok"].macs == 0 and inv["tok"].weight_shape == (256, 128)
    head = inv["head"]
    assert head.macs == x.shape[1] * 128 * 256 and not head.has_bias
    assert inv["blocks.0.fc"].macs == x.shape[1] * 128 * 512
    kept = {m.name: m for m in inv.kept_float}
    assert {"ln_f", "blocks.0.ln1"} <= set(kept) and not {"tok", "pos"} & set(kept)
    assert "normalisation" in kept["ln_f"].reason
    assert inv.float_bytes_other() == sum(m.bytes for m in inv.kept_float)


def test_unused_layer_kept_float():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.spare = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    inv = discover_layers(Net(), torch.randn(2, 4))
    assert inv.names == ["used"]
    assert inv.kept_float[0].name == "spare" and "not called" in inv.kept_float[0].reason


def test_shared_layer_counts_every_call():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.fc(x))

    inv = discover_layers(Net(), torch.randn(3, 8))
    assert inv["fc"].calls == 2 and inv["fc"].macs == 2 * 64


def test_no_quantizable_layer():
    model = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    with pytest.raises(NoQuantizableLayersError) as e:
        discover_layers(model, torch.randn(2, 4))
    msg = str(e.value)
    assert "no quantizable layer" in msg and "Linear, Conv1d, Conv2d" in msg and "LayerNorm" in msg


def test_input_that_does_not_fit(digits_task):
    with pytest.raises(CalibrationError) as e:
        discover_layers(digits_task.model, torch.randn(4, 3, 8, 8))
    msg = str(e.value)
    assert "(4, 3, 8, 8)" in msg and "'conv1'" in msg and "1 channels" in msg
