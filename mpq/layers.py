"""Layer discovery: which modules mpq can quantize, their shapes and their MACs per sample.

MACs and input shapes are measured with forward hooks on an example input, so they are right for any model that
runs, however it routes tensors. Every other module that holds parameters is listed as kept in float, with why.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import pandas as pd
import torch
from torch import nn

from mpq.errors import CalibrationError, NoQuantizableLayersError

log = logging.getLogger(__name__)

QUANTIZABLE_TYPES: dict[type, str] = {nn.Linear: "linear", nn.Conv1d: "conv1d", nn.Conv2d: "conv2d",
                                      nn.Embedding: "embedding"}


def is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's linears): a linear layer whose weight is stored ``[in, out]``. Recognised
    by name so that mpq never imports transformers itself."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers")


def weight_matrix(m: nn.Module) -> torch.Tensor:
    """The weight with output channels first (``[out, in, ...]``): a view of HF Conv1D's transposed weight."""
    return m.weight.t() if is_hf_conv1d(m) else m.weight


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer, seen as the GEMM ``[rows, K] x [K, N]`` that its kernel runs (an embedding as a table
    of N rows of K values, looked up rather than multiplied)."""

    name: str
    kind: str  # linear | conv1d | conv2d | embedding
    weight_shape: tuple[int, ...]  # output channels (or embedding rows) first, whatever the module stores
    params: int  # weight + bias elements
    has_bias: bool
    weight_bytes_per_elem: int  # float storage of the original weight
    macs: int = 0  # per sample, summed over calls
    calls: int = 0  # forward calls on the example input
    input_shape: tuple[int, ...] | None = None  # of the first call, batch dim included
    batch_size: int = 0  # batch of the example input
    conv: dict[str, Any] | None = None  # stride, padding, dilation, groups
    transposed: bool = False  # the module stores its weight [in, out] (HF Conv1D)
    tied_to: str | None = None  # the kept-float module whose weight this layer shares (a tied LM head)
    float_dtype: str = "float32"  # the weight's dtype (torch name without "torch."): what the float layer runs in

    @property
    def n(self) -> int:
        return self.weight_shape[0]

    @property
    def k(self) -> int:
        """GEMM reduction size: in_features, or in_channels/groups * prod(kernel)."""
        k = 1
        for d in self.weight_shape[1:]:
            k *= d
        return k

    @property
    def groups(self) -> int:
        return 1 if self.conv is None else int(self.conv["groups"])

    def float_bytes(self) -> int:
        """Bytes this layer adds in float; a tied layer adds only its bias (its weight is counted once, under the
        module it shares it with)."""
        if self.tied_to:
            return (self.n if self.has_bias else 0) * self.weight_bytes_per_elem
        return self.params * self.weight_bytes_per_elem

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["weight_shape"] = "x".join(map(str, self.weight_shape))
        row["input_shape"] = "" if self.input_shape is None else "x".join(map(str, self.input_shape))
        row["conv"] = "" if self.conv is None else str(self.conv)
        row["k"], row["n"] = self.k, self.n
        return row


@dataclass(frozen=True)
class FloatModule:
    """A module with parameters that stays in float, and why."""

    name: str
    type: str
    params: int
    bytes: int
    reason: str


@dataclass
class LayerInventory:
    layers: list[LayerInfo]
    kept_float: list[FloatModule] = field(default_factory=list)
    batch_size: int = 0

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def float_bytes_other(self) -> int:
        """Bytes of the parameters that are never quantized (kept-float modules)."""
        return sum(m.bytes for m in self.kept_float)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([layer.to_row() for layer in self.layers])

    def kept_float_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(m) for m in self.kept_float], columns=["name", "type", "params", "bytes", "reason"])


def call_model(model: nn.Module, inputs: Any):
    """Call ``model`` on a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def first_tensor(inputs: Any) -> torch.Tensor:
    if isinstance(inputs, torch.Tensor):
        return inputs
    values = inputs.values() if isinstance(inputs, dict) else inputs
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise CalibrationError(f"calibration inputs hold no tensor: got {type(inputs).__name__}")


def describe_input(inputs: Any) -> str:
    if isinstance(inputs, torch.Tensor):
        return f"tensor of shape {tuple(inputs.shape)} ({inputs.dtype})"
    if isinstance(inputs, dict):
        return "{" + ", ".join(f"{k}: {describe_input(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(describe_input(v) for v in inputs) + ")"
    return type(inputs).__name__


def expected_input(model: nn.Module) -> str:
    """What the model's first quantizable layer expects, for error messages."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            return f"its first layer {name!r} (Embedding) expects integer ids below {m.num_embeddings}"
        if isinstance(m, nn.Linear):
            return f"its first layer {name!r} (Linear) expects a last dimension of {m.in_features}"
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            dims = "[batch, channels, length]" if isinstance(m, nn.Conv1d) else "[batch, channels, height, width]"
            return f"its first layer {name!r} ({type(m).__name__}) expects {dims} with {m.in_channels} channels"
    return "no Linear/Conv layer tells the expected shape"


def run_checked(model: nn.Module, inputs: Any, what: str = "calibration batch 0"):
    """Run the model, turning a shape error into a :class:`CalibrationError` that says what the model expects."""
    try:
        return call_model(model, inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise CalibrationError(
            f"{what} ({describe_input(inputs)}) does not fit the model: {expected_input(model)}. "
            f"PyTorch said: {str(e).splitlines()[0]}"
        ) from e


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _static_info(name: str, m: nn.Module) -> LayerInfo:
    kind = "linear" if is_hf_conv1d(m) else next(v for t, v in QUANTIZABLE_TYPES.items() if isinstance(m, t))
    conv = None
    if kind.startswith("conv"):
        conv = {"stride": tuple(m.stride), "padding": m.padding if isinstance(m.padding, str) else tuple(m.padding),
                "dilation": tuple(m.dilation), "groups": m.groups, "padding_mode": m.padding_mode}
    bias = getattr(m, "bias", None)
    params = m.weight.numel() + (bias.numel() if bias is not None else 0)
    return LayerInfo(name=name, kind=kind, weight_shape=tuple(weight_matrix(m).shape), params=params,
                     has_bias=bias is not None, weight_bytes_per_elem=m.weight.element_size(), conv=conv,
                     transposed=is_hf_conv1d(m), float_dtype=str(m.weight.dtype).removeprefix("torch."))


def custom_subclass_reason(m: nn.Module) -> str | None:
    """Why a subclass of Linear/Conv1d/Conv2d/Embedding must stay in float, or None if it is one in all but name.

    A kernel module computes what the base class's ``forward`` computes from ``weight`` and ``bias``; a subclass
    with its own ``forward``, or with parameters or buffers beyond those, would lose them when swapped (silently:
    the model still runs). Subclasses that only change ``__init__`` (``NonDynamicallyQuantizableLinear``) are fine.
    """
    base = next((t for t in QUANTIZABLE_TYPES if isinstance(m, t)), None)
    if base is None or type(m) is base:
        return None
    why = []
    if type(m).forward is not base.forward:
        owner = next(c for c in type(m).__mro__ if "forward" in vars(c))
        why.append(f"its own forward ({owner.__qualname__}.forward)")
    base_state = {"weight", "bias"}
    extra = sorted(({n for n, _ in m.named_parameters()} | {n for n, _ in m.named_buffers()}) - base_state)
    if extra:
        why.append(f"state beyond weight/bias ({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})")
    if not why:
        return None
    return (f"{type(m).__name__} subclasses {base.__name__} with {' and '.join(why)}: a kernel module would drop "
            f"it, so it stays in float")


def is_quantizable(m: nn.Module) -> bool:
    return (isinstance(m, tuple(QUANTIZABLE_TYPES)) or is_hf_conv1d(m)) and \
        isinstance(getattr(m, "weight", None), torch.Tensor) and custom_subclass_reason(m) is None


def discover_layers(model: nn.Module, example_input: Any = None) -> LayerInventory:
    """Find every quantizable layer; with ``example_input`` also measure MACs per sample and input shapes."""
    infos: dict[str, LayerInfo] = {}
    modules = dict(model.named_modules())
    for name, m in modules.items():
        if name and is_quantizable(m):
            infos[name] = _static_info(name, m)
    tied = _untie_plan(infos, modules)

    batch = 0
    if example_input is not None:
        stats: dict[str, dict[str, Any]] = {n: {"macs": 0, "calls": 0, "shape": None} for n in infos}

        def hook(name):
            def fn(mod, inp, out):
                s = stats[name]
                s["calls"] += 1
                if s["shape"] is None:
                    s["shape"] = tuple(inp[0].shape)
                if infos[name].kind != "embedding":  # a lookup multiplies nothing
                    s["macs"] += out.numel() * infos[name].k  # every output element is a dot product of length K
            return fn

        handles = [modules[n].register_forward_hook(hook(n)) for n in infos]
        try:
            with torch.no_grad():
                run_checked(model, example_input)
        finally:
            for h in handles:
                h.remove()
        batch = int(first_tensor(example_input).shape[0])
        for n, s in stats.items():
            infos[n] = LayerInfo(**{**asdict(infos[n]), "macs": s["macs"] // max(batch, 1), "calls": s["calls"],
                                    "input_shape": s["shape"], "batch_size": batch})

    kept: list[FloatModule] = []
    layers: list[LayerInfo] = []
    for name, info in infos.items():
        if name in tied:
            partner = tied[name]
            if partner is None:  # a tied embedding: its head is the quantizable one
                heads = [h for h, t in tied.items() if t == name]
                kept.append(FloatModule(name, type(modules[name]).__name__, info.params, info.float_bytes(),
                                        f"weight tied to {', '.join(heads)}: quantized there (the head), kept in "
                                        f"float here"))
                continue
            info = LayerInfo(**{**asdict(info), "tied_to": partner})
        if example_input is not None and info.calls == 0:
            m = modules[name]
            kept.append(FloatModule(name, type(m).__name__, info.params, info.float_bytes(),
                                    "not called in the forward pass of the example input"))
        else:
            layers.append(info)
    seen = {id(modules[n].weight) for n in infos}
    for name, m in modules.items():
        if name in infos:
            continue
        own = [p for p in m.parameters(recurse=False) if id(p) not in seen]
        if not own:
            continue
        seen.update(id(p) for p in own)
        n = sum(p.numel() for p in own)
        nbytes = sum(p.numel() * p.element_size() for p in own)
        kept.append(FloatModule(name or "<root>", type(m).__name__, n, nbytes, _float_reason(m)))
    if not layers:
        types = sorted({type(m).__name__ for m in modules.values() if list(m.parameters(recurse=False))})
        raise NoQuantizableLayersError(
            f"model {type(model).__name__} has no quantizable layer: mpq quantizes "
            f"{', '.join(t.__name__ for t in QUANTIZABLE_TYPES)} and Hugging Face Conv1D; its modules with "
            f"parameters are "
            f"{types or 'none'}")
    log.debug("discovered %d quantizable layers, %d kept in float", len(layers), len(kept))
    return LayerInventory(layers, kept, batch)


def _untie_plan(infos: dict[str, LayerInfo], modules: dict[str, nn.Module]) -> dict[str, str | None]:
    """Quantizable layers that share one weight tensor (a tied LM head and embedding): the first non-embedding
    member stays quantizable but ``tied_to`` the owner, which is kept in float (``None``) when it is an embedding;
    further members likewise tie to the first. Quantizing a tied layer gives it its own packed copy."""
    groups: dict[int, list[str]] = {}
    for name in infos:
        groups.setdefault(id(modules[name].weight), []).append(name)
    plan: dict[str, str | None] = {}
    for members in (g for g in groups.values() if len(g) > 1):
        embeddings = [n for n in members if infos[n].kind == "embedding"]
        owner = embeddings[0] if embeddings else members[0]
        if embeddings:
            plan[owner] = None
        for n in members:
            if n != owner:
                plan[n] = owner
    return plan


def _float_reason(m: nn.Module) -> str:
    t = type(m).__name__
    custom = custom_subclass_reason(m)
    if custom:
        return custom
    if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) or "norm" in t.lower():
        return f"{t}: normalisation runs in float"
    if isinstance(m, (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return f"{t}: no quantized kernel for this layer type"
    return f"{t}: parameters outside Linear/Conv1d/Conv2d/Embedding stay in float"


def modules_by_name(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    return {n: mods[n] for n in names}
