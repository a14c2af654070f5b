"""Model presets against the parameter counts their publishers state (model cards)."""
import pytest

from megatron_trapo.config import ConfigError
from megatron_trapo.models.presets import PRESETS, num_parameters, preset
from megatron_trapo.models.provider import padded_vocab_size

PUBLISHED = {  # total parameters as published on each model card
    "qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-7b": 7.61e9,
    "qwen2.5-math-7b": 7.61e9, "qwen2.5-32b": 32.5e9, "qwen3-0.6b": 0.6e9,
    "qwen3-1.7b": 1.7e9, "qwen3-4b": 4.0e9, "qwen3-8b": 8.2e9, "qwen3-14b": 14.8e9,
    "qwen3-32b": 32.8e9, "llama3-8b": 8.03e9, "llama3-70b": 70.6e9, "smollm2-135m": 134.5e6,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count_matches_model_card(name):
    count = num_parameters(preset(name))
    # Cards round to 2-3 significant digits ("0.6B", "1.7B").
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.02, (name, count)


def test_every_preset_is_checked():
    assert set(PRESETS) - {"tiny"} == set(PUBLISHED)


def test_padded_vocab_is_layout_independent():
    m = preset("qwen2.5-7b")
    assert padded_vocab_size(m, 1) == padded_vocab_size(m, 8) == 152064
    assert padded_vocab_size(preset("smollm2-135m"), 4) == 49152
    tiny = preset("tiny", vocab_size=250)
    assert padded_vocab_size(tiny, 2) == 256


def test_padded_vocab_not_divisible_by_tp():
    m = preset("tiny", vocab_size=100, make_vocab_size_divisible_by=6)
    with pytest.raises(ConfigError, match="not divisible by tensor_model_parallel_size=4"):
        padded_vocab_size(m, 4)


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("gpt-17")
    with pytest.raises(ConfigError, match="hiddn"):
        preset("tiny", hiddn=3)
