"""Layer discovery: quantizable layers, MACs per sample, kept-float modules with reasons."""

from __future__ import annotations

import copy
import os

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


# --- subclasses of quantizable layers (issue 21 item 4) ---------------------------------------------------------------
class GainLinear(nn.Linear):
    """A Linear with its own forward and an extra parameter: swapping it for a kernel module would drop both."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.full((self.out_features,), 2.0))

    def forward(self, x):
        return super().forward(x) * self.gain


class RenamedLinear(nn.Linear):
    """A Linear in all but name: its forward is the base class's and it holds only weight and bias."""


def custom_task():
    """A ``module:function`` task for the CLI: a model whose first layer is a GainLinear."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = nn.Sequential(GainLinear(16, 32), nn.ReLU(), RenamedLinear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16)
    y = model(x).argmax(-1)
    return SimpleNamespace(name="gain-mlp", model=model, calib=[(x, y)], metric="top1", higher_is_better=True,
                           eval_fn=lambda m: float((m(x).argmax(-1) == y).float().mean()))


def test_custom_subclass_stays_float_with_reason():
    import mpq
    from mpq.config import BitConfig
    from mpq.errors import ConfigError
    from mpq.fakequant import fake_quantize

    task = custom_task()
    inv = discover_layers(task.model, task.calib[0][0])
    assert inv.names == ["2", "4"]  # the renamed Linear is quantizable, the GainLinear is not
    kept = {m.name: m for m in inv.kept_float}
    assert "its own forward (GainLinear.forward)" in kept["0"].reason and "(gain)" in kept["0"].reason
    assert kept["0"].params == 16 * 32 + 32 + 32
    x = task.calib[0][0]
    with torch.no_grad():
        y_float = task.model(x)
        cfg = BitConfig.uniform(inv.names, "w8a16")
        y_fake = fake_quantize(task.model, cfg, "cpu", inv)(x)
        applied = mpq.apply(copy.deepcopy(task.model), cfg, inventory=inv)
        assert type(applied[0]) is GainLinear and torch.equal(applied[0].gain, task.model[0].gain)
        y_real = applied(x)
    for y in (y_fake, y_real):  # only the int8 layers' rounding, not a lost gain (which halves the output)
        assert ((y - y_float).norm() / y_float.norm()) < 0.02
    with pytest.raises(ConfigError, match=r"names layer '0', a GainLinear, which mpq cannot quantize"):
        mpq.apply(copy.deepcopy(task.model), BitConfig({"0": "w8a16"}))


def test_cli_keeps_custom_subclass(tmp_path):
    """Through the CLI with a ``module:function`` model: the subclass's weights and gain are saved as they were."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from mpq.config import BitConfig

    BitConfig.uniform(["2", "4"], "w8a16").save(tmp_path / "config.json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "mpq.cli", "apply", "--model", "test_layers:custom_task", "--config",
                           str(tmp_path / "config.json"), "--out", str(tmp_path / "q.pt"), "--threads", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = torch.load(tmp_path / "q.pt", weights_only=True)
    task = custom_task()
    assert torch.equal(state["0.gain"], task.model[0].gain) and torch.equal(state["0.weight"], task.model[0].weight)
    assert state["2.qweight"].dtype == torch.int8  # the plain layers did run on the kernel
    out = proc.stdout
    result = json.loads(out[out.index("{"):out.rindex("}") + 1])
    assert result["top1"] >= 0.9
