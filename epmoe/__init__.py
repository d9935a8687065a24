"""epmoe: Mixture-of-Experts layers with expert parallelism for PyTorch.

Public API: MoEConfig, MoELayer, reference_moe, UnsupportedCombination, ..., and the testing helpers in
`epmoe.testing` (imported on first use: `import epmoe; epmoe.testing.assert_close(...)`). Messages go to
the `logging` logger "epmoe", which the library never configures (the `epmoe` command does).
"""
from . import log as _log  # noqa: F401  (the "epmoe" logger, with its NullHandler)
from .config import MoEConfig
from .errors import RankMismatch, UnsupportedCombination
from .integration import from_transformers, patch_model
from .layer import MoELayer
from .placement import Placement
from .quant import Fp8Config, fp8_dequantize, fp8_quantize
from .reference import reference_moe
from .routing import Routing, route, validate_routing
from .state_dict import load_hf_experts

__version__ = "0.1.0"

__all__ = ["Fp8Config", "MoEConfig", "MoELayer", "Placement", "RankMismatch", "Routing", "UnsupportedCombination",
           "fp8_dequantize", "fp8_quantize", "from_transformers", "load_hf_experts", "patch_model", "reference_moe", "route", "validate_routing"]


def __getattr__(name):
    if name == "testing":      # on first use: it imports the multiprocessing and distributed helpers
        import importlib
        return importlib.import_module(".testing", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
