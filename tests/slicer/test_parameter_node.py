"""The module's state in a parameter node (as Slicer's scripted-module template keeps it): defaults, scripting, and a
scene saved to an .mrml file and loaded again (slicer-core, headless)."""
from __future__ import annotations

import numpy as np
import pytest
import slicer

nib = pytest.importorskip("nibabel")

from AnomalyDetectionLib import testing  # noqa: E402
from AnomalyDetectionLib.client import DetectionResult  # noqa: E402
from AnomalyDetectionLib.logic import (  # noqa: E402
    MODULE_NAME,
    PARAM_METHOD,
    PARAM_OPACITY,
    PARAM_SERVER_URL,
    PARAM_THRESHOLD,
    REF_HEATMAP,
    REF_INPUT_VOLUME,
    AnomalyLogic,
)


def _write_nifti(path, array_ijk):
    nib.save(nib.Nifti1Image(np.asarray(array_ijk, np.float32), testing.ijk_to_ras()), str(path))
    return str(path)


def _opacities():
    return [c.GetForegroundOpacity() for c in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")]


def _detected(logic, tmp_path, threshold=0.55):
    """An input volume from a file and the server's answer for it (heatmap file + JSON with regions)."""
    image, heat = testing.synthetic_arrays()
    reference = logic.load_volume(_write_nifti(tmp_path / "case.nii.gz", image), name="case")
    heat_path = _write_nifti(tmp_path / "case_anomaly.nii.gz", heat)
    regions = testing.expected_regions(threshold)
    result = DetectionResult(
        params={"score": 1.7, "threshold": 1.2, "pixel_threshold": threshold, "verdict": "abnormal",
                "model_version": "abc123", "regions": regions, "n_regions": len(regions)},
        heatmap_path=heat_path, image_id="case")
    return reference, result


def test_parameter_node_is_a_singleton_with_defaults(scene):
    logic = AnomalyLogic("myhost:8123", model="spmamba")
    node = logic.getParameterNode()
    assert node.GetClassName() == "vtkMRMLScriptedModuleNode"
    assert node.GetSingletonTag() == MODULE_NAME and node.GetModuleName() == MODULE_NAME
    assert logic.getParameterNode() is node
    assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    p = logic.parameters()
    assert (p.server_url, p.method, p.threshold, p.opacity, p.min_region_voxels) == (
        "http://myhost:8123", "spmamba", None, 0.5, 1)
    assert p.input_volume is None and p.heatmap is None
    # another Logic (another session of the module) finds the same node and keeps its values
    node.SetParameter(PARAM_METHOD, "baseline")
    other = AnomalyLogic("elsewhere:1")
    assert other.getParameterNode() is node
    assert other.parameters().method == "baseline" and other.parameters().server_url == "http://myhost:8123"


def test_logic_calls_write_the_parameter_node(scene, tmp_path):
    logic = AnomalyLogic()
    logic.set_server_url("otherhost:9000")
    logic.set_method("spmamba_baseline")
    assert logic.model == "spmamba_baseline"  # the older attribute name still works
    reference, result = _detected(logic, tmp_path)
    heat = logic.show_heatmap(reference, result.heatmap_path, result=result)
    node = logic.getParameterNode()
    assert node.GetParameter(PARAM_SERVER_URL) == "http://otherhost:9000"
    assert node.GetParameter(PARAM_METHOD) == "spmamba_baseline"
    assert node.GetNodeReference(REF_INPUT_VOLUME) is reference
    assert node.GetNodeReference(REF_HEATMAP) is heat
    assert float(node.GetParameter(PARAM_THRESHOLD)) == 0.55  # the server's pixel threshold
    assert _opacities() == [pytest.approx(0.5)] * 3  # the parameter node's opacity
    logic.set_threshold(heat, 0.65)
    logic.set_opacity(0.25)
    p = logic.parameters()
    assert p.threshold == 0.65 and p.opacity == 0.25


def test_parameters_are_scriptable(scene, tmp_path):
    """A script sets the node and asks the Logic to follow it (the panel does the same on every change)."""
    logic = AnomalyLogic()
    reference, result = _detected(logic, tmp_path)
    heat = logic.show_heatmap(reference, result.heatmap_path, result=result)
    logic.set_parameters(threshold=0.8, opacity=0.3, method="spmamba_baseline", server_url="scripted:1234",
                         min_region_voxels=2)
    p = logic.apply_parameters()
    display = heat.GetDisplayNode()
    assert display.GetWindowLevelMin() == pytest.approx(0.8)
    assert display.GetLowerThreshold() == float(np.float32(0.8))  # the rule ">=" in the heatmap's type (float32)
    assert _opacities() == [pytest.approx(0.3)] * 3
    assert logic.method == "spmamba_baseline" and logic.server_url == "http://scripted:1234"
    assert p.min_region_voxels == 2
    # plain Get/SetParameter on the node works as well
    logic.getParameterNode().SetParameter(PARAM_OPACITY, "0.9")
    logic.apply_parameters()
    assert _opacities() == [pytest.approx(0.9)] * 3
    with pytest.raises(TypeError):
        logic.set_parameters(thresold=1.0)


def test_scene_close_keeps_a_usable_parameter_node(scene):
    logic = AnomalyLogic("keep:1")
    logic.set_method("m2")
    scene.Clear(0)  # File -> Close scene: singletons are reset, not removed
    p = logic.parameters()
    assert p.server_url == "http://keep:1" and p.method == "m2" and p.opacity == 0.5  # defaults refilled
    assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1


def test_parameters_survive_scene_save_and_reload(scene, tmp_path):
    logic = AnomalyLogic("savedhost:8000")
    logic.set_method("spmamba_baseline")
    reference, result = _detected(logic, tmp_path)
    heat = logic.show_heatmap(reference, result.heatmap_path, result=result)
    logic.set_threshold(heat, 0.65)
    logic.set_opacity(0.35)
    logic.set_parameters(min_region_voxels=3)
    heat_id, reference_id = heat.GetID(), reference.GetID()

    # save: the volumes' storage nodes point at their files; Commit writes the .mrml
    mrml = tmp_path / "scene" / "anomaly.mrml"
    mrml.parent.mkdir()
    scene.SetURL(str(mrml))
    assert scene.Commit()
    text = mrml.read_text()
    assert 'singletonTag="AnomalyDetection"' in text and "Threshold 0.65" in text

    # load it into a fresh scene, with a fresh Logic that knows nothing
    loaded = slicer.vtkMRMLScene()
    slicer.mrmlScene = loaded
    testing.ensure_slice_views()
    loaded.SetURL(str(mrml))
    assert loaded.Connect()
    fresh = AnomalyLogic()  # defaults: 127.0.0.1, spmamba
    p = fresh.parameters()
    assert p.server_url == "http://savedhost:8000"
    assert p.method == "spmamba_baseline"
    assert p.threshold == 0.65 and p.opacity == 0.35 and p.min_region_voxels == 3
    assert p.heatmap is not None and p.heatmap.GetID() == heat_id
    assert p.input_volume is not None and p.input_volume.GetID() == reference_id
    assert p.heatmap.GetImageData().GetDimensions() == testing.SYNTHETIC_SHAPE_IJK
    assert loaded.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1

    fresh.apply_parameters()
    assert fresh.server_url == "http://savedhost:8000" and fresh.method == "spmamba_baseline"
    assert p.heatmap.GetDisplayNode().GetWindowLevelMin() == pytest.approx(0.65)
    assert _opacities() == [pytest.approx(0.35)] * 3
    # the server's regions were saved with the heatmap: at its threshold the table is the server's again
    _, table, regions = fresh.make_regions(p.heatmap, 0.55)
    assert fresh.regions_source == "server" and len(regions) == len(testing.expected_regions(0.55))

    # Import (File -> Add data -> scene) into a scene that already has a parameter node: the loaded values win
    other = slicer.vtkMRMLScene()
    slicer.mrmlScene = other
    before = AnomalyLogic("before:1").getParameterNode()
    other.SetURL(str(mrml))
    assert other.Import()
    after = AnomalyLogic().parameters()
    assert other.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
    assert other.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode") is before
    assert after.server_url == "http://savedhost:8000" and after.heatmap is not None


def test_parameters_and_regions_survive_an_mrb(scene, tmp_path):
    """A Slicer data bundle (.mrb: the .mrml and every node's data in one zip, what File -> Save offers by default).
    slicer-core writes it (``WriteToMRB``); it is read back by unpacking it and connecting to its .mrml."""
    logic = AnomalyLogic("mrbhost:8000")
    logic.set_method("spmamba")
    reference, result = _detected(logic, tmp_path)
    heat = logic.show_heatmap(reference, result.heatmap_path, result=result)
    logic.make_regions(heat)  # segmentation + table: no files yet, the bundle writes them
    logic.set_threshold(heat, 0.65)
    bundle = tmp_path / "case.mrb"
    assert scene.WriteToMRB(str(bundle))

    loaded = slicer.vtkMRMLScene()
    slicer.mrmlScene = loaded
    app_logic = slicer.vtkMRMLApplicationLogic()
    app_logic.SetMRMLScene(loaded)
    (tmp_path / "unpacked").mkdir()
    mrml = app_logic.UnpackSlicerDataBundle(str(bundle), str(tmp_path / "unpacked"))
    assert mrml
    loaded.SetURL(mrml)
    assert loaded.Connect()
    fresh = AnomalyLogic()
    p = fresh.parameters()
    assert (p.server_url, p.method, p.threshold) == ("http://mrbhost:8000", "spmamba", 0.65)
    assert p.heatmap.GetImageData().GetDimensions() == testing.SYNTHETIC_SHAPE_IJK
    table = fresh.regions_table(p.input_volume)
    assert [r.n_voxels for r in fresh.regions_from_table(table)] == [
        r["n_voxels"] for r in testing.expected_regions(0.55)]
    assert fresh.regions_from_table(table)[0].source == "server"
    assert fresh.server_regions(p.heatmap)["pixel_threshold"] == 0.55
