"""Chunkwise gated linear recurrence (linear attention, RetNet, Lightning, Mamba2-SSD, GLA).

    S_t = diag(exp(gk_t)) exp(g_t) S_{t-1} + k_t^T v_t,      o_t = scale · q_t S_t

``chunk_gated_linear_attention`` (training, prefill) and ``recurrent_gated_linear_attention``
(step by step, decoding) share one signature; ``REGISTRY`` holds the implementations.
"""
from pallas_kernels.linear.op import (REGISTRY, chunk_gated_linear_attention,
                                      recurrent_gated_linear_attention)
from pallas_kernels.linear.reference import gated_linear_reference

__all__ = ["REGISTRY", "chunk_gated_linear_attention", "recurrent_gated_linear_attention",
           "gated_linear_reference"]
