"""pyeff.ops.run_on_subset / SkipBlock: executed samples get the block, skipped ones the shortcut,
gradients flow to both, no copy when everyone or no one executes, clear errors."""
import pytest
import torch

from pyeff.ops import run_on_subset
from pyeff.ops.skip import SkipBlock


class Counting(torch.nn.Module):
    """A conv block that records the batch sizes it was called with."""

    def __init__(self, c_in=3, c_out=3, stride=1):
        super().__init__()
        self.conv = torch.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        return torch.relu(self.conv(x)) + (x if self.conv.in_channels == self.conv.out_channels and
                                           self.conv.stride == (1, 1) else 0)


def _expected(block, x, keep, shortcut):
    rows = []
    for i in range(x.shape[0]):
        if keep[i]:
            rows.append(block(x[i:i + 1])[0])
        elif shortcut is None:
            rows.append(x[i])
        elif isinstance(shortcut, torch.Tensor):
            rows.append(shortcut[i])
        else:
            rows.append(shortcut(x[i:i + 1])[0])
    return torch.stack(rows)


@pytest.mark.parametrize("shortcut_kind", ["identity", "tensor", "callable"])
def test_matches_per_sample_definition_with_gradients(shortcut_kind, rng):
    torch.manual_seed(int(torch.randint(0, 1 << 30, (), generator=rng)))
    stride = 2 if shortcut_kind == "callable" else 1
    block = Counting(3, 5 if stride == 2 else 3, stride).double()
    proj = torch.nn.Conv2d(3, 5, 1, stride=2).double()
    x = torch.randn(7, 3, 9, 11, generator=rng, dtype=torch.float64)
    keep = torch.rand(7, generator=rng) < 0.5
    keep[0], keep[1] = True, False
    shortcut = {"identity": None, "tensor": torch.randn(7, 3, 9, 11, generator=rng, dtype=torch.float64),
                "callable": proj}[shortcut_kind]
    xa = x.clone().requires_grad_()
    got = run_on_subset(block, xa, keep, shortcut)
    assert block.seen[-1] == int(keep.sum())  # the block ran on the executing samples only
    xb = x.clone().requires_grad_()
    ref = _expected(block, xb, keep, shortcut)
    torch.testing.assert_close(got, ref)
    g = torch.randn(got.shape, generator=rng, dtype=torch.float64)
    got.backward(g)
    ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    small = shortcut[:, :, :5, :5] if isinstance(shortcut, torch.Tensor) else shortcut
    assert torch.autograd.gradcheck(lambda t: run_on_subset(block, t, keep, small),
                                    (x[:, :, :5, :5].clone().requires_grad_(),))


def test_nobody_or_everybody_executes_without_copy(rng):
    block = Counting()
    x = torch.randn(4, 3, 6, 6, generator=rng)
    assert run_on_subset(block, x, torch.zeros(4, dtype=torch.bool)) is x
    assert block.seen == []
    shortcut = torch.randn(4, 3, 6, 6, generator=rng)
    assert run_on_subset(block, x, torch.zeros(4, dtype=torch.bool), shortcut) is shortcut
    out = run_on_subset(block, x, torch.ones(4, dtype=torch.bool))
    assert block.seen == [4]
    torch.testing.assert_close(out, block(x))


def test_skip_block_module(rng):
    block = SkipBlock(Counting())
    x = torch.randn(5, 3, 6, 6, generator=rng)
    keep = torch.tensor([True, False, False, True, False])
    y = block(x, keep)
    assert torch.equal(y[1], x[1]) and block.block.seen == [2]
    torch.testing.assert_close(block(x), block.block(x))


def test_bad_keep():
    x = torch.randn(3, 2)
    with pytest.raises(TypeError, match="expected bool"):
        run_on_subset(torch.nn.Identity(), x, torch.ones(3))
    with pytest.raises(ValueError, match=r"expected \[3\]"):
        run_on_subset(torch.nn.Identity(), x, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="is on meta"):
        run_on_subset(torch.nn.Identity(), x, torch.ones(3, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="shortcut"):
        run_on_subset(torch.nn.Linear(2, 4), x, torch.tensor([True, False, True]))
