"""The loss adapter's modes: which tokens get which loss (single process, full vocabulary)."""
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_trapo.algorithms import losses as L
from megatron_trapo.config import BatchingConfig, ConfigError, LossConfig, LuffyConfig
from megatron_trapo.train.loss_func import token_losses
from megatron_trapo.train.step import old_logprobs_source

LP = torch.log(torch.tensor([0.5, 0.05, 0.3, 0.6, 0.2, 0.9]))
ENT = torch.tensor([1.0, 2.0, 0.5, 0.7, 1.5, 0.2])
BATCH = {
    "expert_mask": torch.tensor([0, 1, 1, 0, 0, 0]),      # token 0: prompt; 1-2: expert prefix
    "generated_mask": torch.tensor([0, 0, 0, 1, 1, 0]),   # 3-4: generated; 5: padding
    "advantages": torch.full((6,), 0.5),
    "old_logprobs": torch.log(torch.tensor([0.5, 0.05, 0.3, 0.5, 0.25, 0.9])),
    "rollout_logprobs": torch.log(torch.tensor([0.5, 0.05, 0.3, 0.2, 0.25, 0.9])),
}


def run(luffy_gamma=0.1, luffy_clip_ratio=0.2, **kw):
    cfg = LossConfig(luffy=LuffyConfig(gamma=luffy_gamma, clip_ratio=luffy_clip_ratio), **kw)
    loss, metrics = token_losses(cfg, LP.clone(), ENT, BATCH)
    return loss, metrics


def test_trapo_mode_token_by_token():
    loss, m = run(loss_mode="trapo", entropy_coef=0.01)
    pg = L.policy_gradient_loss(LP, BATCH["old_logprobs"], BATCH["advantages"])
    expected = torch.tensor([0.0, -0.5, -1.0, 0, 0, 0])  # TrSFT: −p/max(p, 0.1)
    expected[3:5] = pg[3:5]  # the entropy bonus is added on its own weights (loss_func)
    assert torch.allclose(loss, expected)
    assert m["expert/tokens"][0] == 2
    assert m["expert/outside_trust_region"].tolist() == [1.0, 2.0]  # p = 0.05 < α
    assert m["expert/nll"][0] == pytest.approx(-(math.log(0.05) + math.log(0.3)), rel=1e-6)
    assert m["pg/tokens"][0] == 2
    assert m["pg/ratio_max"][0] == pytest.approx(1.2)


def test_plain_sft_ablation_and_sft_mode():
    loss, _ = run(loss_mode="trapo_plain_sft", entropy_coef=0.0)
    assert loss[1] == pytest.approx(-math.log(0.05)) and loss[2] == pytest.approx(-math.log(0.3))
    loss, m = run(loss_mode="sft")
    assert loss[3] == loss[4] == 0 and "pg/tokens" not in m
    assert loss[1] == pytest.approx(-math.log(0.05))


def test_grpo_ignores_expert_tokens():
    loss, m = run(loss_mode="grpo", entropy_coef=0.0)
    assert loss[:3].tolist() == [0, 0, 0] and loss[3] != 0
    assert m["expert/tokens"][0] == 0


def test_luffy_shapes_off_policy_and_clips_on_policy():
    loss, m = run(loss_mode="luffy", entropy_coef=0.0, luffy_gamma=0.1, luffy_clip_ratio=0.1)
    assert loss[1] == pytest.approx(-0.5 * 0.05 / 0.15, rel=1e-5)
    # token 3: ratio 1.2 > 1.1 with A > 0 → clipped value −A·1.1
    assert loss[3] == pytest.approx(-0.5 * 1.1, rel=1e-5)
    assert m["pg/clip_frac"].tolist() == [1.0, 2.0]


def test_luffy_leaves_on_policy_tokens_unclipped_by_default_as_its_script():
    """LUFFY's script removes the clip (loss_remove_clip=True; fidelity review D4); before,
    0.2 was forced. Token 3 has ratio 1.2 with A > 0."""
    assert LuffyConfig().clip_ratio is None
    loss, m = token_losses(LossConfig(loss_mode="luffy", entropy_coef=0.0), LP.clone(), ENT,
                           BATCH)
    assert loss[3] == pytest.approx(-0.5 * 1.2, rel=1e-5)
    assert m["pg/clip_frac"].tolist() == [0.0, 2.0]
    clipped, _ = run(loss_mode="luffy", entropy_coef=0.0, luffy_clip_ratio=0.1)
    assert clipped[3] == pytest.approx(-0.5 * 1.1, rel=1e-5)


def test_ppo_mini_batches_must_split_the_prompts_into_whole_parts():
    from megatron_trapo.config import TrainConfig, load_config

    with pytest.raises(ConfigError, match=r"batching\.ppo_mini_batches=3 must divide "
                                          r"prompts_per_step=8"):
        load_config(TrainConfig, None, ["prompts_per_step=8", "batching.ppo_mini_batches=3"])
    with pytest.raises(ConfigError, match=r"batching\.ppo_epochs must be >= 1"):
        BatchingConfig(ppo_epochs=0)
    cfg = load_config(TrainConfig, None, ["prompts_per_step=8", "batching.ppo_mini_batches=2",
                                          "batching.ppo_epochs=2"])
    assert cfg.batching.updates_per_step == 4
    assert old_logprobs_source(cfg) == "recompute"  # π_old is not the current policy then


def test_an_update_with_fewer_sequences_than_dp_ranks_is_refused_by_name(monkeypatch):
    """One SFT prompt a step on 2 data-parallel ranks left rank 1 without a micro-batch and
    died in max() deep in the step; now every rank stops with the settings to change."""
    from megatron.core import parallel_state as ps

    from megatron_trapo.config import TrainConfig, load_config
    from megatron_trapo.train import step

    monkeypatch.setattr(ps, "get_data_parallel_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(ps, "get_data_parallel_rank", lambda *a, **k: 1)
    cfg = load_config(TrainConfig, None, ["prompts_per_step=1", "loss.loss_mode=sft"])
    seq = {"tokens": torch.ones(5, dtype=torch.long)}
    with pytest.raises(ConfigError, match=r"1 sequences for 2 data-parallel ranks.*"
                                          r"prompts_per_step \(1\)"):
        step.prepare_update([seq], cfg, run=None)


def test_the_lr_schedule_counts_rollout_steps_with_several_updates_each():
    """lr_warmup_iters / lr_decay_iters are rollout steps: with 2 updates per step the
    scheduler's warm-up and decay take twice as many of its (per-update) steps."""
    from megatron_trapo.config import OptimizerConfig
    from megatron_trapo.train.optimizer import build_scheduler

    class Opt:  # what megatron's scheduler touches of an optimizer
        param_groups = [{"lr": 0.0, "weight_decay": 0.0}]

    cfg = OptimizerConfig(lr=1.0, lr_warmup_iters=4, lr_decay_style="linear")
    one, two = build_scheduler(Opt(), cfg, 10, 1), build_scheduler(Opt(), cfg, 10, 2)
    assert (one.lr_warmup_steps, one.lr_decay_steps) == (4, 10)
    assert (two.lr_warmup_steps, two.lr_decay_steps) == (8, 20)
    for _ in range(4):
        two.step(increment=1)
    assert two.get_lr(Opt.param_groups[0]) == pytest.approx(0.5)  # 2 of 4 rollout steps


def test_tis_caps_importance_weights():
    loss, m = run(loss_mode="grpo", entropy_coef=0.0, tis_cap=2.0)
    ratio = 0.6 / 0.5
    assert loss[3] == pytest.approx(-0.5 * ratio * 2.0, rel=1e-5)  # exp(old − rollout) = 2.5 → 2
    assert m["pg/tis_capped_frac"].tolist() == [1.0, 2.0]
    assert m["pg/tis_weight_max"][0] == pytest.approx(2.0)


@pytest.mark.parametrize("kw, field", [
    (dict(loss_mode="ppo"), "loss.loss_mode"), (dict(aggregation="sum"), "loss.aggregation"),
    (dict(trust_region_alpha=2.0), "loss.trust_region_alpha"), (dict(tis_cap=-1.0), "loss.tis_cap"),
])
def test_config_validation(kw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        LossConfig(**kw)


def test_ablation_methods_differ_from_trapo_only_on_prefix_tokens():
    """The paper's ablation rows as methods: the schedule with prefixes as context only, and
    with LUFFY's shaping instead of TrSFT; generated tokens are trained as in TRAPO."""
    trapo, _ = run(loss_mode="trapo", entropy_coef=0.01)
    context, m = run(loss_mode="trapo_prefix_context", entropy_coef=0.01)
    assert context[1:3].tolist() == [0.0, 0.0] and m["expert/tokens"][0] == 0
    assert torch.equal(context[3:], trapo[3:])
    shaped, _ = run(loss_mode="trapo_luffy_prefix", entropy_coef=0.01, luffy_gamma=0.1)
    # −1·p/(p+γ): the prefix's advantage is 1, as the reference's (mix_actor.py:109), not the
    # sample's 0.5: p = 0.05 → −1/3, p = 0.3 → −0.75
    assert shaped[1].item() == pytest.approx(-0.05 / 0.15, rel=1e-5)
    assert shaped[2].item() == pytest.approx(-0.3 / 0.4, rel=1e-5)
    assert torch.equal(shaped[3:], trapo[3:])  # TRAPO's clip range, not LUFFY's


def test_luffy_prefix_ablation_pulls_prefixes_up_whatever_the_sample_s_advantage():
    """A guided sample that failed has A < 0: LUFFY's shaping with the sample's A would push
    its expert prefix down; the ablation (the reference's) gives prefix tokens A = 1, while
    LUFFY's own off-policy samples keep theirs."""
    failed = dict(BATCH, advantages=torch.full((6,), -0.5))
    cfg = LossConfig(loss_mode="trapo_luffy_prefix", entropy_coef=0.0)
    lp = LP.clone().requires_grad_(True)
    loss, _ = token_losses(cfg, lp, ENT, failed)
    loss[1:3].sum().backward()
    assert (lp.grad[1:3] < 0).all()  # descent raises log p of the prefix tokens
    p = LP[1:3].exp()
    assert torch.allclose(loss[1:3], -p / (p + 0.1))
    luffy, _ = token_losses(LossConfig(loss_mode="luffy", entropy_coef=0.0), LP.clone(), ENT,
                            failed)
    assert torch.allclose(luffy[1:3], 0.5 * p / (p + 0.1))  # −A·f(p) with the sample's A


@pytest.mark.parametrize("mode", ["trapo", "grpo", "luffy"])
def test_on_policy_ratio_uses_the_current_logprobs_with_a_recompute_s_gradient(mode):
    """Strictly on-policy the recompute pass gives π_old = the current logprobs; reading
    lp.detach() instead gives the same loss and gradient with no pass, and a ratio of 1 — not
    the rollout logprobs' ratio (batch["old_logprobs"] here holds stale values on purpose)."""
    cfg = LossConfig(loss_mode=mode, clip_ratio_low=0.2, clip_ratio_high=0.2, entropy_coef=0.01)

    def loss_and_grad(batch, old_is_current):
        lp = LP.clone().requires_grad_(True)
        loss, metrics = token_losses(cfg, lp, ENT, batch, old_is_current=old_is_current)
        loss.sum().backward()
        return loss.detach(), lp.grad, metrics

    recomputed = dict(BATCH, old_logprobs=LP.clone())  # what the recompute pass would fill
    ref_loss, ref_grad, _ = loss_and_grad(recomputed, False)
    loss, grad, m = loss_and_grad(BATCH, True)
    assert torch.allclose(loss, ref_loss) and torch.allclose(grad, ref_grad)
    assert m["pg/ratio_mean"].tolist() == [2.0, 2.0] and m["pg/ratio_max"][0] == 1.0
    stale_loss, _, _ = loss_and_grad(BATCH, False)
    assert not torch.allclose(stale_loss, ref_loss)


@pytest.mark.parametrize("forced,tis,source", [
    (None, None, "current"), (None, 2.0, "recompute"), (True, None, "recompute"),
    (False, None, "rollout"), (False, 2.0, "rollout")])
def test_old_logprobs_source(forced, tis, source):
    cfg = SimpleNamespace(batching=BatchingConfig(recompute_old_logprobs=forced),
                          loss=LossConfig(tis_cap=tis))
    assert old_logprobs_source(cfg) == source
