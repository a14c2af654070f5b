"""HF ↔ Megatron conversion: logits parity with transformers for every family at TP=1 and
TP=2, bit-exact round trips, cross-layout loads, and the real SmolLM2-135M-Instruct."""
import json

import pytest
import torch
from safetensors import safe_open

from hf_models import hf_greedy, hf_logits, smollm2_hf_dir, tiny_hf_model
from launch import run_tool, run_worker
from workers.results import HFParity, ParityCheckpoint, ParityJob, to_json

FAMILIES = ["llama", "qwen2", "qwen3"]
TOKENS = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
PROMPT = "The capital of France is"
GREEDY_STEPS = 12


def read_safetensors(folder):
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return {k: safe_open(str(folder / f), "pt").get_tensor(k) for k, f in index.items()}


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("hfconv")
    hf = {f: tiny_hf_model(f, tmp / f"hf_{f}") for f in FAMILIES}
    hf["smol"] = smollm2_hf_dir(tmp / "hf_smol")
    prompt = AutoTokenizer.from_pretrained(hf["smol"])(PROMPT, return_tensors="pt").input_ids
    stats, job = {}, []
    for f in FAMILIES:
        for tp in (1, 2):
            out = tmp / f"mc_{f}_tp{tp}"
            stats[f"{f}_tp{tp}"] = json.loads(run_tool(
                "convert_hf_to_mcore.py", "--hf-dir", str(hf[f]), "--out-dir", str(out),
                "--tp", str(tp), "--dtype", "fp32"))
            job.append(ParityCheckpoint(name=f"{f}_tp{tp}", ckpt=str(out),
                                        tokens=TOKENS.tolist(), tp=[1, 2]))
        run_tool("convert_mcore_to_hf.py", "--mcore-dir", str(tmp / f"mc_{f}_tp2"),
                 "--out-dir", str(tmp / f"hf_back_{f}"), "--max-shard-size", "150KB")
    run_tool("convert_hf_to_mcore.py", "--hf-dir", str(hf["llama"]), "--out-dir",
             str(tmp / "mc_llama_tp2pp2"), "--tp", "2", "--pp", "2", "--dtype", "fp32")
    job.append(ParityCheckpoint(name="llama_tp2pp2", ckpt=str(tmp / "mc_llama_tp2pp2"),
                                tokens=TOKENS.tolist(), tp=[1]))
    stats["smol"] = json.loads(run_tool("convert_hf_to_mcore.py", "--hf-dir", str(hf["smol"]),
                                        "--out-dir", str(tmp / "mc_smol"), "--dtype", "fp32"))
    run_tool("convert_mcore_to_hf.py", "--mcore-dir", str(tmp / "mc_smol"), "--out-dir",
             str(tmp / "hf_back_smol"))
    job.append(ParityCheckpoint(name="smol", ckpt=str(tmp / "mc_smol"), tokens=prompt.tolist(),
                                tp=[1], greedy=GREEDY_STEPS))
    (tmp / "job.json").write_text(to_json(ParityJob(checkpoints=job)))
    run_worker("hf_parity.py", 2, tmp, env={"TRAPO_TEST_JOB": str(tmp / "job.json")})
    mcore = HFParity.load(tmp / "results.json.pt")
    return {"tmp": tmp, "hf": hf, "mcore": mcore, "stats": stats, "prompt": prompt}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("conv_tp", [1, 2])
@pytest.mark.parametrize("load_tp", [1, 2])
def test_tiny_logits_match_transformers(conv, family, conv_tp, load_tp):
    ref = hf_logits(conv["hf"][family], TOKENS)
    got = conv["mcore"].logits[f"{family}_tp{conv_tp}@tp{load_tp}"]
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_exact(conv, family):
    orig = read_safetensors(conv["hf"][family])
    back = read_safetensors(conv["tmp"] / f"hf_back_{family}")
    assert sorted(orig) == sorted(back)
    for name in orig:
        assert orig[name].dtype == back[name].dtype, name
        assert torch.equal(orig[name], back[name]), name
    # The written config makes transformers rebuild the same model (same logits).
    ref = hf_logits(conv["hf"][family], TOKENS)
    assert torch.equal(hf_logits(conv["tmp"] / f"hf_back_{family}", TOKENS), ref)


def test_tp2pp2_conversion_loads_at_tp1pp1(conv):
    got = conv["mcore"].logits["llama_tp2pp2@tp1"]
    ref = conv["mcore"].logits["llama_tp1@tp1"]
    assert torch.equal(got, ref)


def test_converted_checkpoint_records_layout_and_vocab_padding(conv):
    meta = json.loads((conv["tmp"] / "mc_llama_tp2pp2" / "iter_0000000" / "trapo_meta.json")
                      .read_text())
    assert meta["layout"]["tp"] == 2 and meta["layout"]["pp"] == 2
    assert meta["config"]["model"]["vocab_size"] == 300
    from megatron.core import dist_checkpointing

    shapes = dist_checkpointing.load_tensors_metadata(
        str(conv["tmp"] / "mc_llama_tp2pp2" / "iter_0000000"))
    assert tuple(shapes["embedding.word_embeddings.weight"].global_shape) == (384, 64)


def test_smollm2_logits_and_greedy_match_transformers(conv):
    ref = hf_logits(conv["hf"]["smol"], conv["prompt"])
    got = conv["mcore"].logits["smol@tp1"]
    assert (got - ref).abs().max() <= 1e-3
    hf_tokens = hf_greedy(conv["hf"]["smol"], conv["prompt"], GREEDY_STEPS)
    assert conv["mcore"].greedy["smol@tp1"] == hf_tokens
    assert len(set(hf_tokens)) > 3  # a real continuation, not one repeated token


def test_smollm2_round_trip_and_tokenizer(conv):
    orig = read_safetensors(conv["hf"]["smol"])
    back = read_safetensors(conv["tmp"] / "hf_back_smol")
    assert sorted(orig) == sorted(back)
    assert all(torch.equal(orig[k], back[k]) for k in orig)
    assert "tokenizer.json" in conv["stats"]["smol"]["tokenizer_files"]
    assert (conv["tmp"] / "hf_back_smol" / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(conv["tmp"] / "hf_back_smol")
    assert tok(PROMPT, return_tensors="pt").input_ids.tolist() == conv["prompt"].tolist()


def test_context_is_extended_at_conversion(conv, tmp_path):
    """The 7B example's 16k base: positions and RoPE base replaced when converting (review D1),
    in the checkpoint's model config and in the hf/config.json kept beside it."""
    src = json.loads((conv["hf"]["llama"] / "config.json").read_text())
    assert src["max_position_embeddings"] != 1024 and src.get("rope_theta") != 40000.0
    out = tmp_path / "mc_long"
    run_tool("convert_hf_to_mcore.py", "--hf-dir", str(conv["hf"]["llama"]), "--out-dir",
             str(out), "--max-position-embeddings", "1024", "--rope-theta", "40000")
    model = json.loads((out / "iter_0000000" / "trapo_meta.json").read_text())["config"]["model"]
    assert model["max_position_embeddings"] == 1024 and model["rotary_base"] == 40000.0
    kept = json.loads((out / "hf" / "config.json").read_text())
    assert kept["max_position_embeddings"] == 1024 and kept["rope_theta"] == 40000.0
