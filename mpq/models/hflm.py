"""``hf-gpt2`` and ``hf-llama``: Hugging Face ``transformers`` models trained here, byte level, on the stdlib corpus.

The same task as ``char-lm``/``llama-lm`` (splits, calibration windows, held-out perplexity), but the modules are
transformers' own: ``GPT2LMHeadModel`` (``Conv1D`` linears with fused q/k/v, learned positions, tied head) and
``LlamaForCausalLM`` (RMSNorm, rotary, grouped-query attention, gated MLP, tied head), so the zoo benchmarks what a
user hands mpq from the Hub rather than mpq's own re-implementations. Both run eager attention: second derivatives
(Hessian-vector products) go through it on every backend, which fused attention kernels do not promise.

transformers is the optional ``[hf]`` extra: building either model without it raises a ``ConfigError`` saying so.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mpq.models.charlm import EVAL_WINDOWS


@dataclass(frozen=True)
class HFLMConfig:
    family: str  # "gpt2" or "llama"
    vocab: int = 256
    ctx: int = 128
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2  # llama only
    n_layers: int = 4
    d_hidden: int = 512  # gpt2: 4 d_model; llama (LLAMA below): 352, ~ 8/3 d_model rounded to 32 as Llama does


GPT2 = HFLMConfig("gpt2")
LLAMA = HFLMConfig("llama", d_hidden=352)
CONFIGS = {"hf-gpt2": GPT2, "hf-llama": LLAMA}


def build(cfg: HFLMConfig) -> nn.Module:
    """The untrained transformers model of ``cfg`` (float32, eager attention, head tied to the token embedding)."""
    from mpq.hf import _transformers

    tf = _transformers()
    if cfg.family == "gpt2":
        config = tf.GPT2Config(vocab_size=cfg.vocab, n_positions=cfg.ctx, n_embd=cfg.d_model, n_layer=cfg.n_layers,
                               n_head=cfg.n_heads, n_inner=cfg.d_hidden, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
        config._attn_implementation = "eager"
        return tf.GPT2LMHeadModel(config)
    if cfg.family == "llama":
        config = tf.LlamaConfig(vocab_size=cfg.vocab, hidden_size=cfg.d_model, intermediate_size=cfg.d_hidden,
                                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.ctx,
                                tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=None)
        config._attn_implementation = "eager"
        return tf.LlamaForCausalLM(config)
    raise ValueError(f"unknown family {cfg.family!r}: gpt2 or llama")


@dataclass(frozen=True)
class HFStdlibTask:
    """A zoo entry (``train``/``load_task``, what :mod:`mpq.models` calls by name) for one of :data:`CONFIGS`."""

    name: str
    what: str

    def train(self, steps: int = 2000, lr: float = 3e-3, batch_size: int = 32, seed: int = 0):
        # 2000 steps, not char-lm's 2500: about 18 min on one CPU thread (two models trained side by side on 2 cores)
        from mpq.hf import _transformers
        from mpq.models import charlm

        model, meta = charlm.train(steps=steps, lr=lr, batch_size=batch_size, seed=seed, cfg=CONFIGS[self.name],
                                   build=build)
        meta["transformers"] = _transformers().__version__
        return model, meta

    def load_task(self, eval_windows_n: int = EVAL_WINDOWS):
        from mpq.models.charlm import stdlib_lm_task

        cfg = CONFIGS[self.name]
        return stdlib_lm_task(self.name, build(cfg).eval(), self.what, eval_windows_n, cfg=cfg)


GPT2_TASK = HFStdlibTask("hf-gpt2", "byte-level 4-layer transformers GPT2LMHeadModel (Conv1D, tied head)")
LLAMA_TASK = HFStdlibTask("hf-llama", "byte-level 4-layer transformers LlamaForCausalLM (GQA, gated MLP, tied head)")
