"""Per-layer bit-widths: :class:`LayerBits` for one layer, :class:`BitConfig` for a model.

Both are frozen and JSON-versioned. A config names layers by their module path (``model.get_submodule(name)``);
layers it does not name stay in float. Whether a config can run on a device is checked by
:func:`mpq.validate_config` (the kernel registry of that device decides; this module imports none of it).
:class:`Choice` is what a solver picks (layer -> option name, names not yet parsed, so solvers work on plain
tables); its :attr:`~Choice.key` is the one text form of an allocation that run directories store, and
:meth:`~Choice.to_config` makes it a :class:`BitConfig`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from mpq.errors import ConfigError

FORMAT = "mpq.bitconfig"
VERSION = 4  # 4: the quantizer is a top-level field; 3 added weight symmetry, 2 FP8; older files read unchanged
READS = (1, 2, 3, 4)
FORMATS = ("int", "e4m3")
WEIGHT_BITS = range(2, 9)  # 2..8
ACT_BITS = (8, 16)  # integer 8 / 16-bit (or a 16-bit float format where the kernel says so); None keeps float
GROUP_SIZES = (16, 32, 64, 128, 256, 512)

_NAME = re.compile(r"^w(?P<w>\d+)(?:a(?P<a>\d+|f))?(?:g(?P<g>\d+))?(?P<sym>sym|asym)?$")


@dataclass(frozen=True)
class LayerBits:
    """Bits of one layer: weight bits, activation bits, the weight group size, the number format and the symmetry.

    ``w_bits=None`` keeps the weight in float, ``a_bits=None`` keeps activations in float, ``group_size=None`` means
    one scale per output channel. ``fmt`` is ``int`` (integer levels) or ``e4m3`` (FP8 weights and activations,
    named ``fp8``). ``symmetric`` says how integer weights are stored: ``True`` a scale per group (name suffix
    ``sym``), ``False`` a scale and a zero (``asym``), ``None`` whatever the kernel's one scheme for these bits is
    (the names of configs from before version 3, and of kernels that offer one scheme). The rest of the numerics
    (scale dtype, how activations are scaled) are the kernel's: see :meth:`mpq.kernel_registry.Kernel.scheme`.
    """

    w_bits: int | None = None
    a_bits: int | None = None
    group_size: int | None = None
    fmt: str = "int"
    symmetric: bool | None = None

    def __post_init__(self) -> None:
        for what, v in (("weight bits", self.w_bits), ("activation bits", self.a_bits), ("group size",
                                                                                       self.group_size)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ConfigError(f"{what} must be a whole number or None, got {v!r}")
        if self.w_bits is not None and self.w_bits not in WEIGHT_BITS:
            raise ConfigError(f"weight bits {self.w_bits!r} not allowed: use 2..8, or None for float")
        if self.a_bits is not None and self.a_bits not in ACT_BITS:
            raise ConfigError(f"activation bits {self.a_bits!r} not allowed: use one of {ACT_BITS}, or None for float")
        if self.group_size is not None:
            if self.w_bits is None:
                raise ConfigError(f"group size {self.group_size} given for float weights: a group needs w_bits")
            if self.group_size not in GROUP_SIZES:
                raise ConfigError(f"group size {self.group_size!r} not allowed: use one of {GROUP_SIZES} or None")
        if self.fmt not in FORMATS:
            raise ConfigError(f"number format {self.fmt!r} not allowed: use one of {FORMATS}")
        if self.fmt == "e4m3" and (self.w_bits, self.a_bits, self.group_size) != (8, 8, None):
            raise ConfigError(f"FP8 (e4m3) is 8-bit weights and activations per channel/token, got "
                              f"w_bits={self.w_bits}, a_bits={self.a_bits}, group_size={self.group_size}")
        if self.symmetric is not None:
            if self.w_bits is None or self.fmt != "int":
                raise ConfigError(f"symmetric={self.symmetric!r} given for {'float' if self.w_bits is None else 'FP8'}"
                                  f" weights: symmetry applies to integer weights only")
            if not isinstance(self.symmetric, bool):
                raise ConfigError(f"symmetric must be True, False or None, got {self.symmetric!r}")

    @property
    def is_float(self) -> bool:
        return self.w_bits is None and self.a_bits is None

    @property
    def name(self) -> str:
        """Short name: ``float``, ``w8a8``, ``w8a16``, ``w4a16g32``, ``w4af`` (float activations), ``w3a16g64sym``
        (symmetric: scales only), ``w2a16g32asym`` (a scale and a zero per group)."""
        if self.is_float:
            return "float"
        if self.fmt == "e4m3":
            return "fp8"
        if self.w_bits is None:
            raise ConfigError(f"float weights with {self.a_bits}-bit activations have no name: not supported")
        a = "f" if self.a_bits is None else str(self.a_bits)
        g = "" if self.group_size is None else f"g{self.group_size}"
        sym = "" if self.symmetric is None else ("sym" if self.symmetric else "asym")
        return f"w{self.w_bits}a{a}{g}{sym}"

    @classmethod
    def parse(cls, text: str) -> LayerBits:
        """Inverse of :attr:`name`; ``w4g128`` (no ``a``) means float activations."""
        text = text.strip().lower()
        if text in ("float", "fp", "fp32", "none"):
            return FLOAT
        if text in ("fp8", "fp8e4m3", "w8a8e4m3"):
            return cls(8, 8, None, "e4m3")
        m = _NAME.match(text)
        if not m:
            raise ConfigError(f"cannot parse layer bits {text!r}: expected 'float' or e.g. 'w8a8', 'w4a16g128'")
        a = m["a"]
        return cls(
            w_bits=int(m["w"]),
            a_bits=None if a in (None, "f") else int(a),
            group_size=None if m["g"] is None else int(m["g"]),
            symmetric=None if m["sym"] is None else m["sym"] == "sym",
        )

    def to_dict(self) -> dict[str, int | str | None]:
        d: dict[str, int | str | None] = {"w_bits": self.w_bits, "a_bits": self.a_bits, "group_size": self.group_size}
        if self.fmt != "int":
            d["format"] = self.fmt
        if self.symmetric is not None:
            d["symmetric"] = self.symmetric
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerBits:
        if not isinstance(d, Mapping):
            raise ConfigError(f"layer bits must be an object like {{'w_bits': 8, 'a_bits': 8}}, got {d!r}")
        unknown = set(d) - {"w_bits", "a_bits", "group_size", "format", "symmetric"}
        if unknown:
            raise ConfigError(f"unknown layer-bits keys {sorted(unknown)}: allowed are w_bits, a_bits, group_size, "
                              f"format, symmetric")
        return cls(d.get("w_bits"), d.get("a_bits"), d.get("group_size"), d.get("format", "int"), d.get("symmetric"))

    def __str__(self) -> str:
        return self.name


FLOAT = LayerBits()


def choice_key(choice: Mapping[str, Any]) -> str:
    """The one text form of an allocation: JSON of ``{layer: option name}`` sorted by layer (what run
    directories store in their ``choice`` columns)."""
    return json.dumps({str(k): str(v) for k, v in sorted(choice.items())})


class Choice(Mapping[str, str]):
    """One option name per layer, as a solver picks it: frozen, hashable, equal to a dict with the same items.

    Option names stay strings (solvers and their tests work on plain tables whose options need not be bit names);
    :meth:`to_config` parses them into a :class:`BitConfig`.
    """

    __slots__ = ("_items", "_key")

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()):
        pairs = dict(items)
        for layer, option in pairs.items():
            if not isinstance(layer, str) or not layer:
                raise ConfigError(f"layer names must be non-empty strings, got {layer!r}")
            if option is None:
                raise ConfigError(f"layer {layer!r}: option is null; give an option name such as 'float' or 'w8a8'")
        self._items = MappingProxyType({k: str(v) for k, v in sorted(pairs.items())})
        self._key = choice_key(self._items)

    @classmethod
    def from_key(cls, key: str) -> Choice:
        """Inverse of :attr:`key`."""
        try:
            data = json.loads(key)
        except (TypeError, json.JSONDecodeError) as e:
            raise ConfigError(f"not an allocation key (JSON of layer -> option): {str(key)[:80]!r}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"an allocation key is a JSON object of layer -> option, got {type(data).__name__}")
        return cls(data)

    @property
    def key(self) -> str:
        return self._key

    def __getitem__(self, layer: str) -> str:
        return self._items[layer]

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"Choice({dict(self._items)})"

    def to_config(self, quantizer: QuantizerSpec | Mapping[str, Any] | str | None = None, **meta: Any) -> BitConfig:
        return BitConfig({k: LayerBits.parse(v) for k, v in self._items.items()}, meta=meta, quantizer=quantizer)


@dataclass(frozen=True)
class QuantizerSpec:
    """Which quantizer chose a config's integers and with what options (``apply`` repeats it)."""

    name: str = "minmax"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"quantizer name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @classmethod
    def of(cls, spec: QuantizerSpec | Mapping[str, Any] | str | None) -> QuantizerSpec | None:
        """From a spec, recorded settings ``{"name": ..., **options}``, a name, or None."""
        if spec is None or isinstance(spec, QuantizerSpec):
            return spec
        if isinstance(spec, str):
            return cls(spec)
        if isinstance(spec, Mapping):
            options = dict(spec)
            return cls(options.pop("name", "minmax"), options)
        raise ConfigError(f"quantizer must be a name or {{'name': ..., options}}, got {spec!r}")

    def to_dict(self) -> dict[str, Any]:
        """The settings form ``{"name": ..., **options}`` (what :meth:`mpq.quantizers.Quantizer.settings` gives)."""
        return {"name": self.name, **dict(self.options)}


@dataclass(frozen=True, eq=False)
class BitConfig:
    """Per-layer bits of a model. Layers not named stay in float.

    >>> cfg = BitConfig({"fc1": LayerBits(8, 8), "fc2": LayerBits.parse("w4a16g32")})
    >>> BitConfig.from_json(cfg.to_json()) == cfg
    True
    """

    layers: Mapping[str, LayerBits] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    quantizer: QuantizerSpec | None = None  # None: apply's default (min-max)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping):
            raise ConfigError(f"bit config layers must be a mapping of layer name -> bits, got "
                              f"{type(self.layers).__name__}")
        layers = {}
        for name, bits in dict(self.layers).items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"layer names must be non-empty strings, got {name!r}")
            layers[name] = _layer_bits(name, bits)
        meta = dict(self.meta)
        # configs from before version 4 kept the quantizer in the metadata
        quantizer = QuantizerSpec.of(self.quantizer if self.quantizer is not None else meta.pop("quantizer", None))
        meta.pop("quantizer", None)
        object.__setattr__(self, "layers", MappingProxyType(dict(sorted(layers.items()))))
        object.__setattr__(self, "meta", _MetaView(meta, quantizer))
        object.__setattr__(self, "quantizer", quantizer)

    @property
    def choice(self) -> Choice:
        """Layer -> option name of every layer the config names."""
        return Choice({k: v.name for k, v in self.layers.items()})

    @property
    def key(self) -> str:
        """The text form run directories store (see :func:`choice_key`)."""
        return self.choice.key

    # --- mapping-like access -------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> LayerBits:
        return self.layers.get(name, FLOAT)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BitConfig):
            return NotImplemented
        return dict(self.quantized()) == dict(other.quantized())

    def __hash__(self) -> int:
        return hash(tuple(self.quantized().items()))

    def quantized(self) -> Mapping[str, LayerBits]:
        """The layers that are not float."""
        return {k: v for k, v in self.layers.items() if not v.is_float}

    @classmethod
    def uniform(cls, names: Iterable[str], bits: LayerBits | str, **meta: Any) -> BitConfig:
        bits = LayerBits.parse(bits) if isinstance(bits, str) else bits
        return cls({n: bits for n in names}, meta=meta)

    def with_layer(self, name: str, bits: LayerBits | str) -> BitConfig:
        return BitConfig({**self.layers, name: bits}, meta=self.meta.own(), quantizer=self.quantizer)

    def histogram(self) -> dict[str, int]:
        """How many named layers take each option."""
        out: dict[str, int] = {}
        for bits in self.layers.values():
            out[bits.name] = out.get(bits.name, 0) + 1
        return dict(sorted(out.items()))

    # --- JSON ----------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": FORMAT,
            "version": VERSION,
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "meta": self.meta.own(),
        }
        if self.quantizer is not None:
            out["quantizer"] = self.quantizer.to_dict()
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BitConfig:
        if not isinstance(d, Mapping):
            raise ConfigError(f"a bit config is a JSON object with format {FORMAT!r}, got a {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ConfigError(f"not an mpq bit config: format is {d.get('format')!r}, expected {FORMAT!r}")
        if d.get("version") not in READS:
            raise ConfigError(f"bit config version {d.get('version')!r} is not supported: this mpq reads "
                              f"{', '.join(map(str, READS))}")
        layers = d.get("layers")
        if not isinstance(layers, Mapping):
            raise ConfigError("bit config has no 'layers' mapping")
        meta = d.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise ConfigError(f"bit config 'meta' must be an object, got {type(meta).__name__}")
        return cls(dict(layers), meta=meta, quantizer=d.get("quantizer"))

    @classmethod
    def from_json(cls, text: str) -> BitConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"bit config is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> BitConfig:
        """Read ``config.json``; a missing, unreadable or non-UTF-8 file is a :class:`ConfigError` naming it."""
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"no bit config at {path}: give the config.json of a run") from None
        except IsADirectoryError:
            raise ConfigError(f"{path} is a directory: give the config.json inside it") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"bit config {path} is not UTF-8 text (byte {e.start}): not a config.json") from None
        except OSError as e:
            raise ConfigError(f"cannot read bit config {path}: {e.strerror}") from None
        try:
            return cls.from_json(text)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        return f"BitConfig({len(self.quantized())} quantized of {len(self.layers)} named; {self.histogram()})"


def _layer_bits(name: str, bits: Any) -> LayerBits:
    if isinstance(bits, LayerBits):
        return bits
    if isinstance(bits, str):
        return LayerBits.parse(bits)
    if isinstance(bits, Mapping):
        return LayerBits.from_dict(bits)
    if bits is None:
        raise ConfigError(f"layer {name!r}: bits are null; give 'float', a name like 'w8a8', or "
                          f"{{'w_bits': 8, 'a_bits': 8, 'group_size': null}}")
    raise ConfigError(f"layer {name!r}: bits must be LayerBits, a name like 'w8a8' or a dict, got {bits!r}")


class _MetaView(Mapping[str, Any]):
    """A config's metadata, read-only. ``meta["quantizer"]`` still reads the quantizer's settings, for code written
    before the quantizer became the typed field :attr:`BitConfig.quantizer`; :meth:`own` is the metadata proper."""

    __slots__ = ("_own", "_quantizer")

    def __init__(self, own: Mapping[str, Any], quantizer: QuantizerSpec | None):
        self._own = MappingProxyType(dict(own))
        self._quantizer = quantizer

    def own(self) -> dict[str, Any]:
        return dict(self._own)

    def _full(self) -> dict[str, Any]:
        return {**self._own, **({"quantizer": self._quantizer.to_dict()} if self._quantizer else {})}

    def __getitem__(self, key: str) -> Any:
        return self._full()[key]

    def __iter__(self):
        return iter(self._full())

    def __len__(self) -> int:
        return len(self._full())

    def __repr__(self) -> str:
        return repr(self._full())
