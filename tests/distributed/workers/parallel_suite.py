"""Two-process suite: TP, SP, PP (1F1B), VPP, cross-layout checkpoints, training, resume,
atomic saves. Runs every phase in one torchrun (process start-up dominates on 2 cores) and
writes measured differences to $TRAPO_TEST_OUT; tests/distributed/test_parallel_suite.py asserts."""
from __future__ import annotations

import os
import time

import torch

from common import (fixed_microbatches, full_logits, loss_and_grads, max_diff, rank, setup,
                    train, write_results)
from results import ParallelSuite, PipelineCase, ResumeCase, SaveGather
from megatron_trapo.train.checkpoint import latest_iteration, load_checkpoint, save_checkpoint
from megatron_trapo.train.optimizer import optimizer_steps


def main():
    root = os.environ["TRAPO_TEST_CKPT"]
    r, pipeline, resume = {}, {}, {}
    mbs = fixed_microbatches()
    t0 = time.time()

    # TP=2 vs TP=1, sequence parallel, training reduces the loss, TP=2 checkpoint -> TP=1.
    st = setup(tp=2)
    logits_tp2 = full_logits(st[0], mbs)
    r["tp2_losses"] = train(st, mbs, 5)
    trained_tp2 = full_logits(st[0], mbs)
    save_checkpoint(f"{root}/tp2", 5, *st)
    r["tp2_next_losses"] = train(st, mbs, 2)
    st = setup(tp=2, sp=True)
    r["sp_vs_tp2_logits"] = max_diff(full_logits(st[0], mbs), logits_tp2)
    st = setup(tp=1)
    r["tp1_vs_tp2_logits"] = max_diff(full_logits(st[0], mbs), logits_tp2)
    r["tp1_init_vs_tp2_trained"] = max_diff(full_logits(st[0], mbs), trained_tp2)
    info = load_checkpoint(f"{root}/tp2", *st)
    r["tp2_ckpt_at_tp1_logits"] = max_diff(full_logits(st[0], mbs), trained_tp2)
    r["tp2_ckpt_at_tp1_rng_restored"] = info["rng_restored"]
    r["tp2_ckpt_at_tp1_next_losses"] = train(st, mbs, 2)

    # PP=1 reference (saved), PP=2 1F1B and PP=2 x VPP=2 loaded from it: loss and grads.
    st = setup(pp=1, seed=7)
    train(st, mbs, 1)  # move away from the initialisation
    save_checkpoint(f"{root}/pp1", 1, st[0])
    ref_loss, ref_grads = loss_and_grads(st[0], mbs)
    for name, vpp in (("pp2", None), ("pp2_vpp2", 2)):
        st = setup(pp=2, vpp=vpp)
        load_checkpoint(f"{root}/pp1", st[0], refresh_optimizer=st[1])
        loss, grads = loss_and_grads(st[0], mbs)
        # With tied embeddings the last stage holds its own copy of the embedding as
        # output_layer.weight; megatron all-reduces the two grads, so both equal PP=1's.
        tied = grads.pop("output_layer.weight", None)
        pipeline[name] = PipelineCase(
            grad_keys_match=sorted(grads) == sorted(ref_grads), loss_diff=abs(loss - ref_loss),
            grad_max_diff=max(max_diff(grads[k], ref_grads[k]) for k in ref_grads),
            tied_output_grad_diff=(max_diff(tied, ref_grads["embedding.word_embeddings.weight"])
                                   if tied is not None else None))
    r["ref_grad_max_abs"] = max(float(g.abs().max()) for g in ref_grads.values())
    r["pp_num_grads"] = len(ref_grads)

    # PP=2 checkpoint -> PP=1 logits.
    st = setup(pp=2)
    load_checkpoint(f"{root}/pp1", st[0], refresh_optimizer=st[1])
    train(st, mbs, 2)
    logits_pp2 = full_logits(st[0], mbs)
    save_checkpoint(f"{root}/pp2", 3, *st)
    st = setup(pp=1)
    load_checkpoint(f"{root}/pp2", *st)
    r["pp2_ckpt_at_pp1_logits"] = max_diff(full_logits(st[0], mbs), logits_pp2)

    # Resume: continuous 4 steps == 2 steps, save, fresh process state, load, 2 steps.
    # The distributed optimizer's state is gathered for the save; how (gloo to DP rank 0,
    # or all-gathered on every rank over the default group) is recorded.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    gathers = []
    real_gather = DistributedOptimizer.get_parameter_state_dp_zero

    def recorded_gather(self, use_gloo_comm=True, empty_data=False, return_on_all_ranks=False):
        gathers.append({"gloo": use_gloo_comm, "all_ranks": return_on_all_ranks,
                        "loading": empty_data})
        return real_gather(self, use_gloo_comm=use_gloo_comm, empty_data=empty_data,
                           return_on_all_ranks=return_on_all_ranks)

    DistributedOptimizer.get_parameter_state_dp_zero = recorded_gather
    for distopt in (False, True):
        tag = "distopt" if distopt else "plain"
        st = setup(distopt=distopt)
        first = train(st, mbs, 2)
        save_checkpoint(f"{root}/resume_{tag}", 2, *st, trainer_state={"consumed": 2})
        if tag == "distopt":
            r["distopt_save_gathers"] = [SaveGather(**g) for g in gathers if not g["loading"]]
        cont = train(st, mbs, 2)
        weights_cont = full_logits(st[0], mbs)
        st = setup(distopt=distopt, seed=99)  # different init: the load must overwrite it
        info = load_checkpoint(f"{root}/resume_{tag}", *st)
        resumed = train(st, mbs, 2)
        resume[tag] = ResumeCase(
            first=first, cont=cont, resumed=resumed,
            logits_diff=max_diff(full_logits(st[0], mbs), weights_cont),
            steps=sorted(set(optimizer_steps(st[1]))), trainer_state=info["trainer_state"],
            rng_restored=info["rng_restored"])
    DistributedOptimizer.get_parameter_state_dp_zero = real_gather

    # Atomic save: a save that dies mid-way leaves "latest" on the previous checkpoint.
    import megatron.core.dist_checkpointing as mdc

    real_save = mdc.save

    def dying_save(state, ckpt_dir, **kw):
        open(os.path.join(ckpt_dir, f"partial_{rank()}.bin"), "wb").write(b"x" * 100)
        raise RuntimeError("simulated crash during save")

    mdc.save = dying_save
    try:
        save_checkpoint(f"{root}/resume_plain", 9, *st)
        r["atomic_save_raised"] = False
    except RuntimeError:
        r["atomic_save_raised"] = True
    finally:
        mdc.save = real_save
    torch.distributed.barrier()
    r["atomic_latest_after_crash"] = latest_iteration(f"{root}/resume_plain")
    r["atomic_iter9_exists"] = os.path.isdir(f"{root}/resume_plain/iter_0000009")
    st = setup()
    info = load_checkpoint(f"{root}/resume_plain", *st)
    r["atomic_load_iteration"] = info["iteration"]
    r["seconds"] = time.time() - t0
    write_results(ParallelSuite(**r, pipeline=pipeline, resume=resume))


if __name__ == "__main__":  # required: the checkpoint writer re-imports __main__ (spawn)
    main()
