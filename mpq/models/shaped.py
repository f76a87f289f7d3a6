"""Shape-only models for profiling at scale: Llama-7B's decoder stack built on the meta device (no memory, no
weights), so that layer discovery, the search space and the deduplicated latency workloads of a 7B model can be
produced on a laptop and measured on a cluster.

    mpq profile --model mpq.models.shaped:llama7b_task --device cpu
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpq.models import ReferenceTask

LLAMA_7B = {"vocab": 32000, "hidden": 4096, "intermediate": 11008, "heads": 32, "blocks": 32}


class _Block(nn.Module):
    """A Llama decoder block: RMSNorm, q/k/v/o projections around causal attention, gated SiLU MLP."""

    def __init__(self, hidden: int, intermediate: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(hidden, hidden, bias=False)
                                                              for _ in range(4))
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(a)
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaShaped(nn.Module):
    def __init__(self, vocab: int, hidden: int, intermediate: int, heads: int, blocks: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(_Block(hidden, intermediate, heads) for _ in range(blocks))
        self.norm = nn.RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def llama7b_shaped(blocks: int = LLAMA_7B["blocks"], device: str = "meta", dtype: torch.dtype = torch.bfloat16,
                   **sizes: int) -> LlamaShaped:
    """Llama-7B's layers (``sizes`` override vocab/hidden/intermediate/heads), on ``device`` (meta: shapes only)."""
    with torch.device(device):
        return LlamaShaped(**{**LLAMA_7B, **sizes, "blocks": blocks}).to(dtype)


def llama7b_task(blocks: int = LLAMA_7B["blocks"], tokens: int = 16) -> ReferenceTask:
    """The shape-only 7B model with one batch of ``tokens`` token ids (on the meta device): enough for layer
    discovery and profiling; there are no weights to evaluate."""
    model = llama7b_shaped(blocks).eval()
    batch = torch.zeros(1, tokens, dtype=torch.long, device="meta")

    def no_eval(_model: nn.Module) -> float:
        raise RuntimeError("llama7b_task is shape-only (meta device): it can be profiled, not evaluated")

    return ReferenceTask("llama-7b-shaped", model, [(batch, None)], no_eval, "none", True,
                         description=f"Llama-7B-shaped, {blocks} blocks, meta device")
