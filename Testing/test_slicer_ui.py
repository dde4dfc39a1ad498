"""The module's Qt Designer file and its source files, checked without the Slicer application.

* The .ui file loads with Qt's own loader (PySide6's QUiLoader; Slicer's custom widgets fall back to the base
  classes named in <customwidgets>), and every ``self.ui.<name>`` the Widget code uses exists in it.
* Every ``SlicerParameterName`` binding names a field of the parameter node wrapper.
* The logic package imports no Qt (it must run on slicer-core), and the CMake file lists the module's files.
"""

from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "PPCRegistration"
UI_FILE = MODULE / "Resources" / "UI" / "PPCRegistration.ui"
MODULE_FILE = MODULE / "PPCRegistration.py"


def _used_ui_names() -> set[str]:
    return set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))


def _parameter_fields() -> set[str]:
    tree = ast.parse(MODULE_FILE.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "PPCRegistrationParameterNode":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("PPCRegistrationParameterNode not found")


@pytest.fixture(scope="module")
def loaded_ui():
    pytest.importorskip("PySide6", reason="PySide6 is needed to load the .ui file")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QFile, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    f = QFile(str(UI_FILE))
    assert f.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    widget = loader.load(f)
    f.close()
    assert widget is not None, loader.errorString()
    yield widget
    widget.deleteLater()
    del app


def test_ui_file_is_well_formed_and_declares_custom_widgets():
    root = ET.parse(UI_FILE).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if c.startswith(("qMRML", "ctk", "qSlicer"))}
    assert custom <= declared, f"custom widgets not declared in <customwidgets>: {custom - declared}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    assert root.find("widget").get("class") == "qMRMLWidget"


def test_every_widget_used_by_the_code_exists(loaded_ui):
    from PySide6.QtWidgets import QWidget

    found = {w.objectName() for w in loaded_ui.findChildren(QWidget)}
    used = _used_ui_names()
    assert len(used) > 30
    missing = sorted(used - found)
    assert not missing, f"widgets used in PPCRegistration.py but absent from the .ui file: {missing}"


def test_parameter_bindings_name_parameter_node_fields(loaded_ui):
    from PySide6.QtWidgets import QWidget

    fields = _parameter_fields()
    bound = {}
    for w in loaded_ui.findChildren(QWidget):
        name = w.property("SlicerParameterName")
        if name:
            bound[w.objectName()] = name
    assert len(bound) >= 15
    unknown = {k: v for k, v in bound.items() if v not in fields}
    assert not unknown, f"SlicerParameterName not in PPCRegistrationParameterNode: {unknown}"
    # the parameters handled by hand in the Widget code are the unbound ones
    assert {"method", "device", "modelPath", "segmentId"} <= fields - set(bound.values())


def test_module_file_structure():
    tree = ast.parse(MODULE_FILE.read_text())
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"PPCRegistration", "PPCRegistrationWidget", "PPCRegistrationLogic", "PPCRegistrationTest",
            "PPCRegistrationParameterNode"} <= classes
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert {"registerSampleData", "ensureTorch"} <= functions
    # torch is never imported at module level (it may not be installed when Slicer starts)
    top_imports = {a.name.split(".")[0] for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))
                   for a in n.names} | {n.module.split(".")[0] for n in tree.body
                                         if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in top_imports and "PPCRegistrationLib" not in top_imports


def test_logic_package_imports_no_qt():
    for path in (MODULE / "PPCRegistrationLogic").glob("*.py"):
        tree = ast.parse(path.read_text())
        for n in ast.walk(tree):
            mods = []
            if isinstance(n, ast.Import):
                mods = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.module:
                mods = [n.module]
            for m in mods:
                assert m.split(".")[0] not in ("qt", "ctk", "PySide6", "PyQt5"), f"{path.name} imports {m}"
                assert not m.startswith("slicer.ScriptedLoadableModule"), f"{path.name} imports {m}"


def test_cmake_lists_module_files():
    text = (MODULE / "CMakeLists.txt").read_text()
    for path in (MODULE / "PPCRegistrationLogic").glob("*.py"):
        assert f"PPCRegistrationLogic/{path.name}" in text, f"{path.name} missing from the module's CMakeLists"
    for res in ("Resources/UI/${MODULE_NAME}.ui", "Resources/Icons/${MODULE_NAME}.png"):
        assert res in text
        assert (MODULE / res.replace("${MODULE_NAME}", "PPCRegistration")).exists()
    assert "WITH_GENERIC_TESTS" in text and "slicer_add_python_unittest" in text
    top = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_CATEGORY \"Registration\"", "EXTENSION_DEPENDS \"PyTorch\"", "find_package(Slicer",
                "add_subdirectory(PPCRegistration)", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert key in top
    assert (ROOT / "PPCRegistration.png").exists()
