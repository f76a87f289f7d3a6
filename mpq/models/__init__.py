"""Bundled reference models, trained by mpq itself on data that ships with Python or its packages.

- ``digits-cnn``: a small CNN on ``sklearn.datasets.load_digits`` (metric: top-1 accuracy on a held-out split).
- ``char-lm``: a byte-level transformer LM on the Python standard library's own source (metric: perplexity on
  held-out files).
- ``llama-lm``: the same task with Llama's block (RMSNorm, rotary, grouped-query attention, gated MLP, tied head).
- ``hf-gpt2``, ``hf-llama``: the same task with transformers' own ``GPT2LMHeadModel`` and ``LlamaForCausalLM``
  (needs the ``[hf]`` extra).

Checkpoints are small, committed under ``checkpoints/``, loaded with ``weights_only=True``, and reproducible with
``python -m mpq.models.train NAME``.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mpq.errors import ConfigError

CHECKPOINTS = Path(__file__).parent / "checkpoints"


@dataclass
class ReferenceTask:
    """A model with its calibration batches and its evaluator: everything ``mpq.search`` needs."""

    name: str
    model: nn.Module
    calib: list[tuple[Any, Any]]  # (inputs, targets) batches
    eval_fn: Callable[[nn.Module], float]
    metric: str
    higher_is_better: bool
    description: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    heldout: list[tuple[Any, Any]] = field(default_factory=list)  # the evaluation data as (inputs, targets) batches


# name -> the module (or "module:attribute") whose train() and load_task() build the task.
_TASKS = {"digits-cnn": "mpq.models.digits", "char-lm": "mpq.models.charlm", "llama-lm": "mpq.models.llamalm",
          "hf-gpt2": "mpq.models.hflm:GPT2_TASK", "hf-llama": "mpq.models.hflm:LLAMA_TASK"}


def reference_names() -> list[str]:
    return list(_TASKS)


def checkpoint_path(name: str) -> Path:
    return CHECKPOINTS / f"{name}.pt"


def load_checkpoint(model: nn.Module, name: str) -> dict[str, Any]:
    """Load the committed weights into ``model``; returns the checkpoint's metadata (training settings, metric)."""
    path = checkpoint_path(name)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint for {name!r} at {path}; build it: python -m mpq.models.train {name}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    meta_path = path.with_suffix(".json")
    return json.loads(meta_path.read_text()) if meta_path.exists() else {}


def load_reference(name: str, **kwargs: Any) -> ReferenceTask:
    """The bundled task ``name`` (see :func:`reference_names`), with trained weights."""
    if name not in _TASKS:
        raise ConfigError(f"unknown reference model {name!r}; bundled: {', '.join(_TASKS)}")
    return task_builder(name).load_task(**kwargs)


def describe_reference(name: str) -> str:
    """One line on the bundled task ``name``, without loading weights or importing an optional package."""
    builder = task_builder(name)
    return getattr(builder, "what", None) or builder.__doc__.strip().splitlines()[0]


def task_builder(name: str) -> Any:
    """What builds the bundled task ``name``: an object with ``train()`` and ``load_task()``."""
    module, _, attribute = _TASKS[name].partition(":")
    found = importlib.import_module(module)
    return getattr(found, attribute) if attribute else found
