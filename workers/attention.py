"""Attention over the paged pool: decode reads K/V in place, prefill gathers one sequence's blocks.

Decode is memory-bound: each step reads every running sequence's whole context. Gathering it
out of the pool first (index, pad, then SDPA reads the copy) moved the context three times; the
C++ kernel in csrc/paged_attention.cpp reads each K/V row once, where it lies. It is compiled on
first use with torch's extension builder (about 15 s, cached under ~/.cache/torch_extensions;
`make` builds it ahead). Where it cannot run (no compiler, a GPU pool) decode falls back to the
gather path, which is also the kernel's test oracle.

Prefill is compute-bound (a chunk's queries against its context): gathering that one sequence's
blocks costs little next to the matmuls, and SDPA's fused causal kernel does the rest.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "paged_attention.cpp"
_lock = threading.Lock()
_kernel_state: dict[str, object] = {}


def build_kernel(verbose: bool = False) -> bool:
    """Compile (or load the cached) decode kernel; False, with the reason logged, if it cannot be built."""
    with _lock:
        if "ok" in _kernel_state:
            return bool(_kernel_state["ok"])
        if os.environ.get("AGENTKV_PAGED_KERNEL", "1") == "0":
            _kernel_state["ok"] = False
            return False
        try:
            from torch.utils.cpp_extension import load

            # torch finds ninja on PATH; the venv's (a dependency) sits next to this interpreter.
            os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
            load("agentkv_paged_attention", [str(_SOURCE)], extra_cflags=["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd"],
                 is_python_module=False, verbose=verbose)  # fmt: skip
            _kernel_state["ok"] = True
        except Exception as exc:  # no compiler, no ninja, a read-only cache: the gather path still works
            log.warning("paged decode kernel unavailable, decode gathers K/V instead: %s", exc)
            _kernel_state["ok"] = False
        return bool(_kernel_state["ok"])


def gather_context(kv: torch.Tensor, layer: int, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `length` keys and values as [kv_heads, length, dim] copies."""
    keys = kv[block_table, layer, 0].flatten(0, 1)[:length]
    values = kv[block_table, layer, 1].flatten(0, 1)[:length]
    return keys.transpose(0, 1), values.transpose(0, 1)


def prefill_attention(q: torch.Tensor, kv: torch.Tensor, layer: int, block_table: torch.Tensor, context_len: int, scale: float) -> torch.Tensor:
    """q: [heads, Q, dim], the last Q of `context_len` positions -> [heads, Q, dim], causal."""
    keys, values = gather_context(kv, layer, block_table, context_len)
    qlen = q.shape[1]
    mask = causal_lower_right(qlen, context_len) if qlen > 1 else None
    return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=True)[0]


def decode_attention(q: torch.Tensor, kv: torch.Tensor, layer: int, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float, use_kernel: bool = True) -> torch.Tensor:  # fmt: skip
    """q: [B, heads, dim], one new token per sequence -> [B, heads, dim]."""
    if use_kernel and kv.device.type == "cpu" and build_kernel():
        return torch.ops.agentkv.paged_decode_attention(q.contiguous(), kv, layer, block_tables, context_lens, scale)
    return decode_attention_gathered(q, kv, layer, block_tables, context_lens, scale)


def decode_attention_gathered(q: torch.Tensor, kv: torch.Tensor, layer: int, block_tables: torch.Tensor,
                              context_lens: torch.Tensor, scale: float) -> torch.Tensor:  # fmt: skip
    """The reference: gather every context padded to the longest, mask the padding, one SDPA."""
    batch, block_size = q.shape[0], kv.shape[3]
    keys = kv[block_tables, layer, 0].flatten(1, 2).transpose(1, 2)  # [B, kv_heads, S, dim]
    values = kv[block_tables, layer, 1].flatten(1, 2).transpose(1, 2)
    positions = torch.arange(block_tables.shape[1] * block_size, device=q.device)
    mask = (positions[None, :] < context_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.view(batch, q.shape[1], q.shape[2])


if __name__ == "__main__":  # `make` builds the kernel ahead of the first worker start
    logging.basicConfig(level=logging.INFO)
    print("paged decode kernel:", "ready" if build_kernel(verbose=False) else "unavailable (decode gathers K/V)")
