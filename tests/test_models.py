"""Models by name, and weights from a local file."""

import pytest
import torch

from lookaround_dist.models import CIFAR_DEPTHS, build_model, check_model_name, load_weights

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("name", sorted(CIFAR_DEPTHS))
def test_cifar_resnets_have_depth_and_3x3_stem(name):
    model = build_model(name, num_classes=10)
    assert model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1)
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    # 6n + 2 layers: 6n + 1 convolutions of 3x3 and the classifier.
    assert len(convolutions) + 1 == CIFAR_DEPTHS[name]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                                  "vgg19_bn", "vit_b_16"])
def test_torchvision_models_by_name(name):
    model = build_model(name, num_classes=7, image_size=224)
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert classifier.out_features == 7


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet21'; valid names: .*resnet20.*vit_b_16"):
        check_model_name("resnet21")


def test_local_weights_skip_mismatched_classifier(tmp_path):
    source = build_model("resnet20", num_classes=10)
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    target = build_model("resnet20", num_classes=100, weights_path=str(path))
    assert torch.equal(target.conv1.weight, source.conv1.weight)
    assert target.fc.out_features == 100, "a classifier of another shape keeps its fresh weights"


def test_weights_sharing_nothing_rejected(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"unrelated.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="shares no tensor"):
        load_weights(build_model("resnet20", 10), str(path))
