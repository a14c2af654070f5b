"""Hugging Face ↔ Megatron-Core: the per-family mapping (shared by the converters and by run-time
weight sync), HF checkpoint I/O, and the conversions themselves."""
