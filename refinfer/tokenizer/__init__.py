"""Tokenizers that reproduce llama.cpp's token ids from GGUF metadata, and chat templates."""

from .vocab import Tokenizer

__all__ = ["Tokenizer"]
