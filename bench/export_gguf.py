"""Exported checkpoints run by their serving stacks: perplexity of llama.cpp on mpq's GGUF (and of transformers on
mpq's compressed-tensors checkpoint) next to mpq's own fake-quant perplexity, with file size next to predicted size.

A tiny Llama (hidden 256, 2 layers: every row a whole number of K-quant super-blocks) is trained here for a few
hundred steps on the Python standard library's source with a byte-level BPE tokenizer trained on the same split
(files split by path hash as mpq's char-lm does); perplexity is measured on held-out files, on the same token
windows for every runner. Configs are weight-only (llama.cpp quantizes activations its own way): float, uniform
8/4-bit symmetric (Q8_0, Q4_0: mpq's values exactly), uniform 4-bit asymmetric g128 (Q4_K), 3-bit g64 (Q3_K), and a
mixed config.

    flock /tmp/mpq-bench.lock python bench/export_gguf.py        # writes bench/results/export_gguf.json

llama.cpp comes from ``llama-cpp-python`` (built from source: ``pip install llama-cpp-python``, 55 minutes on the
2 shared cores here); without it the
GGUF rows are evaluated by dequantizing the file with the ``gguf`` package into the torch model, and the result
says so.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, write_result  # noqa: E402
from mpq.config import BitConfig  # noqa: E402
from mpq.export import export  # noqa: E402
from mpq.export.plan import build_plan, fake_quant_model  # noqa: E402
from mpq.models.charlm import split_of, stdlib_files  # noqa: E402
from mpq.numerics import ActQuantSpec, QuantScheme, WeightQuantSpec  # noqa: E402


def numerics(layer, bits) -> QuantScheme:
    """Weight-only options of any width and symmetry, fp16 scales (the numerics of mpq's new CPU options)."""
    return QuantScheme(WeightQuantSpec(bits.w_bits, bits.symmetric is not False, bits.group_size, "float16"),
                       ActQuantSpec(16, "bfloat16"))


def corpus_text(split: str, limit: int) -> str:
    out, size = [], 0
    for p in stdlib_files():
        if split_of(p) == split:
            out.append(p.read_text(encoding="utf-8", errors="replace"))
            size += len(out[-1])
            if size > limit:
                break
    return "\n".join(out)


def train_tokenizer(text: str, vocab: int):
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def train_model(ids: torch.Tensor, vocab: int, steps: int, seq: int, batch: int, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=seq, bos_token_id=0, eos_token_id=0,
        tie_word_embeddings=False))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=g)
        tokens = torch.stack([ids[s:s + seq] for s in starts])
        loss = model(tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval(), float(loss)


@torch.no_grad()
def torch_perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for w in windows.split(8):
        logits = model(w).logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                       reduction="sum"))
        count += w[:, 1:].numel()
    return math.exp(nll / count)


def _llama(**kwargs):
    """``llama_cpp.Llama`` with llama.cpp's extra (repacking) weight buffers off: built for this Sapphire Rapids
    VM, they run quantized weights on AMX tiles, which the VM does not grant (the process dies of SIGILL)."""
    import llama_cpp.llama as binding

    default = binding.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    binding.llama_cpp.llama_model_default_params = params
    try:
        return binding.Llama(**kwargs)
    finally:
        binding.llama_cpp.llama_model_default_params = default


def llama_cpp_perplexity(path: Path, windows: torch.Tensor, threads: int) -> float:
    llm = _llama(model_path=str(path), n_ctx=windows.shape[1], logits_all=True, verbose=False, n_threads=threads,
                n_batch=windows.shape[1])
    nll, count = 0.0, 0
    for w in windows.tolist():
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return math.exp(nll / count)


def llama_cpp_tokens(path: Path, text: str) -> list[int]:
    llm = _llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    return llm.tokenize(text.encode(), add_bos=False, special=False)


def gguf_in_torch(model, path: Path, plan) -> torch.nn.Module:
    """The model with every quantized layer's weight replaced by the GGUF file's, dequantized by the gguf package
    (q/k rows put back in Hugging Face's order)."""
    import gguf

    from mpq.export.gguf_file import _rotary_permutation

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    out = copy.deepcopy(model)
    for lx in plan.quantized():
        t = tensors[tmap.get_name(lx.name) + ".weight"]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(lx.layer.n, -1)
        for leaf, heads in (("q_proj", model.config.num_attention_heads), ("k_proj", model.config.num_key_value_heads)):
            if lx.name.endswith(leaf):
                inv = np.argsort(_rotary_permutation(lx.layer.n, heads))
                w = w[inv]
        out.get_submodule(lx.name).weight.data = torch.from_numpy(np.ascontiguousarray(w)).float()
    return out.eval()


def configs(model) -> dict[str, BitConfig]:
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    mixed = {}
    for n in linears:
        if n == "lm_head":
            mixed[n] = "w8a16sym"
        elif "self_attn" in n:
            mixed[n] = "w6a16g64sym" if n.endswith(("q_proj", "k_proj")) else "w4a16g32sym"
        else:
            mixed[n] = "w3a16g64sym" if n.endswith(("gate_proj", "up_proj")) else "w4a16g128asym"
    return {"float": BitConfig({}),
            "uniform w8a16sym": BitConfig.uniform(linears, "w8a16sym"),
            "uniform w4a16g32sym": BitConfig.uniform(linears, "w4a16g32sym"),
            "uniform w4a16g128asym": BitConfig.uniform(linears, "w4a16g128asym"),
            "uniform w3a16g64sym": BitConfig.uniform(linears, "w3a16g64sym"),
            "mixed (6/4/3-bit, head 8)": BitConfig(mixed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads (numbers, not timings)")
    args = ap.parse_args()
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    torch.set_num_threads(args.threads)
    t0 = time.time()
    text = corpus_text("train", 800_000)
    tokenizer = train_tokenizer(text, 512)
    train_ids = torch.tensor(tokenizer(text)["input_ids"])
    print(f"tokenizer and {train_ids.numel()} training tokens in {time.time() - t0:.0f} s", flush=True)
    held = torch.tensor(tokenizer(corpus_text("heldout", 300_000))["input_ids"])
    windows = held[: args.windows * args.seq].reshape(args.windows, args.seq)
    model, last_loss = train_model(train_ids, len(tokenizer), args.steps, args.seq, args.batch)
    train_s = time.time() - t0
    print(f"trained {args.steps} steps in {train_s:.0f} s, last loss {last_loss:.3f}", flush=True)
    try:
        import llama_cpp

        llama_version, llama_error = llama_cpp.__version__, None
    except ImportError as e:
        llama_version, llama_error = None, f"llama_cpp not importable: {e}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sample = corpus_text("heldout", 2000)[:2000]
        tokens_match = None
        for name, config in configs(model).items():
            plan = build_plan(model, config, numerics)
            mpq_ppl = torch_perplexity(fake_quant_model(plan, float_activations=True), windows)
            rep = export(model, config, format="gguf", out=Path(tmp) / "gguf", device=numerics, tokenizer=tokenizer,
                         name="tiny")
            path = Path(tmp) / "gguf" / "tiny.gguf"
            row = {"config": name, "mpq_fakequant_ppl": mpq_ppl, "gguf_types": rep.notes[0],
                   "gguf_bytes": rep.written_total_bytes, "predicted_bytes": rep.predicted_total_bytes,
                   "gguf_dequantized_in_torch_ppl": torch_perplexity(gguf_in_torch(model, path, plan), windows),
                   "max_abs_diff_vs_mpq": max((r.max_abs_diff or 0.0) for r in rep.layers)}
            if llama_error is None:
                row["llama_cpp_ppl"] = llama_cpp_perplexity(path, windows, args.threads)
                if tokens_match is None:
                    tokens_match = llama_cpp_tokens(path, sample) == tokenizer(sample)["input_ids"]
            if all(not b.name.endswith("asym") for b in config.quantized().values()):  # CT: symmetric weights only
                ct = export(model, config, format="compressed-tensors", out=Path(tmp) / f"ct{len(rows)}",
                            device=numerics)
                import transformers as tf

                loaded = tf.AutoModelForCausalLM.from_pretrained(ct.out_dir, dtype=torch.float32).eval()
                row.update(ct_bytes=ct.written_total_bytes, ct_transformers_ppl=torch_perplexity(loaded, windows))
            rows.append(row)
            print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    import compressed_tensors
    import gguf

    write_result("export_gguf", {
        **environment("cpu", args.threads), "versions": {"gguf": gguf.__version__ if hasattr(gguf, "__version__")
                                                         else "0.19.0", "compressed_tensors": compressed_tensors
                                                         .__version__, "llama_cpp_python": llama_version},
        "llama_cpp": llama_error or "ran", "tokenizer_tokens_match_llama_cpp": tokens_match,
        "model": "Llama 2x256 (intermediate 512, 4 heads / 2 kv), byte-level BPE vocab 512",
        "train": {"steps": args.steps, "batch": args.batch, "seq": args.seq, "last_loss": last_loss, "seconds": train_s,
                  "tokens": int(train_ids.numel())},
        "eval": {"windows": args.windows, "seq": args.seq, "tokens": int(windows.numel())}, "rows": rows,
        "loadavg_before": load_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3]})


if __name__ == "__main__":
    main()
