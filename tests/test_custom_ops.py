"""The C++ kernels registered as torch custom ops (namespace ``primaps_fast``): schema, fake (meta)
implementations, autograd registration and AOT dispatch checked by ``torch.library.opcheck``, and the
public functions under ``torch.compile`` equal to eager."""
import pytest
import torch

import primaps_fast
import primaps_fast.ops.assign_pseudo_labels  # noqa: F401  (registers the ops)
import primaps_fast.ops.dense_crf  # noqa: F401
import primaps_fast.ops.focal_loss  # noqa: F401
import primaps_fast.ops.median_filter  # noqa: F401

ops = torch.ops.primaps_fast


def test_median_filter_op(rng):
    planes = torch.rand(5, 7, 9, generator=rng)
    torch.library.opcheck(ops.median_filter.default, (planes,))


def test_assign_pseudo_labels_op(rng):
    logits = torch.randn(2, 4, 5, 6, generator=rng)
    ids = torch.randint(0, 7, (2, 20, 24), generator=rng)
    ids[:, :3] = 255
    torch.library.opcheck(ops.assign_pseudo_labels.default, (logits, ids, 7, 255, 255))


@pytest.mark.parametrize("with_grad", [True, False])
def test_focal_loss_op(rng, with_grad):
    logits = torch.randn(2, 4, 5, 6, generator=rng, requires_grad=with_grad)
    target = torch.randint(0, 4, (2, 20, 24), generator=rng)
    target[0, :2] = 255
    torch.library.opcheck(ops.focal_loss.default, (logits, target, 2.0, 255, with_grad))


def test_dense_crf_op(rng):
    images = torch.randint(0, 256, (2, 3, 12, 10), generator=rng, dtype=torch.uint8)
    labels = torch.tensor([3, 2])
    probs = torch.rand(int(labels.sum()) * 12 * 10, generator=rng)
    torch.library.opcheck(ops.dense_crf.default, (images, probs, labels, 3, 1.0, 3.0, 67.0, 3.0, 4.0))


def test_training_ops_under_torch_compile_match_eager(rng):
    logits = torch.randn(2, 5, 8, 8, generator=rng)
    masks = torch.randint(0, 6, (2, 32, 32), generator=rng)

    def step(x):
        target = primaps_fast.assign_pseudo_labels(x.detach(), masks)
        return primaps_fast.focal_loss(x * 2.0, target)

    x_eager = logits.clone().requires_grad_()
    loss_eager = step(x_eager)
    loss_eager.backward()
    torch._dynamo.reset()
    x_comp = logits.clone().requires_grad_()
    loss_comp = torch.compile(step, backend="aot_eager")(x_comp)
    loss_comp.backward()
    assert torch.allclose(loss_comp, loss_eager, rtol=1e-6, atol=0)
    assert torch.allclose(x_comp.grad, x_eager.grad, rtol=1e-6, atol=1e-9)


def test_kernel_ops_compile_without_graph_breaks(rng):
    logits = torch.randn(2, 5, 8, 8, generator=rng, requires_grad=True)
    target = torch.randint(0, 5, (2, 32, 32), generator=rng)
    planes = torch.rand(3, 8, 8, generator=rng)

    def kernels(x, t, p):
        loss, _ = ops.focal_loss(x, t, 2.0, 255, True)
        labels = ops.assign_pseudo_labels(x.detach(), t, 5, 255, 255)
        return loss, labels, ops.median_filter(p)

    torch._dynamo.reset()
    got = torch.compile(kernels, backend="aot_eager", fullgraph=True)(logits, target, planes)
    want = kernels(logits, target, planes)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    got[0].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_focal_loss_op_refuses_backward_without_its_gradient(rng):
    logits = torch.randn(1, 3, 4, 4, generator=rng, requires_grad=True)
    target = torch.randint(0, 3, (1, 8, 8), generator=rng)
    loss, _ = ops.focal_loss(logits, target, 2.0, 255, False)
    with pytest.raises(RuntimeError, match="with_grad=False"):
        loss.backward()
