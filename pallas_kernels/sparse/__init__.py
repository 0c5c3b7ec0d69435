"""Block-sparse flash softmax attention and its mask library.

    o = flash_attention(q, k, v, mask=Causal() & Local(255, 0), segment_ids=seg)

Masks (``masks``): Full, Causal, Local, ChunkedCausal, BlockSparse, Dense, combined with & and |.
Block maps (``mask_info``): ``make_block_map`` turns a mask into the visit lists a kernel reads.
Content-based block selection (``selection``): ``select_blocks`` -> BlockSparse (MoBA-style).
Implementations are chosen in ``ops`` (``register_implementation`` adds another one).
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
