"""The cuDNN implementation: its mask -> flag translation, checked through dot_product_attention's
XLA implementation on CPU against the float64 oracle; its accept rules."""
import jax.numpy as jnp
import numpy as np
import pytest

from kernel_utils import assert_close, TOL_BF16
from test_sparse_utils import allowed_matrix, oracle, qkv, segments
from pallas_kernels.sparse import ChunkedCausal, Causal, Full, Local, flash_attention
from pallas_kernels.sparse.cudnn import cudnn_accepts, dpa_accepts, dpa_attention


@pytest.mark.parametrize("mask", [Full(), Causal(), Local(5, 0), Local(0, 0)], ids=repr)
def test_flags_reproduce_the_mask(mask):
    q, k, v, _ = qkv(3, 2, 37, 4, 2, 16, dtype=jnp.bfloat16)  # GQA: 4 q heads over 2 k/v heads
    kwargs = dict(mask=mask, segment_ids=None, logits_soft_cap=None)
    assert dpa_accepts(q, k, v, **kwargs) is None
    out = dpa_attention(q, k, v, mask=mask, scale=0.3, implementation="xla")
    ref = oracle(q, k, v, allowed_matrix(mask, 37, 2, 4), scale=0.3)
    assert_close(out, ref, TOL_BF16)


def test_declines_what_cudnn_cannot_run_fast():
    q, k, v, _ = qkv(4, 1, 16, 2, 2, 16, dtype=jnp.bfloat16)
    seg = segments(4, 1, 16)
    base = dict(mask=Causal(), segment_ids=None, logits_soft_cap=None)
    for change, words in [({"mask": ChunkedCausal(4)}, "masks"), ({"mask": Local(3, 2)}, "masks"),
                          ({"mask": Causal() & Local(3, 0)}, "masks"), ({"segment_ids": seg}, "segments"),
                          ({"logits_soft_cap": 5.0}, "soft cap")]:
        assert words in dpa_accepts(q, k, v, **{**base, **change})
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    assert "bfloat16" in dpa_accepts(*f32, **base)
    assert "NVIDIA" in cudnn_accepts(q, k, v, **base)  # this CPU: declined, auto moves on
    np.testing.assert_allclose(np.asarray(flash_attention(q, k, v, mask=Causal()), np.float32),
                               np.asarray(flash_attention(q, k, v, mask=Causal(), impl="xla"), np.float32),
                               atol=2e-2)
