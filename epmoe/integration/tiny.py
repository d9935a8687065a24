"""Tiny models of every supported family, built with transformers' own classes, and a tiny tokenizer.

For tests and the GPU check: random weights at a scale that makes routing decisive (transformers'
default init, std 0.02, leaves the router near-uniform), DeepSeek-V3's correction bias non-zero, and a
word-level tokenizer trained on nothing (no model hub needed), saved next to the weights so a checkpoint
directory is complete.
"""
from __future__ import annotations

from pathlib import Path

import torch

FAMILY_NAMES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss")

WORDS = ("the capital of france is paris a an and or to in on at by for with from city country river "
         "mountain sea king queen old new big small red blue green one two three four five hello world "
         "model expert token layer route send run fast slow yes no").split()


def tiny_config(family: str, hidden: int = 64, layers: int = 2, experts: int = 8, top_k: int = 2,
                vocab: int = 128, intermediate: int = 32, **overrides):
    """A transformers config of `family` at toy size (every layer an MoE layer unless overridden)."""
    import transformers as tf
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    head_dim = hidden // 4
    if family == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=intermediate, num_local_experts=experts,
                               num_experts_per_tok=top_k)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=2 * intermediate, moe_intermediate_size=intermediate,
                                shared_expert_intermediate_size=intermediate + 16, num_experts=experts,
                                num_experts_per_tok=top_k, norm_topk_prob=False)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=2 * intermediate, moe_intermediate_size=intermediate,
                                num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True,
                                head_dim=head_dim)
    elif family == "deepseek_v3":
        common.update(num_key_value_heads=4)
        cfg = tf.DeepseekV3Config(**common, intermediate_size=2 * intermediate, moe_intermediate_size=intermediate,
                                  n_routed_experts=experts, num_experts_per_tok=top_k, n_group=4, topk_group=2,
                                  n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
                                  norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                  qk_nope_head_dim=8, v_head_dim=head_dim)
    elif family == "olmoe":
        cfg = tf.OlmoeConfig(**common, intermediate_size=intermediate, num_experts=experts,
                             num_experts_per_tok=top_k, norm_topk_prob=False)
    elif family == "gpt_oss":
        cfg = tf.GptOssConfig(**common, intermediate_size=intermediate, num_local_experts=experts,
                              num_experts_per_tok=top_k, head_dim=head_dim, sliding_window=8)
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILY_NAMES)}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights ~ N(0, 1/fan_in) (norms ~1, biases small), DeepSeek correction biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    # gpt-oss stores its experts [in, out]; everything else is [.., out, in] like nn.Linear
    in_first = getattr(model.config, "model_type", "") == "gpt_oss"
    for name, p in model.named_parameters():
        if p.dim() == 1:
            base = 1.0 if "norm" in name else 0.0
            value = base + 0.1 * torch.randn(p.shape, generator=g)
        else:
            experts = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
            fan_in = p.shape[-2] if experts and in_first else p.shape[-1]
            value = torch.randn(p.shape, generator=g) * fan_in ** -0.5
        p.copy_(value.to(p.dtype))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_((0.05 * torch.randn(b.shape, generator=g)).to(b.dtype))
    return model


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A randomized transformers causal LM of `family` (eval mode, eager attention)."""
    from transformers import AutoModelForCausalLM
    cfg = tiny_config(family, **config_kwargs)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="eager")
    return randomize(model, seed).eval()


def tiny_tokenizer():
    """A word-level fast tokenizer over `WORDS` (ids 0-2: <unk>, <s>, </s>), built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_checkpoint(model, directory, max_shard_size: str | None = None, with_tokenizer: bool = True,
                         original_format: bool = True) -> Path:
    """save_pretrained (sharded when `max_shard_size` is given) plus the tiny tokenizer."""
    directory = Path(directory)
    kwargs = {"save_original_format": original_format}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(directory, **kwargs)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(directory)
    return directory
