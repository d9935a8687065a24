"""load_model: safetensors checkpoints (single file, sharded, per-expert or fused layout, FP8) read
lazily into a patched model; logits equal transformers' on the same weights; pickles refused."""
import json
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from epmoe import reference_moe  # noqa: E402
from epmoe.integration import checkpoint as ckpt_mod  # noqa: E402
from epmoe.integration import expert_memory_bytes, load_model, moe_blocks  # noqa: E402
from epmoe.integration.tiny import FAMILY_NAMES, save_tiny_checkpoint, tiny_model  # noqa: E402
from epmoe.quant.fp8 import FP8_DTYPE, quantize_weight  # noqa: E402
from epmoe.routing import Routing  # noqa: E402
from epmoe.testing import assert_close  # noqa: E402

EXPERT_KEY = re.compile(r"^(.*)\.experts\.(\d+)\.")


def prompts(seed, batch=2, length=6):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


class CountingSafeOpen:
    """Stands in for safetensors.safe_open in the loader and records every tensor read: (key, rows)."""

    def __init__(self):
        self.reads = []

    def __call__(self, *args, **kwargs):
        return _CountingHandle(safe_open(*args, **kwargs), self.reads)

    def expert_reads(self):
        """[(layer prefix, expert id)] of every routed-expert read (per-expert keys or fused rows)."""
        out = []
        for key, rows in self.reads:
            m = EXPERT_KEY.match(key)
            if m:
                out.append((m.group(1), int(m.group(2))))
            elif ".experts." in key:
                assert isinstance(rows, slice) and rows.stop == rows.start + 1, (key, rows)
                out.append((key.split(".experts.")[0], rows.start))
        return out


class _CountingHandle:
    def __init__(self, handle, reads):
        self.handle, self.reads = handle, reads

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)

    def keys(self):
        return self.handle.keys()

    def get_tensor(self, key):
        self.reads.append((key, None))
        return self.handle.get_tensor(key)

    def get_slice(self, key):
        return _CountingSlice(self.handle.get_slice(key), key, self.reads)


class _CountingSlice:
    def __init__(self, sl, key, reads):
        self.sl, self.key, self.reads = sl, key, reads

    def get_shape(self):
        return self.sl.get_shape()

    def __getitem__(self, index):
        self.reads.append((self.key, index))
        return self.sl[index]


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_sharded_checkpoint_logits_equal_transformers(family, tmp_path):
    reference = tiny_model(family, seed=21)
    save_tiny_checkpoint(reference, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_model(tmp_path, progress=False)
    assert len(moe_blocks(model)) == 2
    ids = prompts(FAMILY_NAMES.index(family))
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, bound=1e-5, name=f"{family} logits")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_single_file_fused_layout(family, tmp_path):
    """A checkpoint saved in transformers 5's own fused layout (experts.gate_up_proj [E, ...]), one file."""
    reference = tiny_model(family, seed=22)
    save_tiny_checkpoint(reference, tmp_path, original_format=False, with_tokenizer=False)
    assert (tmp_path / "model.safetensors").exists()
    model = load_model(tmp_path, progress=False)
    ids = prompts(3)
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, bound=1e-5, name=f"{family} logits")


@pytest.mark.parametrize("original_format", [True, False])
def test_every_expert_read_exactly_once(original_format, tmp_path, monkeypatch):
    reference = tiny_model("qwen3_moe", seed=23)
    save_tiny_checkpoint(reference, tmp_path, max_shard_size="40KB", original_format=original_format)
    counter = CountingSafeOpen()
    monkeypatch.setattr(ckpt_mod, "safe_open", counter)
    model = load_model(tmp_path, progress=False)
    reads = counter.expert_reads()
    per_expert_tensors = 3 if original_format else 2     # gate, up, down  |  gate_up rows, down rows
    layers = {p for p, _ in reads}
    assert len(layers) == 2
    for layer in layers:
        for e in range(8):
            assert reads.count((layer, e)) == per_expert_tensors
    assert len(counter.reads) == len({repr(r) for r in counter.reads}), "a tensor (or row) was read twice"
    assert expert_memory_bytes(model) == 2 * 8 * 3 * 64 * 32 * 4


def test_tied_embeddings(tmp_path):
    reference = tiny_model("qwen3_moe", seed=28, tie_word_embeddings=True)
    save_tiny_checkpoint(reference, tmp_path, with_tokenizer=False)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = load_model(tmp_path, progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = prompts(7)
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, bound=1e-5)


def test_pickled_checkpoint_refused_unless_allowed(tmp_path):
    reference = tiny_model("olmoe", seed=24)
    reference.config.save_pretrained(tmp_path)
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ckpt_mod.PickledCheckpointRefused, match="allow_pickle=True"):
        load_model(tmp_path, progress=False)
    model = load_model(tmp_path, progress=False, allow_pickle=True)
    ids = prompts(4)
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, bound=1e-5)


def test_missing_and_unsupported_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt_mod.CheckpointFiles(tmp_path)
    reference = tiny_model("mixtral", seed=25)
    save_tiny_checkpoint(reference, tmp_path, with_tokenizer=False)
    file = tmp_path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="model.layers.1.post_attention_layernorm.weight"):
        load_model(tmp_path, progress=False)


def test_mxfp4_experts_are_refused(tmp_path):
    reference = tiny_model("gpt_oss", seed=26)
    save_tiny_checkpoint(reference, tmp_path, with_tokenizer=False)
    file = tmp_path / "model.safetensors"
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in [k for k in tensors if k.endswith("experts.gate_up_proj")]:
        tensors[key + "_blocks"] = tensors.pop(key).to(torch.uint8)
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="MXFP4"):
        load_model(tmp_path, progress=False)


# --------------------------------------------------------------------------------------------- FP8
BLOCK = (32, 32)


def _fp8_deepseek_checkpoint(tmp_path):
    """A DeepSeek-V3-style FP8 checkpoint: every linear weight of the decoder layers in e4m3fn with a
    `weight_scale_inv` per 32x32 block. Returns (directory, transformers model holding the dequantized
    weights = what the checkpoint means)."""
    model = tiny_model("deepseek_v3", seed=27)
    src = tmp_path / "bf16"
    save_tiny_checkpoint(model, src, with_tokenizer=False)
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out, dequantized = {}, {}
    for key, t in tensors.items():
        if key.startswith("model.layers.") and key.endswith("proj.weight") and t.dim() == 2:
            q, scale = quantize_weight(t, "block", BLOCK)
            out[key], out[key + "_scale_inv"] = q, scale
            dequantized[key] = ckpt_mod.dequantize_blocks(q, scale, BLOCK)
        else:
            out[key] = t
    directory = tmp_path / "fp8"
    directory.mkdir()
    save_file(out, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(BLOCK)}
    (directory / "config.json").write_text(json.dumps(config))
    # the reference: the same model with every quantized weight replaced by its dequantized value
    with torch.no_grad():
        for key, w in dequantized.items():
            m = EXPERT_KEY.match(key)
            if m:
                layer = model.get_submodule(m.group(1))
                e, name = int(m.group(2)), key.split(".")[-2]
                I = layer.experts.down_proj.shape[2]
                if name == "gate_proj":
                    layer.experts.gate_up_proj[e, :I] = w
                elif name == "up_proj":
                    layer.experts.gate_up_proj[e, I:] = w
                else:
                    layer.experts.down_proj[e] = w
            else:
                model.get_parameter(key).copy_(w)
    return directory, model


def test_fp8_checkpoint_dequantized(tmp_path):
    directory, reference = _fp8_deepseek_checkpoint(tmp_path)
    model = load_model(directory, quant=None, progress=False)
    assert moe_blocks(model)[0][1].experts.w13.dtype == torch.float32
    ids = prompts(5)
    with torch.no_grad():
        assert_close(model(ids).logits, reference(ids).logits, bound=1e-5, name="dequantized FP8 logits")


def test_fp8_checkpoint_keeps_fp8_experts(tmp_path):
    directory, reference = _fp8_deepseek_checkpoint(tmp_path)
    model = load_model(directory, progress=False)          # quant="auto": experts stay FP8
    layer = moe_blocks(model)[0][1].experts
    assert layer.w13.dtype == FP8_DTYPE and layer.cfg.quant.weight_block == BLOCK
    # the checkpoint's FP8 bits are stored as they are (no requantization)
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        gate = f.get_tensor("model.layers.0.mlp.experts.3.gate_proj.weight")
    I, H = gate.shape
    assert torch.equal(layer.w13[3, :I, :H].view(torch.uint8), gate.view(torch.uint8))
    # every local expert, dequantized with the scales the layer stored, is the checkpoint's meaning exactly
    for path, block in moe_blocks(model):
        ref_experts = reference.get_submodule(path).experts
        for e in range(block.experts.num_local_experts):
            gate_w, up_w, down_w = block.experts.scheme.dequantized_expert(block.experts, e)
            assert torch.equal(gate_w, ref_experts.gate_up_proj[e, :I])
            assert torch.equal(up_w, ref_experts.gate_up_proj[e, I:])
            assert torch.equal(down_w, ref_experts.down_proj[e])
    # end to end the activations are FP8 too: the model's logits are those of the FP8 function, i.e. the
    # reference with its experts computed by the oracle that quantizes the activations at the same two
    # points with the same formula. Measured: 3-4e-7 (float32 against float64) on most prompts, 7e-5 at
    # worst over 40 prompt sets, where an activation lands on the other side of an e4m3 rounding boundary
    # (one FP8 step, 6%, on one element); float32 activations instead are 4-18% away, so the bound of 1e-3
    # tells them apart by a factor of 40 or more
    for path, block in moe_blocks(model):
        fp8_function_experts(reference.get_submodule(path).experts, block.experts.cfg)
    for seed in (5, 6):
        ids = prompts(seed)
        with torch.no_grad():
            assert_close(model(ids).logits, reference(ids).logits, bound=1e-3, name="FP8 experts logits")


def fp8_function_experts(experts, cfg) -> None:
    """Make transformers' fused experts module compute the FP8 function of its weights: `reference_moe`
    with the activations quantized (cfg's FP8 scheme), on the routing transformers computed."""
    I = experts.down_proj.shape[2]

    def forward(hidden, topk_ids, topk_weights):
        weights = [(experts.gate_up_proj[e, :I], experts.gate_up_proj[e, I:], experts.down_proj[e])
                   for e in range(cfg.num_experts)]
        routing = Routing(topk_ids.to(torch.int32), topk_weights.float())
        return reference_moe(hidden, None, weights, cfg, routing=routing, quantize_activations=True).to(hidden.dtype)
    experts.forward = forward
