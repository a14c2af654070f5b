"""Build Megatron-Core ``GPTModel`` chunks from a :class:`ModelConfig` and the parallel state.

Transformer Engine's layer spec is used when TE and CUDA are present (and required for FP8);
otherwise megatron's local spec with torch norms that support sequence parallel. On CPU the
weights are initialised on the CPU from the full master weight and then sliced
(``use_cpu_initialization``), so a TP=2 model's shards gathered together equal the TP=1 model
built with the same seed — the basis of every cross-layout test.
"""
from __future__ import annotations

import importlib.util
from typing import List, Optional

import torch
import torch.nn.functional as F

from megatron_trapo.config import ConfigError, ModelConfig, ParallelConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def have_transformer_engine() -> bool:
    """True when Transformer Engine is importable and a CUDA device is present."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def padded_vocab_size(model: ModelConfig, tp: int = 1) -> int:
    """Vocab rounded up to ``make_vocab_size_divisible_by``. Independent of TP on purpose, so a
    checkpoint's embedding shape does not change with the layout; TP must divide it."""
    d = model.make_vocab_size_divisible_by
    padded = -(-model.vocab_size // d) * d
    if padded % tp != 0:
        raise ConfigError(f"padded vocab size {padded} (vocab_size={model.vocab_size} rounded to "
                          f"make_vocab_size_divisible_by={d}) is not divisible by "
                          f"tensor_model_parallel_size={tp}")
    return padded


def resolve_transformer_impl(model: ModelConfig) -> str:
    """'transformer_engine' or 'local', refusing TE/FP8 requests this machine cannot honour."""
    te = have_transformer_engine()
    if model.fp8 is not None and not te:
        raise ConfigError(f"model.fp8={model.fp8!r} needs Transformer Engine and a CUDA GPU; "
                          "neither is available here (set model.fp8=null)")
    if model.transformer_impl == "transformer_engine" and not te:
        raise ConfigError("model.transformer_impl=transformer_engine needs Transformer Engine "
                          "and a CUDA GPU; use 'auto' or 'local'")
    if model.transformer_impl == "auto":
        return "transformer_engine" if te else "local"
    return model.transformer_impl


def transformer_config(model: ModelConfig, parallel: ParallelConfig,
                       calculate_per_token_loss: bool = True,
                       use_cpu_initialization: Optional[bool] = None,
                       perform_initialization: bool = True):
    """The megatron ``TransformerConfig`` for this model and layout."""
    # lazy: megatron-core takes ~3 s to import; the planner and the launcher use this module's
    # cheap helpers
    from megatron.core.transformer import TransformerConfig

    impl = resolve_transformer_impl(model)
    on_gpu = torch.cuda.is_available()
    fused = impl == "transformer_engine"
    dtype = _DTYPES[model.dtype]
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=model.dtype == "bf16",
        fp16=model.dtype == "fp16",
        use_cpu_initialization=(not on_gpu) if use_cpu_initialization is None
        else use_cpu_initialization,
        calculate_per_token_loss=calculate_per_token_loss,
        perform_initialization=perform_initialization,
        bias_dropout_fusion=fused,
        bias_activation_fusion=fused and model.swiglu,
        masked_softmax_fusion=fused,
        apply_rope_fusion=fused,
        gradient_accumulation_fusion=fused and grad_accumulation_fusion_available(),
        cross_entropy_loss_fusion=False,
        # gloo matches point-to-point messages between a pair of ranks in posting order.
        # megatron's batched p2p posts send_prev, recv_prev, send_next, recv_next on every rank,
        # so with PP=2 (prev == next) the interleaved schedule's forward activations and
        # backward grads cross-match and the loss silently changes. The unbatched path orders
        # sends/receives by rank parity and pairs correctly. NCCL groups batches: keep it there.
        batch_p2p_comm=on_gpu,
    )
    if model.fp8 is not None:
        if model.fp8_recipe == "mxfp8" and torch.cuda.get_device_capability()[0] < 10:
            raise ConfigError("model.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability "
                              "10+); use tensorwise or blockwise on Hopper")
        kwargs.update(fp8=model.fp8, fp8_recipe=model.fp8_recipe)
        if model.first_last_layers_bf16:
            kwargs.update(first_last_layers_bf16=True,
                          num_layers_at_start_in_bf16=model.num_layers_at_start_in_bf16,
                          num_layers_at_end_in_bf16=model.num_layers_at_end_in_bf16)
    if model.recompute_granularity is not None:
        kwargs.update(recompute_granularity=model.recompute_granularity,
                      recompute_method=model.recompute_method,
                      recompute_num_layers=model.recompute_num_layers)
    return TransformerConfig(**kwargs)


def grad_accumulation_fusion_available() -> bool:
    """megatron fuses the wgrad GEMM into ``main_grad`` only with apex's
    ``fused_weight_gradient_mlp_cuda``; asking for it without raises at model build (a
    TE-only or pip install has no apex)."""
    # lazy: megatron-core takes ~3 s to import (see transformer_config)
    from megatron.core.tensor_parallel import layers

    return bool(getattr(layers, "_grad_accum_fusion_available", False))


def layer_spec(model: ModelConfig, config, vp_stage: Optional[int] = None):
    """Transformer Engine spec on GPU; otherwise megatron's local spec with SP-capable torch
    norms and, unless ``model.attention_backend=local``, torch SDPA as core attention."""
    # lazy: megatron-core takes ~3 s to import (see transformer_config); norms subclass
    # megatron's modules
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    from megatron_trapo.models.norms import QKTorchNorm, SequenceParallelTorchNorm

    if resolve_transformer_impl(model) == "transformer_engine":
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    spec = specs.get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm,
                                          normalization=model.normalization)
    sub = spec.submodules
    if model.attention_backend in ("auto", "sdpa"):
        # lazy: it subclasses megatron-core's attention (see the import above)
        from megatron_trapo.models.sdpa_attention import SDPADotProductAttention

        sub.self_attention.submodules.core_attention = SDPADotProductAttention
    sub.input_layernorm = SequenceParallelTorchNorm
    sub.pre_mlp_layernorm = SequenceParallelTorchNorm
    if model.qk_layernorm:
        sub.self_attention.submodules.q_layernorm = QKTorchNorm
        sub.self_attention.submodules.k_layernorm = QKTorchNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * num_layers,
                                      layer_norm=SequenceParallelTorchNorm)


def takes_packed_sequences(model: torch.nn.Module) -> bool:
    """Whether ``model``'s core attention takes packed rows as THD ``PackedSeqParams``
    (Transformer Engine's, or :class:`SDPADotProductAttention`); megatron's unfused local
    attention needs a block-diagonal mask instead. Decided from the built modules, not from
    the machine: a ``transformer_impl=local`` model on a TE machine needs the mask. Cached on
    the model."""
    cached = getattr(model, "_trapo_takes_packed_sequences", None)
    if cached is None:
        classes = []
        if have_transformer_engine():
            # lazy: Transformer Engine is optional, and megatron-core slow to import
            from megatron.core.extensions.transformer_engine import TEDotProductAttention

            classes.append(TEDotProductAttention)
        # lazy: it subclasses megatron-core's attention, slow to import
        from megatron_trapo.models.sdpa_attention import SDPADotProductAttention

        classes.append(SDPADotProductAttention)
        cached = any(isinstance(m, tuple(classes)) for m in model.modules())
        model._trapo_takes_packed_sequences = cached
    return cached


def build_model(model: ModelConfig, parallel: ParallelConfig,
                calculate_per_token_loss: bool = True,
                use_cpu_initialization: Optional[bool] = None,
                perform_initialization: bool = True) -> List[torch.nn.Module]:
    """One ``GPTModel`` per virtual pipeline stage of this rank (a list of length 1 without VPP).

    Requires :func:`megatron_trapo.platform.distributed.initialize_distributed` first.
    ``perform_initialization=False`` skips random init (weights about to be loaded).
    """
    # lazy: megatron-core takes ~3 s to import (see transformer_config)
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(model, parallel, calculate_per_token_loss, use_cpu_initialization,
                                perform_initialization)
    vocab = padded_vocab_size(model, parallel.tensor_model_parallel_size)
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(model, config, stage),
            vocab_size=vocab,
            max_sequence_length=model.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=int(model.rotary_base),
            vp_stage=stage,
        )
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks
