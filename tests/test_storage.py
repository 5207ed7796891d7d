"""Object storage through pyarrow.fs against the session's S3 server (conftest): node-local copies of remote
files, and backbone weights named by a bucket URI."""

from __future__ import annotations

import dataclasses
import io

import pytest
import timm
import torch

from querypose import ModelConfig, build_model
from querypose_platform.storage import fetch_to_local, resolve_backbone_weights

TINY = ModelConfig(
    backbone="resnet10t", hidden_dim=32, ffn_dim=64, dynamic_dim=8, tower_channels=32, tower_convs=1,
    num_queries=6, num_stages=1, part_dim=32, num_heads=4,
)  # fmt: skip


def upload(s3, key: str, content: bytes) -> str:
    s3.client().put_object(Bucket=s3.uri(key).split("/")[2], Key=key, Body=content)
    return s3.uri(key)


def test_backbone_weights_from_the_bucket(s3, tmp_path):
    """A timm checkpoint in the bucket: resolved to a node-local copy, loaded into the built backbone."""
    checkpoint = timm.create_model("resnet10t", pretrained=False).state_dict()  # a classifier: fc.* is left out
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    uri = upload(s3, "storage-tests/weights/resnet10t.pth", buffer.getvalue())

    cfg = dataclasses.replace(TINY, backbone_weights=uri)
    resolved = resolve_backbone_weights(cfg)
    assert resolved.backbone_weights != uri and resolved.backbone_weights.endswith("resnet10t.pth")
    assert dataclasses.replace(resolved, backbone_weights=uri) == cfg  # nothing else changes
    body = build_model(resolved).backbone.body.state_dict()
    compared = [name for name in body if name in checkpoint]
    assert len(compared) > 20 and {name for name in body if not name.endswith("num_batches_tracked")} <= set(checkpoint)
    for name in compared:
        torch.testing.assert_close(body[name], checkpoint[name], msg=name)
    # local paths and hub names are the model library's to load: they pass through unchanged
    assert (
        resolve_backbone_weights(dataclasses.replace(TINY, backbone_weights="/data/r10.pth")).backbone_weights
        == "/data/r10.pth"
    )


def test_remote_files_are_fetched_once_per_version(s3, tmp_path):
    uri = upload(s3, "storage-tests/file.bin", b"first")
    first = fetch_to_local(uri, cache=tmp_path)
    assert first.read_bytes() == b"first"
    assert fetch_to_local(uri, cache=tmp_path) == first  # reused, not fetched again
    assert [p.name for p in first.parent.iterdir()] == ["file.bin"]  # no staging file left behind
    upload(s3, "storage-tests/file.bin", b"second version")
    second = fetch_to_local(uri, cache=tmp_path)
    assert second != first and second.read_bytes() == b"second version"
    with pytest.raises(FileNotFoundError, match="storage-tests/missing.bin"):
        fetch_to_local(s3.uri("storage-tests/missing.bin"), cache=tmp_path)
