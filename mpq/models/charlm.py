"""``char-lm``: a byte-level GPT-style transformer trained on the Python standard library's own source files.

Attention is written out (matmul, causal mask, softmax) rather than calling ``scaled_dot_product_attention`` so that
second derivatives (Hessian-vector products) work through it on every backend.

Files are split by a hash of their path into training (80%), calibration (10%) and held-out evaluation (10%), so
the split does not depend on which files a Python version ships; calibration text is never trained on, so
quantization damage measured on it predicts damage on unseen text. The perplexity is that of the running
interpreter's stdlib (the checkpoint's metadata records the version it was measured on).
"""

from __future__ import annotations

import hashlib
import math
import sys
import sysconfig
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mpq.calib import model_output

NAME = "char-lm"
EXCLUDE_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__", "_bundled",
                "dist-packages"}
SPLIT_MOD = 10  # by path hash: 0 -> held-out evaluation, 1 -> calibration, others -> training
CALIB_BATCHES, CALIB_BATCH_SIZE = 4, 16
EVAL_WINDOWS = 64


@dataclass(frozen=True)
class LMConfig:
    vocab: int = 256
    ctx: int = 128
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    mlp_mult: int = 4


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.register_buffer("mask", torch.tril(torch.ones(cfg.ctx, cfg.ctx, dtype=torch.bool)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.n_heads)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_mult * cfg.d_model)
        self.out = nn.Linear(cfg.mlp_mult * cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharLM(nn.Module):
    def __init__(self, cfg: LMConfig = LMConfig()):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# --------------------------------------------------------------------------------------------------------------------
# Corpus: the standard library's .py files
# --------------------------------------------------------------------------------------------------------------------
def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not EXCLUDE_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_of(path: Path) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    bucket = hashlib.sha1(path.relative_to(root).as_posix().encode()).digest()[0] % SPLIT_MOD
    return {0: "heldout", 1: "calib"}.get(bucket, "train")


@lru_cache(maxsize=3)
def corpus(split: str) -> torch.Tensor:
    """All bytes of the ``train``, ``calib`` or ``heldout`` files, joined by blank lines, as a uint8 tensor."""
    if split not in ("train", "calib", "heldout"):
        raise ValueError(f"unknown split {split!r}: use train, calib or heldout")
    chunks = [p.read_bytes() for p in stdlib_files() if split_of(p) == split]
    data = b"\n\n".join(chunks)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def windows(data: torch.Tensor, starts: torch.Tensor, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts.unsqueeze(1) + torch.arange(ctx + 1)
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


def eval_windows(cfg: LMConfig = LMConfig(), n: int = EVAL_WINDOWS) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` evenly spaced held-out windows: the perplexity test set."""
    data = corpus("heldout")
    starts = torch.linspace(0, len(data) - cfg.ctx - 2, n).long()
    return windows(data, starts, cfg.ctx)


def calibration_batches(cfg: LMConfig = LMConfig(), seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random windows of the calibration files (never trained on)."""
    data = corpus("calib")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(CALIB_BATCHES):
        starts = torch.randint(0, len(data) - cfg.ctx - 2, (CALIB_BATCH_SIZE,), generator=g)
        out.append(windows(data, starts, cfg.ctx))
    return out


@torch.no_grad()
def perplexity(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], batch_size: int = 16) -> float:
    model.eval()
    x, y = data
    total, count = 0.0, 0
    for i in range(0, len(x), batch_size):
        logits = model_output(model(x[i:i + batch_size]))
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), y[i:i + batch_size].flatten(), reduction="sum"))
        count += y[i:i + batch_size].numel()
    return math.exp(total / count)


def train(steps: int = 2500, lr: float = 3e-3, batch_size: int = 32, seed: int = 0,
          cfg: LMConfig = LMConfig(), log_every: int = 100, build=None) -> tuple[nn.Module, dict]:
    """Train ``build(cfg)`` (default :class:`CharLM`; ``llama-lm`` reuses this loop) on the training files."""
    import logging

    log = logging.getLogger(__name__)
    torch.manual_seed(seed)
    data = corpus("train")
    model = (build or CharLM)(cfg)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        model.train()
        x, y = windows(data, torch.randint(0, len(data) - cfg.ctx - 2, (batch_size,), generator=g), cfg.ctx)
        loss = F.cross_entropy(model_output(model(x)).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            log.info("step %d/%d loss %.4f", step, steps, loss.item())
    meta = {"config": asdict(cfg), "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
            "train_bytes": int(len(data)), "calib_bytes": int(len(corpus("calib"))),
            "heldout_bytes": int(len(corpus("heldout"))),
            "python": sys.version.split()[0]}
    return model, meta


def stdlib_lm_task(name: str, model: nn.Module, what: str, eval_windows_n: int = EVAL_WINDOWS, cfg=None):
    """The reference task of a byte-level LM on the stdlib corpus: ``model`` with the checkpoint ``name`` loaded,
    calibration windows, and perplexity on held-out windows (of ``cfg.ctx`` bytes; default ``model.cfg``)."""
    from mpq.models import ReferenceTask, load_checkpoint

    cfg = cfg or model.cfg
    meta = load_checkpoint(model, name)
    model.eval()
    test = eval_windows(cfg, eval_windows_n)
    return ReferenceTask(
        name=name, model=model, calib=calibration_batches(cfg), eval_fn=lambda m: perplexity(m, test),
        metric="perplexity", higher_is_better=False,
        description=f"{what} on the Python stdlib, perplexity on {eval_windows_n} held-out windows of "
                    f"{cfg.ctx} bytes", info=meta,
        heldout=[(test[0][i:i + 16], test[1][i:i + 16]) for i in range(0, len(test[0]), 16)])


def load_task(eval_windows_n: int = EVAL_WINDOWS):
    return stdlib_lm_task(NAME, CharLM(), "byte-level 4-layer transformer LM", eval_windows_n)
