"""In-domain teacher pretraining (issue 10, lever 2): ``spmamba.models.pretrain``, ``train_detector(teacher_pretrain=
...)``, ``spmamba pretrain`` and ``spmamba train --teacher-pretrain / --encoder-weights TEACHER.pt``."""
from pathlib import Path

import pytest
import torch

from core_helpers import small_volumes
from spmamba.checkpoint import load_checkpoint, read_checkpoint_meta
from spmamba.cli import main
from spmamba.detector import Detector
from spmamba.io import save_volume
from spmamba.models import SPMamba, get_config
from spmamba.models.pretrain import (TEACHER_FORMAT, coarse_noise, mask_patches, pretrain_encoder,
                                     read_teacher_file)
from spmamba.train import train_detector

OLD = Path(__file__).resolve().parents[1] / "data" / "spmamba_v0_tiny.pt"
CONV = "encoder.layer1.0.conv1.weight"


def _state(det: Detector) -> dict:
    return {k: v.clone() for k, v in det.model.state_dict().items()}


def test_corruptions_mask_patches_and_add_noise_inside_the_foreground():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(8, 1, 64, 64)
    x[:, :, 16:48, 16:48] = 1.0
    masked, mask = mask_patches(x, 4, 0.4, g)
    assert masked.shape == mask.shape == x.shape
    assert 0.3 < float(mask.mean()) < 0.5  # about the ratio of 4x4 patches
    assert torch.all(masked[mask.bool()] == 0) and torch.equal(masked[~mask.bool()], x[~mask.bool()])
    noisy = coarse_noise(x, 0.2, 8, g)
    assert torch.equal(noisy[x == 0], x[x == 0])  # background untouched
    assert float((noisy - x)[x > 0].std()) > 0.05


@pytest.mark.parametrize("objective", ["inpaint", "denoise"])
def test_pretrain_encoder_learns_then_freezes_again(objective):
    torch.manual_seed(0)
    model = SPMamba(get_config("tiny"))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    slices = torch.rand(6, 1, 64, 64)
    events = []
    res = pretrain_encoder(model.encoder, model._encoder_input, slices, objective, steps=2, batch_size=4,
                           progress=events.append)
    assert res.steps == 2 and res.slices_seen == 8 and res.stop_reason is None and len(res.losses) == 2
    after = model.encoder.state_dict()
    assert not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    assert not torch.equal(before["stem.1.running_mean"], after["stem.1.running_mean"])  # BatchNorm trained too
    assert not any(p.requires_grad for p in model.encoder.parameters())  # frozen again
    assert not any(m.training for m in model.encoder.modules())
    assert [e["step"] for e in events] == [0, 1, 2] and {e["phase"] for e in events} == {"pretrain"}
    assert events[0]["total_steps"] == 2 and "loss" in events[-1]
    with pytest.raises(ValueError, match="inpaint, denoise"):
        pretrain_encoder(model.encoder, model._encoder_input, slices, "contrastive", steps=1)


def test_pretrain_encoder_stops_on_request_and_on_its_deadline():
    torch.manual_seed(0)
    model = SPMamba(get_config("tiny"))
    slices = torch.rand(6, 1, 64, 64)
    calls = []
    res = pretrain_encoder(model.encoder, model._encoder_input, slices, "inpaint", steps=50, batch_size=2,
                           should_stop=lambda: calls.append(1) or len(calls) > 2)
    assert res.steps == 2 and res.stop_reason == "stopped"
    import time
    res = pretrain_encoder(model.encoder, model._encoder_input, slices, "denoise", steps=50, batch_size=2,
                           deadline=time.time() - 1)
    assert res.steps == 0 and res.stop_reason == "time_limit"
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_training_with_pretraining_stores_the_new_encoder_and_records_the_teacher(tmp_path):
    kw = dict(config="tiny", epochs=1, device="cpu", max_steps=1, seed=0)
    plain = train_detector(small_volumes(5), **kw)
    assert plain.meta["teacher"] == {"source": "random"}
    events = []
    path = tmp_path / "m.pt"
    det = train_detector(small_volumes(5), teacher_pretrain="inpaint", pretrain_steps=2, checkpoint_path=path,
                         progress=events.append, **kw)
    rec = det.meta["teacher"]
    assert rec["source"] == "in-domain" and rec["init"] == {"source": "random"}
    assert rec["objective"] == "inpaint" and rec["steps"] == 2 and rec["slices_seen"] == 8 and rec["seconds"] > 0
    # the distillation's encoder is the pretrained one, saved in the model file (same seed: same initial weights)
    loaded = Detector.load(path, device="cpu")
    assert torch.equal(loaded.model.state_dict()[CONV], det.model.state_dict()[CONV])
    assert not torch.equal(loaded.model.state_dict()[CONV], plain.model.state_dict()[CONV])
    assert not any(p.requires_grad for p in loaded.model.encoder.parameters())
    meta = read_checkpoint_meta(path)["meta"]
    assert meta["teacher"] == rec and meta["training"]["teacher"] == rec
    # its BatchNorm statistics were re-estimated on the clean slices afterwards
    assert det.meta["encoder_norm"].startswith("adapted on")
    phases = [e["phase"] for e in events]
    assert phases.index("pretrain") < phases.index("encoder_norm") < phases.index("train")


def test_a_stop_during_pretraining_ends_training_cleanly():
    calls = []

    def stop():  # polled by the pretraining before each step: the third poll asks to stop
        calls.append(1)
        return len(calls) > 2

    det = train_detector(small_volumes(5), config="tiny", epochs=3, device="cpu", teacher_pretrain="denoise",
                         pretrain_steps=50, should_stop=stop)
    rec = det.meta["teacher"]
    assert rec["source"] == "in-domain" and rec["steps"] == 2 and rec["stop_reason"] == "stopped"
    assert det.meta["training"]["stop_reason"] == "stopped" and det.meta["training"]["steps"] == 0
    assert det.calibration.n_volumes >= 1 and det.calibration.pixel_threshold > 0


def test_a_stop_before_the_first_pretraining_step_keeps_the_random_teacher():
    det = train_detector(small_volumes(5), config="tiny", epochs=1, device="cpu", teacher_pretrain="inpaint",
                         should_stop=lambda: True)
    rec = det.meta["teacher"]
    assert rec["source"] == "random" and rec["pretraining"]["steps"] == 0
    assert rec["pretraining"]["stop_reason"] == "stopped"


def test_time_limit_gives_pretraining_a_share_only():
    import time

    t0 = time.time()
    det = train_detector(small_volumes(5), config="tiny", epochs=50, device="cpu", teacher_pretrain="inpaint",
                         pretrain_steps=100_000, time_limit=12)
    took = time.time() - t0
    rec = det.meta["teacher"]
    assert rec["stop_reason"] == "time_limit" and 0 <= rec["steps"] < 100_000
    assert rec["seconds"] <= 0.25 * 12 + 1.5  # at most a quarter of the time left (+ one step)
    assert det.meta["training"]["steps"] >= 1 and took < 12 + 10, took


def test_bad_library_options_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="choose none or one of inpaint, denoise"):
        train_detector(small_volumes(3), config="tiny", teacher_pretrain="jigsaw")
    with pytest.raises(ValueError, match="voxelwise has no teacher"):
        train_detector(small_volumes(3), method="voxelwise", teacher_pretrain="inpaint")
    with pytest.raises(ValueError, match="resumed model keeps its teacher"):
        train_detector(small_volumes(3), config="tiny", teacher_pretrain="inpaint", resume=str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="pretrain_steps"):
        train_detector(small_volumes(3), config="tiny", pretrain_steps=5)


def test_an_old_model_file_without_a_teacher_record_still_loads_and_detects():
    det = Detector.load(OLD, device="cpu")
    assert "teacher" not in det.meta and "teacher" not in (det.meta.get("training") or {})
    v = small_volumes(1, shape=(64, 64, 3))[0]
    res = det.detect(v.array, v.affine)
    assert res.heatmap.shape == v.array.shape and torch.isfinite(torch.as_tensor(res.heatmap)).all()


def _write_normals(folder: Path, n: int = 5) -> Path:
    folder.mkdir(parents=True)
    for i, v in enumerate(small_volumes(n)):
        save_volume(v.array, v.affine, folder / f"n{i}.nii.gz")
    return folder


def test_cli_pretrain_writes_a_teacher_that_train_accepts(tmp_path, capsys):
    normals = _write_normals(tmp_path / "normal")
    teacher = tmp_path / "teacher.pt"
    rc = main(["pretrain", "--normal", str(normals), "--out", str(teacher), "--config", "tiny", "--objective",
               "denoise", "--steps", "2", "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    assert "saved teacher" in capsys.readouterr().out
    obj = torch.load(teacher, weights_only=True)
    assert obj["format"] == TEACHER_FORMAT and obj["arch"] == "resnet18" and "layer3.1.conv2.weight" in obj["state_dict"]
    rec = read_teacher_file(teacher)
    assert rec["objective"] == "denoise" and rec["steps"] == 2 and rec["n_volumes"] == 4  # one of 5 held out
    assert rec["encoder_norm"].startswith("adapted on")
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temporary left
    model = tmp_path / "m.pt"
    rc = main(["train", "--normal", str(normals), "--out", str(model), "--config", "tiny", "--max-steps", "1",
               "--device", "cpu", "--encoder-weights", str(teacher), "-q"])
    assert rc == 0, capsys.readouterr().err
    payload = load_checkpoint(model)
    assert torch.equal(payload["state_dict"][CONV], obj["state_dict"]["layer1.0.conv1.weight"])
    # a pretrained file is kept as it is: its BatchNorm statistics (re-estimated by pretrain) are not adapted again
    assert torch.equal(payload["state_dict"]["encoder.stem.1.running_mean"], obj["state_dict"]["bn1.running_mean"])
    t = payload["meta"]["teacher"]
    assert t["source"] == "file" and t["file"] == str(teacher) and t["objective"] == "denoise" and t["steps"] == 2
    assert t["slices_seen"] == rec["slices_seen"] and len(t["digest"]) == 16


def test_cli_train_with_teacher_pretrain_records_it(tmp_path, capsys):
    normals = _write_normals(tmp_path / "normal")
    model = tmp_path / "m.pt"
    rc = main(["train", "--normal", str(normals), "--out", str(model), "--config", "tiny", "--max-steps", "1",
               "--device", "cpu", "--teacher-pretrain", "inpaint", "--pretrain-steps", "1", "-q"])
    assert rc == 0, capsys.readouterr().err
    t = read_checkpoint_meta(model)["meta"]["teacher"]
    assert t["source"] == "in-domain" and t["objective"] == "inpaint" and t["steps"] == 1
    from spmamba.demo import describe_model

    assert "teacher pretrained in domain (inpaint, 1 step)" in describe_model(model)
    assert "teacher" not in describe_model(OLD)  # an old file: nothing recorded, nothing claimed


@pytest.mark.parametrize("extra, message", [
    (["--teacher-pretrain", "jigsaw"], "--teacher-pretrain jigsaw: unknown objective; choose none, inpaint, denoise"),
    (["--pretrain-steps", "5"], "--pretrain-steps needs --teacher-pretrain"),
    (["--teacher-pretrain", "inpaint", "--pretrain-steps", "0"], "--pretrain-steps 0: must be >= 1"),
    (["--teacher-pretrain", "inpaint", "--method", "voxelwise"], "method voxelwise has no teacher to pretrain"),
    (["--teacher-pretrain", "inpaint", "--resume", "RESUME"], "a resumed model keeps its teacher"),
    (["--encoder-weights", "MISSING"], "--encoder-weights MISSING: no such file"),
])
def test_cli_train_refuses_bad_teacher_options(tmp_path, capsys, extra, message):
    normals = _write_normals(tmp_path / "normal", 3)
    extra = [str(tmp_path / e) if e in ("RESUME", "MISSING") else e for e in extra]
    (tmp_path / "RESUME").write_bytes(b"x")
    message = message.replace("MISSING", str(tmp_path / "MISSING"))
    rc = main(["train", "--normal", str(normals), "--out", str(tmp_path / "m.pt"), "--config", "tiny", "-q"] + extra)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_cli_pretrain_refuses_bad_options_and_foreign_teachers(tmp_path, capsys):
    normals = _write_normals(tmp_path / "normal", 3)
    base = ["pretrain", "--normal", str(normals), "--out", str(tmp_path / "t.pt"), "--config", "tiny", "-q"]
    assert main(base + ["--objective", "jigsaw"]) == 2
    assert "--objective jigsaw: unknown objective" in capsys.readouterr().err
    assert main(base + ["--steps", "0"]) == 2
    assert "--steps 0: must be >= 1" in capsys.readouterr().err
    assert main(base + ["--time-limit", "-1"]) == 2
    assert "--time-limit -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not both
        main(base + ["--steps", "2", "--time-limit", "1"])
    assert not (tmp_path / "t.pt").exists()
    # a resnet18 teacher (tiny) given to a resnet34 preset (fast): a clear error, exit 2
    assert main(base[:-1] + ["--steps", "1", "--device", "cpu", "-q"]) == 0
    capsys.readouterr()
    rc = main(["train", "--normal", str(normals), "--out", str(tmp_path / "m.pt"), "--config", "fast",
               "--max-steps", "1", "--device", "cpu", "--encoder-weights", str(tmp_path / "t.pt"), "-q"])
    assert rc == 2 and "do not fit resnet34" in capsys.readouterr().err
