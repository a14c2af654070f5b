"""The CPU demo: a synthetic task, a local tokenizer, a tiny base model, and
TRAPO and its baselines trained and compared on it — all on a laptop's CPU."""
