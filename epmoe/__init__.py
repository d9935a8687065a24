"""epmoe: Mixture-of-Experts layers with expert parallelism for PyTorch.

Public API: MoEConfig, MoELayer, reference_moe, UnsupportedCombination, RankMismatch; `balance_experts`
(the expert placement for a measured load, see `epmoe.balance`); for engines that run their own experts,
`make_dispatcher` (dispatch / combine on a process group) and the backend registry (`register_dispatcher`,
`register_experts`); the testing helpers in `epmoe.testing` (imported on first use: `import epmoe;
epmoe.testing.assert_close(...)`). Messages go to the `logging` logger "epmoe", which the library never
configures (the `epmoe` command does).
"""
from . import dispatch, experts  # noqa: F401  (registers the built-in backends)
from . import log as _log  # noqa: F401  (the "epmoe" logger, with its NullHandler)
from .balance import ExpertMap, balance_experts
from .config import MoEConfig
from .dispatch.symm_workspace import SymmWorkspace
from .build import make_dispatcher
from .errors import RankMismatch, UnsupportedCombination
from .integration import from_transformers, patch_model
from .layer import MoELayer
from .placement import Placement
from .plan import Handoff, MoEPlan
from .quant import Fp8Config, fp8_dequantize, fp8_quantize
from .reference import reference_moe
from .registry import register_dispatcher, register_experts
from .routing import Routing, route, validate_routing
from .state_dict import load_hf_experts
from .version import __version__

__all__ = ["ExpertMap", "Fp8Config", "Handoff", "MoEConfig", "MoELayer", "MoEPlan", "Placement", "RankMismatch",
           "Routing", "SymmWorkspace", "UnsupportedCombination", "__version__", "balance_experts", "fp8_dequantize",
           "fp8_quantize", "from_transformers",
           "load_hf_experts", "make_dispatcher", "patch_model", "reference_moe", "register_dispatcher", "register_experts", "route",
           "validate_routing"]


def __getattr__(name):
    if name == "testing":      # on first use: it imports the multiprocessing and distributed helpers
        import importlib
        return importlib.import_module(".testing", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
