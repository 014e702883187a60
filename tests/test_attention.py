"""The in-place decode kernel against the gather-and-SDPA reference, on a pool laid out like the engine's."""

import pytest
import torch

from workers.attention import build_kernel, decode_attention, decode_attention_gathered


def test_the_kernel_builds_here():
    # CI has a compiler: if this fails, every decode silently takes the slower gather path.
    assert build_kernel()


@pytest.mark.parametrize(
    ("dtype", "q_heads", "kv_heads", "dim", "lens"),
    [
        (torch.float32, 9, 3, 64, [1, 15, 16, 17, 300]),  # SmolLM2's shape: AVX-512 path, partial blocks
        (torch.float32, 8, 8, 128, [5, 64]),  # no grouping, the 128-wide path
        (torch.float32, 4, 2, 48, [33, 7]),  # a width the fast path does not take
        (torch.bfloat16, 9, 3, 64, [40, 3]),
    ],
)
def test_kernel_equals_the_gathered_reference(dtype, q_heads, kv_heads, dim, lens):
    torch.manual_seed(0)
    num_blocks, layers, block_size = 64, 3, 16
    kv = torch.randn(num_blocks, layers, 2, block_size, kv_heads, dim).to(dtype)
    width = -(-max(lens) // block_size)
    tables = torch.stack([torch.randperm(num_blocks)[:width] for _ in lens])  # blocks scattered in the pool
    context_lens = torch.tensor(lens)
    q = torch.randn(len(lens), q_heads, dim).to(dtype)
    for layer in range(layers):
        got = decode_attention(q, kv, layer, tables, context_lens, dim**-0.5)
        want = decode_attention_gathered(q.float(), kv.float(), layer, tables, context_lens, dim**-0.5)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
