"""Block-sparse flash softmax attention and its mask library.

    o = flash_attention(q, k, v, mask=Causal() & Local(255, 0), segment_ids=seg)

Masks (``masks``): Full, Causal, Local, ChunkedCausal, BlockSparse, Dense, combined with & and |.
Block maps (``mask_info``): ``make_block_map`` turns a mask into the visit lists a kernel reads.
Content-based block selection (``selection``): ``select_blocks`` -> BlockSparse (MoBA-style).
Implementations are chosen in ``ops`` (one place): built in "pallas" (portable kernel: Mosaic TPU,
CPU interpret) and "xla" (plain jnp, the fallback). A further kernel (e.g. Mosaic GPU on Hopper)
registers with ``register_implementation(name, run, accepts, priority=...)``; it can read the
same ``make_block_map`` output (visit kinds: 0 skip, 1 partial, 2 full, 3 full but padded keys).
"""
from pallas_kernels.sparse.masks import (BlockSparse, Causal, ChunkedCausal, Dense, Full, Local,
                                         Mask)
from pallas_kernels.sparse.mask_info import BlockMap, BlockSizes, make_block_map
from pallas_kernels.sparse.ops import flash_attention, implementations, register_implementation
from pallas_kernels.sparse.reference import attention_reference
from pallas_kernels.sparse.selection import select_blocks

__all__ = [
    "BlockMap", "BlockSizes", "BlockSparse", "Causal", "ChunkedCausal", "Dense", "Full", "Local",
    "Mask", "attention_reference", "flash_attention", "implementations", "make_block_map",
    "register_implementation", "select_blocks",
]
