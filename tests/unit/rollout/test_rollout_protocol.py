"""SGLang/vLLM protocol parsing, both directions, and rollout config validation."""
import pytest

from megatron_trapo.config import ConfigError, RolloutConfig
from megatron_trapo.rollout import protocol
from megatron_trapo.rollout.types import RolloutError, RolloutRequest, Sample, SamplingParams


def test_payload_round_trip_through_server_parser():
    sp = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=9, stop_token_ids=[2])
    body = protocol.sglang_payload([1, 2, 3], sp, seed=42, rid="r1")
    [req] = protocol.requests_from_sglang(body)
    assert req.prompt_ids == [1, 2, 3] and req.sampling.seed == 42
    assert (req.sampling.temperature, req.sampling.top_p, req.sampling.top_k) == (0.7, 0.9, 5)
    assert req.sampling.stop_token_ids == [2] and req.sampling.max_new_tokens == 9
    sample = Sample([7, 2], [-0.5, -0.1], "stop", "v3")
    item = protocol.sglang_item(sample, "r1", 3)
    assert item["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}
    back = protocol.sample_from_sglang(item, prefix_len=0)
    assert back == sample


@pytest.mark.parametrize("body, message", [
    ({"input_ids": [1], "bogus": 1}, "bogus: unknown field"),
    ({"input_ids": [1], "stream": True}, "stream"),
    ({"text": "hi"}, "input_ids is required"),
    ({"input_ids": [1], "sampling_params": {"stop": ["\n"]}}, "stop_token_ids"),
    ({"input_ids": [1], "sampling_params": {"repetition_penalty": 1.3}}, "repetition_penalty"),
    ({"input_ids": [1], "return_hidden_states": True}, "return_hidden_states"),
])
def test_server_refuses_what_it_cannot_honour(body, message):
    with pytest.raises(ValueError, match=message):
        protocol.requests_from_sglang(body)


def test_router_added_fields_with_neutral_values_are_accepted():
    body = {"input_ids": [[1, 2], [3]], "model": "m", "background": False, "log_metrics": True,
            "return_entropy": False, "sampling_params": {"n": 2, "repetition_penalty": 1.0}}
    reqs = protocol.requests_from_sglang(body)
    assert [r.prompt_ids for r in reqs] == [[1, 2], [3]] and reqs[0].sampling.n == 2


def test_vllm_choices_grouped_per_prompt():
    resp = {"choices": [{"index": k, "token_ids": [k], "finish_reason": "stop" if k % 2 else "length",
                         "logprobs": {"token_logprobs": [-float(k)]}} for k in (3, 0, 2, 1)]}
    out = protocol.samples_from_vllm(resp, 2, 2, [0, 4], "v")
    assert [[s.token_ids for s in p] for p in out] == [[[0], [1]], [[2], [3]]]
    assert out[1][1].finish_reason == "stop" and out[1][0].prefix_len == 4
    with pytest.raises(RolloutError, match="lacks choices"):
        protocol.samples_from_vllm({"choices": resp["choices"][:3]}, 2, 2, [0, 0], "v")


def test_sampling_and_budget_validation():
    with pytest.raises(RolloutError, match="top_p"):
        SamplingParams(top_p=0)
    req = RolloutRequest([1], SamplingParams(max_new_tokens=3), prefix_ids=[5, 6, 7, 8])
    with pytest.raises(RolloutError, match="exceeds max_new_tokens=3"):
        req.generation_budget()


def test_rollout_config():
    assert RolloutConfig(engine="sglang").resolved_weight_sync == "distributed"
    assert RolloutConfig().resolved_weight_sync == "inprocess"
    with pytest.raises(ConfigError, match="rollout.server_urls"):
        RolloutConfig(engine="vllm")
    with pytest.raises(ConfigError, match="not available with engine=hf"):
        RolloutConfig(engine="hf", weight_sync="distributed")
    # vLLM: the disk path by default; broadcast refused at config time, not an AttributeError
    # at the first sync
    assert RolloutConfig(engine="vllm", server_urls=["http://127.0.0.1:8000"]) \
        .resolved_weight_sync == "disk"
    with pytest.raises(ConfigError, match="weight_sync=distributed is not available with "
                                          "engine=vllm"):
        RolloutConfig(engine="vllm", server_urls=["http://127.0.0.1:8000"],
                      weight_sync="distributed")
    with pytest.raises(ConfigError, match="needs rollout.weight_sync_dir"):
        RolloutConfig(engine="vllm", server_urls=["http://node7:8000"])


def test_vllm_engine_sends_one_call_per_seeded_sample():
    """vLLM seeds a request's n samples with one generator; the interface promises sample j
    the seed + j. The engine therefore sends seeded samples one by one, and asks the server
    which model name it serves."""
    import json

    import httpx

    from megatron_trapo.rollout.vllm_engine import VLLMEngine

    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "served-name"}]})
        body = json.loads(request.content)
        bodies.append(body)
        seed = body.get("seed", 0)
        return httpx.Response(200, json={"choices": [
            {"index": j, "token_ids": [seed % 1000, j], "finish_reason": "length",
             "logprobs": {"token_logprobs": [-1.0, -1.0]}} for j in range(body["n"])]})

    engine = VLLMEngine(["http://vllm:8000"], model="/local/path",
                        transport=httpx.MockTransport(handler))
    assert engine.model == "served-name"
    seeded = RolloutRequest([1, 2], SamplingParams(n=3, max_new_tokens=4, seed=500))
    free = RolloutRequest([3], SamplingParams(n=2, max_new_tokens=4))
    out = engine.generate([seeded, free])
    assert sorted((b["n"], b.get("seed")) for b in bodies) == [(1, 500), (1, 501), (1, 502),
                                                                (2, None)]
    assert [s.token_ids for s in out[0]] == [[500, 0], [501, 0], [502, 0]]
    assert len(out[1]) == 2 and all(b["model"] == "served-name" for b in bodies)
    engine.close()


def test_each_choice_list_matches_what_implements_it():
    from megatron_trapo import config
    from megatron_trapo.rollout.servers import server_command
    from megatron_trapo.rollout.weight_sync import STRATEGIES

    assert tuple(STRATEGIES) == config.WEIGHT_SYNC_MODES
    for impl in config.SERVER_IMPLS:  # each is launchable; anything else is refused
        assert server_command(impl, "/m", 30000)[0]
    with pytest.raises(RolloutError, match="server_impl"):
        server_command("trtllm", "/m", 30000)
