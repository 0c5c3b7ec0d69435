"""Attention layers: one Flax NNX module per family, all with the registry's call contract.

Importing this package registers every layer (see ``attnlab.layers.registry``):

    S softmax          SoftmaxAttention        W sliding_window   SlidingWindowAttention
    L linear           LinearAttention         R retnet           RetNet
    T lightning        LightningAttention      G gla              GatedLinearAttention
    M mamba2           Mamba2Like              D deltanet         DeltaNet
    E gated_deltanet   GatedDeltaNet           H hybrid           HybridAttention
    B moba             MoBAAttention           N nsa              NSAAttention
"""
from attnlab.layers.registry import (attention_name, available_attention, expand_pattern,
                                     make_attention, register_attention, uses_layer_depth)
from attnlab.layers.softmax import SlidingWindowAttention, SoftmaxAttention
from attnlab.layers.linear import LinearAttention
from attnlab.layers.gated import GatedLinearAttention, LightningAttention, Mamba2Like, RetNet
from attnlab.layers.delta import DeltaNet, GatedDeltaNet
from attnlab.layers.hybrid import HybridAttention
from attnlab.layers.sparse import MoBAAttention, NSAAttention

__all__ = [
    "attention_name", "available_attention", "expand_pattern", "make_attention",
    "register_attention", "uses_layer_depth",
    "SoftmaxAttention", "SlidingWindowAttention", "LinearAttention", "RetNet",
    "LightningAttention", "GatedLinearAttention", "Mamba2Like", "DeltaNet", "GatedDeltaNet",
    "HybridAttention", "MoBAAttention", "NSAAttention",
]
