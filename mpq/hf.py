"""Hugging Face ``transformers`` models as mpq tasks, with no tracing: a saved model directory plus a data file.

mpq runs these models as they are (eager PyTorch modules); layer discovery finds their ``nn.Linear``, GPT-2's
``Conv1D``, embeddings and tied heads by module type, so nothing is traced and nothing feeds floats into an
embedding. ``transformers`` is the optional ``[hf]`` extra, imported only here and only when called.

- ``perplexity``: a UTF-8 text file, tokenized with the directory's tokenizer; the first ``calib_fraction`` of the
  tokens gives calibration batches, the rest is held out for the metric.
- ``accuracy``/``nll``/``kl``: a ``.pt`` file of ``{"inputs": tensor or dict of tensors, "labels": tensor}`` (loaded
  with ``weights_only=True``), split the same way.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from mpq.errors import CalibrationError, ConfigError
from mpq.evaluators import classification_eval, higher_is_better, lm_batches, perplexity_eval

log = logging.getLogger(__name__)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ConfigError("Hugging Face models need transformers: pip install 'mpq[hf]'") from e
    return transformers


def is_hf_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").exists()


def load_hf_model(path: str | Path):
    """The model saved in ``path`` (eval mode, float32), loaded by the head its config names."""
    tf = _transformers()
    config = tf.AutoConfig.from_pretrained(path)
    arch = (config.architectures or [""])[0]
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        auto = tf.AutoModelForCausalLM
    elif arch.endswith("ForSequenceClassification"):
        auto = tf.AutoModelForSequenceClassification
    elif arch.endswith("ForImageClassification"):
        auto = tf.AutoModelForImageClassification
    else:
        raise ConfigError(f"{path}: architecture {arch or 'unknown'!r} is not a causal LM, sequence classifier or "
                          f"image classifier, the heads mpq's evaluators know")
    return auto.from_pretrained(path, torch_dtype=torch.float32).eval()


def _split(n: int, fraction: float, what: str) -> int:
    cut = int(n * fraction)
    if not 0 < cut < n:
        raise CalibrationError(f"{what}: {n} items cannot be split into calibration and evaluation at "
                               f"calib_fraction={fraction}")
    return cut


def hf_task(path: str | Path, eval: str = "perplexity", data: str | Path | None = None, seq_len: int = 128,
            batch_size: int = 8, calib_batches: int = 4, eval_batches: int | None = 16,
            calib_fraction: float = 0.5):
    """A :class:`~mpq.models.ReferenceTask` for the Hugging Face model in ``path`` evaluated with ``eval`` on
    ``data`` (see the module docstring)."""
    from mpq.models import ReferenceTask

    path = Path(path)
    if data is None:
        raise ConfigError(f"model {path} needs evaluation data: --data FILE (text for perplexity, .pt for "
                          f"classification)")
    model = load_hf_model(path)
    if eval == "perplexity":
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
        if not any((path / f).exists() for f in tokenizer_files):
            raise ConfigError(f"{path} holds no tokenizer to turn {data} into tokens: save one there with "
                              f"tokenizer.save_pretrained({str(path)!r})")
        tokenizer = _transformers().AutoTokenizer.from_pretrained(path)
        ids = torch.tensor(tokenizer(Path(data).read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        seq_len = min(seq_len, limit or seq_len)
        cut = _split(ids.numel(), calib_fraction, str(data))
        calib = lm_batches(ids[:cut], seq_len, batch_size)[:calib_batches]
        heldout = lm_batches(ids[cut:], seq_len, batch_size)[:eval_batches]
        eval_fn = perplexity_eval(heldout)
    elif eval in ("accuracy", "nll", "kl"):
        blob = torch.load(data, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "inputs" not in blob or "labels" not in blob:
            raise ConfigError(f"{data}: expected a dict with 'inputs' and 'labels'")
        inputs, labels = blob["inputs"], blob["labels"]
        n = labels.shape[0]
        cut = _split(n, calib_fraction, str(data))

        def take(lo: int, hi: int) -> Any:
            return {k: v[lo:hi] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[lo:hi]

        calib = [(take(i, min(i + batch_size, cut)), labels[i:min(i + batch_size, cut)])
                 for i in range(0, cut, batch_size)][:calib_batches]
        heldout = [(take(i, min(i + batch_size, n)), labels[i:min(i + batch_size, n)])
                   for i in range(cut, n, batch_size)][:eval_batches]
        eval_fn = classification_eval(heldout, eval, copy.deepcopy(model) if eval == "kl" else None)
    else:
        raise ConfigError(f"evaluator {eval!r} not known: use perplexity, accuracy, nll or kl")
    log.info("%s: %d calibration and %d evaluation batches of %s", path.name, len(calib), len(heldout), data)
    return ReferenceTask(name=path.name, model=model, calib=calib, eval_fn=eval_fn, metric=eval,
                         higher_is_better=higher_is_better(eval), description=f"Hugging Face model {path}",
                         heldout=heldout)
