"""Chunkwise delta rule (DeltaNet, Gated DeltaNet).

    o, state = chunk_delta_rule(q, k, v, beta, g=g, initial_state=s0, output_final_state=True)

    S_t = exp(g_t) S_{t-1} + beta_t k_t ⊗ (v_t - exp(g_t) S_{t-1}^T k_t),   o_t = scale q_t S_t

``recurrent_delta_rule`` is the step-by-step form (decoding), ``delta_rule_reference`` the
oracle. Implementations are chosen in ``op`` (one place); built in "xla" (plain-jnp WY/UT
chunked form). A further kernel registers with
``register_implementation(name, run, accepts, priority=...)``.
"""
from pallas_kernels.delta.op import (chunk_delta_rule, implementations, recurrent_delta_rule,
                                     register_implementation)
from pallas_kernels.delta.reference import delta_rule_reference

__all__ = ["chunk_delta_rule", "delta_rule_reference", "implementations", "recurrent_delta_rule",
           "register_implementation"]
