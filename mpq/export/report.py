"""The report of an export: per layer what was written (format, type, bytes) next to what mpq predicted, and how
far the written values are from mpq's; written as ``export.json`` and ``export.md`` in the output directory."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPORT_JSON = "export.json"
REPORT_MD = "export.md"


@dataclass
class LayerRow:
    """One layer of the export. ``max_abs_diff``/``rel_rms_vs_mpq``: the written weight (dequantized by the
    format's own rule) against mpq's dequantized weight; ``rel_rms_vs_float`` against the float weight."""

    layer: str
    option: str
    written_as: str  # e.g. "pack-quantized int4 group 128 symmetric", "Q4_K", "F32"
    shape: str
    predicted_bytes: int
    written_bytes: int
    max_abs_diff: float | None = None
    rel_rms_vs_mpq: float | None = None
    rel_rms_vs_float: float | None = None
    note: str = ""


@dataclass
class ExportReport:
    """What an export wrote: files, per-layer rows, totals, and what a serving stack should know."""

    format: str
    out_dir: str
    files: dict[str, int]  # file name -> bytes
    layers: list[LayerRow]
    predicted_total_bytes: int  # mpq's size of the whole model at the config (layers + kept-float modules)
    written_total_bytes: int  # the model files' bytes (weights and headers, not tokenizer or config files)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "mpq.export", "version": 1, "serving_format": self.format, "out_dir": self.out_dir,
                "files": self.files, "predicted_total_bytes": self.predicted_total_bytes,
                "written_total_bytes": self.written_total_bytes, "notes": self.notes, "meta": self.meta,
                "layers": [asdict(r) for r in self.layers]}

    def write(self) -> Path:
        out = Path(self.out_dir)
        (out / REPORT_JSON).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        (out / REPORT_MD).write_text(self.markdown())
        return out / REPORT_MD

    def markdown(self) -> str:
        ratio = self.written_total_bytes / self.predicted_total_bytes if self.predicted_total_bytes else float("nan")
        lines = [f"# mpq export: {self.format}", "",
                 f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} to `{self.out_dir}`.", "",
                 f"- model files: {_mb(self.written_total_bytes)} written; mpq predicted "
                 f"{_mb(self.predicted_total_bytes)} for this config ({ratio:.3f}x)",
                 *[f"- `{name}`: {_mb(size)}" for name, size in sorted(self.files.items())]]
        for key, value in self.meta.items():
            lines.append(f"- {key}: {value}")
        if self.notes:
            lines += ["", "## Notes", "", *[f"- {n}" for n in self.notes]]
        lines += ["", "## Layers", "",
                  "| layer | option | written as | shape | predicted B | written B | max abs diff vs mpq "
                  "| rel. RMS vs mpq | rel. RMS vs float | note |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
        for r in self.layers:
            lines.append(f"| `{r.layer}` | {r.option} | {r.written_as} | {r.shape} | {r.predicted_bytes} | "
                         f"{r.written_bytes} | {_num(r.max_abs_diff)} | {_num(r.rel_rms_vs_mpq)} | "
                         f"{_num(r.rel_rms_vs_float)} | {r.note} |")
        return "\n".join(lines) + "\n"


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB ({n} B)"


def _num(x: float | None) -> str:
    if x is None:
        return ""
    return "0" if x == 0 else f"{x:.3g}"


def file_sizes(out_dir: Path, names: list[str]) -> dict[str, int]:
    return {n: (out_dir / n).stat().st_size for n in names if (out_dir / n).exists()}
