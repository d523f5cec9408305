"""Static checks of the extension: the .ui file, the Widget's use of it, CMake lists, and Qt-free Logic/client."""
from __future__ import annotations

import ast
import os
import re
import sys
import types
import unittest
import xml.etree.ElementTree as ET

import pytest

from slicer_paths import MODULE_DIR

EXT_DIR = os.path.dirname(MODULE_DIR)
MODULE_PY = os.path.join(MODULE_DIR, "AnomalyDetection.py")
UI_FILE = os.path.join(MODULE_DIR, "Resources", "UI", "AnomalyDetection.ui")
LIB_DIR = os.path.join(MODULE_DIR, "AnomalyDetectionLib")

# Widget classes the .ui may use: Qt's own plus the CTK/MRML ones Slicer registers for its designer plugins.
KNOWN_CLASSES = {
    "QWidget", "QLabel", "QLineEdit", "QPushButton", "QComboBox", "QCheckBox", "QSpinBox", "QTableWidget",
    "QProgressBar", "QVBoxLayout", "QHBoxLayout", "QFormLayout", "QGridLayout",
    "ctkCollapsibleButton", "ctkSliderWidget", "qMRMLNodeComboBox", "qMRMLWidget",
}


def _ui_widgets():
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def _ui_attributes_used():
    tree = ast.parse(open(MODULE_PY).read())
    used = set()
    for node in ast.walk(tree):
        # self.ui.<name>
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            used.add(node.attr)
    return used


def test_ui_parses_and_names_every_widget_the_widget_uses():
    widgets = _ui_widgets()
    assert widgets, "no widgets in the .ui file"
    used = _ui_attributes_used()
    assert len(used) > 20
    missing = sorted(used - set(widgets))
    assert not missing, f"AnomalyDetection.py uses self.ui.X for widgets missing from the .ui: {missing}"


def test_ui_names_are_unique_and_classes_known():
    root = ET.parse(UI_FILE).getroot()
    names = [w.get("name") for w in root.iter("widget")] + [w.get("name") for w in root.iter("layout")]
    assert len(names) == len(set(names)), "duplicate object names in the .ui"
    classes = {w.get("class") for w in root.iter("widget")} | {w.get("class") for w in root.iter("layout")}
    assert classes <= KNOWN_CLASSES, f"unknown widget classes: {classes - KNOWN_CLASSES}"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    assert {c for c in classes if not c.startswith("Q")} <= custom, "custom widgets must be declared in <customwidgets>"
    assert root.find("widget").get("class") == "qMRMLWidget"  # so setMRMLScene reaches the node selector


def test_ui_widget_kinds_match_their_use():
    widgets = _ui_widgets()
    assert widgets["inputVolumeSelector"] == "qMRMLNodeComboBox"
    assert widgets["methodComboBox"] == "QComboBox"  # the anomaly method (infer task), kept in the parameter node
    assert "modelComboBox" not in widgets
    assert widgets["thresholdSlider"] == widgets["opacitySlider"] == "ctkSliderWidget"
    assert widgets["trainingProgressBar"] == "QProgressBar"
    assert widgets["statusLabel"] == "QLabel"
    assert widgets["regionsTableWidget"] == "QTableWidget"
    root = ET.parse(UI_FILE).getroot()
    selector = [w for w in root.iter("widget") if w.get("name") == "inputVolumeSelector"][0]
    node_types = [s.text for p in selector.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
    assert node_types == ["vtkMRMLScalarVolumeNode"]


def _imports(path):
    tree = ast.parse(open(path).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names, tree


@pytest.mark.parametrize("filename", sorted(f for f in os.listdir(LIB_DIR) if f.endswith(".py")))
def test_logic_and_client_have_no_qt_and_no_spmamba(filename):
    path = os.path.join(LIB_DIR, filename)
    names, tree = _imports(path)
    forbidden = {n for n in names if n.split(".")[0] in ("qt", "ctk", "PythonQt", "spmamba", "PyQt5", "PySide2",
                                                        "requests", "httpx", "torch", "monai", "monailabel")}
    assert not forbidden, f"{filename} imports {forbidden}"
    assert names <= {"__future__", "os", "re", "json", "math", "mimetypes", "shutil", "socket", "tempfile", "weakref",
                     "urllib.error",
                     "urllib.parse", "urllib.request", "uuid", "dataclasses", "typing", "concurrent.futures",
                     "threading", "time", "numpy", "slicer", "vtk", "vtk.util",
                     "keyring", "keyring.backends",  # optional (credentials.py), imported when used
                     "SimpleITK"}, names  # Slicer bundles it: 2-D images are read with ITK's geometry, as the server
    source = open(path).read()
    assert "slicer.app" not in source and "slicer.modules" not in source


def test_module_file_follows_the_scripted_module_pattern():
    tree = ast.parse(open(MODULE_PY).read())
    classes = {c.name: [ast.unparse(b) for b in c.bases] for c in tree.body if isinstance(c, ast.ClassDef)}
    assert classes["AnomalyDetection"] == ["ScriptedLoadableModule"]
    assert classes["AnomalyDetectionWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert classes["AnomalyDetectionLogic"][0] == "ScriptedLoadableModuleLogic"
    assert classes["AnomalyDetectionTest"] == ["ScriptedLoadableModuleTest"]
    source = open(MODULE_PY).read()
    assert 'loadUI(self.resourcePath("UI/AnomalyDetection.ui"))' in source
    # no blocking network call in the Widget: every Logic call that talks to the server goes through self.run/runner
    for remote in ("connect", "run_detection", "mark", "curation_counts", "fetch_next_case", "start_training",
                   "stop_training", "training_progress", "model_versions", "rollback"):
        direct = re.findall(rf"self\.logic\.{remote}\(", source)
        assert not direct, f"the Widget calls logic.{remote}() on the GUI thread"


def test_cmake_lists_name_every_script_and_resource():
    ext = open(os.path.join(EXT_DIR, "CMakeLists.txt")).read()
    assert "find_package(Slicer REQUIRED)" in ext and "include(${Slicer_USE_FILE})" in ext
    assert "add_subdirectory(AnomalyDetection)" in ext
    mod = open(os.path.join(MODULE_DIR, "CMakeLists.txt")).read()
    assert "slicerMacroBuildScriptedModule" in mod and "WITH_GENERIC_TESTS" in mod
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in mod
    listed = set(re.findall(r"\$\{MODULE_NAME\}(\S*)", mod))
    for f in os.listdir(LIB_DIR):
        if f.endswith(".py"):
            assert f"Lib/{f}" in listed, f"{f} missing from the module's CMakeLists.txt"
    for res in ("Resources/Icons/AnomalyDetection.png", "Resources/UI/AnomalyDetection.ui"):
        assert os.path.isfile(os.path.join(MODULE_DIR, res))
    with open(os.path.join(MODULE_DIR, "Resources", "Icons", "AnomalyDetection.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _stub_qt_modules(monkeypatch):
    """Minimal stand-ins for qt, ctk and slicer.ScriptedLoadableModule so AnomalyDetection.py imports headless."""
    import slicer

    qt = types.ModuleType("qt")
    ctk = types.ModuleType("ctk")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "ctk", ctk)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", slm, raising=False)
    monkeypatch.delitem(sys.modules, "AnomalyDetection", raising=False)


def test_module_test_class_runs_headless(scene, monkeypatch):
    """The in-Slicer Test class (overlay + regions) passes on slicer-core when Qt is stubbed out."""
    _stub_qt_modules(monkeypatch)
    import AnomalyDetection

    parent = types.SimpleNamespace()
    AnomalyDetection.AnomalyDetection(parent)
    assert parent.title == "Anomaly Detection"
    monkeypatch.delenv("ANOMALY_DETECTION_TEST_SERVER", raising=False)
    test = AnomalyDetection.AnomalyDetectionTest()
    test.runTest()
    logic = AnomalyDetection.AnomalyDetectionLogic("localhost:9")
    assert logic.server_url == "http://localhost:9"
    sys.modules.pop("AnomalyDetection", None)  # imported against stubs: do not leave it for other tests
