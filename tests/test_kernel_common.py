"""pallas_kernels.common helpers shared by the kernels' glue code."""
import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import split_bf16


def test_split_bf16_reads_float32_to_16_bits():
    """hi is exactly a bf16, hi + lo reproduces x to ~2^-16 relative (bf16 alone: ~2^-8), under
    jit, over magnitudes from 1e-30 to 1e30 and both signs."""
    x = jax.random.normal(jax.random.key(3), (4097,)) * jnp.logspace(-30, 30, 4097)
    hi, lo = jax.jit(split_bf16)(x)
    assert hi.dtype == lo.dtype == jnp.bfloat16
    x64, hi64, lo64 = (np.asarray(a, np.float64) for a in (x, hi, lo))
    assert np.all(np.abs(hi64) <= np.abs(x64))          # truncation toward zero
    rel = np.abs(hi64 + lo64 - x64) / np.abs(x64)
    assert rel.max() < 2.0 ** -15
    assert np.median(np.abs(hi64 - x64) / np.abs(x64)) > 2.0 ** -12  # lo carries real bits
