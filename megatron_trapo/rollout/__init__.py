"""Rollout engines behind one interface (``types.RolloutEngine``): the in-process HF engine,
SGLang servers behind sglang-router, vLLM servers; our SGLang-protocol server; weight sync."""
from typing import Optional

from megatron_trapo.rollout.types import (RolloutEngine, RolloutError, RolloutRequest, Sample,
                                          SamplingParams)

__all__ = ["RolloutEngine", "RolloutError", "RolloutRequest", "Sample", "SamplingParams",
           "make_engine"]


def make_engine(cfg, weight_updates: bool = False, hf_config: Optional[dict] = None
                ) -> RolloutEngine:
    """The engine a :class:`megatron_trapo.config.RolloutConfig` asks for. ``weight_updates``:
    the trainer will push weights to it, so check now that the servers can take them.
    ``hf_config``: engine=hf without model_path starts from this architecture with unfilled
    weights (the trainer's first weight sync fills them)."""
    if cfg.engine == "hf":
        # lazy: importing any rollout module runs this __init__; an engine's stack (transformers,
        # httpx) loads only when it is chosen
        from megatron_trapo.rollout.hf_engine import HFEngine

        if not cfg.model_path and hf_config is not None:
            return HFEngine.from_hf_config(hf_config, device=cfg.device, dtype=cfg.dtype,
                                           max_batch_size=cfg.max_batch_size,
                                           share_weights=cfg.share_trainer_weights)
        if not cfg.model_path:
            raise RolloutError("rollout.model_path is required for engine=hf")
        return HFEngine(cfg.model_path, device=cfg.device, dtype=cfg.dtype,
                        max_batch_size=cfg.max_batch_size, tokenizer_path=cfg.tokenizer_path)
    if cfg.quantization == "fp8" and cfg.engine != "hf" and cfg.model_path and weight_updates:
        # lazy: see engine=hf above; servers start from the FP8 layout they update
        from megatron_trapo.rollout import fp8

        fp8.check_serving_folder(cfg.model_path, cfg.fp8_block_size)
    if cfg.engine == "sglang":
        # lazy: see engine=hf above
        from megatron_trapo.rollout.servers import ServerPool
        from megatron_trapo.rollout.sglang_engine import SGLangEngine

        if cfg.server_urls:
            pool = ServerPool.attach(list(cfg.server_urls), cfg.use_router, cfg.startup_timeout_s)
        else:
            if not cfg.model_path:
                raise RolloutError("rollout.model_path is required to launch servers")
            pool = ServerPool.launch(cfg.server_impl, cfg.model_path, cfg.num_servers,
                                     cfg.use_router, cfg.tokenizer_path, cfg.startup_timeout_s,
                                     extra_args=list(cfg.server_args))
        return SGLangEngine(pool, cfg.request_timeout_s, cfg.max_retries,
                            concurrency_per_server=cfg.concurrency_per_server)
    # lazy: see engine=hf above
    from megatron_trapo.rollout.vllm_engine import VLLMEngine

    return VLLMEngine(list(cfg.server_urls), model=cfg.model_path or "",
                      request_timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries,
                      weight_updates=weight_updates)
