"""Decoder models, weight loading (HF folders, GGUF, dummy) and tokenizers."""
