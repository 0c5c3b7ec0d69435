"""Sequence parallelism inside ``jax.shard_map``: time sharded contiguously over one mesh axis.

``lasp2_gated_linear_attention``: LASP-2 for the gated linear recurrence (one all-gather of the
shard states, no rerun of the chunked op). ``lasp2h_causal_attention``: LASP-2H for softmax
layers (all-gather K/V, causal attention of the local queries with their global offset).
"""
from attnlab.parallel.lasp2 import lasp2_gated_linear_attention
from attnlab.parallel.lasp2h import lasp2h_causal_attention

__all__ = ["lasp2_gated_linear_attention", "lasp2h_causal_attention"]
