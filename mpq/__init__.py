"""mpq: mixed-precision bit-allocation search for PyTorch models.

    import mpq
    result = mpq.search(model, calib_batches, eval_fn, budget=mpq.Budget(size=0.3))
    mpq.apply(model, result.config, calib_data=calib_batches)   # real integer kernels (GPTQ rounds on calib)

    study = mpq.study(model, calib_batches, eval_fn)   # sensitivity and latencies once
    for b in ("size=0.25", "size=0.35", "latency=0.7"):
        print(study.solve(b))                          # each budget in seconds

``import mpq`` loads only the light core (configs, budgets); ``search``/``apply`` load torch-side code on first use,
and neither CUDA nor Ray is touched until a search asks for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mpq.budget import Budget
from mpq.config import FLOAT, BitConfig, LayerBits
from mpq.errors import (BudgetError, CalibrationError, ConfigError, KernelUnavailableError, ModelError, MpqError,
                        NoQuantizableLayersError, RunDirectoryError)

__version__ = "0.1.0"

_LAZY = {"search": "mpq.api", "apply": "mpq.api", "load_quantized": "mpq.api", "SearchResult": "mpq.study_result",
         "sensitivity_report": "mpq.api", "search_devices": "mpq.api", "validate_config": "mpq.api",
         "study": "mpq.studies", "Study": "mpq.studies", "load_study": "mpq.studies",
         "resume_study": "mpq.studies",
         "load_reference": "mpq.models", "fake_quantize": "mpq.fakequant", "discover_layers": "mpq.layers",
         "build_search_space": "mpq.space", "export": "mpq.export"}

if TYPE_CHECKING:  # pragma: no cover
    from mpq.api import (apply, load_quantized, search, search_devices, sensitivity_report,  # noqa: F401
                         validate_config)
    from mpq.studies import Study, load_study, resume_study, study  # noqa: F401
    from mpq.study_result import SearchResult  # noqa: F401
    from mpq.export import export  # noqa: F401
    from mpq.fakequant import fake_quantize  # noqa: F401
    from mpq.layers import discover_layers  # noqa: F401
    from mpq.models import load_reference  # noqa: F401
    from mpq.space import build_search_space  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mpq' has no attribute {name!r}")


__all__ = ["Budget", "BitConfig", "LayerBits", "FLOAT", "MpqError", "ConfigError", "BudgetError", "CalibrationError",
           "NoQuantizableLayersError", "KernelUnavailableError", "ModelError", "RunDirectoryError", *_LAZY]
