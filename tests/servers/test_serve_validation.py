"""The protocol server under hostile-but-fair clients, on 127.0.0.1 (the probe table's §7):
every bad body gets a 4xx naming the field, never a 500; a request over the limits is refused at
once; a full queue answers 503; /health_generate says when the engine is busy; an abandoned
request is cancelled — and after all of it a good request is served within a second, with the
same greedy output as before."""
import json
import threading
import time

import httpx
import pytest

from rollout_models import tiny_qwen2

from megatron_trapo.rollout.servers import ServerPool

GOOD = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
# batches of 8 rows: the 256-sample request below takes far longer than its client waits
LIMITS = ["--max-n", "64", "--max-queued-samples", "256", "--health-timeout-s", "1.5",
          "--max-body-mb", "1", "--max-batch-size", "8"]

# (path, raw body, status, words the message must hold)
BAD = [
    ("/generate", b'{"input_ids": [1,2,', 400, ["malformed JSON", "line 1"]),
    ("/generate", b"", 400, ["empty request body"]),
    ("/generate", b"5", 422, ["JSON object", "int"]),
    ("/generate", b"{" + b"x" * (2 << 20), 413, ["exceeds the server's limit"]),
    ("/generate", b'{"input_ids": [1], "sampling_params": {"temperature": NaN}}', 400,
     ["NaN is not valid JSON"]),
    ("/generate", json.dumps({"input_ids": [5.7, 6]}).encode(), 422,
     ["input_ids[0]", "integer token id", "5.7"]),
    ("/generate", json.dumps({"input_ids": [[1, 2], [3, True]]}).encode(), 422,
     ["input_ids[1][1]"]),
    ("/generate", json.dumps({"input_ids": [1], "sampling_params": {"n": 100000}}).encode(), 422,
     ["sampling_params.n", "at most 64", "--max-n"]),
    ("/generate", json.dumps({"input_ids": [1], "sampling_params": {"max_new_tokens": -1}})
     .encode(), 422, ["sampling_params.max_new_tokens", "greater than or equal to 1"]),
    ("/generate", json.dumps({"input_ids": [1], "sampling_params": {"temperature": "hot"}})
     .encode(), 422, ["sampling_params.temperature"]),
    ("/generate", json.dumps({"input_ids": [1], "sampling_params": "x"}).encode(), 422,
     ["sampling_params"]),
    ("/generate", json.dumps({"input_ids": [1], "bogus": 1}).encode(), 422,
     ["bogus: unknown field"]),
    ("/generate", json.dumps({"text": "hi"}).encode(), 422, ["input_ids is required"]),
    ("/generate", json.dumps({"input_ids": [999999]}).encode(), 400, ["outside the model's vocab"]),
    ("/v1/completions", json.dumps({"model": "m"}).encode(), 422, ["prompt is required"]),
    ("/v1/completions", json.dumps({"prompt": [1], "max_tokens": -1}).encode(), 422,
     ["max_tokens", "greater than or equal to 1"]),
    ("/v1/completions", b'{"prompt": [1', 400, ["malformed JSON"]),
    ("/update_weight_version", b"{}", 422, ["new_version", "Field required"]),
    ("/init_weights_update_group", b"{}", 422, ["master_address", "master_port", "rank_offset",
                                                "world_size"]),
    ("/update_weights_from_distributed", json.dumps(
        {"names": ["a"], "dtypes": ["int7"], "shapes": [[2]]}).encode(), 422, ["dtypes[0]"]),
    ("/collective_rpc", json.dumps({"method": "rm_rf"}).encode(), 422, ["reload_weights"]),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = tiny_qwen2(tmp_path_factory.mktemp("serve") / "hf")
    pool = ServerPool.launch("hf", str(model), 1, use_router=False, startup_timeout_s=120,
                             extra_args=LIMITS)
    yield pool.urls[0]
    pool.close()


def post(url, path, raw, timeout=30.0):
    return httpx.post(url + path, content=raw, timeout=timeout,
                      headers={"Content-Type": "application/json"})


def good(url, timeout=30.0):
    t0 = time.time()
    r = httpx.post(url + "/generate", json=GOOD, timeout=timeout)
    return r, time.time() - t0


def test_bad_requests_get_4xx_naming_the_field_then_a_good_one_is_served(server):
    r0, _ = good(server)
    assert r0.status_code == 200
    for _round in range(3):  # a bounded loop of bad requests
        for path, raw, status, words in BAD:
            r = post(server, path, raw)
            assert r.status_code == status, (path, raw[:60], r.status_code, r.text)
            message = r.json()["error"]["message"]
            for w in words:
                assert w in message, (path, raw[:60], message)
    r, seconds = good(server)
    assert r.status_code == 200 and seconds < 1.0
    assert r.json()["output_ids"] == r0.json()["output_ids"]  # the server state is unharmed
    wrong_type = httpx.post(server + "/generate", content=json.dumps(GOOD), timeout=10,
                            headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415


def _big_request(n_prompts: int, n: int, max_new: int) -> dict:
    return {"input_ids": [[7 + k % 50, 9, 11] for k in range(n_prompts)],
            "sampling_params": {"n": n, "max_new_tokens": max_new, "temperature": 1.0}}


def test_full_queue_busy_health_and_abandoned_request_is_cancelled(server):
    # 4 x 64 = 256 samples of 240 tokens fill the queue (the server's limit) for a long while
    big = _big_request(4, 64, 240)
    abandoned = {}

    def client_that_gives_up():
        try:
            httpx.post(server + "/generate", json=big, timeout=4.0)
        except httpx.TimeoutException:
            abandoned["gave_up"] = time.time()

    t = threading.Thread(target=client_that_gives_up)
    t.start()
    time.sleep(1.0)
    full = httpx.post(server + "/generate", json=GOOD, timeout=10)
    assert full.status_code == 503 and full.headers.get("retry-after") == "1"
    assert "--max-queued-samples" in full.json()["error"]["message"]
    health = httpx.get(server + "/health_generate", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "busy"
    assert httpx.get(server + "/health", timeout=5).status_code == 200  # alive, only busy
    t.join(timeout=30)
    assert "gave_up" in abandoned
    # the abandoned work is cancelled: the server is free again within about a second
    deadline = time.time() + 5
    while True:
        r, seconds = good(server, timeout=10)
        if r.status_code == 200 or time.time() > deadline:
            break
        time.sleep(0.1)
    assert r.status_code == 200 and seconds < 1.0
    assert time.time() - abandoned["gave_up"] < 3.0, "the abandoned request kept running"
    assert httpx.get(server + "/health_generate", timeout=10).status_code == 200
    info = httpx.get(server + "/server_info", timeout=10).json()
    assert info["queued_samples"] == 0 and info["limits"]["max_n"] == 64
