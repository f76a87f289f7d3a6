"""Bundled reference models: small, weights_only-loadable, at their documented quality, reproducible."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from mpq.models import checkpoint_path, load_reference, reference_names


@pytest.mark.parametrize("name", reference_names())
def test_checkpoint_small_and_weights_only(name):
    path = checkpoint_path(name)
    assert path.stat().st_size <= 2_000_000
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    meta = json.loads(path.with_suffix(".json").read_text())
    assert "seed" in meta and "torch" in meta


def test_digits_accuracy(digits_task):
    meta = json.loads(checkpoint_path("digits-cnn").with_suffix(".json").read_text())
    acc = digits_task.eval_fn(digits_task.model)
    assert acc >= 0.97
    assert acc == pytest.approx(meta["top1"], abs=1e-6)


@pytest.mark.parametrize("name", ["char-lm", "llama-lm", "hf-gpt2", "hf-llama"])
def test_lm_perplexity(name):
    if name.startswith("hf-"):
        pytest.importorskip("transformers")
    task = load_reference(name)
    meta = json.loads(checkpoint_path(name).with_suffix(".json").read_text())
    ppl = task.eval_fn(task.model)
    assert 1.5 < ppl < 4.5  # bytes of Python source: the stdlib is held out by file
    if sys.version.split()[0] == meta["python"]:
        assert ppl == pytest.approx(meta["perplexity"], rel=1e-3 if name.startswith("hf-") else 1e-4)


def test_hf_zoo_models_are_transformers_own_modules():
    """The zoo's transformers entries are the library's classes as a user loads them (Conv1D linears, tied heads),
    discovered without tracing."""
    tf = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from mpq.layers import discover_layers

    gpt2 = load_reference("hf-gpt2", eval_windows_n=4)
    assert isinstance(gpt2.model, tf.GPT2LMHeadModel)
    assert isinstance(gpt2.model.get_submodule("transformer.h.0.attn.c_attn"), Conv1D)
    inv = discover_layers(gpt2.model, gpt2.calib[0][0])
    assert inv["transformer.h.0.attn.c_attn"].weight_shape == (384, 128)  # fused q, k, v
    assert gpt2.model.lm_head.weight is gpt2.model.transformer.wte.weight
    llama = load_reference("hf-llama", eval_windows_n=4)
    assert isinstance(llama.model, tf.LlamaForCausalLM)
    inv = discover_layers(llama.model, llama.calib[0][0])
    assert inv["model.layers.0.self_attn.k_proj"].weight_shape == (64, 128)  # grouped-query attention
    assert llama.model.lm_head.weight is llama.model.model.embed_tokens.weight


def test_llama_lm_has_llama_blocks_and_a_tied_head():
    from mpq.layers import discover_layers

    task = load_reference("llama-lm", eval_windows_n=4)
    inv = discover_layers(task.model, task.calib[0][0])
    names = set(inv.names)
    assert {"blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.mlp.gate_proj", "head"} <= names
    assert inv["blocks.0.attn.k_proj"].weight_shape == (64, 128)  # 2 key/value heads of 32 for 4 query heads
    assert inv["head"].tied_to == "tok" and "tok" in {m.name for m in inv.kept_float}
    assert task.model.head.weight is task.model.tok.weight


def test_digits_training_is_deterministic():
    from mpq.models.digits import train

    a, meta_a = train(epochs=3)
    b, meta_b = train(epochs=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert meta_a["test_top1"] == meta_b["test_top1"] > 0.5


def test_llama7b_shaped_dedups_to_a_few_workloads():
    from mpq.layers import discover_layers
    from mpq.models.shaped import llama7b_task
    from mpq.space import build_search_space
    from mpq.workers import workloads_for

    task = llama7b_task()
    inventory = discover_layers(task.model, task.calib[0][0])  # on the meta device: no memory, no weights
    assert len(inventory) == 32 * 7 + 2 and next(task.model.parameters()).is_meta
    workloads, by_pair = workloads_for(inventory, build_search_space(inventory, "cpu"))
    shapes = {w.weight_shape for w in workloads}
    assert shapes == {(4096, 4096), (11008, 4096), (4096, 11008), (32000, 4096)}
    # one workload per (kind, shape, option): 7663 (layer, option) pairs measured as about 150 workloads
    keys = {w.key for w in workloads}
    assert len(by_pair) > 1000 and len(keys) == len({(w.kind, w.weight_shape, w.option) for w in workloads}) < 200
