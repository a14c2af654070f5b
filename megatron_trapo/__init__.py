"""megatron_trapo: TRAPO (Trust-Region Adaptive Policy Optimization) post-training on Megatron-Core."""
__version__ = "0.1.0"
