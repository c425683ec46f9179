"""Hita models: the tokenizer and the AR GPT."""
from hita.models.gpt import HitaGPT
from hita.models.tokenizer import HitaTokenizer, TokenizerOutput

__all__ = ["HitaGPT", "HitaTokenizer", "TokenizerOutput"]
