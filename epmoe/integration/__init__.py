"""transformers integration: run a transformers MoE model with its experts spread over ranks.

`from_transformers(block)` / `patch_model(model)` swap transformers' sparse-MoE blocks (Mixtral, Qwen2-MoE,
Qwen3-MoE, DeepSeek-V3, OLMoE, gpt-oss) for epmoe modules; `load_model(path, ep_group)` builds a model
from a local safetensors checkpoint reading only this rank's experts. Importing this package does not
import transformers; `load_model` needs it (and safetensors).
"""
from .block import EPMoEBlock, expert_memory_bytes, from_transformers, moe_blocks, patch_model
from .families import FAMILIES, SUPPORTED_BLOCKS, Family, family_of


def __getattr__(name):
    if name in ("load_model", "CheckpointFiles", "PickledCheckpointRefused"):
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EPMoEBlock", "FAMILIES", "Family", "SUPPORTED_BLOCKS", "CheckpointFiles", "PickledCheckpointRefused",
           "expert_memory_bytes", "family_of", "from_transformers", "load_model", "moe_blocks", "patch_model"]
