"""Pallas attention kernels: pure functions of jax arrays (no Flax, no attnlab imports).

Subpackages:
  linear  chunkwise gated linear recurrence (linear attention, RetNet, Lightning, GLA, SSD)
  delta   chunkwise delta rule (DeltaNet, Gated DeltaNet)
  sparse  block-sparse flash softmax attention and its mask library

Every op takes ``impl`` in {None (auto), "pallas", "xla"} and follows the conventions of
``pallas_kernels.common``: layout [batch, time, heads, head_dim], log-space gates, float32
state, any sequence length.
"""
