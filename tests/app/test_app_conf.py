"""``--conf`` validation: unknown keys, unknown presets and malformed values stop the server with one line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from app_helpers import APP_DIR, REPO, free_port


@pytest.fixture(scope="module")
def configs():
    sys.path.insert(0, str(APP_DIR))
    try:
        import lib.configs as configs

        yield configs
    finally:
        sys.path.remove(str(APP_DIR))


def test_every_library_preset_is_accepted(configs, tmp_path):
    from spmamba.models.config import PRESETS

    assert {"tiny", "fast", "paper"} <= set(PRESETS)
    for name in PRESETS:
        assert configs.parse_conf(str(tmp_path), "x", {"preset": name}).preset == name


def test_unknown_preset_is_refused_naming_the_presets(configs, tmp_path):
    with pytest.raises(configs.ConfError) as e:
        configs.parse_conf(str(tmp_path), "x", {"preset": "bogus"})
    msg = str(e.value)
    assert "preset" in msg and "bogus" in msg and "tiny" in msg and "fast" in msg and "paper" in msg
    assert "\n" not in msg


def test_method_is_validated_against_the_registry_and_presets_per_method(configs, tmp_path):
    s = configs.parse_conf(str(tmp_path), "x", {})
    assert (s.method, s.preset) == ("spmamba", "fast")
    s = configs.parse_conf(str(tmp_path), "x", {"method": "voxelwise"})
    assert (s.method, s.preset) == ("voxelwise", "default")  # the method's default preset
    with pytest.raises(configs.ConfError, match="method 'nosuch'.*spmamba, voxelwise"):
        configs.parse_conf(str(tmp_path), "x", {"method": "nosuch"})
    with pytest.raises(configs.ConfError, match="preset 'fast': unknown preset of method voxelwise.*default"):
        configs.parse_conf(str(tmp_path), "x", {"method": "voxelwise", "preset": "fast"})


def test_preset_ranking_is_per_method():
    sys.path.insert(0, str(APP_DIR))
    try:
        from lib.versions import weaker_preset_message
    finally:
        sys.path.remove(str(APP_DIR))
    served = {"preset": "paper", "version": "v1"}  # no 'method': an SP-Mamba model
    assert "weaker" in weaker_preset_message("tiny", served)
    assert weaker_preset_message("tiny", {**served, "method": "voxelwise"}) is None
    assert weaker_preset_message("default", {"method": "voxelwise", "preset": "default"}, "voxelwise") is None
    memmc = {**served, "method": "memmc_mae"}  # the same ladder
    assert "weaker" in weaker_preset_message("fast", memmc, "memmc_mae")
    assert weaker_preset_message("fast", memmc, "spmamba") is None  # another method's model is never compared


def test_unknown_key_is_refused_listing_the_valid_ones(configs, tmp_path):
    with pytest.raises(configs.ConfError) as e:
        configs.parse_conf(str(tmp_path), "x", {"typo_key": "1"})
    msg = str(e.value)
    assert "typo_key" in msg and "\n" not in msg
    for key in ("preset", "device", "model", "stop_grace_s", "auto_score"):
        assert key in msg
    with pytest.raises(ValueError) as e:  # ConfError is a ValueError: older callers keep working
        configs.parse_conf(str(tmp_path), "x", {"top_region": "3"})
    assert "top_region" in str(e.value) and "did you mean top_regions" in str(e.value)


def test_every_settings_field_and_monailabel_key_is_a_valid_key(configs, tmp_path):
    """New settings (e.g. keep_versions) are valid keys as soon as they are fields of AppSettings."""
    from dataclasses import fields

    keys = configs.settings.conf_keys()
    for f in fields(configs.AppSettings):
        if f.name not in ("app_dir", "extra", "dicomweb"):  # dicomweb: the --studies URL, not a --conf key
            assert f.name in keys
    assert "dicomweb" not in keys
    assert "keep_versions" in keys  # helper C's rollback setting
    s = configs.parse_conf(str(tmp_path), "x", {"server_mode": "true", "keep_versions": "3"})
    assert s.extra == {"server_mode": "true"}  # MONAI Label's own key passes through
    assert s.intensity_search_mm is None  # the library's default
    assert configs.parse_conf(str(tmp_path), "x", {"intensity_search_mm": "2.5"}).intensity_search_mm == 2.5


@pytest.mark.parametrize("conf", [{"device": "gpu"}, {"slice_axis": "7"}, {"epochs": "zero"},
                                  {"auto_score": "perhaps"}, {"min_normals": "0"}, {"intensity_search_mm": "-1"},
                                  {"intensity_search_mm": "wide"},
                                  {"intensity_search_mm": "4", "fusion": "none"}])
def test_malformed_values_name_the_key_in_one_line(configs, tmp_path, conf):
    with pytest.raises(configs.ConfError) as e:
        configs.parse_conf(str(tmp_path), "x", conf)
    assert list(conf)[0] in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_start_server_with_a_bad_setting_exits_with_one_line(tmp_path):
    """A real ``python -m monailabel.main start_server``: non-zero exit, the key named in stderr, no traceback.
    It runs a copy of the app (start_server writes logs/ into the app folder it is given)."""
    from app_folder_guard import app_copy

    app = app_copy(tmp_path / "app")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "lib")}
    cases = {"preset": ("bogus", "fast"), "typo_key": ("1", "valid keys"), "device": ("gpu", "cuda")}
    for key, (value, hint) in cases.items():
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app),
               "--studies", str(tmp_path / "studies"), "-i", "127.0.0.1", "-p", str(free_port()),
               "--conf", "model_dir", str(tmp_path / "model"), "--conf", key, value]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env, cwd=str(tmp_path))
        assert p.returncode != 0, (key, p.stderr[-2000:])
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("SP-Mamba app not started:")]
        assert len(lines) == 1, (key, p.stderr[-2000:])
        assert f"--conf {key}" in lines[0] and hint in lines[0], lines[0]
        assert "Traceback" not in p.stderr + p.stdout, (key, p.stderr[-3000:])
        assert "Uvicorn running" not in p.stderr + p.stdout


def test_training_request_with_an_unknown_preset_is_a_400(make_app, tiny_data):
    env = make_app({f"n{i}": p for i, p in enumerate(tiny_data["normal"][:3])},
                   curation={"n0": "normal", "n1": "normal", "n2": "normal"})
    r = env.client.post("/train/spmamba", json={"preset": "bogus", "max_epochs": 1})
    assert r.status_code == 400, r.text
    assert "bogus" in r.json()["detail"] and "tiny" in r.json()["detail"]
    assert env.client.get("/train/").status_code in (200, 404)
    assert env.client.get("/info/").json()["train_stats"].get("spmamba", {}).get("status") != "RUNNING"


def test_teacher_pretrain_is_validated_against_the_method(configs, tmp_path):
    assert configs.parse_conf(str(tmp_path), "x", {}).teacher_pretrain == "none"
    assert configs.parse_conf(str(tmp_path), "x", {"teacher_pretrain": "Inpaint"}).teacher_pretrain == "inpaint"
    assert configs.parse_conf(str(tmp_path), "x", {"teacher_pretrain": "denoise"}).teacher_pretrain == "denoise"
    with pytest.raises(configs.ConfError, match="teacher_pretrain 'jigsaw': expected none, inpaint, denoise"):
        configs.parse_conf(str(tmp_path), "x", {"teacher_pretrain": "jigsaw"})
    with pytest.raises(configs.ConfError, match="method voxelwise has no teacher"):
        configs.parse_conf(str(tmp_path), "x", {"method": "voxelwise", "teacher_pretrain": "inpaint"})


def test_dicomweb_studies_settings(configs, tmp_path):
    s = configs.parse_conf(str(tmp_path), "http://127.0.0.1:8042/dicom-web/",
                           {"dicomweb_cache": str(tmp_path / "c"), "dicomweb_modality": "mr,ct",
                            "pacs_results": "true", "dicomweb_refresh_s": "5"})
    assert s.dicomweb == "http://127.0.0.1:8042/dicom-web" and s.dicomweb_cache == str((tmp_path / "c").resolve())
    assert s.dicomweb_modality == "MR,CT" and s.pacs_results and s.dicomweb_refresh_s == 5
    assert s.seed_curation == ""  # no curation.csv beside a PACS
    local = configs.parse_conf(str(tmp_path), str(tmp_path), {})
    assert local.dicomweb == "" and local.dicomweb_cache == "" and not local.pacs_results
    with pytest.raises(configs.ConfError, match="dicomweb_modality"):
        configs.parse_conf(str(tmp_path), "http://x/dicom-web", {"dicomweb_modality": "MR;rm -rf"})
