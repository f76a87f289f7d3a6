"""Export to serving formats, on tiny Hugging Face GPT-2 and Llama models built here (random weights, a byte-level
BPE tokenizer trained on the standard library's source; nothing downloaded).

compressed-tensors: the package's own loader (through transformers) gives back every weight exactly as mpq's
dequantized weight, and the model's logits match mpq's fake-quant model; options it cannot express are refused by
name. GGUF: block layouts against the ``gguf`` package's dequantizers, values within the type's rounding of
mpq's (exact where the type holds them), ``GGUFReader`` reads the file back with the intended types and shapes."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mpq.config import BitConfig
from mpq.errors import ConfigError
from mpq.numerics import ActQuantSpec, QuantScheme, WeightQuantSpec, quantize_weight

tf = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("compressed_tensors")

from mpq.export import export  # noqa: E402
from mpq.export.gguf_quants import TYPES, Grid, encode, pack, steps  # noqa: E402
from mpq.export.plan import UnsupportedOptionError, build_plan, fake_quant_model  # noqa: E402


# --------------------------------------------------------------------------------------------------------------------
# Tiny models, a tokenizer, and numerics for options no kernel on this branch defines
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = inspect.getsource(json)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def llama(vocab: int, hidden: int = 256, tied: bool = False):
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=tied)).eval()


def gpt2(vocab: int):
    torch.manual_seed(1)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=256, n_layer=2, n_head=4,
                                            bos_token_id=0, eos_token_id=0)).eval()


def numerics(layer, bits) -> QuantScheme:
    """Weight-only options of every width and symmetry with fp16 scales (``w3a16g64sym``, ...), and the CUDA
    kernels' W8A8 (per-token int8) and FP8 numerics."""
    if bits.fmt == "e4m3":
        return QuantScheme(WeightQuantSpec(8, True, None, "float32", fmt="e4m3"),
                           ActQuantSpec(8, "float8_e4m3fn", "token", dynamic=True))
    if bits.a_bits == 8:
        return QuantScheme(WeightQuantSpec(8, True, None, "float32"), ActQuantSpec(8, "int", "token", True, True))
    return QuantScheme(WeightQuantSpec(bits.w_bits, bits.symmetric is not False, bits.group_size, "float16"),
                       ActQuantSpec(16, "bfloat16"))


def ids(vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (2, 24), generator=torch.Generator().manual_seed(5))


# --------------------------------------------------------------------------------------------------------------------
# compressed-tensors
# --------------------------------------------------------------------------------------------------------------------
LLAMA_MIXED = {"model.layers.0.self_attn.q_proj": "w4a16g32sym", "model.layers.0.self_attn.k_proj": "w3a16sym",
               "model.layers.0.self_attn.v_proj": "w4a16g32sym", "model.layers.0.mlp.gate_proj": "w2a16g64sym",
               "model.layers.0.mlp.down_proj": "w8a8", "model.layers.1.mlp.up_proj": "fp8",
               "model.layers.1.self_attn.o_proj": "w6a16g128sym", "model.layers.1.mlp.down_proj": "w5a16sym",
               "lm_head": "w8a16sym"}


def test_compressed_tensors_round_trip_through_the_packages_loader(tmp_path, tokenizer):
    model = llama(len(tokenizer))
    config = BitConfig(LLAMA_MIXED)
    report = export(model, config, format="compressed-tensors", out=tmp_path, device=numerics, tokenizer=tokenizer)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "compressed-tensors" and saved["format"] == "mixed-precision"
    groups = saved["config_groups"].values()
    assert len(groups) == 8  # one per distinct scheme: the two w4a16g32sym layers share one
    assert sorted(t for g in groups for t in g["targets"]) == sorted(LLAMA_MIXED)
    assert {g["format"] for g in groups} == {"pack-quantized", "int-quantized", "float-quantized"}
    by_target = {t: g for g in groups for t in g["targets"]}
    assert by_target["model.layers.0.self_attn.q_proj"]["weights"] == {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32, "dynamic": False}
    assert by_target["model.layers.0.mlp.down_proj"]["input_activations"]["strategy"] == "token"

    # the package's own loader (transformers' compressed-tensors quantizer, which decompresses with it)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    plan = build_plan(model, config, numerics)
    x = ids(len(tokenizer))
    with torch.no_grad():
        logits = loaded(x).logits  # the first forward pass decompresses every layer
        reference = fake_quant_model(plan)(x).logits
    for lx in plan.quantized():
        assert torch.equal(loaded.get_submodule(lx.name).weight.float(), lx.values()), lx.name
    for name in ("model.layers.0.self_attn.o_proj", "model.embed_tokens"):  # float layers left as they were
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight)
    # mpq rounds inputs of weight-only layers to bf16 and scales int8 inputs by amax/127 (the package by /127.5)
    assert float((logits - reference).abs().max()) < 0.02 * float(reference.abs().max())
    assert report.written_total_bytes == (tmp_path / "model.safetensors").stat().st_size
    rows = {r.layer: r for r in report.layers}
    assert rows["model.layers.0.self_attn.q_proj"].max_abs_diff == 0
    assert (tmp_path / "export.md").exists() and (tmp_path / "tokenizer.json").exists()


def test_compressed_tensors_weight_only_logits_match_fake_quant_in_float(tmp_path, tokenizer):
    model = llama(len(tokenizer), hidden=64)
    config = BitConfig({"model.layers.0.self_attn.q_proj": "w4a16g32sym", "model.layers.1.mlp.up_proj": "w3a16sym",
                        "lm_head": "w6a16g32sym"})
    export(model, config, format="compressed-tensors", out=tmp_path, device=numerics)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = ids(len(tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, fake_quant_model(build_plan(model, config, numerics),
                                                                      float_activations=True)(x).logits,
                                   rtol=1e-5, atol=1e-5)


def test_cuda_numerics_export_on_a_machine_without_a_gpu(tmp_path, tokenizer):
    """A config searched for CUDA (symmetric bf16 W4A16, per-token W8A8, FP8) exports here: its numerics are the
    registered CUDA kernels' even where they cannot run."""
    model = llama(len(tokenizer))
    config = BitConfig({"model.layers.0.self_attn.q_proj": "w4a16g128", "model.layers.0.mlp.down_proj": "w8a8",
                        "model.layers.1.mlp.up_proj": "fp8"})
    report = export(model, config, format="compressed-tensors", out=tmp_path, device="cuda")
    assert all(r.max_abs_diff == 0 for r in report.layers if r.option != "float")
    assert {r.predicted_bytes for r in report.layers if r.layer == "model.layers.0.self_attn.q_proj"} == \
        {256 * 256 // 2 + 256 * 2 * 2}


def test_compressed_tensors_refuses_what_it_cannot_express_by_name(tmp_path, tokenizer):
    model = llama(len(tokenizer), hidden=64)
    config = BitConfig({"model.layers.0.self_attn.q_proj": "w8a8",        # CPU: per-tensor dynamic uint8 inputs
                        "model.layers.0.mlp.up_proj": "w4a16g32",         # CPU tinygemm: float zero per group
                        "model.embed_tokens": "w4af"})                    # row-wise table: float minimum per row
    out = tmp_path / "ct"
    with pytest.raises(UnsupportedOptionError) as e:
        export(model, config, format="compressed-tensors", out=out, device="cpu")
    text = str(e.value)
    assert "'model.layers.0.self_attn.q_proj' option 'w8a8'" in text and "per tensor" in text
    assert "'model.layers.0.mlp.up_proj' option 'w4a16g32'" in text and "integer zero points" in text
    assert "'model.embed_tokens' option 'w4af'" in text
    assert not out.exists()
    g = gpt2(len(tokenizer))
    with pytest.raises(UnsupportedOptionError) as e:
        export(g, BitConfig({"transformer.h.0.attn.c_attn": "w8a16", "lm_head": "w8a16"}),
               format="compressed-tensors", out=out, device="cpu")
    assert "'transformer.h.0.attn.c_attn' option 'w8a16': a Hugging Face Conv1D" in str(e.value)
    assert "'lm_head' option 'w8a16': the weight is tied to 'transformer.wte'" in str(e.value)
    with pytest.raises(UnsupportedOptionError, match="K=96 is not a multiple of the group size 64"):
        export(llama(len(tokenizer), hidden=96), BitConfig({"model.layers.0.self_attn.q_proj": "w4a16g64sym"}),
               format="compressed-tensors", out=out, device=numerics)
    assert not out.exists()


# --------------------------------------------------------------------------------------------------------------------
# GGUF blocks
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TYPES))
def test_block_layout_matches_the_packages_dequantizer(name):
    """Random integer fields packed by mpq decode, with the gguf package's dequantizer, to the type's formula."""
    t = TYPES[name]
    rng = np.random.default_rng(0)
    nb, per = 6, t.block // t.sub
    u = rng.integers(0, 1 << t.bits, size=(nb, t.block)).astype(np.uint8)
    d = rng.uniform(0.01, 0.1, nb).astype(np.float16)
    fields, offset = {}, 0.0
    if t.kquant:
        fields["sc"] = rng.integers(0, t.scale_max + 1, size=(nb, per))
        step = np.repeat(d.astype(np.float32)[:, None] * fields["sc"], t.sub, axis=1)
        if not t.symmetric:
            fields["dmin"] = rng.uniform(0.01, 0.1, nb).astype(np.float16)
            fields["mn"] = rng.integers(0, t.scale_max + 1, size=(nb, per))
            offset = -np.repeat(fields["dmin"].astype(np.float32)[:, None] * fields["mn"], t.sub, axis=1)
    else:
        step = d.astype(np.float32)[:, None]
        if not t.symmetric:
            fields["m"] = rng.uniform(-1, 0, nb).astype(np.float16)
            offset = fields["m"].astype(np.float32)[:, None]
    blocks = pack(t, d, u, **fields)
    assert blocks.shape == (nb, t.type_size)
    decoded = gguf.quants.dequantize(blocks.reshape(1, -1), getattr(gguf.GGMLQuantizationType, name))
    qmin = t.levels[0] if t.symmetric else 0
    np.testing.assert_array_equal(decoded.reshape(nb, -1), step * (u.astype(np.float32) + qmin) + offset)
    np.testing.assert_array_equal(steps(blocks.reshape(1, -1), name).reshape(nb, -1),
                                  np.broadcast_to(np.abs(step), (nb, t.block)))


def _grid(qw) -> Grid:
    if qw.zero is None:
        return Grid(qw.scale.numpy(), None, qw.group, qmax=int(qw.spec.qmax))
    return Grid(qw.scale.numpy(), (qw.zero - qw.spec.mid * qw.scale).numpy(), qw.group, levels=2 ** qw.spec.bits)


ENCODINGS = [  # (bits, symmetric, group, scale dtype, GGUF type, exact)
    (8, True, None, "bfloat16", "Q8_0", True), (4, True, 32, "float16", "Q4_0", True),
    (4, True, 128, "bfloat16", "Q4_0", True), (5, True, 64, "float16", "Q5_0", True),
    (3, True, 32, "float16", "Q4_0", True), (2, True, 64, "bfloat16", "Q4_0", True),
    (4, False, 32, "bfloat16", "Q4_1", False), (5, False, 32, "float16", "Q5_1", False),
    (6, True, 64, "bfloat16", "Q6_K", False), (5, False, 128, "bfloat16", "Q5_K", False),
    (4, False, 128, "bfloat16", "Q4_K", False), (4, True, 64, "float16", "Q4_K", False),
    (3, True, 64, "float16", "Q3_K", False), (2, False, 32, "bfloat16", "Q2_K", False),
    (6, True, None, "float32", "Q8_0", False),
]


@pytest.mark.parametrize("bits,sym,group,scale_dtype,qtype,exact", ENCODINGS)
def test_encoding_holds_mpq_values_within_the_types_rounding(bits, sym, group, scale_dtype, qtype, exact):
    torch.manual_seed(3)
    weight = torch.randn(48, 512) * 0.05
    weight[5, 7] = 0.9  # an outlier: its group's step is far from its super-block neighbours'
    qw = quantize_weight(weight, WeightQuantSpec(bits, sym, group, scale_dtype))
    values = qw.dequantize().numpy()
    blocks = encode(values, qtype, _grid(qw))
    decoded = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype))
    err = np.abs(decoded - values)
    if exact:
        np.testing.assert_array_equal(decoded, values)
    # every value within half a step of the written grid (a clipped extreme may cost up to one step)
    step = steps(blocks, qtype)
    assert float(np.sqrt((err ** 2).mean())) <= 0.5 * float(np.sqrt((step ** 2).mean()))
    assert np.all(err <= step * 1.0001 + 1e-7)
    if qtype in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):  # the package quantizes these types from floats itself
        theirs = gguf.quants.dequantize(gguf.quants.quantize(values, getattr(gguf.GGMLQuantizationType, qtype)),
                                        getattr(gguf.GGMLQuantizationType, qtype))
        assert np.linalg.norm(decoded - values) <= np.linalg.norm(theirs - values)


# --------------------------------------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------------------------------------
GPT2_MIXED = {"transformer.h.0.attn.c_attn": "w4a16g32sym", "transformer.h.0.mlp.c_fc": "w3a16g64sym",
              "transformer.h.0.mlp.c_proj": "w5a16g64asym", "transformer.h.1.attn.c_proj": "w2a16g32asym",
              "transformer.h.1.mlp.c_proj": "w6a16g128sym", "lm_head": "w8a16sym", "transformer.wpe": "w4a16g32sym"}
LLAMA_GGUF = {"model.layers.0.self_attn.q_proj": "w4a16g128asym", "model.layers.0.self_attn.k_proj": "w4a16g32sym",
              "model.layers.0.mlp.gate_proj": "w3a16g64sym", "model.layers.0.mlp.down_proj": "w8a8",
              "model.layers.1.mlp.up_proj": "fp8", "model.layers.1.self_attn.v_proj": "w6a16sym",
              "model.layers.1.mlp.down_proj": "w5a16g32sym", "model.embed_tokens": "w4a16g64asym"}
EXPECTED = {"w4a16g32sym": "Q4_0", "w3a16g64sym": "Q3_K", "w5a16g64asym": "Q5_K", "w2a16g32asym": "Q2_K",
            "w6a16g128sym": "Q6_K", "w8a16sym": "Q8_0", "w4a16g128asym": "Q4_K", "w8a8": "Q8_0", "fp8": "Q8_0",
            "w6a16sym": "Q6_K", "w5a16g32sym": "Q5_0", "w4a16g64asym": "Q4_K"}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gguf_file_reads_back_with_the_intended_types(family, tmp_path, tokenizer):
    from mpq.export.gguf_file import _rotary_permutation

    model = gpt2(len(tokenizer)) if family == "gpt2" else llama(len(tokenizer))
    mixed = GPT2_MIXED if family == "gpt2" else LLAMA_GGUF
    report = export(model, BitConfig(mixed), format="gguf", out=tmp_path, device=numerics, tokenizer=tokenizer,
                    name="tiny")
    reader = gguf.GGUFReader(tmp_path / "tiny.gguf")
    tensors = {t.name: t for t in reader.tensors}
    plan = build_plan(model, BitConfig(mixed), numerics)
    names = {r.layer: r.written_as.split()[0] for r in report.layers}
    for layer, option in mixed.items():
        t = tensors[names[layer]]
        assert t.tensor_type.name == EXPECTED[option], (layer, t.tensor_type.name)
        lx = plan.layers[layer]
        assert [int(s) for s in t.shape] == [lx.layer.k, lx.layer.n]  # ggml order: the row (K) first
        values = lx.values().numpy()
        if layer.endswith(("q_proj", "k_proj")):
            heads = 4 if layer.endswith("q_proj") else 2
            values = values[_rotary_permutation(lx.layer.n, heads)]
        decoded = gguf.quants.dequantize(t.data, t.tensor_type).reshape(values.shape)
        if EXPECTED[option] in ("Q4_0", "Q5_0") or option == "w8a16sym":
            np.testing.assert_array_equal(decoded, values)
        else:
            step = steps(np.ascontiguousarray(t.data).reshape(lx.layer.n, -1), t.tensor_type.name)
            assert np.all(np.abs(decoded - values) <= step * 1.0001 + 1e-7), layer
    float_layer = "transformer.h.1.attn.c_attn" if family == "gpt2" else "model.layers.1.self_attn.o_proj"
    t = tensors[names[float_layer]]
    assert t.tensor_type.name == "F32"
    expected = model.get_submodule(float_layer).weight.detach()
    expected = expected.t() if family == "gpt2" else expected  # GPT-2's Conv1D stores [in, out]
    np.testing.assert_array_equal(np.asarray(t.data).reshape(expected.shape), expected.numpy())
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == family
    assert len(fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
    assert len(fields["tokenizer.ggml.merges"].data) > 0
    assert ("output.weight" in tensors) == (family == "gpt2" or not model.config.tie_word_embeddings)
    assert report.written_total_bytes == (tmp_path / "tiny.gguf").stat().st_size
    assert report.predicted_total_bytes > 0 and (tmp_path / "export.md").read_text().count("|") > 20


def test_gguf_prefer_exact_and_narrow_rows(tmp_path, tokenizer):
    from mpq.export.gguf_file import choose_type

    model = llama(len(tokenizer), hidden=64)  # rows of 64: no K-quant fits, the 32-blocks take over
    config = BitConfig({"model.layers.0.self_attn.q_proj": "w3a16g32sym", "model.layers.0.mlp.up_proj": "w6a16sym",
                        "model.layers.1.mlp.gate_proj": "w4a16g32asym"})
    report = export(model, config, format="gguf", out=tmp_path / "size", device=numerics, tokenizer=tokenizer)
    got = {r.layer: r.written_as.split()[1] for r in report.layers if r.option != "float"}
    assert got == {"model.layers.0.self_attn.q_proj": "Q4_0", "model.layers.0.mlp.up_proj": "Q8_0",
                   "model.layers.1.mlp.gate_proj": "Q4_1"}
    assert all("not a multiple of 256" in r.note for r in report.layers if r.option != "float")
    plan = build_plan(model, config, numerics)
    assert [choose_type(lx, "exact") for lx in plan.quantized()] == ["Q4_0", "Q8_0", "Q4_1"]
    exact = export(model, config, format="gguf", out=tmp_path / "exact", device=numerics, tokenizer=tokenizer,
                   gguf_prefer="exact", gguf_types={"model.layers.0.mlp.up_proj": "Q6_K"})
    rows = {r.layer: r for r in exact.layers}
    assert rows["model.layers.0.self_attn.q_proj"].max_abs_diff == 0
    assert rows["model.layers.0.mlp.up_proj"].written_as.endswith("Q8_0")  # Q6_K asked, rows too narrow
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = Tokenizer(models.BPE(unk_token="<unk>"))  # whitespace words: llama.cpp's gpt2 tokenizer is byte-level
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(["def f(x): return x"], trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>"]))
    with pytest.raises(UnsupportedOptionError, match="byte-level BPE tokenizers with GPT-2's pre-tokenizer"):
        export(model, config, format="gguf", out=tmp_path / "words", device=numerics,
               tokenizer=tf.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>"))
    assert not (tmp_path / "words").exists()
    with pytest.raises(ConfigError, match="gguf_types gives layer 'lm_head' type 'Q7_K'"):
        export(llama(len(tokenizer), hidden=64), BitConfig({"lm_head": "w4a16g32sym"}), format="gguf",
               out=tmp_path / "bad", device=numerics, tokenizer=tokenizer, gguf_types={"lm_head": "Q7_K"})


def test_gguf_from_the_cpu_kernels_options(tmp_path, tokenizer):
    """The CPU kernels' own numerics: per-tensor W8A8 (float32 scales), W8A16 (bf16), tinygemm W4A16 (bf16 scale
    and zero), row-wise embedding tables (fp16 scale and minimum)."""
    model = llama(len(tokenizer))
    config = BitConfig({"model.layers.0.self_attn.q_proj": "w8a8", "model.layers.0.self_attn.o_proj": "w8a16",
                        "model.layers.1.mlp.up_proj": "w4a16g32", "model.embed_tokens": "w4af",
                        "model.layers.1.mlp.down_proj": "w4a16g128"})
    rows = {r.layer: r for r in export(model, config, format="gguf", out=tmp_path / "size", device="cpu",
                                       tokenizer=tokenizer).layers}
    assert {n: r.written_as.split()[1] for n, r in rows.items() if r.option != "float"} == {
        "model.layers.0.self_attn.q_proj": "Q8_0", "model.layers.0.self_attn.o_proj": "Q8_0",
        "model.layers.1.mlp.up_proj": "Q4_K", "model.embed_tokens": "Q4_K", "model.layers.1.mlp.down_proj": "Q4_K"}
    assert rows["model.layers.0.self_attn.o_proj"].max_abs_diff == 0  # bf16 scales are fp16 numbers here
    assert 0 < rows["model.layers.0.self_attn.q_proj"].rel_rms_vs_mpq < 1e-3  # float32 scales rounded to fp16
    exact = {r.layer: r for r in export(model, config, format="gguf", out=tmp_path / "exact", device="cpu",
                                        tokenizer=tokenizer, gguf_prefer="exact").layers}
    assert exact["model.embed_tokens"].written_as.endswith("Q4_1")
    assert exact["model.embed_tokens"].max_abs_diff == 0  # the row's fp16 minimum is Q4_1's minimum
    assert exact["model.layers.1.mlp.up_proj"].rel_rms_vs_mpq < 1e-3  # bf16 zero -> fp16 minimum per block
    assert exact["model.layers.1.mlp.up_proj"].written_bytes > rows["model.layers.1.mlp.up_proj"].written_bytes


# --------------------------------------------------------------------------------------------------------------------
# The command line on a run directory, and the lazy import
# --------------------------------------------------------------------------------------------------------------------
def test_cli_exports_a_run_directory(tmp_path, tokenizer, capsys):
    from mpq.cli import main
    from mpq.fakequant import fake_quantize
    from mpq.quantizers import get_quantizer

    model = llama(len(tokenizer), hidden=64, tied=True)
    model.save_pretrained(tmp_path / "tiny-llama")
    tokenizer.save_pretrained(tmp_path / "tiny-llama")
    run_dir = tmp_path / "run"
    config = BitConfig({"model.layers.0.self_attn.q_proj": "w8a16", "model.layers.1.mlp.down_proj": "w8a16"},
                       meta={"quantizer": {"name": "mse", "grid": 20, "min_ratio": 0.5}})
    config.save(run_dir / "config.json")  # what mpq search writes: the config, run.json, search_args.json
    (run_dir / "run.json").write_text(json.dumps({"format": "mpq.run", "device": "cpu"}))
    (run_dir / "search_args.json").write_text(json.dumps({"model": str(tmp_path / "tiny-llama")}))
    for fmt in ("compressed-tensors", "gguf"):
        assert main(["export", str(run_dir), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "compressed-tensors", dtype=torch.float32)
    with torch.no_grad():
        loaded(ids(len(tokenizer)))
    mse = fake_quantize(model, config, "cpu", quantizer=get_quantizer("mse"))  # the run's recorded quantizer
    for name in config.quantized():
        assert torch.equal(loaded.get_submodule(name).weight, mse.get_submodule(name).weight)
    assert gguf.GGUFReader(next((tmp_path / "gguf").glob("*.gguf"))).tensors
    (run_dir / "search_args.json").unlink()
    assert main(["export", str(run_dir), "--format", "gguf", "--out", str(tmp_path / "x")]) == 2
    assert "give --model" in capsys.readouterr().err


def test_import_mpq_leaves_export_unloaded():
    code = ("import sys, mpq; assert 'mpq.export' not in sys.modules and 'torch' not in sys.modules; "
            "assert mpq.export.__name__ == 'export'; import mpq.export.cli; assert callable(mpq.export)")
    subprocess.run([sys.executable, "-c", code], check=True)
