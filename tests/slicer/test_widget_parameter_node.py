"""The Widget's parameter-node plumbing, headless: AnomalyDetection.py's real Widget class runs against stand-ins for
the Qt widgets of the .ui file (values + signals, nothing drawn) on a real MRML scene (slicer-core).

Checks what cannot be seen without Slicer: the GUI follows the parameter node (and a script that changes it), each
widget writes its own parameter, no feedback loop, a method list from /info/, a detection result sets the threshold
slider, and a scene closed, saved and loaded again restores the panel."""
from __future__ import annotations

import os
import sys
import types
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import slicer

nib = pytest.importorskip("nibabel")

from slicer_paths import MODULE_DIR  # noqa: E402
from AnomalyDetectionLib import testing  # noqa: E402
from AnomalyDetectionLib.client import DetectionResult, summarize_info  # noqa: E402

UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "AnomalyDetection.ui")


# ------------------------------------------------------------------------------------------------ Qt stand-ins
class _Widget:
    def __init__(self):
        self._slots = {}
        self.enabled = True
        self.toolTip = ""
        self.text = ""

    def connect(self, signal, fn):
        self._slots.setdefault(signal.split("(")[0], []).append(fn)

    def emit(self, name, *args):
        for fn in self._slots.get(name, []):
            fn(*args)

    def setStyleSheet(self, style):
        pass

    def hasFocus(self):
        return False


class _Valued(_Widget):
    """ctkSliderWidget / QSpinBox: setting ``value`` emits valueChanged when it changes."""

    def __init__(self):
        super().__init__()
        self._value = 0.0
        self.minimum, self.maximum, self.singleStep = 0.0, 1.0, 0.01

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, v):
        if v != self._value:
            self._value = v
            self.emit("valueChanged", v)


class _Combo(_Widget):
    def __init__(self):
        super().__init__()
        self.items, self._index = [], -1

    @property
    def count(self):
        return len(self.items)

    @property
    def currentIndex(self):
        return self._index

    @property
    def currentText(self):
        return self.items[self._index] if 0 <= self._index < len(self.items) else ""

    def setCurrentIndex(self, i):
        if i != self._index:
            self._index = i
            self.emit("currentIndexChanged", i)

    def addItem(self, text):
        self.items.append(text)
        if self._index < 0:
            self.setCurrentIndex(0)  # as QComboBox does

    def clear(self):
        self.items = []
        self.setCurrentIndex(-1)

    def findText(self, text):
        return self.items.index(text) if text in self.items else -1

    def setItemData(self, index, value, role):
        pass


class _NodeSelector(_Widget):
    def __init__(self):
        super().__init__()
        self._node = None

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.emit("currentNodeChanged", node)


class _Table(_Widget):
    def __init__(self):
        super().__init__()
        self.rows, self.cells = 0, {}

    def setColumnCount(self, n):
        pass

    def setHorizontalHeaderLabels(self, labels):
        pass

    def setRowCount(self, n):
        self.rows = n
        self.cells = {k: v for k, v in self.cells.items() if k[0] < n}

    def setItem(self, row, col, item):
        self.cells[(row, col)] = item

    def resizeColumnsToContents(self):
        pass


class _Progress(_Widget):
    def setValue(self, v):
        pass

    def setRange(self, a, b):
        pass


class _Check(_Widget):
    checked = False


FAKES = {"QComboBox": _Combo, "ctkSliderWidget": _Valued, "QSpinBox": _Valued, "qMRMLNodeComboBox": _NodeSelector,
         "QTableWidget": _Table, "QProgressBar": _Progress, "QCheckBox": _Check}


def _fake_ui():
    root = ET.parse(UI_FILE).getroot()
    return types.SimpleNamespace(**{w.get("name"): FAKES.get(w.get("class"), _Widget)()
                                    for w in root.iter("widget")})


def _stub_modules(monkeypatch, ui):
    qt = types.ModuleType("qt")

    class QTimer:
        def __init__(self):
            self.active = False

        def setInterval(self, ms):
            pass

        def connect(self, signal, fn):
            pass

        def start(self):
            self.active = True

        def stop(self):
            self.active = False

        def isActive(self):
            return self.active

    class QSettings:
        def setValue(self, key, value):
            pass

    class QTableWidgetItem:
        def __init__(self, text):
            self.text = text

        def setToolTip(self, text):
            self.toolTip = text

    qt.QTimer, qt.QSettings, qt.QTableWidgetItem = QTimer, QSettings, QTableWidgetItem
    qt.Qt = types.SimpleNamespace(ToolTipRole=3)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
            self.layout = types.SimpleNamespace(addWidget=lambda w: None)

        def setup(self):
            pass

        def resourcePath(self, path):
            return path

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleTest:
        pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "ctk", types.ModuleType("ctk"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: types.SimpleNamespace(setMRMLScene=lambda s: None))
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui)
    monkeypatch.setattr(slicer.util, "settingsValue", lambda key, default, **kw: "http://remembered:8000")
    monkeypatch.delitem(sys.modules, "AnomalyDetection", raising=False)


@pytest.fixture()
def widget(scene, monkeypatch):
    ui = _fake_ui()
    _stub_modules(monkeypatch, ui)
    import AnomalyDetection

    w = AnomalyDetection.AnomalyDetectionWidget(types.SimpleNamespace(isEntered=True))
    w.setup()
    yield w
    w.cleanup()
    sys.modules.pop("AnomalyDetection", None)  # imported against stand-ins: do not leave it for other tests


def _write_nifti(path, array_ijk):
    nib.save(nib.Nifti1Image(np.asarray(array_ijk, np.float32), testing.ijk_to_ras()), str(path))
    return str(path)


def _save_scene(scene, mrml):
    """What Slicer's Save dialog does for the module's nodes: data (regions segmentation and table; the volumes have
    their files already) to files beside the .mrml, then the .mrml."""
    for node in slicer.util.getNodesByClass("vtkMRMLStorableNode"):
        storage = node.GetStorageNode()
        if storage is None and node.GetAttribute("AnomalyDetection.Role"):
            node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
            extension = storage.GetDefaultWriteFileExtension().lstrip(".")
            storage.SetFileName(str(mrml.parent / f"{node.GetID()}.{extension}"))
            assert storage.WriteData(node), node.GetID()
    scene.SetURL(str(mrml))
    assert scene.Commit()


def _opacities():
    return [c.GetForegroundOpacity() for c in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")]


INFO = {"name": "app", "version": "1",
        "models": {"spmamba": {"type": "others", "labels": [], "model_version": "v1"},
                   "spmamba_seg": {"type": "segmentation", "labels": {"anomaly": 1}},
                   "voxel_baseline": {"type": "others", "labels": [], "description": "baseline",
                                      "model_version": "b1"}},
        "strategies": {"most_anomalous": {}}, "trainers": {"spmamba": {}}, "train_stats": {}}


def test_widget_follows_and_writes_the_parameter_node(widget, scene, tmp_path):
    ui, logic = widget.ui, widget.logic
    node = logic.getParameterNode()
    # a new scene: the remembered URL and the default method
    assert ui.serverUrlLineEdit.text == "http://remembered:8000" == node.GetParameter("ServerURL")
    assert ui.methodComboBox.currentText == "spmamba"
    widget.runner.shutdown()
    widget.runner = _NoRunner()  # Connect's follow-up calls (counts, versions, training) are not under test

    # Connect's answer: the heatmap methods only; picking one writes the parameter node
    widget.showSummary(summarize_info(INFO))
    assert ui.methodComboBox.items == ["spmamba", "voxel_baseline"]
    ui.methodComboBox.setCurrentIndex(1)
    assert node.GetParameter("Method") == "voxel_baseline" and logic.method == "voxel_baseline"
    assert ui.modelVersionLabel.text == "b1"
    ui.methodComboBox.setCurrentIndex(0)

    # a volume and a detection: the slider starts at the server's pixel threshold
    image, heat = testing.synthetic_arrays()
    volume = logic.load_volume(_write_nifti(tmp_path / "case.nii.gz", image), name="case")
    ui.inputVolumeSelector.setCurrentNode(volume)
    assert node.GetNodeReference("InputVolume") is volume
    regions = testing.expected_regions(0.55)
    result = DetectionResult(params={"score": 1.0, "threshold": 0.5, "pixel_threshold": 0.55, "verdict": "abnormal",
                                     "regions": regions, "n_regions": len(regions)},
                             heatmap_path=_write_nifti(tmp_path / "heat.nii.gz", heat), image_id="case")
    widget.showDetection(volume, result)
    heat_node = widget.currentHeatmap()
    assert heat_node is not None and node.GetNodeReference("Heatmap") is heat_node
    assert ui.thresholdSlider.value == 0.55 and ui.thresholdSlider.maximum == pytest.approx(0.9)
    assert ui.regionsButton.enabled and ui.thresholdSlider.enabled
    assert ui.verdictLabel.text == "ABNORMAL"

    # each widget writes its own parameter, and the Logic applies it
    ui.opacitySlider.value = 0.3
    assert node.GetParameter("Opacity") == "0.3" and _opacities() == [pytest.approx(0.3)] * 3
    assert node.GetParameter("Threshold") == "0.55"  # the opacity did not touch the threshold
    ui.thresholdSlider.value = 0.65
    assert float(node.GetParameter("Threshold")) == 0.65
    assert heat_node.GetDisplayNode().GetWindowLevelMin() == pytest.approx(0.65)
    ui.regionsButton.emit("clicked", False)
    assert ui.regionsTableWidget.rows == 2 and logic.regions_source == "heatmap"
    ui.thresholdSlider.value = 0.55
    ui.minRegionVoxelsSpinBox.value = 2
    assert node.GetParameter("MinRegionVoxels") == "2"
    ui.regionsButton.emit("clicked", False)
    assert logic.regions_source == "server" and ui.regionsTableWidget.rows == 2
    assert "the server's regions" in ui.statusLabel.text

    # a script changes the node: the panel and the views follow
    node.SetParameter("Opacity", "0.8")
    assert ui.opacitySlider.value == 0.8 and _opacities() == [pytest.approx(0.8)] * 3
    logic.set_parameters(threshold=0.7)
    assert ui.thresholdSlider.value == 0.7
    assert heat_node.GetDisplayNode().GetLowerThreshold() == float(np.float32(0.7))
    logic.set_parameters(threshold=0.55)

    # save, close, load: the panel comes back with the scene's values
    mrml = tmp_path / "saved" / "scene.mrml"
    mrml.parent.mkdir()
    _save_scene(scene, mrml)
    scene.Clear(0)
    assert widget.currentHeatmap() is None and ui.regionsTableWidget.rows == 0
    assert logic.getParameterNode().GetParameter("Opacity") == "0.5"  # a new scene: defaults again
    scene.SetURL(str(mrml))
    assert scene.Import()
    assert ui.opacitySlider.value == 0.8 and ui.minRegionVoxelsSpinBox.value == 2
    assert ui.methodComboBox.currentText == "spmamba" and ui.thresholdSlider.value == 0.55
    assert widget.currentHeatmap() is not None and ui.inputVolumeSelector.currentNode().GetName() == "case"
    assert ui.regionsTableWidget.rows == 2  # the regions table saved with the scene
    assert ui.regionsTableWidget.cells[(0, 0)].toolTip == "from the server"


class _NoRunner:
    def submit(self, *args, **kwargs):
        pass

    def busy(self, name=None):
        return False

    def poll(self):
        pass

    def shutdown(self):
        pass
