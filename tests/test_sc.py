"""The SC loss is the paper's equation (2), at one or several layers."""

import numpy as np
import torch

from fastssl.methods.sc import spatial_contrasting_loss


def reference(f1, f2):
    """Eq. (2) written out with NumPy loops in float64."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    n = len(f1)
    total = 0.0
    for i in range(n):
        d = np.array([np.linalg.norm(f1[i] - f2[j]) for j in range(n)])
        total += -np.log(np.exp(-d[i]) / np.exp(-d).sum())
    return total / n


def test_loss_equals_equation_2():
    for n, d in ((5, 3), (17, 33), (64, 128)):
        f1, f2 = torch.randn(n, d), torch.randn(n, d) * 0.3
        got = spatial_contrasting_loss(f1, f2).item()
        np.testing.assert_allclose(got, reference(f1.numpy(), f2.numpy()), rtol=1e-4)


def test_gradients_match_finite_differences_and_are_finite_at_zero_distance():
    f1 = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    loss64 = lambda a, b: torch.nn.functional.cross_entropy(-torch.cdist(a, b), torch.arange(len(a)))
    assert torch.autograd.gradcheck(loss64, (f1, f2))
    a, b = f1.detach().float().requires_grad_(), f2.detach().float().requires_grad_()
    spatial_contrasting_loss(a, b).backward()
    g1, g2 = torch.autograd.grad(loss64(f1, f2), (f1, f2))
    torch.testing.assert_close(a.grad, g1.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.grad, g2.float(), atol=1e-5, rtol=1e-4)
    same = torch.randn(4, 5, requires_grad=True)
    spatial_contrasting_loss(same, same.detach().clone()).backward()
    assert torch.isfinite(same.grad).all()
    assert spatial_contrasting_loss(same, same.detach().clone()).item() >= 0


def test_multi_layer_loss_is_weighted_sum(tiny_cfg):
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = tiny_cfg("method.layers=[block2,block3]", "method.layer_weights=[0.5,2.0]")
    torch.manual_seed(0)
    m = get_method("sc")(cfg, build_backbone(cfg.model, 32), 32)
    views = [torch.randn(6, 3, 21, 21), torch.randn(6, 3, 21, 21)]
    out = m(views, torch.arange(6))
    want = 0.5 * out["loss_block2"] + 2.0 * out["loss_block3"]
    torch.testing.assert_close(out["loss"].detach(), want)
    assert not m.find_unused_parameters
    m2 = get_method("sc")(tiny_cfg("method.layers=[block1]"), build_backbone(cfg.model, 32), 32)
    assert m2.find_unused_parameters  # block2/3 get no gradient: DDP must know


def test_crop_plan_is_in_bounds_and_sized(tiny_cfg):
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    cfg = tiny_cfg("method.patch_size=11")
    m = get_method("sc")(cfg, build_backbone(cfg.model, 32), 32)
    f = m.recipe().draw(np.random.default_rng(0), 500)
    boxes, flips, color = f["box"], f["flip"], f["hsv"]
    assert boxes.shape == (500, 2, 4) and flips.shape == (500, 2) and color.shape == (500, 2, 3)
    assert (boxes[..., 2:] == 11).all() and (boxes[..., :2] >= 0).all() and (boxes[..., :2] <= 21).all()
    assert boxes[..., 0].min() == 0 and boxes[..., 0].max() == 21  # every position is reachable
