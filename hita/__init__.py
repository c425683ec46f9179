"""Hita: holistic image tokenizer + class-conditional AR GPT, faithful to the released checkpoints.

Public API::

    from hita import load_tokenizer, load_gpt
    tok = load_tokenizer("hita-tok.pt")            # or our .safetensors; preset inferred
    gpt = load_gpt("GPT-B-300.pt")
    images = tok.decode(holistic_ids, patch_ids)   # float32 [B,3,336,336], unclamped
"""
from hita.checkpoint import CheckpointError, load_gpt, load_tokenizer, save_model
from hita.config import GPTConfig, TokenizerConfig

__all__ = ["CheckpointError", "GPTConfig", "TokenizerConfig", "load_gpt", "load_tokenizer", "save_model"]
__version__ = "0.1.0"
