"""Load a transformers MoE checkpoint with expert parallelism, reading only this rank's experts.

`load_model(path, ep_group)` builds the model skeleton on the meta device (no memory), swaps its MoE
blocks for epmoe modules that allocate only this rank's experts, then reads the checkpoint lazily with
`safe_open`: every non-expert tensor (replicated on each rank), and of the routed experts only the local
ones, one expert at a time (whole tensors in per-expert layouts, row slices of fused tensors). The other
ranks' experts are never read. DeepSeek-V3 FP8 checkpoints (`weight_scale_inv`) keep their routed experts
in FP8 (`epmoe.Fp8Config`) unless asked otherwise; FP8 non-expert weights are dequantized to the model's
dtype. Pickled checkpoints (`*.bin`, `*.pt`) can run code when unpickled: refused unless
`allow_pickle=True`.
"""
from __future__ import annotations

import copy
import json
import re
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from ..log import get_logger

from .block import EPMoEBlock, convert_block, replace_blocks
from .families import GPT_OSS, split_expert

log = get_logger("integration")

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SCALE_SUFFIX = "_scale_inv"          # DeepSeek-V3: `<name>.weight_scale_inv` next to an FP8 `<name>.weight`
AUTO = "auto"


class PickledCheckpointRefused(ValueError):
    """The checkpoint is pickled (unpickling can run arbitrary code) and the caller did not opt in."""


# ------------------------------------------------------------------------------------------ reading
class CheckpointFiles:
    """Which file holds which tensor, and lazy reads of whole tensors or rows of them.

    safetensors files are opened with `safe_open` once each, on first use, and read tensor by tensor;
    nothing is read before it is asked for. Use as a context manager (closes the files).
    """

    def __init__(self, path, allow_pickle: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        self.pickled = False
        index = self.path / SAFETENSORS_INDEX
        files = sorted(self.path.glob("*.safetensors"))
        if index.exists():
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            self.key_to_file = {k: self.path / v for k, v in weight_map.items()}
            missing = sorted({str(p.name) for p in self.key_to_file.values() if not p.exists()})
            if missing:
                raise FileNotFoundError(f"{index} names shards that are not in {self.path}: {missing[:4]}")
        elif files:
            self.key_to_file = {}
            for file in files:
                with _opened(file) as f:   # reads the header only
                    for k in f.keys():
                        self.key_to_file[k] = file
        else:
            pickled = sorted(p for p in self.path.iterdir() if p.suffix in PICKLED_SUFFIXES)
            if not pickled:
                raise FileNotFoundError(f"{self.path} holds no checkpoint: no *.safetensors, no "
                                        f"{SAFETENSORS_INDEX}, no pickled {'/'.join(PICKLED_SUFFIXES)} files")
            if not allow_pickle:
                raise PickledCheckpointRefused(
                    f"{self.path} is a pickled PyTorch checkpoint ({', '.join(p.name for p in pickled[:3])}); "
                    "unpickling can run arbitrary code, so epmoe refuses it by default. Convert it to safetensors, "
                    "or pass allow_pickle=True if you trust where it came from.")
            self.pickled = True
            self.key_to_file = {}
            self._pickled_files = pickled
        self._open: dict[Path, object] = {}
        self._stack = ExitStack()
        if self.pickled:
            self._load_pickled()

    def _load_pickled(self) -> None:
        self._pickled: dict[str, torch.Tensor] = {}
        for file in self._pickled_files:
            sd = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            for k, v in sd.items():
                self._pickled[k] = v
                self.key_to_file[k] = file

    def __enter__(self) -> "CheckpointFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._open.clear()

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def keys(self):
        return self.key_to_file.keys()

    def _handle(self, key: str):
        if key not in self.key_to_file:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.path}")
        file = self.key_to_file[key]
        if file not in self._open:
            self._open[file] = self._stack.enter_context(_opened(file))
        return self._open[file]

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor."""
        if self.pickled:
            return self._pickled[key]
        return self._handle(key).get_tensor(key)

    def row(self, key: str, index: int) -> torch.Tensor:
        """`tensor[index]`, reading only that row (a fused per-expert tensor's expert)."""
        if self.pickled:
            return self._pickled[key][index]
        return self._handle(key).get_slice(key)[index:index + 1][0]

    def shape(self, key: str) -> tuple[int, ...]:
        if self.pickled:
            return tuple(self._pickled[key].shape)
        return tuple(self._handle(key).get_slice(key).get_shape())


# ------------------------------------------------------------------------------------------ FP8
def _opened(file: Path):
    """`safe_open` on one file, its errors naming the file (a truncated download says only "incomplete
    metadata" otherwise)."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:   # safetensors raises its own SafetensorError, not an OSError
        raise ValueError(f"{file}: not a readable safetensors file ({exc}); a truncated or interrupted "
                         "download? Fetch the file again") from exc


def fp8_weight_block(config) -> tuple[int, int] | None:
    """The (rows, cols) weight block of an FP8 checkpoint's `quantization_config`, None if not FP8."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method != "fp8":
        raise ValueError(f"checkpoint quantization {method!r} is not supported: epmoe reads unquantized and FP8 "
                         "(quant_method 'fp8', DeepSeek-V3 weight_scale_inv) checkpoints")
    block = qc.get("weight_block_size") or (128, 128)
    return int(block[0]), int(block[1])


def dequantize_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 weight [N, K] with one multiplier per `block` (edge blocks partial) -> float32 [N, K]."""
    N, K = w.shape
    bn, bk = block
    s = scale_inv.float().repeat_interleave(bn, dim=0)[:N].repeat_interleave(bk, dim=1)[:, :K]
    return w.float() * s


# ------------------------------------------------------------------------------------------ experts
class ExpertSource:
    """Where one MoE block's routed experts are in the checkpoint, and how to read one of them."""

    def __init__(self, ckpt: CheckpointFiles, block: EPMoEBlock, block_path: str, fp8_block):
        self.ckpt, self.family, self.fp8_block = ckpt, block.family, fp8_block
        self.layer = block.experts
        parent = block_path.rsplit(".", 1)[0] if "." in block_path else ""
        prefixes = [f"{parent}.{n}" if parent else n for n in self.family.checkpoint_block_names]
        if block_path not in prefixes:
            prefixes.append(block_path)
        self.per_expert = self.fused = None
        tried = []
        for prefix in prefixes:
            names = self.family.expert_weight_names
            if names is not None:
                keys = [f"{prefix}.experts.0.{n}.weight" for n in names]
                tried.append(keys[0])
                if all(k in ckpt for k in keys):
                    self.per_expert = (prefix, names)
                    break
            fused = f"{prefix}.experts.gate_up_proj"
            tried.append(fused)
            if fused in ckpt:
                self.fused = prefix
                break
            if f"{fused}_blocks" in ckpt:
                raise ValueError(f"{block_path}: the checkpoint stores the experts in MXFP4 ({fused}_blocks); epmoe "
                                 "reads unquantized and FP8 experts (use a BF16 copy of this checkpoint)")
        if self.per_expert is None and self.fused is None:
            raise KeyError(f"{block_path}: no routed experts found in the checkpoint (looked for {', '.join(tried)})")

    def keys(self, e: int) -> list[str]:
        """The tensors `read(e)` touches (whole tensors, or the fused tensors it takes row `e` of)."""
        if self.per_expert is not None:
            prefix, names = self.per_expert
            keys = [f"{prefix}.experts.{e}.{n}.weight" for n in names]
            return keys + [k + SCALE_SUFFIX for k in keys if k + SCALE_SUFFIX in self.ckpt]
        base = f"{self.fused}.experts."
        names = ["gate_up_proj", "down_proj"] + (["gate_up_proj_bias", "down_proj_bias"]
                                                  if self.family.layout == GPT_OSS else [])
        return [base + n for n in names]

    def read(self, e: int) -> dict:
        """`load_expert` arguments for global expert `e` (FP8 kept with its scales when the layer is FP8)."""
        if self.per_expert is not None:
            prefix, names = self.per_expert
            out = {}
            for arg, name in zip(("gate_proj", "up_proj", "down_proj"), names):
                key = f"{prefix}.experts.{e}.{name}.weight"
                w = self.ckpt.get(key)
                if key + SCALE_SUFFIX in self.ckpt:
                    scale = self.ckpt.get(key + SCALE_SUFFIX)
                    if self.layer.cfg.quant is not None:
                        out[arg], out[arg + "_scale"] = w, scale
                        continue
                    w = dequantize_blocks(w, scale, self._block(key))
                out[arg] = w
            return out
        base = f"{self.fused}.experts."
        if self.family.layout == GPT_OSS:
            return split_expert(GPT_OSS, self.ckpt.row(base + "gate_up_proj", e), self.ckpt.row(base + "down_proj", e),
                                self.ckpt.row(base + "gate_up_proj_bias", e), self.ckpt.row(base + "down_proj_bias", e))
        return split_expert(self.family.layout, self.ckpt.row(base + "gate_up_proj", e),
                            self.ckpt.row(base + "down_proj", e))

    def _block(self, key: str) -> tuple[int, int]:
        if self.fp8_block is None:
            raise ValueError(f"{key} has a weight_scale_inv but config.json has no FP8 quantization_config "
                             "(weight_block_size)")
        return self.fp8_block


# ------------------------------------------------------------------------------------------ model
def _config_dtype(config) -> torch.dtype | None:
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else None


def _fp32_patterns(model: nn.Module, dtype: torch.dtype) -> list[re.Pattern]:
    """transformers' keep-in-fp32 rule: `_keep_in_fp32_modules` for fp16, `..._strict` for fp16 and bf16."""
    names = set()
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return [re.compile(re.escape(n).replace(r"\*", ".*")) for n in names]


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise KeyError(f"{key} is neither a parameter nor a buffer of the model")


def _checkpoint_key(key: str, blocks: dict[str, EPMoEBlock], ckpt: CheckpointFiles) -> str | None:
    """The checkpoint's name of model tensor `key` (a block's own tensors may sit under a legacy name)."""
    if key in ckpt:
        return key
    for path, block in blocks.items():
        if key.startswith(path + "."):
            parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
            rest = key[len(path):]
            for name in block.family.checkpoint_block_names:
                if parent + name + rest in ckpt:
                    return parent + name + rest
    return None


def _rebuild_non_persistent_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers computed at construction (rotary inv_freq) are still on meta: recompute them on `device`."""
    for path, module in model.named_modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        if not all(n in module._non_persistent_buffers_set for n in meta):
            continue     # persistent: reported as missing from the checkpoint
        config = getattr(module, "config", None)
        if config is None:
            raise RuntimeError(f"{path or 'model'} ({type(module).__name__}) has buffers {meta} computed at "
                               "construction that epmoe cannot rebuild (the module has no config)")
        with torch.device(device):
            fresh = type(module)(config)
        for n in meta:
            module._buffers[n] = fresh._buffers[n].to(device)


def load_model(path, ep_group=None, *, dtype: torch.dtype | None = None, device=None, quant=AUTO,
               allow_pickle: bool = False, progress: bool = True, **layer_options) -> nn.Module:
    """Build a transformers causal LM from a local checkpoint directory, its MoE blocks patched to epmoe.

    Only this rank's experts are read and allocated (`ep_group`; None: all experts). dtype: default the
    checkpoint's (config.json `dtype`), else float32. device: default cuda:<current> for an NCCL group,
    else the CPU. quant: "auto" keeps FP8 checkpoint experts in FP8 (`Fp8Config` with the checkpoint's
    block), None dequantizes them to `dtype`, or an explicit `Fp8Config` (BF16 experts quantized on load).
    `layer_options` go to each `MoELayer` (dispatcher, experts, max_tokens_per_rank, expert_placement).
    Returns the model in eval mode; `expert_memory_bytes(model)` is what this rank holds.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"load_model: {path} is not a checkpoint directory (no {path / 'config.json'}); "
                                "load_model reads local directories only")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    fp8_block = fp8_weight_block(config)
    if fp8_block is not None:
        config = copy.deepcopy(config)
        del config.quantization_config              # build a plain skeleton; FP8 is handled here
    if quant == AUTO:
        quant = None
        if fp8_block is not None:
            from ..quant import Fp8Config
            quant = Fp8Config(weight_block=fp8_block)
    dtype = dtype or _config_dtype(config) or torch.float32
    if device is None:
        from ..build import default_device
        device = default_device(ep_group)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    rank = 0
    if ep_group is not None:
        import torch.distributed as dist
        rank = dist.get_rank(ep_group)

    with CheckpointFiles(path, allow_pickle=allow_pickle) as ckpt:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        paths = replace_blocks(model, lambda block: convert_block(
            block, ep_group, load_weights=False, device=device, dtype=dtype, quant=quant, **layer_options))
        if not paths:
            raise ValueError(f"{path}: model_type {config.model_type!r} has no MoE block epmoe converts")
        blocks = {p: model.get_submodule(p) for p in paths}
        owned = tuple(p + ".experts." for p in paths)
        tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or ())
        plan, missing = [], []
        for key in model.state_dict(keep_vars=True):
            if key.startswith(owned):
                continue
            src = _checkpoint_key(key, blocks, ckpt)
            if src is not None:
                plan.append((key, src))
            elif key not in tied:
                missing.append(key)
        if missing:
            raise KeyError(f"{path}: the checkpoint lacks {len(missing)} tensors the model needs: {missing[:6]}")
        sources = {p: ExpertSource(ckpt, b, p, fp8_block) for p, b in blocks.items()}
        n_expert_reads = sum(len(b.experts.local_experts) for b in blocks.values())
        log.info("%s: %s, %d MoE blocks on epmoe; rank %d reads %d tensors and %d of its experts' weights",
                 path, config.model_type, len(blocks), rank, len(plan), n_expert_reads)

        fp32 = _fp32_patterns(model, dtype)
        with _progress(progress and rank == 0, len(plan) + n_expert_reads, path) as advance:
            for key, src in plan:
                value = ckpt.get(src)
                if src + SCALE_SUFFIX in ckpt:
                    value = dequantize_blocks(value, ckpt.get(src + SCALE_SUFFIX), fp8_block or (128, 128))
                if value.dtype.is_floating_point:
                    value = value.to(torch.float32 if any(p.search(key) for p in fp32) else dtype)
                _set_tensor(model, key, value.to(device))
                advance()
            model.tie_weights()
            _rebuild_non_persistent_buffers(model, device)
            for p, block in blocks.items():
                for e in block.experts.local_experts:
                    block.experts.load_expert(int(e), **sources[p].read(int(e)))
                    advance()
                block.sync_routing_state()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{path}: tensors left unloaded (meta) after loading: {left[:6]}")
    return model.eval()


class _progress:
    """A rich progress bar over the tensors to read (rank 0 only), or nothing."""

    def __init__(self, enabled: bool, total: int, path: Path):
        self.enabled, self.total, self.path = enabled, total, path

    def __enter__(self):
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.bar = Progress(TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        self.bar.__enter__()
        from rich.markup import escape
        task = self.bar.add_task(escape(self.path.name), total=self.total)   # a name, not markup
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.__exit__(*exc)
