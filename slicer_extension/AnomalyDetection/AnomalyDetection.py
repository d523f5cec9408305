"""Anomaly Detection: SP-Mamba heatmaps, curation and retraining from 3D Slicer.

Standard scripted-module pattern:

* ``AnomalyDetection``        module description;
* ``AnomalyDetectionWidget``  Qt only and thin: reads widgets, calls the Logic, shows results;
                              every server call runs in a worker thread (``TaskRunner``) polled by a QTimer;
                              the module's state (server URL, method, threshold, opacity, input volume,
                              heatmap) lives in the Logic's parameter node, as in the scripted-module template
                              (updateGUIFromParameterNode / updateParameterNodeFromGUI);
* ``AnomalyDetectionLogic``   the module logic (MRML + server client) from ``AnomalyDetectionLib`` - no Qt;
* ``AnomalyDetectionTest``    runs inside Slicer (Developer mode -> Reload and Test, or ctest).
"""
import logging
import os
import tempfile

import ctk  # noqa: F401 - loaded for the .ui file's ctk widgets
import qt
import slicer
import vtk  # noqa: F401
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from AnomalyDetectionLib.client import (
    CURATION_STATES,
    DEFAULT_MODEL,
    DEFAULT_URL,
    UNREVIEWED,
    ServerError,
    train_progress,
)
from AnomalyDetectionLib import credentials
from AnomalyDetectionLib.logic import REF_HEATMAP, AnomalyLogic
from AnomalyDetectionLib.tasks import TaskRunner

SETTINGS_URL_KEY = "AnomalyDetection/ServerURL"
SETTINGS_USER_KEY = "AnomalyDetection/UserName"  # the password is never in the settings (keyring or nothing)
POLL_INTERVAL_MS = 100
TRAIN_POLL_INTERVAL_MS = 2000


#
# AnomalyDetection
#
class AnomalyDetection(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Anomaly Detection"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["SP-Mamba contributors"]
        self.parent.helpText = (
            "Unsupervised anomaly detection with SP-Mamba served by a MONAI Label app: detect anomalies as a heatmap "
            "overlay, turn them into regions, curate studies (normal / abnormal / excluded) and retrain the model "
            "on the studies marked normal. See docs/SLICER.md in the project."
        )
        self.parent.acknowledgementText = (
            "SP-Mamba (arXiv 2507.19076); built on MONAI Label and 3D Slicer's scripted module template."
        )


#
# AnomalyDetectionWidget
#
class AnomalyDetectionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Thin Qt layer: each button starts one Logic call in a worker thread and shows its result."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.runner = None
        self.summary = None
        self.regionsTable = None
        self.lastVersion = ""
        self.versions = None  # ModelVersions shown in versionsComboBox
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._shownHeatmapID = None  # heatmap whose regions the table widget shows
        self._shownMethod = None  # method whose model version the panel shows

    # ----------------------------------------------------------------------------------------------- set-up
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnomalyDetection.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        url = slicer.util.settingsValue(SETTINGS_URL_KEY, DEFAULT_URL)
        self.ui.serverUrlLineEdit.text = url
        self.logic = AnomalyDetectionLogic(url)
        self.runner = TaskRunner()

        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.runner.poll)
        self.pollTimer.start()
        self.trainTimer = qt.QTimer()
        self.trainTimer.setInterval(TRAIN_POLL_INTERVAL_MS)
        self.trainTimer.connect("timeout()", self.pollTraining)

        self.setupSignIn()

        self.ui.regionsTableWidget.setColumnCount(len(self.logic.REGION_COLUMNS))
        self.ui.regionsTableWidget.setHorizontalHeaderLabels(list(self.logic.REGION_COLUMNS))

        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.serverUrlLineEdit.connect("returnPressed()", self.onConnect)
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.updateParameterNodeFromGUI)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.detectButton.connect("clicked(bool)", self.onDetect)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.thresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.minRegionVoxelsSpinBox.connect("valueChanged(int)", self.onMinRegionVoxelsChanged)
        self.ui.regionsButton.connect("clicked(bool)", self.onRegions)
        self.ui.regionsTableWidget.connect("cellClicked(int,int)", self.onRegionClicked)
        self.ui.markNormalButton.connect("clicked(bool)", lambda: self.onMark("normal"))
        self.ui.markAbnormalButton.connect("clicked(bool)", lambda: self.onMark("abnormal"))
        self.ui.markExcludedButton.connect("clicked(bool)", lambda: self.onMark("excluded"))
        self.ui.nextCaseButton.connect("clicked(bool)", self.onNextCase)
        self.ui.refreshCountsButton.connect("clicked(bool)", self.onRefreshCounts)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.stopTrainingButton.connect("clicked(bool)", self.onStopTraining)
        self.ui.rollbackButton.connect("clicked(bool)", self.onRollback)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.initializeParameterNode()
        self.updateButtons()

    def setupSignIn(self):
        """Sign-in row (servers with sign-in on) and 'Store results in the PACS' (servers on a PACS)."""
        self.ui.userLineEdit.text = slicer.util.settingsValue(SETTINGS_USER_KEY, "")
        self.ui.rememberPasswordCheckBox.enabled = credentials.available()
        self.ui.rememberPasswordCheckBox.checked = credentials.available()
        if not credentials.available():
            self.ui.rememberPasswordCheckBox.toolTip = ("No system keyring in Slicer's Python "
                                                        "(slicer.util.pip_install('keyring')): the password is kept "
                                                        "for this session only")
        self.ui.storeInPacsCheckBox.visible = False
        self.ui.storeInPacsCheckBox.connect("toggled(bool)",
                                            lambda on: setattr(self.logic, "store_in_pacs", bool(on)))
        self.ui.signInButton.connect("clicked(bool)", self.onSignIn)
        self.ui.passwordLineEdit.connect("returnPressed()", self.onSignIn)

    def onSignIn(self, *unused):
        self.applyServerUrl()
        user = self.ui.userLineEdit.text.strip()
        password = self.ui.passwordLineEdit.text
        self.ui.passwordLineEdit.text = ""
        if not user:
            self.setStatus("Enter your user name (and password) first.", error=True)
            return
        qt.QSettings().setValue(SETTINGS_USER_KEY, user)

        def done(result):
            stored, summary = result
            self.showSummary(summary)
            self.setStatus(f"Signed in to {self.logic.server_url} as {user}"
                           + ("; the password is in the system keyring." if stored and password else "."))

        self.run("connect", f"Signing in to {self.logic.server_url} ...", self.logic.sign_in_and_connect, user,
                 password, bool(self.ui.rememberPasswordCheckBox.checked), onDone=done)

    def cleanup(self):
        self.removeObservers()
        for timer in (getattr(self, "pollTimer", None), getattr(self, "trainTimer", None)):
            if timer is not None:
                timer.stop()
        if self.runner is not None:
            self.runner.shutdown()
        if self.logic is not None:
            self.logic.close()  # the temporary scans and heatmaps

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # stop following the node while the module is hidden (the template's rule); enter() picks it up again
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)
        self.regionsTable = None
        self._shownHeatmapID = None
        self.ui.regionsTableWidget.setRowCount(0)
        self.ui.scoreLabel.text = "-"
        self.ui.verdictLabel.text = "-"
        self.updateButtons()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event):
        # a loaded scene brings its own parameter node values (URL, method, threshold, heatmap ...)
        self._shownHeatmapID = None
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ----------------------------------------------------------------------------------------------- parameter node
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        p = self.logic.parameters()
        if p.input_volume is None:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and first.GetAttribute("AnomalyDetection.Role") is None:
                self.logic.set_parameters(input_volume=first)

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = parameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def currentHeatmap(self):
        heat = self._parameterNode.GetNodeReference(REF_HEATMAP) if self._parameterNode is not None else None
        return heat if heat is not None and heat.GetImageData() is not None else None

    def updateGUIFromParameterNode(self, caller=None, event=None):
        """Show the parameter node's values, then let the Logic apply them (URL, method, threshold, opacity)."""
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            p = self.logic.parameters()
            if not self.ui.serverUrlLineEdit.hasFocus():
                self.ui.serverUrlLineEdit.text = p.server_url
            index = self.ui.methodComboBox.findText(p.method)
            if index < 0 and p.method:
                self.ui.methodComboBox.addItem(p.method)  # not connected yet: show the remembered method
                index = self.ui.methodComboBox.findText(p.method)
            self.ui.methodComboBox.setCurrentIndex(index)
            if self.summary is not None and p.method != self._shownMethod:  # another method: its model version
                self.ui.modelVersionLabel.text = self.summary.model_version(p.method) or "(none yet)"
            self._shownMethod = p.method
            self.ui.inputVolumeSelector.setCurrentNode(p.input_volume)
            self.ui.opacitySlider.value = p.opacity
            self.ui.minRegionVoxelsSpinBox.value = p.min_region_voxels
            heat = self.currentHeatmap()
            if heat is not None:
                lo, hi = self.logic.heatmap_range(heat)
                threshold = p.threshold if p.threshold is not None else lo
                self.ui.thresholdSlider.minimum = min(lo, threshold)
                self.ui.thresholdSlider.maximum = max(hi, threshold)
                self.ui.thresholdSlider.singleStep = max((hi - lo) / 1000.0, 1e-6)
                self.ui.thresholdSlider.value = threshold
            if heat is None or heat.GetID() != self._shownHeatmapID:
                self._shownHeatmapID = heat.GetID() if heat is not None else None
                self.showRegionsFromScene(heat)
        finally:
            self._updatingGUIFromParameterNode = False
        self.logic.apply_parameters()  # may write the node again (same values): converges at once
        self.updateButtons()

    def updateParameterNodeFromGUI(self, caller=None, event=None):
        """Server URL typed by the user (the other widgets write their own parameter when they change)."""
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        url = self.ui.serverUrlLineEdit.text.strip()
        if url:
            self.logic.set_parameters(server_url=url)

    # ----------------------------------------------------------------------------------------------- helpers
    def setStatus(self, text, error=False):
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")
        (logging.warning if error else logging.info)(f"AnomalyDetection: {text}")

    def showError(self, exc):
        if isinstance(exc, ServerError):
            self.setStatus(str(exc), error=True)
        else:
            logging.exception("AnomalyDetection", exc_info=exc)
            self.setStatus(f"Unexpected error: {exc} (details in the Python console / application log).", error=True)
        self.updateButtons()

    def run(self, name, busyText, fn, *args, onDone=None):
        """Run ``fn(*args)`` off the GUI thread; ``onDone(result)`` then runs on the GUI thread."""
        self.setStatus(busyText)

        def done(result):
            try:
                if onDone is not None:
                    onDone(result)
            except Exception as e:  # noqa: BLE001 - show every failure in the status line
                self.showError(e)
            self.updateButtons()

        self.runner.submit(name, fn, *args, on_done=done, on_error=self.showError)
        self.updateButtons()

    def currentVolume(self):
        return self.ui.inputVolumeSelector.currentNode()

    def updateButtons(self, *unused):
        if self.runner is None:
            return
        volume = self.currentVolume()
        self.ui.connectButton.enabled = not (self.runner and self.runner.busy("connect"))
        self.ui.detectButton.enabled = volume is not None and not self.runner.busy("detect")
        hasHeat = self.currentHeatmap() is not None
        self.ui.regionsButton.enabled = hasHeat
        self.ui.thresholdSlider.enabled = hasHeat
        hasStudy = volume is not None and bool(self.logic.study_id(volume))
        for button in (self.ui.markNormalButton, self.ui.markAbnormalButton, self.ui.markExcludedButton):
            button.enabled = hasStudy and not self.runner.busy("mark")
        self.ui.nextCaseButton.enabled = self.ui.strategyComboBox.count > 0 and not self.runner.busy("next")
        training = self.trainTimer.isActive() if hasattr(self, "trainTimer") else False
        self.ui.startTrainingButton.enabled = not training and not self.runner.busy("train")
        self.ui.stopTrainingButton.enabled = training
        self.ui.rollbackButton.enabled = (self.ui.versionsComboBox.count > 1 and not training
                                          and not self.runner.busy("rollback"))

    def applyServerUrl(self):
        url = self.ui.serverUrlLineEdit.text.strip() or DEFAULT_URL
        self.logic.set_server_url(url)  # -> the parameter node (saved with the scene)
        self.ui.serverUrlLineEdit.text = self.logic.server_url
        qt.QSettings().setValue(SETTINGS_URL_KEY, self.logic.server_url)  # the default of a new scene

    # ----------------------------------------------------------------------------------------------- server
    def onConnect(self, *unused):
        self.applyServerUrl()
        self.run("connect", f"Connecting to {self.logic.server_url} ...", self.logic.connect_signed_in,
                 self.ui.userLineEdit.text.strip(), onDone=self.showSummary)

    def showSummary(self, summary):
        self.summary = summary
        self.ui.storeInPacsCheckBox.visible = summary.pacs
        wanted = self.logic.parameters().method
        self._updatingGUIFromParameterNode = True
        try:
            self.ui.methodComboBox.clear()
            for i, name in enumerate(summary.models):
                self.ui.methodComboBox.addItem(name)
                self.ui.methodComboBox.setItemData(i, summary.description(name) or name, qt.Qt.ToolTipRole)
            strategy = self.ui.strategyComboBox.currentText
            self.ui.strategyComboBox.clear()
            for name in summary.strategies:
                self.ui.strategyComboBox.addItem(name)
            if strategy in summary.strategies:
                self.ui.strategyComboBox.setCurrentIndex(summary.strategies.index(strategy))
        finally:
            self._updatingGUIFromParameterNode = False
        missing = ""
        method = wanted
        if summary.models and wanted not in summary.models:
            method = DEFAULT_MODEL if DEFAULT_MODEL in summary.models else summary.models[0]
            missing = f" This server has no method '{wanted}'; using '{method}'."
        self.logic.set_method(method)
        self.updateGUIFromParameterNode()  # selects the method in the combo box
        version = summary.model_version(self.logic.method)
        self.lastVersion = version
        self.ui.modelVersionLabel.text = version or "(none yet)"
        percent, text = train_progress(summary.train_stats, self.logic.train_task)
        self.ui.serverInfoLabel.text = (
            f"{summary.name} {summary.version}: methods {', '.join(summary.models) or 'none'}; "
            f"strategies {', '.join(summary.strategies) or 'none'}; training ({self.logic.train_task}): {text}"
        )
        if not summary.models:
            self.setStatus("Connected, but the server has no anomaly method (no infer task returns a heatmap): "
                           "check the app.", error=True)
        elif missing:
            self.setStatus(f"Connected to {self.logic.server_url}.{missing}", error=True)
        elif not version:
            self.setStatus("Connected. No trained model yet: mark normal studies in Curate, then Start training.")
        else:
            self.setStatus(f"Connected to {self.logic.server_url}.")
        self.onRefreshCounts()
        self.onRefreshVersions()
        self.run("train-poll", "Checking training state ...", self.logic.training_progress, onDone=self.showTraining)

    def onMethodChanged(self, *unused):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        if self.ui.methodComboBox.currentText:
            self.logic.set_method(self.ui.methodComboBox.currentText)  # -> parameter node -> GUI

    def onInputVolumeChanged(self, node):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            self.updateButtons()
            return
        # the threshold slider follows the heatmap of the chosen volume (none yet: the slider is disabled)
        heat = self.logic.find_heatmap(node) if node is not None else None
        threshold = heat.GetAttribute("AnomalyDetection.displayThreshold") if heat is not None else None
        self.logic.set_parameters(input_volume=node, heatmap=heat,
                                  threshold=float(threshold) if threshold else None)

    # ----------------------------------------------------------------------------------------------- detect
    def onDetect(self, *unused):
        volume = self.currentVolume()
        if volume is None:
            self.setStatus("Select an input volume first.", error=True)
            return
        self.applyServerUrl()
        try:
            job = self.logic.prepare_detection(volume, self.ui.addToStudiesCheckBox.checked)
        except Exception as e:  # noqa: BLE001
            self.showError(e)
            return
        self.run("detect", f"Detecting anomalies in {volume.GetName()} (the server may take a while) ...",
                 self.logic.run_detection, job, onDone=lambda result: self.showDetectionOf(job, volume, result))

    def showDetectionOf(self, job, volume, result):
        """As showDetection, then what differed from the request (job.note) and where the PACS stored the results."""
        self.showDetection(volume, result)
        extra = [job.note] if job.note else []
        pacs = result.params.get("pacs") if isinstance(result.params.get("pacs"), dict) else None
        if pacs:
            extra.append("Stored in the PACS (anomaly map and regions)." if pacs.get("stored") else
                         f"Not stored in the PACS: {pacs.get('error')}")
        if extra:
            self.setStatus(" ".join([self.ui.statusLabel.text] + extra), error=bool(pacs and not pacs.get("stored")))

    def showDetection(self, volume, result):
        if not slicer.mrmlScene.IsNodePresent(volume):
            self.logic.discard(result.heatmap_path)
            self.setStatus("The input volume was closed before the result arrived.", error=True)
            return
        # the Logic writes input, heatmap and threshold (the server's pixel threshold) into the parameter node,
        # whose Modified event sets the slider range and value (updateGUIFromParameterNode)
        self.logic.show_heatmap(volume, result.heatmap_path, result=result)
        score = "-" if result.score is None else f"{result.score:.4g}"
        if result.threshold is not None:
            score += f"  (threshold {result.threshold:.4g})"
        self.ui.scoreLabel.text = score
        verdict = result.verdict
        self.ui.verdictLabel.text = verdict.upper() if verdict == "abnormal" else verdict
        self.ui.verdictLabel.setStyleSheet("color: #c0392b; font-weight: bold;" if verdict == "abnormal" else "")
        if result.model_version:
            self.ui.modelVersionLabel.text = result.model_version
        self.ui.regionsTableWidget.setRowCount(0)
        self.regionsTable = None
        warning = getattr(self.logic, "geometry_warning", "")
        aligned = f"{result.alignment_text[0].upper()}{result.alignment_text[1:]}. " if result.alignment_text else ""
        self.setStatus(f"{volume.GetName()}: {verdict} (score {score}). {aligned}{warning}".strip(),
                       error=bool(warning))

    # each widget writes only its own parameter (so moving the opacity never rounds the server's threshold)
    def onOpacityChanged(self, value):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self.logic.set_parameters(opacity=value)

    def onThresholdChanged(self, value):
        if self._parameterNode is None or self._updatingGUIFromParameterNode or self.currentHeatmap() is None:
            return
        self.logic.set_parameters(threshold=value)

    def onMinRegionVoxelsChanged(self, value):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self.logic.set_parameters(min_region_voxels=value)

    def onRegions(self, *unused):
        heat = self.currentHeatmap()
        if heat is None:
            return
        p = self.logic.parameters()
        try:
            # threshold None: the heatmap's display threshold, i.e. the parameter node's (exact, not the slider's
            # rounded value), so the server's regions are used while it is the server's pixel threshold
            seg, table, regions = self.logic.make_regions(heat, None, p.min_region_voxels)
        except Exception as e:  # noqa: BLE001
            self.showError(e)
            return
        self.regionsTable = table
        self.fillRegionsTable(regions)
        threshold = float(heat.GetAttribute("AnomalyDetection.displayThreshold") or 0.0)
        source = {"server": "the server's regions", "server+heatmap": "the server's regions, completed here"}.get(
            self.logic.regions_source, "computed from the heatmap")
        note = f" ({self.logic.regions_note})" if self.logic.regions_note else ""
        self.setStatus(f"{len(regions)} region(s) at or above {threshold:.4g}, {source}{note}"
                       + ("; click a row to jump there." if regions else "."))

    def fillRegionsTable(self, regions):
        widget = self.ui.regionsTableWidget
        widget.setRowCount(len(regions))
        for row, r in enumerate(regions):
            values = (str(r.label), str(r.n_voxels), f"{r.volume_mm3:.1f}", f"{r.peak:.4g}", f"{r.mean:.4g}") + tuple(
                f"{x:.1f}" for x in r.centroid_ras)
            for col, text in enumerate(values):
                item = qt.QTableWidgetItem(text)
                item.setToolTip("from the server" if r.source == "server" else "computed from the heatmap")
                widget.setItem(row, col, item)
        widget.resizeColumnsToContents()

    def showRegionsFromScene(self, heat):
        """The regions table of ``heat``'s volume as saved with the scene (none: an empty table)."""
        reference = slicer.mrmlScene.GetNodeByID(heat.GetAttribute("AnomalyDetection.ReferenceNodeID") or "") \
            if heat is not None else None
        table = self.logic.regions_table(reference) if reference is not None else None
        self.regionsTable = table
        self.fillRegionsTable(self.logic.regions_from_table(table) if table is not None else [])

    def onRegionClicked(self, row, column):
        if self.regionsTable is None or not slicer.mrmlScene.IsNodePresent(self.regionsTable):
            return
        self.logic.jump_to(self.logic.region_centroid_from_table(self.regionsTable, row))

    # ----------------------------------------------------------------------------------------------- curate
    def onMark(self, state):
        volume = self.currentVolume()
        image_id = self.logic.study_id(volume)  # a PACS series from Slicer's DICOM browser: its SeriesInstanceUID
        self.applyServerUrl()
        self.run("mark", f"Marking {image_id} {state} ...", self.logic.mark, image_id, state,
                 onDone=lambda counts: (self.showCounts(counts), self.setStatus(f"{image_id} marked {state}.")))

    def onRefreshCounts(self, *unused):
        self.run("counts", "Counting studies ...", self.logic.curation_counts,
                 onDone=lambda counts: (self.showCounts(counts), self.setStatus("Study counts updated.")))

    def showCounts(self, counts):
        order = CURATION_STATES + (UNREVIEWED,)
        self.ui.countsLabel.text = "Studies: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in order)

    def onNextCase(self, *unused):
        strategy = self.ui.strategyComboBox.currentText
        if not strategy:
            self.setStatus("Connect first: the server lists its strategies.", error=True)
            return
        self.run("next", f"Asking '{strategy}' for the next case ...", self.logic.fetch_next_case, strategy,
                 onDone=self.showNextCase)

    def showNextCase(self, found):
        if found.image_id is None:
            self.setStatus(found.status_text())
            return
        image_id = found.image_id
        node = self.logic.load_case(image_id, found.path)
        self.ui.inputVolumeSelector.setCurrentNode(node)
        slicer.util.resetSliceViews()
        self.setStatus(f"Loaded {image_id}. Review it, then mark it normal, abnormal or excluded.")
        if self.ui.detectOnLoadCheckBox.checked:
            self.onDetect()

    # ----------------------------------------------------------------------------------------------- retrain
    def onStartTraining(self, *unused):
        params = {}
        if self.ui.epochsSpinBox.value > 0:
            params["max_epochs"] = int(self.ui.epochsSpinBox.value)
        if self.ui.allowWeakerCheckBox.checked:
            params["force"] = True  # the server refuses a weaker preset than the served model's without it
        self.applyServerUrl()
        self.run("train", "Starting training on the studies marked normal ...", self.logic.start_training, params,
                 onDone=self.trainingStarted)

    def trainingStarted(self, response):
        self.ui.trainingProgressBar.setValue(0)
        self.ui.trainingStatusLabel.text = "Training started."
        warning = response.get("warning") if isinstance(response, dict) else None
        if warning:
            self.setStatus(f"Training started. Warning: {warning}", error=True)
        else:
            self.setStatus("Training started; the progress bar follows the server's train stats.")
        self.trainTimer.start()
        self.updateButtons()

    def onStopTraining(self, *unused):
        self.run("stop", "Stopping training ...", self.logic.stop_training,
                 onDone=lambda r: self.setStatus("Training stop requested."))

    # ----------------------------------------------------------------------------------------------- versions
    def onRefreshVersions(self, *unused):
        self.runner.submit("versions", self.logic.model_versions, on_done=self.showVersions,
                           on_error=lambda exc: self.showVersions(None))

    def showVersions(self, versions):
        self.versions = versions
        self.ui.versionsComboBox.clear()
        if versions is None or not versions.supported:
            self.ui.versionsComboBox.toolTip = "This server keeps no model versions."
        else:
            self.ui.versionsComboBox.toolTip = (f"Models the server keeps (at most {versions.keep}; newest first): "
                                                "version, preset, creation date, training summary")
            for label in versions.labels:
                self.ui.versionsComboBox.addItem(label)
            index = versions.index_of(versions.current)
            if index >= 0:
                self.ui.versionsComboBox.setCurrentIndex(index)
        self.updateButtons()

    def onRollback(self, *unused):
        index = self.ui.versionsComboBox.currentIndex
        if self.versions is None or not (0 <= index < len(self.versions.versions)):
            self.setStatus("Connect first: the server lists the model versions it keeps.", error=True)
            return
        entry = self.versions.versions[index]
        version = entry.get("version")
        if version == self.versions.current:
            self.setStatus(f"Version {version} is already the served model.")
            return
        self.applyServerUrl()
        self.run("rollback", f"Rolling back to model version {version} ...", self.logic.rollback, version,
                 onDone=self.rolledBack)

    def rolledBack(self, response):
        version = response.get("version", "")
        self.lastVersion = version
        self.ui.modelVersionLabel.text = version or "(none yet)"
        self.setStatus(f"Now serving model version {version} (was {response.get('previous_version') or 'none'}); "
                       "the next detection uses it.")
        self.onRefreshVersions()

    def pollTraining(self):
        if self.runner.busy("train-poll"):
            return  # the previous poll is still waiting for the server
        self.runner.submit("train-poll", self.logic.training_progress, on_done=self.showTraining,
                           on_error=self.trainingPollFailed)

    def trainingPollFailed(self, exc):
        self.ui.trainingStatusLabel.text = f"Cannot read training progress: {exc}"

    def showTraining(self, progress):
        if progress.percent is None:
            self.ui.trainingProgressBar.setRange(0, 0 if progress.running else 100)
        else:
            self.ui.trainingProgressBar.setRange(0, 100)
            self.ui.trainingProgressBar.setValue(progress.percent)
        self.ui.trainingStatusLabel.text = progress.text
        if progress.running and not self.trainTimer.isActive():
            self.trainTimer.start()  # a training started elsewhere (another client, the CLI)
        if not progress.running and self.trainTimer.isActive():
            self.trainTimer.stop()
            self.ui.trainingProgressBar.setRange(0, 100)
            if progress.model_version and progress.model_version != self.lastVersion:
                text = f"Training finished: new model version {progress.model_version} published."
                if progress.warning:
                    text += f" Warning: {progress.warning}"
                self.setStatus(text, error=bool(progress.warning))
            else:
                self.setStatus(f"Training ended ({progress.status.lower() or 'stopped'}); model version unchanged.",
                               error=progress.status in ("ERROR", "FAILED"))
            self.onRefreshVersions()
        if progress.model_version:
            self.lastVersion = progress.model_version
            self.ui.modelVersionLabel.text = progress.model_version
        self.updateButtons()


#
# AnomalyDetectionLogic
#
class AnomalyDetectionLogic(ScriptedLoadableModuleLogic, AnomalyLogic):
    """The module logic: everything lives in ``AnomalyDetectionLib.logic.AnomalyLogic`` (no Qt there)."""

    # the Qt-free parameter node of AnomalyLogic, not ScriptedLoadableModuleLogic's (same singleton tag, but ours
    # fills our defaults and is what the headless tests check)
    getParameterNode = AnomalyLogic.getParameterNode
    setDefaultParameters = AnomalyLogic.setDefaultParameters

    def __init__(self, server_url=DEFAULT_URL):
        ScriptedLoadableModuleLogic.__init__(self)
        AnomalyLogic.__init__(self, server_url)


#
# AnomalyDetectionTest
#
class AnomalyDetectionTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer. The server part runs only when ANOMALY_DETECTION_TEST_SERVER names a running server."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_HeatmapOverlay()
        self.setUp()
        self.test_Regions()
        self.setUp()
        self.test_ParameterNode()
        url = os.environ.get("ANOMALY_DETECTION_TEST_SERVER")
        if url:
            self.setUp()
            self.test_Server(url)

    def _case(self):
        from AnomalyDetectionLib import testing

        testing.ensure_slice_views()
        logic = AnomalyDetectionLogic()
        reference, path = testing.make_synthetic_case(logic, tempfile.mkdtemp())
        return logic, reference, path

    def test_HeatmapOverlay(self):
        self.delayDisplay("Heatmap overlay")
        logic, reference, path = self._case()
        heat = logic.show_heatmap(reference, path, threshold=0.5, opacity=0.4)
        display = heat.GetDisplayNode()
        self.assertIn(display.GetColorNodeID(), ("vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeIron",
                                                 "vtkMRMLColorTableNodeRainbow"))
        self.assertTrue(display.GetApplyThreshold())
        self.assertAlmostEqual(display.GetLowerThreshold(), 0.5, places=5)
        self.assertAlmostEqual(display.GetWindowLevelMin(), 0.5, places=5)
        for i in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            self.assertEqual(composite.GetForegroundVolumeID(), heat.GetID())
            self.assertEqual(composite.GetBackgroundVolumeID(), reference.GetID())
        self.delayDisplay("Heatmap overlay passed")

    def test_Regions(self):
        from AnomalyDetectionLib import testing

        self.delayDisplay("Regions")
        logic, reference, path = self._case()
        heat = logic.show_heatmap(reference, path, threshold=0.65)
        seg, table, regions = logic.make_regions(heat, 0.65)
        expected = testing.expected_regions(0.65)
        self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), len(expected))
        self.assertEqual(table.GetNumberOfRows(), len(expected))
        for region, want in zip(regions, expected):
            self.assertEqual(region.n_voxels, want["n_voxels"])
            self.assertAlmostEqual(region.volume_mm3, want["volume_mm3"], places=3)
        logic.jump_to(regions[0].centroid_ras)
        self.delayDisplay("Regions passed")

    def test_ParameterNode(self):
        self.delayDisplay("Parameter node")
        logic, reference, path = self._case()
        heat = logic.show_heatmap(reference, path, threshold=0.5)
        node = logic.getParameterNode()
        self.assertEqual(node.GetNodeReference("Heatmap"), heat)
        self.assertEqual(node.GetNodeReference("InputVolume"), reference)
        node.SetParameter("Threshold", "0.65")
        node.SetParameter("Opacity", "0.3")
        node.SetParameter("Method", "spmamba")
        logic.apply_parameters()
        self.assertAlmostEqual(heat.GetDisplayNode().GetWindowLevelMin(), 0.65, places=5)
        for i in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
            composite = slicer.mrmlScene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            self.assertAlmostEqual(composite.GetForegroundOpacity(), 0.3, places=5)
        self.assertEqual(logic.method, "spmamba")
        self.delayDisplay("Parameter node passed")

    def test_Server(self, url):
        self.delayDisplay(f"Server {url}")
        logic = AnomalyDetectionLogic(url)
        summary = logic.connect()
        self.assertIn(logic.model, summary.models)
        counts = logic.curation_counts()
        self.assertTrue(set(CURATION_STATES) <= set(counts))
        self.delayDisplay("Server passed")
