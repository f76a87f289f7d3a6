"""``llama-lm``: a byte-level LM with Llama's block, trained on the same Python stdlib corpus and splits as ``char-lm``.

The block is Llama's: RMSNorm before attention and MLP, rotary position embeddings on queries and keys, grouped-query
attention (fewer key/value heads than query heads), a gated SiLU MLP (``down(silu(gate(x)) * up(x))``), no biases,
and the LM head tied to the token embedding (as small Llamas ship it), so the zoo has a tied head to quantize.
Attention is written out (no fused kernel) so that Hessian-vector products work through it on every backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mpq.models.charlm import EVAL_WINDOWS

NAME = "llama-lm"


@dataclass(frozen=True)
class LlamaConfig:
    vocab: int = 256
    ctx: int = 128
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    n_layers: int = 4
    d_hidden: int = 352  # ~ 8/3 d_model, a multiple of 32 as Llama rounds it
    rope_base: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(cfg: LlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    head = cfg.d_model // cfg.n_heads
    inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, head, 2).float() / head)
    angles = torch.outer(torch.arange(cfg.ctx).float(), inv_freq)  # [ctx, head/2]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head's features by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class GroupedQueryAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head = cfg.n_heads, cfg.n_kv_heads, cfg.d_model // cfg.n_heads
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.head, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.head, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.register_buffer("mask", torch.tril(torch.ones(cfg.ctx, cfg.ctx, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head).transpose(1, 2)
        q, k = apply_rotary(q, self.cos[:t], self.sin[:t]), apply_rotary(k, self.cos[:t], self.sin[:t])
        rep = self.n_heads // self.n_kv  # each key/value head serves this many query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        return self.o_proj((att @ v).transpose(1, 2).reshape(b, t, d))


class GatedMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.d_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_norm = RMSNorm(cfg.d_model)
        self.attn = GroupedQueryAttention(cfg)
        self.post_attn_norm = RMSNorm(cfg.d_model)
        self.mlp = GatedMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x))
        return x + self.mlp(self.post_attn_norm(x))


class LlamaLM(nn.Module):
    def __init__(self, cfg: LlamaConfig = LlamaConfig()):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        for m in self.modules():  # Llama's init: N(0, 0.02) everywhere (the default N(0, 1) embedding would give
            if isinstance(m, (nn.Linear, nn.Embedding)):  # the tied head logits of size ~sqrt(d_model))
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def train(steps: int = 2500, lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
          cfg: LlamaConfig = LlamaConfig()) -> tuple[nn.Module, dict]:
    from mpq.models import charlm

    return charlm.train(steps=steps, lr=lr, batch_size=batch_size, seed=seed, cfg=cfg, build=LlamaLM)


def load_task(eval_windows_n: int = EVAL_WINDOWS):
    from mpq.models.charlm import stdlib_lm_task

    return stdlib_lm_task(NAME, LlamaLM(), "byte-level 4-layer Llama-style LM (RMSNorm, rotary, GQA, gated MLP, "
                                           "tied head)", eval_windows_n)
