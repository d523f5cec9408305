"""MemMC-MAE (spmamba.methods.memmc_mae): its two operators against hand computations, the complementary test masks,
the presets, and the method (tiny preset) through train, save, load, detect and the CLI; 2-D images through detect
and the CLI. The app: tests/app/test_app_memmc_mae.py."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from monai.networks.blocks import CrossAttentionBlock, PatchEmbeddingBlock, SABlock, TransformerBlock
from PIL import Image

from spmamba.checkpoint import load_checkpoint
from spmamba.detector import Detector
from spmamba.io import load_volume, save_volume
from spmamba.methods import SLICE, get_method, method_names
from spmamba.methods.memmc_mae import (PRESETS, MemMCMAE, MemMCMAEConfig, MemorySABlock, MultiLevelCrossAttention,
                                       complementary_masks)
from spmamba.train import train_detector
from method_helpers import AFFINE, box_volume  # noqa: E402



# ------------------------------------------------------------------------------------------------ the operators
def test_memory_attention_is_attention_over_concatenated_keys_and_values():
    """One head, two tokens, one memory slot, identity projections: the numbers worked out by hand."""
    blk = MemorySABlock(hidden_size=2, num_heads=1, memory_slots=1)
    with torch.no_grad():
        blk.qkv.weight.copy_(torch.cat([torch.eye(2)] * 3))  # q = k = v = x
        blk.qkv.bias.zero_()
        blk.out_proj.weight.copy_(torch.eye(2))
        blk.out_proj.bias.zero_()
        # stored slots are scaled on use: keys by sqrt(d_head) = sqrt(2), values by sqrt(slots) = 1
        blk.memory_k.copy_(torch.tensor([[[[0.0, 2.0]]]]) / math.sqrt(2))
        blk.memory_v.copy_(torch.tensor([[[[5.0, -1.0]]]]))
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    # keys [x1; x2; m] = [[1, 0], [0, 1], [0, 2]], values [[1, 0], [0, 1], [5, -1]], scale 1/sqrt(2)
    keys = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    values = np.array([[1.0, 0.0], [0.0, 1.0], [5.0, -1.0]])
    expected = []
    for q in ([1.0, 0.0], [0.0, 1.0]):
        logits = keys @ np.array(q) / math.sqrt(2)
        w = np.exp(logits) / np.exp(logits).sum()
        expected.append(w @ values)
    # e.g. token 1: logits (0.707, 0, 0) -> weights (0.503, 0.249, 0.249): output (1.749, 0.0)
    np.testing.assert_allclose(expected[0], [1.7448, 0.0], atol=1e-3)
    np.testing.assert_allclose(blk(x)[0].detach().numpy(), np.array(expected), atol=1e-5)


def test_memory_attention_matches_the_formula_with_several_heads():
    torch.manual_seed(0)
    blk = MemorySABlock(hidden_size=8, num_heads=2, memory_slots=3).eval()
    x = torch.randn(2, 5, 8)
    h, dh, m = 2, 4, 3
    qkv = (x @ blk.qkv.weight.T + blk.qkv.bias).reshape(2, 5, 3, h, dh)
    outs = []
    for head in range(h):
        q, k, v = qkv[:, :, 0, head], qkv[:, :, 1, head], qkv[:, :, 2, head]
        k = torch.cat([k, math.sqrt(dh) * blk.memory_k[0, head].expand(2, m, dh)], dim=1)
        v = torch.cat([v, math.sqrt(m) * blk.memory_v[0, head].expand(2, m, dh)], dim=1)
        outs.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dh), dim=-1) @ v)
    expected = blk.out_proj(torch.cat(outs, dim=-1))
    torch.testing.assert_close(blk(x), expected, atol=1e-5, rtol=1e-5)


def test_without_memory_it_is_monais_self_attention():
    torch.manual_seed(1)
    blk = MemorySABlock(hidden_size=8, num_heads=2, memory_slots=0)
    ref = SABlock(8, 2, qkv_bias=True)
    ref.load_state_dict(blk.state_dict())
    x = torch.randn(3, 7, 8)
    torch.testing.assert_close(blk(x), ref(x), atol=1e-5, rtol=1e-5)


def test_multi_level_cross_attention_gates_each_level_and_sums():
    torch.manual_seed(2)
    mca = MultiLevelCrossAttention(hidden_size=8, num_heads=2, context_size=12, levels=3).eval()
    y = torch.randn(2, 6, 8)
    levels = [torch.randn(2, 4, 12) for _ in range(3)]
    expected = sum(torch.sigmoid(g(torch.cat([y, mca.attend(y, context=e)], -1))) * mca.attend(y, context=e)
                   for g, e in zip(mca.gates, levels)) / math.sqrt(3)
    torch.testing.assert_close(mca(y, levels), expected)
    assert isinstance(mca.attend, CrossAttentionBlock)
    # one level: plain cross-attention, no gate
    single = MultiLevelCrossAttention(hidden_size=8, num_heads=2, context_size=12, levels=1)
    assert len(single.gates) == 0
    torch.testing.assert_close(single(y, levels[:1]), single.attend(y, context=levels[0]))
    with pytest.raises(ValueError, match="3 encoder levels"):
        mca(y, levels[:2])


# ------------------------------------------------------------------------------------------------ test-time masks
@pytest.mark.parametrize("n_patches", [4, 17, 196, 256])
@pytest.mark.parametrize("n_masks", [2, 3, 4, 5])
def test_complementary_masks_show_every_patch_exactly_once_per_round(n_patches, n_masks):
    for r in (0, 1):
        masks = complementary_masks(n_patches, n_masks, r)
        assert len(masks) == n_masks
        everything = torch.cat(masks)
        assert torch.equal(torch.sort(everything).values, torch.arange(n_patches))  # each patch once
        sizes = [len(m) for m in masks]
        assert max(sizes) - min(sizes) <= 1
        assert all(torch.equal(a, b) for a, b in zip(masks, complementary_masks(n_patches, n_masks, r)))
    if n_patches > 4:
        assert not all(torch.equal(a, b) for a, b in zip(complementary_masks(n_patches, n_masks, 0),
                                                         complementary_masks(n_patches, n_masks, 1)))


def test_the_map_averages_the_error_over_the_masks_that_hid_each_pixel():
    """A stand-in network that copies the visible patches and misses every hidden pixel by 1: the error map is 1
    everywhere (it would be (K - 1) / K if the masks that showed a pixel counted too)."""
    cfg = MemMCMAE.get_config("tiny", test_rounds=2)
    model = MemMCMAE(cfg).eval()
    calls = []

    def network(x, visible):
        calls.append(visible[0].clone())
        out = model.patchify(x) + 1.0
        rows = torch.arange(x.shape[0]).unsqueeze(1)
        out[rows, visible] -= 1.0
        return out

    model.forward = network
    x = torch.rand(3, 1, cfg.image_size, cfg.image_size)
    err = model.reconstruction_error(x)
    assert err.shape == (3, cfg.image_size, cfg.image_size)
    torch.testing.assert_close(err, torch.ones_like(err))
    assert len(calls) == cfg.test_rounds * cfg.n_test_masks == 8
    for r in range(2):  # every round shows each patch once
        shown = torch.cat(calls[4 * r:4 * r + 4])
        assert torch.equal(torch.sort(shown).values, torch.arange(cfg.n_patches))


def test_training_masks_hide_the_preset_share_and_the_loss_counts_hidden_patches_only():
    torch.manual_seed(3)
    model = MemMCMAE("tiny")
    vis = model.random_visible(5, "cpu")
    assert vis.shape == (5, round(16 * 0.25)) and all(len(set(v.tolist())) == 4 for v in vis)
    calls = []

    def network(x, visible):  # perfect on the visible patches, off by 2 elsewhere
        calls.append(visible)
        out = model.patchify(x) + 2.0
        out[torch.arange(x.shape[0]).unsqueeze(1), visible] -= 2.0
        return out

    model.forward = network
    assert model.training_loss(torch.rand(4, 1, 32, 32)).item() == pytest.approx(4.0)


# ------------------------------------------------------------------------------------------------ presets / config
def test_presets_and_their_checks():
    assert "memmc_mae" in method_names() and get_method("memmc_mae") is MemMCMAE and MemMCMAE.kind == SLICE
    assert set(PRESETS) == {"paper", "fast", "tiny"} and MemMCMAE.default_preset == "fast"
    paper = PRESETS["paper"]  # ViT-B/16 at 224 with MAE's decoder
    assert (paper.image_size, paper.patch_size, paper.encoder_dim, paper.encoder_depth, paper.encoder_heads) == \
        (224, 16, 768, 12, 12)
    assert (paper.decoder_dim, paper.decoder_depth, paper.mask_ratio, paper.n_test_masks) == (512, 8, 0.75, 4)
    assert paper.level_layers == [2, 5, 8, 11]
    assert PRESETS["fast"].image_size == 128 and PRESETS["tiny"].image_size == 32
    cfg = MemMCMAE.get_config("tiny", memory_slots=0, decoder_levels=1, epochs=3)
    assert cfg.training.epochs == 3 and cfg.level_layers == [1]
    assert MemMCMAE.get_config(json.loads(json.dumps(cfg.to_dict()))) == cfg  # as stored in a model file
    for bad, words in [({"mask_ratio": 1.0}, "mask_ratio"), ({"mask_ratio": 0.01}, "hides none"), ({"patch_size": 5}, "multiple of patch_size"),
                       ({"decoder_levels": 5}, "decoder_levels"), ({"map_error": "l3"}, "map_error"),
                       ({"encoder_dim": 18}, "encoder_dim")]:
        with pytest.raises(ValueError, match=words):
            MemMCMAE.get_config("tiny", **bad)
    with pytest.raises(ValueError, match="choose one of paper, fast, tiny"):
        MemMCMAE.get_config("huge")
    with pytest.raises(ValueError, match="newer spmamba"):
        MemMCMAE.get_config({**cfg.to_dict(), "future_setting": 1})
    assert isinstance(MemMCMAEConfig().training.lr, float)


def test_built_on_monai_blocks():
    model = MemMCMAE("tiny")
    assert isinstance(model.patch_embed, PatchEmbeddingBlock)
    assert all(isinstance(layer.attn, SABlock) for layer in model.encoder)
    assert all(isinstance(layer, TransformerBlock) and isinstance(layer.cross_attn, MultiLevelCrossAttention)
               for layer in model.decoder)
    # fixed sin-cos positions are not trained
    assert not model.decoder_pos.requires_grad and not model.patch_embed.position_embeddings.requires_grad
    x = torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match="expects"):
        model(torch.rand(2, 1, 16, 16), model.random_visible(2, "cpu"))
    maps, scores = model.eval().score_slices(x)
    assert maps.shape == (2, 32, 32) and torch.equal(scores, maps.flatten(1).amax(1))


# ------------------------------------------------------------------------------------------------ the method
@pytest.fixture(scope="module")
def trained(normals, tmp_path_factory):
    path = tmp_path_factory.mktemp("memmc") / "memmc.pt"
    det = train_detector(normals, method="memmc_mae", config="tiny", device="cpu", checkpoint_path=path)
    return det, path


def test_train_save_load_detect(normals, trained):
    det, path = trained
    assert det.method_name == "memmc_mae" and det.config.name == "tiny"
    assert det.meta["training"]["epochs"] == 2 and det.meta["training"]["steps"] > 0
    cal = det.calibration
    assert np.isfinite(cal.pixel_threshold) and np.isfinite(cal.volume_threshold) and cal.n_volumes == 1
    obj = load_checkpoint(path)
    assert obj["method"] == "memmc_mae" and obj["config"]["name"] == "tiny" and "training_state" in obj
    loaded = Detector.load(path, device="cpu")
    x = box_volume(np.random.default_rng(5), lesion=True)
    a, b = det.detect(x, AFFINE), loaded.detect(x, AFFINE)
    assert loaded.version == det.version and np.array_equal(a.heatmap, b.heatmap) and a.score == b.score
    assert a.heatmap.shape == x.shape and np.isfinite(a.heatmap).all()
    assert (a.heatmap[~a.foreground] == 0).all() and a.heatmap[a.foreground].max() > 0
    # the test-time masks are deterministic: the same volume gives the same map
    assert np.array_equal(det.detect(x, AFFINE).heatmap, a.heatmap)


def test_resume_and_the_ablations(normals, trained, tmp_path):
    _, path = trained
    more = train_detector(normals, resume=path, epochs=3, device="cpu")
    assert more.method_name == "memmc_mae" and more.meta["training"]["epochs"] == 3
    with pytest.raises(ValueError, match="memmc_mae"):
        train_detector(normals, method="spmamba", resume=path, device="cpu")
    cfg = MemMCMAE.get_config("tiny", memory_slots=0, decoder_levels=1)
    det = train_detector(normals, method="memmc_mae", config=cfg, device="cpu", max_steps=1)
    det.save(tmp_path / "ablation.pt")
    loaded = Detector.load(tmp_path / "ablation.pt", device="cpu")
    assert loaded.config == cfg and not any("memory" in k for k in loaded.model.state_dict())


# ------------------------------------------------------------------------------------------------ CLI, 2-D images
def _xray(rng, lesion: bool = False) -> np.ndarray:
    """A 60 x 50 grey 'X-ray': a bright smooth field with noise; ``lesion`` adds a dark round spot."""
    yy, xx = np.mgrid[0:60, 0:50]
    img = 90 + 100 * np.exp(-(((yy - 30) / 22.0) ** 2 + ((xx - 25) / 18.0) ** 2)) + 4 * rng.standard_normal((60, 50))
    if lesion:
        img[(yy - 25) ** 2 + (xx - 20) ** 2 < 36] -= 60
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("xrays")
    rng = np.random.default_rng(2)
    for i in range(5):
        Image.fromarray(_xray(rng)).save(d / f"normal_{i}.png")
    (d / "test").mkdir()
    Image.fromarray(_xray(rng, lesion=True)).save(d / "test" / "spot.png")
    Image.fromarray(np.stack([_xray(rng)] * 3, -1)).save(d / "test" / "colour.jpg")
    return d


def test_cli_trains_and_detects_volumes(trained, tmp_path, capsys):
    from spmamba.cli import main
    from spmamba.demo import describe_model

    normal = tmp_path / "normal"
    rng = np.random.default_rng(1)
    for i in range(4):
        save_volume(box_volume(rng), AFFINE, normal / f"n{i}.nii.gz")
    save_volume(box_volume(rng, lesion=True), AFFINE, tmp_path / "test" / "a0.nii.gz")
    out = tmp_path / "m.pt"
    assert main(["train", "--method", "memmc_mae", "--config", "nosuch", "--normal", str(normal), "--out", str(out),
                 "-q"]) == 2
    assert "not a preset of method memmc_mae; choose one of paper, fast, tiny" in capsys.readouterr().err
    assert main(["train", "--method", "memmc_mae", "--config", "tiny", "--normal", str(normal), "--out", str(out),
                 "--max-steps", "2", "-q"]) == 0
    assert load_checkpoint(out)["method"] == "memmc_mae" and "method memmc_mae" in describe_model(out)
    assert main(["detect", "--model", str(out), str(tmp_path / "test"), "--out", str(tmp_path / "pred"), "-q"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "pred" / "scores.csv")))
    assert [r["id"] for r in rows] == ["a0"] and np.isfinite(float(rows[0]["score"]))
    assert load_volume(tmp_path / "pred" / "a0_anomaly.nii.gz").array.shape == (20, 24, 8)


def test_cli_trains_on_2d_images_and_detects_them(image_folder, tmp_path, capsys):
    from spmamba.cli import main

    out = tmp_path / "xray.pt"
    assert main(["train", "--method", "memmc_mae", "--config", "tiny", "--normal", str(image_folder), "--out",
                 str(out), "-q"]) == 0
    det = Detector.load(out, device="cpu")
    assert det.alignment is None and det.meta["training"]["n_slices"] == 4  # one slice per training image
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    pred = tmp_path / "pred"
    rc = main(["detect", "--model", str(out), str(image_folder / "test"), str(tmp_path / "broken.png"), "--out",
               str(pred), "--png", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "broken.png" in err  # the bad file is named and skipped, the others scored
    rows = {r["id"]: r for r in csv.DictReader(open(pred / "scores.csv"))}
    assert set(rows) == {"spot", "colour"}
    for sid, name in (("spot", "spot.png"), ("colour", "colour.jpg")):
        src, heat = load_volume(image_folder / "test" / name), load_volume(pred / f"{sid}_anomaly.nii.gz")
        assert heat.array.shape == src.array.shape == (50, 60, 1)
        np.testing.assert_allclose(heat.affine, src.affine)  # opens on the image in ITK-based viewers
        assert np.isfinite(heat.array).all() and heat.array.max() > 0
        assert (pred / f"{sid}_overlay.png").stat().st_size > 1000
    meta = json.loads((pred / "detect.json").read_text())
    assert meta["n_done"] == 2 and meta["n_failed"] == 1


def test_single_slice_images_of_any_orientation_through_detect(trained, tmp_path):
    """A model trained on volumes scores a one-slice image whatever plane it lies in (here a coronal X-ray's
    DICOM orientation): the heatmap has the image's shape, one slice score, 0 outside the foreground."""
    det, _ = trained
    rng = np.random.default_rng(4)
    img = box_volume(rng, lesion=True)[:, :, 4:5]  # (20, 24, 1)
    coronal = np.array([[-2.0, 0, 0, 100], [0, 0, -2.0, -50], [0, -2.0, 0, 200], [0, 0, 0, 1]])
    for affine in (AFFINE, coronal):
        res = det.detect(img, affine)
        assert res.heatmap.shape == img.shape and len(res.slice_scores) == 1
        assert np.isfinite(res.heatmap).all() and (res.heatmap[~res.foreground] == 0).all()
        assert res.heatmap[res.foreground].max() > 0 and np.isfinite(res.score)
    res2d = det.detect(img[:, :, 0], AFFINE)  # a plain 2-D array
    assert res2d.heatmap.shape == (20, 24)
