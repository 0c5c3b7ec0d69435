"""Decoder LM whose per-layer attention is chosen by a pattern string (hybrids)."""
from attnlab.models.lm import DecoderBlock, DecoderLM, SwiGLU, build_model

__all__ = ["DecoderBlock", "DecoderLM", "SwiGLU", "build_model"]
