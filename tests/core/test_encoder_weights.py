import time

import pytest
import torch

from spmamba.models import encoder as enc_mod
from spmamba.models.encoder import EncoderWeightsError, ResNetEncoder, load_encoder_weights


def test_local_torchvision_style_file_is_loaded(tmp_path):
    from monai.networks.nets import resnet18

    torch.manual_seed(1)
    src = resnet18(spatial_dims=2, n_input_channels=3, num_classes=1000, conv1_t_size=7, conv1_t_stride=2)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)  # torchvision's file format: a plain state dict with these names
    enc = ResNetEncoder("resnet18", str(path))
    assert torch.equal(enc.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    assert torch.equal(enc.stem[0].weight, src.conv1.weight)
    # wrapped state dicts ("state_dict" / DataParallel "module." prefixes) are accepted too
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "wrapped.pth")
    assert load_encoder_weights(str(tmp_path / "wrapped.pth"), "resnet18")["conv1.weight"].shape == (64, 3, 7, 7)


def test_wrong_architecture_or_bad_file_is_explained(tmp_path):
    from monai.networks.nets import resnet18

    torch.save(resnet18(spatial_dims=2, n_input_channels=3).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(EncoderWeightsError, match="do not fit resnet34"):
        ResNetEncoder("resnet34", str(tmp_path / "r18.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EncoderWeightsError, match="could not be read"):
        ResNetEncoder("resnet18", str(tmp_path / "junk.pth"))
    with pytest.raises(EncoderWeightsError, match="does not exist"):
        ResNetEncoder("resnet18", str(tmp_path / "missing.pth"))


def test_imagenet_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("SPMAMBA_CACHE", str(tmp_path / "cache"))
    # a closed local port stands in for an unreachable download server
    monkeypatch.setitem(enc_mod.IMAGENET_URLS, "resnet18", "http://127.0.0.1:9/resnet18-f37072fd.pth")
    t = time.perf_counter()
    with pytest.raises(EncoderWeightsError) as err:
        load_encoder_weights("imagenet", "resnet18", timeout=5)
    assert time.perf_counter() - t < 10
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and "--encoder-weights" in msg and str(tmp_path / "cache") in msg
    assert not list((tmp_path / "cache").glob("*"))  # no partial file left behind


def test_imagenet_uses_the_cached_file_without_network(tmp_path, monkeypatch):
    from monai.networks.nets import resnet18

    monkeypatch.setenv("SPMAMBA_CACHE", str(tmp_path))
    monkeypatch.setitem(enc_mod.IMAGENET_URLS, "resnet18", "http://127.0.0.1:9/resnet18-f37072fd.pth")
    torch.save(resnet18(spatial_dims=2, n_input_channels=3).state_dict(), tmp_path / "resnet18-f37072fd.pth")
    assert "layer1.0.conv1.weight" in load_encoder_weights("imagenet", "resnet18")


def test_none_means_random_frozen():
    assert load_encoder_weights("none", "resnet34") is None
    enc = ResNetEncoder("resnet18", "none")
    assert not any(p.requires_grad for p in enc.parameters())
