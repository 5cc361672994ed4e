"""Tokenizers that reproduce llama.cpp's token ids from GGUF metadata, and chat templates.

    Tokenizer.from_gguf_metadata(metadata)   tokenizer.ggml.* keys (llama, gpt2, gemma4, bert, t5)
    tokenizer_from_hf_dir(directory)         tokenizer.json / tokenizer.model, via the same keys
    ChatTemplate / render_chat               tokenizer.chat_template rendered as transformers does
"""

from .chat import ChatTemplate, render_chat
from .hf import metadata_from_hf_dir, tokenizer_from_hf_dir
from .vocab import Tokenizer

__all__ = ["Tokenizer", "ChatTemplate", "render_chat", "metadata_from_hf_dir", "tokenizer_from_hf_dir"]
