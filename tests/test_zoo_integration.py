"""prepare -> 20 SGD steps -> convert on the paper's architectures (real torchvision/timm models).

Every conv / linear / attention weight must be quantized at 8 bits after prepare, training must
lower the loss on a fixed batch, and the converted integer model must reproduce the fake-quant
model's eval output. Large models at full size are marked slow (run with ``-m slow``).
"""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

import msq_fx
from conftest import eval_output, expected_weight_names, reported_names


def tiny_vit():
    """torchvision's VisionTransformer (nn.MultiheadAttention inside), at a CI-friendly size."""
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                num_heads=4, hidden_dim=64, mlp_dim=128,
                                                num_classes=10)


MODELS = {
    "resnet20": (lambda: msq_fx.resnet20(), (4, 3, 32, 32), 0.05),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (4, 3, 64, 64), 0.01),
    "tv_mobilenet_v3_large": (lambda: torchvision.models.mobilenet_v3_large(num_classes=10),
                              (4, 3, 64, 64), 0.01),
    "tv_vit_tiny_mha": (tiny_vit, (4, 3, 32, 32), 0.01),
    "timm_deit_tiny_patch16_224": (
        lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10),
        (2, 3, 224, 224), 0.01),
    "timm_mobilenetv3_large_100": (
        lambda: timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=10),
        (4, 3, 64, 64), 0.01),
}
SLOW_MODELS = {
    "tv_vit_b_16": (lambda: torchvision.models.vit_b_16(num_classes=10), (2, 3, 224, 224), 0.003),
    "tv_mobilenet_v3_large_224": (lambda: torchvision.models.mobilenet_v3_large(),
                                  (2, 3, 224, 224), 0.01),
    "tv_resnet18_224": (lambda: torchvision.models.resnet18(), (2, 3, 224, 224), 0.01),
    "timm_swin_tiny_patch4_window7_224": (
        lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10),
        (2, 3, 224, 224), 0.01),
}
CASES = ([pytest.param(k, *v, id=k) for k, v in MODELS.items()]
         + [pytest.param(k, *v, id=k, marks=pytest.mark.slow) for k, v in SLOW_MODELS.items()])


@pytest.mark.parametrize("name, build, shape, lr", CASES)
def test_prepare_train_convert(name, build, shape, lr):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(shape)
    target = torch.arange(shape[0]) % 10

    qmodel = msq_fx.prepare(model, x)
    report = msq_fx.report(qmodel)
    assert expected_weight_names(model) <= reported_names(qmodel)
    assert {row.bits for row in report.layers} == {8}
    assert not report.float_weights

    controller = msq_fx.MSQController(qmodel)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(qmodel(x), target)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        (loss + controller.regularization()).backward()
        optimizer.step()
    assert losses[-1] < losses[0], losses

    int_model = msq_fx.convert(qmodel)
    fake_quant, lowered = eval_output(qmodel, x), eval_output(int_model, x)
    assert (fake_quant - lowered).abs().max() <= 1e-5 * fake_quant.abs().max()
