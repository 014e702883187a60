"""A decoder-only transformer forward pass over the paged KV pool, one packed batch per step.

We reuse the Hugging Face model's own modules (embeddings, norms, projections, MLP, rotary
embedding) and replace only attention: K/V of the step's new tokens are written into pool slots,
then each sequence attends over its own blocks (workers/attention.py). Reusing HF modules keeps
numerics identical to `generate` and supports the Llama family (Llama, SmolLM, Mistral without
sliding window, Qwen2/3) without re-implementing layers.

A step packs every sequence's new tokens into one row, vLLM-style: decodes (one token each) and
prefill chunks (many) share the projections and the MLP, so one step can advance running decodes
and a prompt together and nothing is padded. Only attention is per kind: decode tokens read their
context in place through the block table, each prefill chunk runs a causal SDPA over its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from workers.attention import decode_attention, prefill_attention

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


class UnsupportedModel(ValueError):
    """The architecture needs attention features this engine does not implement."""


@dataclass
class PrefillChunk:
    """One sequence's run of new tokens (more than one) inside the packed step."""

    start: int  # its first token's index in the packed row
    length: int
    context_len: int  # tokens it attends to: cached prefix + this chunk
    block_table: torch.Tensor  # [blocks covering context_len]


@dataclass
class StepInputs:
    """Everything one forward needs, built by the runner from the scheduled sequences."""

    input_ids: torch.Tensor  # [N] every sequence's new tokens, packed
    positions: torch.Tensor  # [N]
    slot_blocks: torch.Tensor  # [N] pool block of each new token
    slot_offsets: torch.Tensor  # [N] offset inside that block
    last_token_index: torch.Tensor  # [B] each sequence's last new token in the packed row
    decode_index: torch.Tensor  # [D] packed index of each single-token sequence
    decode_tables: torch.Tensor  # [D, max_blocks] int64 (padded with block 0)
    decode_lens: torch.Tensor  # [D] int64 context length incl. the new token
    prefills: list[PrefillChunk]


class PagedCausalLM(torch.nn.Module):
    def __init__(self, hf_model: torch.nn.Module):
        super().__init__()
        config = hf_model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model type {config.model_type!r} is not supported (supported: {sorted(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and config.model_type == "mistral":
            raise UnsupportedModel("sliding-window attention is not supported")
        inner = hf_model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers
        self.norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.lm_head = hf_model.lm_head
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_layers = config.num_hidden_layers

    @torch.inference_mode()
    def forward(self, step: StepInputs, kv: torch.Tensor) -> torch.Tensor:
        """Logits of each sequence's last new token: [B, vocab]."""
        num_tokens = step.input_ids.shape[0]
        hidden = self.embed_tokens(step.input_ids)[None]  # [1, N, hidden]
        cos, sin = self.rotary_emb(hidden, step.positions[None])
        for layer_idx, layer in enumerate(self.layers):
            residual = hidden
            x = layer.input_layernorm(hidden)
            attn = layer.self_attn
            q = attn.q_proj(x).view(1, num_tokens, self.num_heads, self.head_dim)
            k = attn.k_proj(x).view(1, num_tokens, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [1, heads, N, dim]
            kv[step.slot_blocks, layer_idx, 0, step.slot_offsets] = k[0].transpose(0, 1)
            kv[step.slot_blocks, layer_idx, 1, step.slot_offsets] = v
            out = self._attention(q[0], kv, layer_idx, step, attn.scaling)
            hidden = residual + attn.o_proj(out.view(1, num_tokens, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.lm_head(self.norm(hidden[0, step.last_token_index])).float()

    def _attention(self, q: torch.Tensor, kv: torch.Tensor, layer: int, step: StepInputs, scale: float) -> torch.Tensor:
        """q: [heads, N, dim] -> [N, heads, dim]: decode tokens in place, each prefill chunk by SDPA."""
        if not step.prefills:  # a pure decode step: every token is a decode, in order
            return decode_attention(q.transpose(0, 1), kv, layer, step.decode_tables, step.decode_lens, scale)
        out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])
        if step.decode_index.numel():
            qd = q[:, step.decode_index].transpose(0, 1)
            out[step.decode_index] = decode_attention(qd, kv, layer, step.decode_tables, step.decode_lens, scale)
        for chunk in step.prefills:
            span = slice(chunk.start, chunk.start + chunk.length)
            out[span] = prefill_attention(q[:, span], kv, layer, chunk.block_table, chunk.context_len, scale).transpose(0, 1)
        return out
