"""Chunkwise delta rule (DeltaNet, Gated DeltaNet).

    o, state = chunk_delta_rule(q, k, v, beta, g=g, initial_state=s0, output_final_state=True)

    S_t = exp(g_t) S_{t-1} + beta_t k_t ⊗ (v_t - exp(g_t) S_{t-1}^T k_t),   o_t = scale q_t S_t

``recurrent_delta_rule`` is the step-by-step form (decoding), ``delta_rule_reference`` the
oracle. Implementations are chosen in ``op`` (one place); built in "pallas" (portable kernels:
Mosaic TPU, CPU interpret; declines on GPU) and "xla" (plain-jnp WY/UT chunked form, autodiff).
Both share the per-chunk math of ``chunk_math`` (forward and hand-written backward). A further
kernel (e.g. Mosaic GPU on Hopper) registers with
``register_implementation(name, run, accepts, priority=...)`` (signature in ``op``); it can
reuse ``chunking.to_layout`` and check itself against ``pallas_op.pallas_chunk_delta_rule``.
"""
from pallas_kernels.delta.op import (chunk_delta_rule, implementations, recurrent_delta_rule,
                                     register_implementation)
from pallas_kernels.delta.reference import delta_rule_reference

__all__ = ["chunk_delta_rule", "delta_rule_reference", "implementations", "recurrent_delta_rule",
           "register_implementation"]
