"""Hugging Face models (tiny configs, random weights, nothing downloaded) through search -> apply -> evaluate, with no
tracing: GPT-2 (Conv1D linears, tied head), a Llama (RMSNorm, rotary, gated MLP, GQA), BERT and a ViT; and the CLI on
a saved model directory with its own tokenizer."""

import copy
import json

import pytest
import torch

import mpq
from mpq.apply_kernels import prepared_quantizer
from mpq.config import BitConfig
from mpq.evaluators import classification_eval, lm_batches, perplexity_eval
from mpq.fakequant import fake_quantize
from mpq.layers import discover_layers

tf = pytest.importorskip("transformers")

QUICK = dict(profile="inprocess", repeats=3, warmup=1, frontier_points=3, progress=False,
             evaluate_frontier=False, sensitivity="hessian",
             sensitivity_options={"min_probes": 2, "max_probes": 4})
VOCAB = 96


def _lm_data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # a repetitive stream, so that the metric moves when the weights are damaged
    stream = torch.arange(VOCAB).repeat(12)[torch.randperm(VOCAB * 12, generator=g) % (VOCAB * 12)]
    return lm_batches(stream[:600], 16, 4)[:2], lm_batches(stream[600:], 16, 4)[:3]


def gpt2():
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=2,
                                            bos_token_id=0, eos_token_id=0))


def llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                                              pad_token_id=0))


def bert():
    return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=128,
                                                          max_position_embeddings=32, num_labels=3, pad_token_id=0))


def vit():
    return tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64,
                                                     num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=128, num_labels=5))


def _cls_data(model_name: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if model_name == "vit":
        x = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(3)]
    else:
        x = [{"input_ids": torch.randint(1, VOCAB, (8, 12), generator=g),
              "attention_mask": torch.ones(8, 12, dtype=torch.long)} for _ in range(3)]
    y = [torch.randint(0, 5 if model_name == "vit" else 3, (8,), generator=g) for _ in range(3)]
    return list(zip(x[:2], y[:2])), list(zip(x[2:], y[2:]))


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "vit"])
def test_hf_family_search_apply_evaluate(family, tmp_path):
    torch.manual_seed(0)
    model = {"gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit}[family]().eval()
    if family in ("gpt2", "llama"):
        calib, held = _lm_data()
        eval_fn, hib = perplexity_eval(held), False
    else:
        calib, held = _cls_data(family)
        eval_fn, hib = classification_eval(held, "kl", copy.deepcopy(model)), False
    inv = discover_layers(model, calib[0][0])
    kinds = {l.kind for l in inv}
    assert "linear" in kinds and (family == "vit" or "embedding" in kinds)
    if family == "gpt2":
        assert inv["lm_head"].tied_to == "transformer.wte" and inv["transformer.h.0.attn.c_attn"].transposed
    before = eval_fn(model)
    result = mpq.search(model, calib, eval_fn, budget="size=0.4", out=tmp_path, metric="m", higher_is_better=hib,
                        **QUICK)
    assert eval_fn(model) == before  # search left the model alone
    chosen = result.row("chosen")
    assert chosen["size_mb"] <= result.info["limits"]["size_mb"] + 1e-9
    assert result.config.quantized(), "a 40% size budget cannot be met in float"
    applied = mpq.apply(copy.deepcopy(model), result.config, calib_data=calib)
    real = eval_fn(applied)
    assert real == pytest.approx(chosen["metric_real"], rel=1e-6)
    quant = prepared_quantizer(result.config.quantizer, model, calib, inv)
    fake = eval_fn(fake_quantize(model, result.config, "cpu", quantizer=quant))  # the same integers
    assert real == pytest.approx(fake, rel=0.05, abs=0.02)
    assert (tmp_path / "dashboard.html").exists()


def test_gpt2_conv1d_and_embedding_round_trip_through_apply():
    torch.manual_seed(1)
    model = gpt2().eval()
    ids = torch.randint(0, VOCAB, (2, 10))
    config = BitConfig({"transformer.h.0.attn.c_attn": "w8a8", "transformer.h.1.mlp.c_fc": "w4a16g32",
                        "transformer.h.0.mlp.c_proj": "w8a16", "transformer.wpe": "w4af", "lm_head": "w8a8"})
    real = mpq.apply(copy.deepcopy(model), config)
    fake = fake_quantize(model, config, "cpu")
    torch.testing.assert_close(real(ids).logits, fake(ids).logits, rtol=0.02, atol=0.02)
    ref = model(ids).logits
    assert float((real(ids).logits - ref).abs().max().detach()) < 0.5  # close to float too: nothing transposed wrongly
    # the quantized model saves as plain tensors and loads back into a fresh float model
    state = real.state_dict()
    fresh = mpq.load_quantized(gpt2().eval(), config, state)
    torch.testing.assert_close(fresh(ids).logits, real(ids).logits)


def test_llama_search_with_gptq(tmp_path):
    torch.manual_seed(2)
    model = llama().eval()
    calib, held = _lm_data(3)
    result = mpq.search(model, calib, perplexity_eval(held), budget="size=0.4", quantizer="gptq",
                        quantizer_options={"block": 32}, out=tmp_path, metric="perplexity", higher_is_better=False,
                        **QUICK)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantizer"] == {"name": "gptq", "damp": 0.01, "block": 32, "act_order": True,
                                          "clip": True, "max_batches": None}
    applied = mpq.apply(copy.deepcopy(model), BitConfig.load(tmp_path / "config.json"), calib_data=calib)
    assert perplexity_eval(held)(applied) == pytest.approx(result.row("chosen")["metric_real"], rel=1e-6)


def test_cli_on_a_saved_hf_directory(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from mpq.cli import main

    text = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(300))
    (tmp_path / "data.txt").write_text(text)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>"]))
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1,
                                             n_head=2, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(tmp_path / "tiny-gpt2")
    tokenizer.save_pretrained(tmp_path / "tiny-gpt2")
    monkeypatch.chdir(tmp_path)
    rc = main(["-q", "search", "--model", str(tmp_path / "tiny-gpt2"), "--eval", "perplexity", "--data", "data.txt",
               "--budget", "size=0.5", "--out", "run", "--profile", "inprocess", "--repeats", "3",
               "--frontier-points", "3", "--quantizer", "mse", "--sensitivity", "lrp"])
    assert rc == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["metric"] == "perplexity" and run["quantizer"]["name"] == "mse" and run["model"] == "tiny-gpt2"
    rc = main(["-q", "apply", "--model", str(tmp_path / "tiny-gpt2"), "--eval", "perplexity", "--data", "data.txt",
               "--config", "run/config.json"])
    assert rc == 0
