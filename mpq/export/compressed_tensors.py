"""Export to compressed-tensors, the checkpoint format that vLLM and llm-compressor read.

The output is a ``save_pretrained`` directory whose ``config.json`` carries a ``quantization_config`` with one
config group per distinct scheme of the mixed config (``targets`` = the exact layer names), built and serialized
with the ``compressed-tensors`` package's own classes. Each quantized layer holds mpq's integers and scales as they
are, packed the way the format packs them:

- weight-only integers (``w{2..8}a16...``, symmetric): ``pack-quantized`` (``weight_packed`` int32 words from the
  package's ``pack_to_int32``, ``weight_scale`` per channel or group in the kernel's scale dtype, ``weight_shape``);
- W8A8 with dynamic symmetric per-token int8 activations (the CUDA option): ``int-quantized`` (int8 ``weight``,
  per-channel ``weight_scale``, ``input_activations`` token/dynamic);
- FP8 (E4M3 per channel, activations E4M3 per token): ``float-quantized``.

Float layers are left as they are. What the format cannot express is refused, for every layer at once and before
anything is written (:class:`~mpq.export.plan.UnsupportedOptionError`): asymmetric weights with a float zero
(mpq's ``asym`` options, the CPU tinygemm ``w4a16g*`` and the row-wise embedding tables: compressed-tensors stores
integer zero points), per-tensor dynamic (uint8, reduce-range) activations (CPU ``w8a8``), GPT-2's ``Conv1D`` and
convolutions (the format quantizes ``nn.Linear``/``nn.Embedding`` modules), a quantized head tied to its embedding,
and groups that do not divide K.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.errors import ConfigError
from mpq.export.plan import ExportPlan, LayerExport, UnsupportedOptionError, float_weight, relative_rms
from mpq.export.report import ExportReport, LayerRow, file_sizes

log = logging.getLogger(__name__)

FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # what vLLM loads as one layer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")


def _ct():
    try:
        import compressed_tensors
    except ImportError as e:
        raise ConfigError("compressed-tensors export needs the compressed-tensors package: pip install "
                          "'mpq[export]'") from e
    return compressed_tensors


@dataclass(frozen=True)
class CtScheme:
    """A layer's compressed-tensors scheme: its compressor format and its weight / input-activation arguments."""

    format: str
    weights: tuple[tuple[str, Any], ...]
    input_activations: tuple[tuple[str, Any], ...] | None

    def describe(self) -> str:
        w = dict(self.weights)
        grain = f"group {w['group_size']}" if w["strategy"] == "group" else "per channel"
        acts = "" if self.input_activations is None else f", {dict(self.input_activations)['type']}8 activations " \
                                                          f"per token"
        return f"{self.format} {w['type']}{w['num_bits']} {grain} symmetric{acts}"


def _act_text(act) -> str:
    return (f"{act.bits}-bit {'symmetric' if act.symmetric else 'asymmetric'} {act.dtype} activations per "
            f"{act.granularity}, {'dynamic' if act.dynamic else 'static'}"
            f"{', reduce_range' if act.reduce_range else ''}")


def scheme_of(lx: LayerExport, module: nn.Module) -> tuple[CtScheme | None, list[str]]:
    """The compressed-tensors scheme of one quantized layer, or the reasons it has none."""
    spec, act = lx.scheme.weight, lx.scheme.act
    where = f"layer {lx.name!r} option {lx.bits.name!r}"
    problems = []
    if not isinstance(module, nn.Linear):
        kind = "Hugging Face Conv1D (GPT-2's linears, stored [in, out])" if lx.layer.transposed else \
            type(module).__name__
        if not isinstance(module, nn.Embedding):
            problems.append(f"{where}: a {kind} module; compressed-tensors quantizes torch.nn.Linear and "
                            f"nn.Embedding modules only")
    if lx.layer.tied_to:
        problems.append(f"{where}: the weight is tied to {lx.layer.tied_to!r} (kept in float); compressed-tensors "
                        f"has one tensor for both, so a quantized tied head cannot be written; keep the head in "
                        f"float (pinned={{{lx.name!r}: 'float'}}) or untie it before the search")
    if spec.fmt == "int" and not spec.symmetric:
        what = "a per-row float minimum" if spec.zero_at_min else f"a float zero per {spec.group_size or 'row'}"
        problems.append(f"{where}: asymmetric weights with {what} ({spec.scale_dtype}); compressed-tensors stores "
                        f"integer zero points, so these values cannot be written exactly; search with symmetric "
                        f"options (names ending in 'sym') for this export")
    if spec.group_size is not None and spec.group_size < lx.layer.k and lx.layer.k % spec.group_size:
        problems.append(f"{where}: K={lx.layer.k} is not a multiple of the group size {spec.group_size}; "
                        f"compressed-tensors groups must divide the row")
    strategy = {"strategy": "channel"} if spec.group_size is None or spec.group_size >= lx.layer.k else \
        {"strategy": "group", "group_size": spec.group_size}
    if spec.fmt == "e4m3":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, **strategy}
    else:
        weights = {"num_bits": spec.bits, "type": "int", "symmetric": True, **strategy}
    inputs = None
    if act.is_float or act.dtype in ("bfloat16", "float16"):
        fmt = "pack-quantized"
    elif act.dtype == "int" and act.bits == 8 and act.granularity == "token" and act.dynamic and act.symmetric \
            and not act.reduce_range and spec.fmt == "int":
        fmt, inputs = "int-quantized", {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                        "dynamic": True}
    elif act.dtype == "float8_e4m3fn" and act.granularity == "token" and act.dynamic and spec.fmt == "e4m3":
        fmt, inputs = "float-quantized", {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                                          "dynamic": True}
    else:
        problems.append(f"{where}: {_act_text(act)}; compressed-tensors (as vLLM serves it) has dynamic activations "
                        f"per token only (per-tensor scales must be static, calibrated once)")
        fmt = ""
    if problems:
        return None, problems
    return CtScheme(fmt, tuple(weights.items()), None if inputs is None else tuple(inputs.items())), []


def check(plan: ExportPlan) -> dict[str, CtScheme]:
    """Every quantized layer's scheme; raises :class:`UnsupportedOptionError` listing every layer and option the
    format cannot express."""
    if not hasattr(plan.model, "config") or not hasattr(plan.model, "save_pretrained"):
        raise UnsupportedOptionError(f"compressed-tensors export writes a Hugging Face transformers model "
                                     f"(save_pretrained); {type(plan.model).__name__} is not one")
    schemes, problems = {}, []
    for lx in plan.quantized():
        scheme, why = scheme_of(lx, plan.model.get_submodule(lx.name))
        problems += why
        if scheme is not None:
            schemes[lx.name] = scheme
    if problems:
        raise UnsupportedOptionError("compressed-tensors cannot express these options (nothing was written):\n  "
                                     + "\n  ".join(problems))
    return schemes


def fused_scheme_notes(plan: ExportPlan, schemes: dict[str, CtScheme]) -> list[str]:
    """vLLM loads q/k/v and gate/up as one fused layer with one scheme: name the siblings that differ."""
    notes = []
    names = set(plan.layers)
    for name in sorted(names):
        parent, _, leaf = name.rpartition(".")
        for group in FUSED_SIBLINGS:
            if leaf != group[0]:
                continue
            members = [f"{parent}.{m}" if parent else m for m in group]
            if not all(m in names for m in members):
                continue
            kinds = {schemes[m].describe() if m in schemes else "float" for m in members}
            if len(kinds) > 1:
                notes.append(f"{', '.join(members)} have different schemes ({'; '.join(sorted(kinds))}): vLLM "
                             f"fuses them into one layer and needs one scheme for it (transformers loads them)")
    return notes


def _layer_tensors(lx: LayerExport, scheme: CtScheme) -> dict[str, torch.Tensor]:
    """The compressed tensors of one layer, local names (``weight_packed``, ``weight_scale``, ...)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    qw = lx.qweight
    n, k = lx.layer.n, lx.layer.k
    q = qw.q[:, :k]
    scale = qw.scale.to(getattr(torch, qw.spec.scale_dtype))  # the kernel's scale values, in its dtype (exact)
    if scheme.format == "pack-quantized":
        return {"weight_packed": pack_to_int32(q.to(torch.int8).contiguous(), qw.spec.bits),
                "weight_scale": scale.contiguous(), "weight_shape": torch.tensor([n, k])}
    if scheme.format == "int-quantized":
        return {"weight": q.to(torch.int8).contiguous(), "weight_scale": scale.reshape(n, -1).contiguous()}
    return {"weight": q.to(torch.float8_e4m3fn).contiguous(), "weight_scale": scale.reshape(n, -1).contiguous()}


def _decompressed(lx: LayerExport, scheme: CtScheme, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight as the package's own rules give it back (unpack, then dequantize with float32 scales)."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    args = QuantizationArgs(**dict(scheme.weights))
    scale = tensors["weight_scale"].float()
    if scheme.format == "pack-quantized":
        q = unpack_from_int32(tensors["weight_packed"], lx.qweight.spec.bits, tensors["weight_shape"])
    else:
        q = tensors["weight"]
    return dequantize(q.float(), scale, None, args).float()


def _quantization_config(schemes: dict[str, CtScheme], ignore: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    groups: dict[CtScheme, list[str]] = {}
    for name, scheme in schemes.items():
        groups.setdefault(scheme, []).append(name)
    config_groups = {}
    for i, (scheme, targets) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0])):
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=sorted(targets), weights=QuantizationArgs(**dict(scheme.weights)),
            input_activations=None if scheme.input_activations is None else
            QuantizationArgs(**dict(scheme.input_activations)), format=scheme.format)
    formats = {s.format for s in groups}
    return QuantizationConfig(config_groups=config_groups, quantization_status="compressed", ignore=ignore,
                              format=formats.pop() if len(formats) == 1 else "mixed-precision")


def save_tokenizer(tokenizer: Any, out: Path) -> None:
    """A tokenizer object (``save_pretrained``) or a directory holding tokenizer files, copied next to the model."""
    if tokenizer is None:
        return
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
        return
    src = Path(tokenizer)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)


def write(plan: ExportPlan, out: str | Path, tokenizer: Any = None) -> ExportReport:
    """Write ``plan`` as a compressed-tensors checkpoint into ``out`` (see the module docstring)."""
    _ct()
    from compressed_tensors.compressors import ModelCompressor

    schemes = check(plan)  # refuses before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = dict(plan.model.state_dict())
    rows, written = [], {}
    for name, lx in plan.layers.items():
        bias = state.get(f"{name}.bias")
        bias_bytes = 0 if bias is None else bias.numel() * bias.element_size()
        if not lx.quantized:
            weight = state.get(f"{name}.weight")
            nbytes = 0 if lx.layer.tied_to else weight.numel() * weight.element_size()
            rows.append(LayerRow(name, "float", f"dense {str(weight.dtype).removeprefix('torch.')}",
                                 "x".join(map(str, lx.layer.weight_shape)), lx.predicted_bytes, nbytes + bias_bytes,
                                 note="tied: stored once, under its embedding" if lx.layer.tied_to else ""))
            continue
        scheme = schemes[name]
        tensors = _layer_tensors(lx, scheme)
        del state[f"{name}.weight"]
        state.update({f"{name}.{k}": v for k, v in tensors.items()})
        back = _decompressed(lx, scheme, tensors).reshape(lx.layer.n, -1)
        values = lx.values()
        rows.append(LayerRow(name, lx.bits.name, scheme.describe(), "x".join(map(str, lx.layer.weight_shape)),
                             lx.predicted_bytes, sum(t.numel() * t.element_size() for t in tensors.values())
                             + bias_bytes, float((back - values).abs().max()), relative_rms(back, values),
                             relative_rms(values, float_weight(plan, name))))
        written[name] = scheme
    plan.model.save_pretrained(out, state_dict=state)
    ignore = sorted(n for n, lx in plan.layers.items() if not lx.quantized
                    and isinstance(plan.model.get_submodule(n), nn.Linear))
    ModelCompressor(quantization_config=_quantization_config(schemes, ignore)).update_config(str(out))
    save_tokenizer(tokenizer, out)
    weight_files = sorted(p.name for p in out.glob("model*.safetensors"))
    notes = fused_scheme_notes(plan, schemes) + [
        "weights and scales are mpq's own (scales in the kernel's dtype); loaded in float32 they dequantize to "
        "mpq's values exactly, and a bfloat16/float16 load computes them in that dtype",
        "activations of weight-only layers run in the loader's dtype; mpq's CPU kernels round them to bfloat16"]
    if any(s.format == "int-quantized" for s in schemes.values()):
        notes.append("int8 activations: compressed-tensors' own reference forward scales them by amax/127.5, vLLM's "
                     "kernels and mpq by amax/127")
    report = ExportReport("compressed-tensors", str(out), file_sizes(out, weight_files + ["config.json"]), rows,
                          plan.predicted_total_bytes(), sum(file_sizes(out, weight_files).values()), notes,
                          {"config groups": len(set(schemes.values())), "device numerics": plan.device,
                           "quantizer": plan.quantizer.settings()})
    report.write()
    log.info("wrote compressed-tensors checkpoint to %s", out)
    return report
