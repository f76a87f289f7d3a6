"""Export to GGUF, llama.cpp's file: a GPT-2 or Llama-family model with one quantization type per tensor.

Tensor names, layouts and metadata follow llama.cpp's own converter (``convert_hf_to_gguf.py``): GPT-2's ``Conv1D``
weights are written ``[out, in]``, Llama's q/k projections are permuted to llama.cpp's rotary layout, norms and
biases are F32, a head tied to its embedding is left out (llama.cpp reuses ``token_embd``) unless mpq quantized
it. The tokenizer (byte-level BPE) goes in as ``tokenizer.ggml.*``.

Each quantized layer gets the GGUF type nearest to its option (:func:`choose_type`) and is encoded from mpq's
values and grid (:mod:`mpq.export.gguf_quants`); the report gives per layer the type, bytes, and the written
values' distance to mpq's (dequantized with the ``gguf`` package's own dequantizers) and to the float weights.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from mpq.errors import ConfigError
from mpq.export import GGUF_FLOAT_TYPES, GGUF_PREFERENCES
from mpq.export.gguf_quants import TYPES, Grid, encode
from mpq.export.plan import ExportPlan, LayerExport, UnsupportedOptionError, float_weight, relative_rms
from mpq.export.report import ExportReport, LayerRow, file_sizes

log = logging.getLogger(__name__)

PREFERENCES, FLOAT_TYPES = GGUF_PREFERENCES, GGUF_FLOAT_TYPES
# K-quants need rows of whole 256-value super-blocks; narrower rows take the nearest 32-block type
FALLBACK = {"Q6_K": "Q8_0", "Q5_K": "Q5_1", "Q4_K": "Q4_1", "Q3_K": "Q4_0", "Q2_K": "Q4_0"}
FILE_TYPES = {"Q8_0": "MOSTLY_Q8_0", "Q6_K": "MOSTLY_Q6_K", "Q5_K": "MOSTLY_Q5_K_M", "Q5_0": "MOSTLY_Q5_0",
              "Q5_1": "MOSTLY_Q5_1", "Q4_K": "MOSTLY_Q4_K_M", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
              "Q3_K": "MOSTLY_Q3_K_M", "Q2_K": "MOSTLY_Q2_K", "F16": "MOSTLY_F16", "F32": "ALL_F32"}
SKIPPED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers llama.cpp recomputes


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ConfigError("GGUF export needs the gguf package: pip install 'mpq[export]'") from e
    return gguf


def choose_type(lx: LayerExport, prefer: str = "size") -> str:
    """The GGUF type for a quantized layer's option: ``size`` keeps the option's bit width (``Q4_0``/``Q5_0``
    where symmetric, which hold mpq's values exactly, K-quants otherwise), ``exact`` takes the smallest type
    that holds mpq's values exactly (``Q4_0``/``Q5_0``/``Q8_0`` symmetric, ``Q4_1``/``Q5_1`` asymmetric, up to
    the fp16 rounding of the minimum). FP8 and 6-8-bit asymmetric weights have no such type: ``Q8_0``."""
    spec = lx.qweight.spec
    b, sym = spec.bits, spec.symmetric
    if spec.fmt == "e4m3":
        return "Q8_0"
    if prefer == "exact":
        if sym:
            return "Q4_0" if b <= 4 else "Q5_0" if b == 5 else "Q8_0"
        return "Q4_1" if b <= 4 else "Q5_1" if b == 5 else "Q8_0"
    return {8: "Q8_0", 7: "Q8_0", 6: "Q6_K", 5: "Q5_0" if sym else "Q5_K", 4: "Q4_0" if sym else "Q4_K",
            3: "Q3_K", 2: "Q2_K"}[b]


def _fit_row(type_name: str, k: int, sym: bool, float_type: str) -> tuple[str, str]:
    """``type_name`` if a row of ``k`` values is whole blocks of it, else the fallback and why."""
    t = type_name
    if t in TYPES and k % TYPES[t].block:
        t = FALLBACK.get(t, t)
        if t == "Q4_0" and not sym:
            t = "Q4_1"
        if k % TYPES[t].block:
            t = float_type
        return t, f"K={k} is not a multiple of {TYPES[type_name].block}: {t} instead of {type_name}"
    return t, ""


def grid_of(lx: LayerExport) -> Grid | None:
    """mpq's integer grid of a layer (None for FP8, whose levels are not evenly spaced)."""
    qw = lx.qweight
    if qw.spec.fmt != "int":
        return None
    step = qw.scale.float().numpy()
    if qw.zero is None:
        return Grid(step, None, qw.group, qmax=int(qw.spec.qmax))
    low = (qw.zero.float() - qw.spec.mid * qw.scale.float()).numpy()
    return Grid(step, low, qw.group, levels=2 ** qw.spec.bits)


def _rotary_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Rows of Hugging Face's q/k projection in llama.cpp's order (``LlamaModel.permute`` of its converter)."""
    return np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _permute_grid(grid: Grid | None, perm: np.ndarray) -> Grid | None:
    if grid is None:
        return None
    return Grid(grid.step[perm], None if grid.low is None else grid.low[perm], grid.group, grid.qmax, grid.levels)


# --------------------------------------------------------------------------------------------------------------------
# Architectures and tokenizer
# --------------------------------------------------------------------------------------------------------------------
def _architecture(model) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ("gpt2", "llama"):
        raise UnsupportedOptionError(f"GGUF export writes GPT-2 and Llama-family Hugging Face models; this model's "
                                     f"model_type is {model_type!r}")
    return model_type


def _hparams(writer, arch: str, cfg) -> dict[str, int]:
    """Write the architecture's hyper-parameters; returns the head counts the q/k permutation needs."""
    if arch == "gpt2":
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(cfg.n_inner or 4 * cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return {}
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    theta = getattr(cfg, "rope_theta", None) or rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UnsupportedOptionError(f"Llama rotary scaling {rope} is not written by mpq's GGUF export (plain rotary "
                                     f"positions only)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(cfg.vocab_size)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    return {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}


def _load_tokenizer(tokenizer: Any):
    if tokenizer is None:
        raise ConfigError("GGUF export needs the model's tokenizer (tokenizer=... or a model directory holding one): "
                          "llama.cpp reads the vocabulary from the file")
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if not hasattr(tokenizer, "backend_tokenizer"):
        raise UnsupportedOptionError(f"GGUF export reads a fast (tokenizers) tokenizer; got {type(tokenizer).__name__}")
    return tokenizer


def byte_level_vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges of a byte-level BPE vocabulary (GPT-2's), as llama.cpp's ``gpt2``
    tokenizer model reads them; anything else is refused (before a file is written)."""
    gguf = _gguf()
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if spec["model"].get("type") != "BPE" or not byte_level or len(parts) != 1 or \
            not byte_level[0].get("use_regex", True):
        raise UnsupportedOptionError(
            f"GGUF export writes byte-level BPE tokenizers with GPT-2's pre-tokenizer; this one is "
            f"{spec['model'].get('type')} with pre-tokenizer {[p.get('type') for p in parts]}")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}))
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(str(added[i]))
            special = getattr(added[i], "special", False)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # the model's embedding is larger than the vocabulary
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, types, merges


def add_tokenizer(writer, tokenizer: Any, vocab: tuple[list[str], list[int], list[str]], model_config) -> None:
    """The vocabulary and special token ids as ``tokenizer.ggml.*`` metadata."""
    tokens, types, merges = vocab
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, fallback in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", None), ("pad", "pad_token_id")):
        tid = getattr(tokenizer, f"{key}_token_id", None)
        if tid is None and fallback:
            tid = getattr(model_config, fallback, None)
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(int(tid))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------
def write(plan: ExportPlan, out: str | Path, tokenizer: Any = None, prefer: str = "size",
          types: Mapping[str, str] | None = None, float_type: str = "F32", name: str | None = None) -> ExportReport:
    """Write ``plan`` as ``out/<name>.gguf`` (see the module docstring) and its report."""
    gguf = _gguf()
    if prefer not in PREFERENCES:
        raise ConfigError(f"gguf_prefer {prefer!r} not known: use one of {PREFERENCES}")
    if float_type not in FLOAT_TYPES:
        raise ConfigError(f"gguf_float {float_type!r} not allowed: use one of {FLOAT_TYPES}")
    overrides = dict(types or {})
    for layer, t in overrides.items():
        if layer not in plan.layers or not plan.layers[layer].quantized:
            raise ConfigError(f"gguf_types names {layer!r}, which is not a quantized layer of the config")
        if t not in TYPES:
            raise ConfigError(f"gguf_types gives layer {layer!r} type {t!r}; allowed: {', '.join(TYPES)}")
    model, arch = plan.model, _architecture(plan.model)
    cfg = model.config
    tok = _load_tokenizer(tokenizer)
    vocab = byte_level_vocab(tok, cfg.vocab_size)  # refuses before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name or getattr(cfg, 'name_or_path', '') and Path(cfg.name_or_path).name or arch}.gguf"
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2 if arch == "gpt2" else gguf.MODEL_ARCH.LLAMA,
                                    cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(path.stem)
    writer.add_quantized_by("mpq")
    heads = _hparams(writer, arch, cfg)
    add_tokenizer(writer, tok, vocab, cfg)
    writer.add_string("mpq.bit_config", plan.config.to_json(indent=None))

    rows: list[LayerRow] = []
    weights_by_type: Counter[str] = Counter()
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for key, tensor in model.state_dict().items():
        module, _, suffix = key.rpartition(".")
        if key.endswith(SKIPPED):
            continue
        lx = plan.layers.get(module)
        if lx is not None and lx.layer.tied_to and not lx.quantized and tied:
            continue  # a float head tied to its embedding: llama.cpp reuses token_embd
        gname = tmap.get_name(module)
        if gname is None:
            raise UnsupportedOptionError(f"tensor {key!r} has no GGUF {arch} name (llama.cpp's converter knows "
                                         f"none for it)")
        gname = f"{gname}.{suffix}"
        if lx is None or suffix != "weight":  # norms, biases, kept-float modules
            data = tensor.detach().float().numpy()
            if data.ndim >= 2 and float_type == "F16":
                writer.add_tensor(gname, data.astype(np.float16))
                weights_by_type["F16"] += data.size
            else:
                writer.add_tensor(gname, data.astype(np.float32))
                weights_by_type["F32"] += data.size
            continue
        perm = next((_rotary_permutation(lx.layer.n, h) for leaf, h in heads.items() if module.endswith(leaf)), None)
        rows.append(_write_layer(writer, gname, lx, plan, prefer, overrides.get(module), float_type, perm,
                                 weights_by_type))
    main_type = max((t for t in weights_by_type), key=lambda t: weights_by_type[t])
    writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[main_type])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    size = path.stat().st_size
    notes = [f"types by parameters: {dict(weights_by_type.most_common())}",
             "activations run in llama.cpp's own numerics (its dot products quantize them to 8 bits per block for "
             "the quantized types); mpq's activation options (w8a8's int8 or fp8 inputs) are not written"]
    report = ExportReport("gguf", str(out), file_sizes(out, [path.name]), rows, plan.predicted_total_bytes(), size,
                          notes, {"file": path.name, "architecture": arch, "prefer": prefer,
                                  "device numerics": plan.device, "quantizer": plan.quantizer.settings()})
    report.write()
    log.info("wrote %s (%d bytes)", path, size)
    return report


def _write_layer(writer, gname: str, lx: LayerExport, plan: ExportPlan, prefer: str, override: str | None,
                 float_type: str, perm: np.ndarray | None, weights_by_type: Counter) -> LayerRow:
    gguf = _gguf()
    shape = "x".join(map(str, lx.layer.weight_shape))
    weight = float_weight(plan, lx.name)
    if not lx.quantized:
        data = weight.numpy() if perm is None else weight.numpy()[perm]
        if float_type == "F16":
            data = data.astype(np.float16)
        writer.add_tensor(gname, data)
        weights_by_type[float_type] += data.size
        back = torch.from_numpy(data.astype(np.float32))
        return LayerRow(lx.name, "float", f"{gname} {float_type}", shape, lx.predicted_bytes, data.nbytes,
                        rel_rms_vs_float=relative_rms(back, weight if perm is None else weight[perm]))
    values = lx.values().numpy()
    grid = grid_of(lx)
    if perm is not None:
        values, grid, weight = values[perm], _permute_grid(grid, perm), weight[perm]
    wanted = override or choose_type(lx, prefer)
    qtype, note = _fit_row(wanted, values.shape[1], lx.qweight.spec.symmetric, float_type)
    if qtype in TYPES:
        blocks = encode(values, qtype, grid)
        writer.add_tensor(gname, blocks, raw_dtype=getattr(gguf.GGMLQuantizationType, qtype))
        back = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype))
        nbytes = blocks.nbytes
    else:
        data = values.astype(np.float16 if qtype == "F16" else np.float32)
        writer.add_tensor(gname, data)
        back, nbytes = data.astype(np.float32), data.nbytes
    weights_by_type[qtype] += values.size
    back_t, values_t = torch.from_numpy(np.asarray(back, dtype=np.float32)), torch.from_numpy(values)
    diff = float((back_t - values_t).abs().max())
    bias = getattr(plan.model.get_submodule(lx.name), "bias", None)
    nbytes += 0 if bias is None else bias.numel() * 4
    exact = "exact" if diff == 0 else "rounded to the type's grid"
    return LayerRow(lx.name, lx.bits.name, f"{gname} {qtype}", shape, lx.predicted_bytes, nbytes, diff,
                    relative_rms(back_t, values_t), relative_rms(back_t, weight), "; ".join(x for x in (exact, note)
                                                                                           if x))


__all__ = ["write", "choose_type", "grid_of", "byte_level_vocab", "add_tokenizer", "PREFERENCES"]
