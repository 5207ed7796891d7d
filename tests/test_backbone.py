"""Pretrained backbone weights: a local file, a timm hub name read from a pre-populated cache with the hub offline,
and the errors that name model.backbone_weights."""

from __future__ import annotations

import dataclasses

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file
from torchvision.ops.misc import FrozenBatchNorm2d

from querypose import ModelConfig, build_model
from querypose.backbone import Backbone

SMALL = ModelConfig(backbone="resnet10t", hidden_dim=32, num_heads=4, part_dim=32)


def backbone(weights: str | None, **changes) -> Backbone:
    return Backbone(dataclasses.replace(SMALL, backbone_weights=weights, **changes))


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    """A full timm classification model, as ImageNet checkpoints hold it (the fc head included)."""
    torch.manual_seed(3)
    return timm.create_model("resnet10t", pretrained=False)


def assert_body_holds(body: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    for name, value in body.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        torch.testing.assert_close(value, expected[name], msg=name)


def test_local_file_loads_every_layer_and_freezes_bn_and_stem(classifier, tmp_path):
    path = tmp_path / "resnet10t.pth"
    torch.save(classifier.state_dict(), path)
    built = backbone(str(path))
    assert_body_holds(built.body, classifier)
    assert isinstance(built.body.bn1, FrozenBatchNorm2d)  # auto norm: frozen BN once weights are given
    assert not any(p.requires_grad for p in built.body.layer1.parameters())
    assert all(p.requires_grad for p in built.body.layer2.parameters())


def test_hub_name_resolves_from_the_cache_with_the_hub_offline(classifier, tmp_path, monkeypatch):
    # What huggingface_hub leaves in its cache after one download of timm/resnet10t.c3_in1k.
    repo = tmp_path / "hub" / "models--timm--resnet10t.c3_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(classifier.state_dict(), repo / "snapshots" / commit / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert_body_holds(backbone("timm/resnet10t.c3_in1k").body, classifier)
    with pytest.raises(ValueError, match=r"backbone_weights='timm/resnet10t.a1_in1k'.*Hugging Face cache"):
        backbone("timm/resnet10t.a1_in1k")


def test_weights_that_do_not_fit_are_named(classifier, tmp_path):
    partial = {k: v for k, v in classifier.state_dict().items() if not k.startswith("layer4.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth.*parameters were not in it, e\.g\. layer4\."):
        backbone(str(tmp_path / "partial.pth"))
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match=r"(?s)resnet18.pth.*could not load weights for 'resnet10t'.*size mismatch"):
        backbone(str(tmp_path / "resnet18.pth"))
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth.*could not load"):
        backbone(str(tmp_path / "junk.pth"))
    with pytest.raises(FileNotFoundError, match="model.backbone_weights: file .*missing.pth does not exist"):
        backbone(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="holds timm's 'resnet50', but the backbone is 'resnet10t'"):
        backbone("timm/resnet50.tv_in1k")
    with pytest.raises(ValueError, match="object-store URIs are fetched to a local file by the platform"):
        backbone("s3://bucket/resnet10t.pth")


def test_none_is_random_init_with_group_norm():
    built = build_model(dataclasses.replace(SMALL, backbone_weights="none", num_queries=4, num_stages=1))
    assert isinstance(built.backbone.body.bn1, torch.nn.GroupNorm)
    assert all(p.requires_grad for p in built.backbone.body.parameters())
