"""Every torchvision model by name: segmentation, detection, video and optical flow as well as
classification, built offline at the input each is made for, and checked end to end."""
from __future__ import annotations

import pytest
import torch
import torchvision

import msq_fx

from msq_fx.check import check_model
from msq_fx.zoo import normalize_input_size, parse_spec, task_loss
from msq_fx.zoo.torchvision_tasks import (DetectionTraining, build_torchvision_model,
                                          keep_every_detection, torchvision_input_size,
                                          torchvision_task, torchvision_tasks)


def built(name: str, **kwargs):
    torch.manual_seed(0)
    return build_torchvision_model(name, **kwargs)


def test_every_torchvision_model_has_a_task():
    assert set(torchvision_tasks()) == set(torchvision.models.list_models())


def test_classifiers_keep_the_classification_task_and_detectors_get_theirs():
    assert torchvision_task("resnet18") == "classification"
    assert torchvision_task("quantized_resnet18") == "quantizable"
    assert torchvision_task("deeplabv3_resnet50") == "segmentation"
    assert torchvision_task("fasterrcnn_resnet50_fpn") == "detection"
    assert torchvision_task("r3d_18") == "video"
    assert torchvision_task("raft_small") == "optical_flow"


def test_a_spec_names_any_torchvision_model():
    assert parse_spec("torchvision:lraspp_mobilenet_v3_large").name == "lraspp_mobilenet_v3_large"


def test_an_unknown_torchvision_model_is_a_spec_error_with_suggestions():
    with pytest.raises(ValueError, match="unknown torchvision model 'raft_smal'.*raft_small"):
        parse_spec("torchvision:raft_smal")


def test_a_segmentation_model_builds_without_its_imagenet_backbone_download():
    # weights_backbone defaults to ImageNet weights here; fetching them would fail offline.
    model = built("lraspp_mobilenet_v3_large", num_classes=3)
    assert model(torch.randn(1, 3, 32, 32))["out"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("name, shape", [
    ("resnet18", (3, 224, 224)),
    ("inception_v3", (3, 299, 299)),
    ("lraspp_mobilenet_v3_large", (3, 520, 520)),
    ("r3d_18", (3, 16, 112, 112)),
    ("mvit_v2_s", (3, 16, 224, 224)),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", (3, 320, 320)),
    ("raft_small", (6, 128, 128)),
])
def test_each_model_gets_the_input_it_is_made_for(name, shape):
    assert torchvision_input_size(name, built(name)) == shape


def test_an_image_size_replaces_only_the_frames_of_a_video_input():
    assert normalize_input_size(64, (3, 16, 112, 112)) == (3, 16, 64, 64)
    assert normalize_input_size((48, 64), (3, 16, 112, 112)) == (3, 16, 48, 64)
    assert normalize_input_size((3, 8, 32, 32), (3, 16, 112, 112)) == (3, 8, 32, 32)


def test_a_detector_comes_wrapped_and_keeps_every_detection():
    model = built("ssdlite320_mobilenet_v3_large", num_classes=3)
    assert isinstance(model, DetectionTraining)
    assert model.detector.score_thresh == 0.0
    detections = model.eval()(torch.rand(2, 3, 96, 96))
    assert len(detections) == 2 and all(len(d["boxes"]) > 0 for d in detections)


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_320_fpn", "fcos_resnet50_fpn"])
def test_every_detector_family_has_its_score_threshold_lowered(name):
    model = built(name, num_classes=3)
    owner = getattr(model.detector, "roi_heads", model.detector)
    assert owner.score_thresh == 0.0


def test_a_detector_without_a_score_threshold_is_named():
    with pytest.raises(ValueError, match="Linear has no score_thresh"):
        keep_every_detection(torch.nn.Linear(2, 2))


def test_a_detector_in_train_mode_returns_the_same_losses_on_every_call():
    model = built("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3).train()
    images = torch.rand(2, 3, 96, 96)
    first, second = model(images), model(images)
    assert set(first) >= {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_a_detectors_train_mode_leaves_the_global_random_stream_alone():
    model = built("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3).train()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    model(torch.rand(1, 3, 64, 64))
    torch.manual_seed(3)
    assert torch.equal(torch.rand(4), expected)


def test_the_losses_a_model_returns_are_summed():
    losses = {"a": torch.tensor(1.5), "b": torch.tensor(2.0, requires_grad=True)}
    assert float(task_loss(losses, torch.tensor([0, 1])).detach()) == 3.5


@pytest.mark.parametrize("name, extra", [("maskrcnn_resnet50_fpn", "masks"),
                                         ("keypointrcnn_resnet50_fpn", "keypoints")])
def test_synthetic_targets_carry_what_the_detector_predicts(name, extra):
    model = built(name, num_classes=2)
    target = model.synthetic_target(torch.rand(3, 64, 80))
    assert torch.equal(target["boxes"], torch.tensor([[20.0, 16.0, 60.0, 48.0]]))
    assert extra in target and len(target[extra]) == 1


def test_the_optical_flow_adapter_names_the_input_it_wants():
    with pytest.raises(ValueError,
                       match=r"FramePair\(RAFT\).*\(B, 6, H, W\); got \(1, 3, 64, 64\)"):
        built("raft_small")(torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize("spec, input_size", [
    ("torchvision:lraspp_mobilenet_v3_large", 64),
    ("torchvision:r3d_18", (3, 4, 32, 32)),
    ("torchvision:raft_small", (6, 128, 128)),
    ("torchvision:ssdlite320_mobilenet_v3_large", 160),
])
def test_a_model_of_each_task_passes_the_check(spec, input_size):
    result = check_model(spec, input_size=input_size)
    assert result.status == "PASS", result.reason
    assert result.quantized_weights > 0 and not result.float_weights


def test_a_detector_trains_with_msq_and_converts_to_the_same_detections():
    # The user's path, without the check's adapter: list inputs, the detector's own losses,
    # and a Hessian taken in train mode, where those losses exist.
    torch.manual_seed(0)
    detector = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3, score_thresh=0.0)
    images = [torch.rand(3, 96, 128), torch.rand(3, 112, 96)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 64.0, 72.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 10.0, 90.0, 60.0]]), "labels": torch.tensor([2])}]
    qmodel = msq_fx.prepare(detector, (images,),
                            msq_fx.MSQConfig(pruning=dict(threshold=1.0, interval=1),
                                             hessian=dict(max_samples=1, min_samples=1,
                                                          model_mode="train")))
    controller = msq_fx.MSQController(qmodel)
    optimizer = torch.optim.SGD(qmodel.parameters(), lr=1e-3)
    qmodel.train()
    loss = sum(qmodel(images, targets).values()) + controller.regularization()
    loss.backward()
    optimizer.step()
    records = controller.epoch_end(1, [((images, targets), None)],
                                   lambda losses, _: sum(losses.values()))
    assert records and controller.compression() > 32 / 8
    qmodel.eval()
    with torch.no_grad():
        expected = qmodel(images)
        converted = msq_fx.convert(qmodel)(images)
    assert all(len(d["boxes"]) > 0 for d in expected)
    for fake_quant, lowered in zip(expected, converted):
        assert fake_quant.keys() == lowered.keys()
        assert all(torch.allclose(fake_quant[k].float(), lowered[k].float(), atol=1e-5)
                   for k in fake_quant)
