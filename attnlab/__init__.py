"""attnlab: efficient attention research in JAX/Pallas.

Layers (``attnlab.layers``), models (``attnlab.models``), data (``attnlab.data``), training
(``attnlab.train``) and sequence parallelism (``attnlab.parallel``); kernels live in the
separate ``pallas_kernels`` package.
"""
__version__ = "0.1.0"
