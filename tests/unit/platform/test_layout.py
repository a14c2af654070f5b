"""Invalid parallel layouts fail before any process group exists, naming the numbers."""
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_trapo.config import ConfigError, ParallelConfig
from megatron_trapo.models.presets import preset
from megatron_trapo.platform.distributed import validate_layout

TINY = preset("tiny")  # 4 heads, 2 query groups, 4 layers, ffn 128


def par(**kw):
    return ParallelConfig(**kw)


@pytest.mark.parametrize("kw, world, message", [
    (dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 6,
     r"world size 6 is not divisible by .*\(2\) x .*\(2\) x .*\(1\) = 4"),
    (dict(tensor_model_parallel_size=4), 4, r"num_query_groups=2 is not divisible by "
                                            r"tensor_model_parallel_size=4"),
    (dict(tensor_model_parallel_size=8), 8, r"num_attention_heads=4 is not divisible"),
    (dict(sequence_parallel=True), 2, r"sequence_parallel=True requires "
                                      r"tensor_model_parallel_size > 1"),
    (dict(virtual_pipeline_model_parallel_size=2), 2, r"requires pipeline_model_parallel_size >= 2"),
    (dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=4), 2,
     r"num_layers=4 is not divisible by pipeline_model_parallel_size \(2\) x "
     r"virtual_pipeline_model_parallel_size \(4\) = 8"),
    (dict(pipeline_model_parallel_size=3), 3, r"num_layers=4 is not divisible"),
])
def test_invalid_layouts(kw, world, message):
    with pytest.raises(ConfigError, match=message):
        validate_layout(par(**kw), world, TINY)


def test_context_parallel_needs_te_attention_on_this_machine():
    with pytest.raises(ConfigError, match=r"context_parallel_size=2 needs Transformer Engine"):
        validate_layout(par(context_parallel_size=2), 2, TINY, seq_length=32)


def test_context_parallel_sequence_length(monkeypatch):
    import megatron_trapo.platform.distributed as d

    monkeypatch.setattr(d, "_have_te_attention", lambda: True)  # as on a GPU node with TE
    with pytest.raises(ConfigError, match=r"sequence length 30 is not divisible by 2 x "
                                          r"context_parallel_size = 4"):
        validate_layout(par(context_parallel_size=2), 2, TINY, seq_length=30)
    assert validate_layout(par(context_parallel_size=2), 4, TINY, seq_length=32).dp == 2


def test_fp8_refused_on_cpu():
    with pytest.raises(ConfigError, match="model.fp8='hybrid' needs Transformer Engine"):
        validate_layout(par(), 1, preset("tiny", fp8="hybrid"))


def test_valid_layout_derives_data_parallel():
    lay = validate_layout(par(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                              virtual_pipeline_model_parallel_size=2), 8, TINY)
    assert (lay.tp, lay.pp, lay.vpp, lay.dp) == (2, 2, 2, 2)


def test_cli_reports_bad_layout_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_trapo.cli", "layout", "--world-size", "3",
         "parallel.tensor_model_parallel_size=2"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "world size 3 is not divisible" in proc.stderr
    assert "Traceback" not in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "megatron_trapo.cli", "layout", "--world-size",
                         "4", "parallel.tensor_model_parallel_size=2"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "dp=2" in ok.stdout


def test_layout_validates_a_training_config():
    """`layout` reads a TrainConfig (the 32B example, its architecture from
    launch.model_preset since the checkpoint is not here), as `train` would run it."""
    cmd = [sys.executable, "-m", "megatron_trapo.cli", "layout", "--config",
           "examples/configs/trapo_qwen2.5_32b.yaml", "--world-size"]
    root = Path(__file__).resolve().parents[3]
    ok = subprocess.run(cmd + ["32"], capture_output=True, text=True, cwd=root)
    assert ok.returncode == 0 and "tp=8 pp=2" in ok.stdout and "dp=2" in ok.stdout
    assert "preset qwen2.5-32b" in ok.stdout
    bad = subprocess.run(cmd + ["12"], capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and "world size 12 is not divisible" in bad.stderr
