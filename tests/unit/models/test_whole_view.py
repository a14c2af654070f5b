"""The weight sync's zero-copy path: shards that are the pieces of one contiguous parameter in
the global layout (TP = 1 SwiGLU: megatron's sharded state dict cuts ``linear_fc1`` into its
gate and up halves) come back as one view of it; anything else is assembled as before."""
import torch

from megatron_trapo.models.sharding import whole_view


def _halves(p):
    f, h = p.shape[0] // 2, p.shape[1]
    return [(p[:f], (slice(0, f), slice(0, h)), tuple(p.shape)),
            (p[f:], (slice(f, 2 * f), slice(0, h)), tuple(p.shape))]


def test_gate_and_up_halves_are_one_view_of_the_parameter():
    p = torch.randn(8, 3)
    whole = whole_view(_halves(p))
    assert whole is not None and whole.data_ptr() == p.data_ptr() and torch.equal(whole, p)
    p.add_(1.0)  # the optimizer's in-place update is what the engine then generates from
    assert torch.equal(whole, p)
    inner = torch.randn(20, 3)[6:14]  # a parameter that starts inside a larger storage
    assert whole_view(_halves(inner)).data_ptr() == inner.data_ptr()


def test_pieces_that_are_not_one_tensor_in_place_are_refused():
    p, q = torch.randn(8, 3), torch.randn(8, 3)
    (g, gs, shape), (u, us, _) = _halves(p)
    assert whole_view([(g, gs, shape), (q[4:], us, shape)]) is None  # two storages
    assert whole_view([(g, us, shape), (u, gs, shape)]) is None  # the halves swapped
    assert whole_view([(g, gs, shape)]) is None  # half of the tensor missing
    t = torch.randn(3, 8).t()  # the right shape, transposed strides
    assert whole_view(_halves(t)) is None
