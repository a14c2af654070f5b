"""Four-process suite: TP=2 x PP=2 (+ sequence parallel, distributed optimizer) against
TP=1/PP=1 and PP=4, through checkpoints. Writes measured differences to $TRAPO_TEST_OUT."""
from __future__ import annotations

import os

from common import (fixed_microbatches, full_logits, loss_and_grads_by_layout, max_diff,
                    setup, train, write_results)
from results import Layouts4Proc, LayoutTarget

from megatron_trapo.train.checkpoint import load_checkpoint, save_checkpoint


def main():
    root = os.environ["TRAPO_TEST_CKPT"]
    mbs = fixed_microbatches()
    st = setup(tp=2, pp=2, sp=True, distopt=True)
    r = Layouts4Proc(tp2pp2_losses=train(st, mbs, 3), tp2pp2_next=[], tp2pp2_loss_after=0.0)
    logits = full_logits(st[0], mbs)
    save_checkpoint(f"{root}/tp2pp2", 3, *st)
    r.tp2pp2_next = train(st, mbs, 2)
    r.tp2pp2_loss_after = loss_and_grads_by_layout(st[0], mbs)
    for name, kw in (("tp1pp1", {}), ("tp1pp4", dict(pp=4)), ("tp2pp1", dict(tp=2))):
        st = setup(distopt=True, seed=3, **kw)
        load_checkpoint(f"{root}/tp2pp2", *st)
        r.targets[name] = LayoutTarget(logits=max_diff(full_logits(st[0], mbs), logits),
                                       next=train(st, mbs, 2),
                                       loss_after=loss_and_grads_by_layout(st[0], mbs))
    write_results(r)


if __name__ == "__main__":  # the checkpoint writer re-imports __main__
    main()
