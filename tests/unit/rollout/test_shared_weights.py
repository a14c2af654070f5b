"""The in-process HF engine generating from the trainer's own tensors
(``rollout.share_trainer_weights``): no second copy, in-place updates seen after a sync, the
same samples as an engine that copied the weights, copies where sharing is not possible."""
import json

import torch
from transformers import AutoModelForCausalLM

from rollout_models import tiny_qwen2

from megatron_trapo.rollout.hf_engine import HFEngine
from megatron_trapo.rollout.types import RolloutRequest, SamplingParams

REQ = [RolloutRequest([5, 6, 7, 8], SamplingParams(n=2, temperature=1.0, max_new_tokens=12,
                                                   seed=3, stop_token_ids=[]))]


def _trainer_tensors(model):
    """HF-named tensors as the sync hands them over at TP = 1: views of the trainer's storage
    (gate/up as the two halves of one fused tensor, like megatron's linear_fc1), and q_proj
    as a strided view (cut out of a fused QKV: not contiguous, so it must be copied)."""
    named = {}
    for name, p in model.named_parameters():
        if name.endswith("q_proj.weight"):
            named[name] = p.detach().t().contiguous().t()  # same values, column-major
        else:
            named[name] = p.detach()
    return named


def test_engine_shares_the_trainers_storage_and_sees_its_updates(tmp_path):
    hf = tiny_qwen2(tmp_path / "m")
    trainer = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    shared = HFEngine(str(hf), share_weights=True)
    shared.update_weights_from_tensors(_trainer_tensors(trainer), "1", share=True)
    mine = dict(shared.model.named_parameters())
    theirs = dict(trainer.named_parameters())
    for name in theirs:
        same = mine[name].data_ptr() == theirs[name].data_ptr()
        assert same == (not name.endswith("q_proj.weight")), name
    q_bytes = sum(p.numel() * 4 for n, p in theirs.items() if n.endswith("q_proj.weight"))
    # only the copied tensors are the engine's own memory
    assert shared.memory_bytes(list(theirs.values()))[0] == q_bytes

    with torch.no_grad():  # an optimizer step: in place, on the trainer's tensors
        for p in trainer.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    shared.update_weights_from_tensors(_trainer_tensors(trainer), "2", share=True)
    copied = HFEngine(str(hf))  # the reference: an engine that copies the updated weights
    copied.update_weights_from_tensors(_trainer_tensors(trainer), "2", share=True)
    assert all(p.data_ptr() != theirs[n].data_ptr() for n, p in copied.model.named_parameters())
    a, b = shared.generate(REQ)[0], copied.generate(REQ)[0]
    assert [s.token_ids for s in a] == [s.token_ids for s in b]
    assert [s.logprobs for s in a] == [s.logprobs for s in b]
    before = HFEngine(str(hf)).generate(REQ)[0]  # the weights before the step sample otherwise
    assert [s.logprobs for s in before] != [s.logprobs for s in a]


def test_no_sharing_unless_both_sides_allow_it(tmp_path):
    hf = tiny_qwen2(tmp_path / "m")
    trainer = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    for engine_allows, sync_allows in ((True, False), (False, True)):
        e = HFEngine(str(hf), share_weights=engine_allows)
        e.update_weights_from_tensors(_trainer_tensors(trainer), "1", share=sync_allows)
        ptrs = {p.data_ptr() for p in trainer.parameters()}
        assert not any(p.data_ptr() in ptrs for p in e.model.parameters())
        assert e.memory_bytes(list(trainer.parameters()))[0] == \
            sum(p.numel() * 4 for p in trainer.parameters())


def test_the_trainers_engine_takes_rollout_dtype_and_copies_into_it(tmp_path):
    """The in-process engine the trainer builds from its own architecture (no model_path) runs
    in ``rollout.dtype``: bf16 was silently fp32 before (the bf16 bench's engine decoded in
    fp32). A bf16 engine cannot share the trainer's fp32 tensors: it holds bf16 copies."""
    from megatron_trapo.config import RolloutConfig
    from megatron_trapo.rollout import make_engine

    hf = tiny_qwen2(tmp_path / "m")
    trainer = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    config = json.loads((hf / "config.json").read_text())
    engine = make_engine(RolloutConfig(dtype="bf16"), hf_config=config)
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    engine.update_weights_from_tensors(_trainer_tensors(trainer), "1", share=True)
    ptrs = {p.data_ptr() for p in trainer.parameters()}
    assert not any(p.data_ptr() in ptrs for p in engine.model.parameters())
    for name, p in engine.model.named_parameters():
        assert torch.equal(p, dict(trainer.named_parameters())[name].to(torch.bfloat16)), name
    assert engine.generate(REQ)[0][0].token_ids  # it generates in bf16
