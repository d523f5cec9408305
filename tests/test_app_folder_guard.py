"""The guard that keeps the test suite out of the repository's app folder sees what MONAI Label would write."""
from __future__ import annotations

from app_folder_guard import app_copy, changes, snapshot


def test_snapshot_sees_runtime_files_but_not_bytecode(tmp_path):
    app = app_copy(tmp_path / "app")
    before = snapshot(app)
    assert before and "main.py" in before

    (app / "lib" / "__pycache__").mkdir(exist_ok=True)
    (app / "lib" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"bytecode")
    (app / "main.py").write_text((app / "main.py").read_text() + "\n# edited\n")  # source edits are not tests' doing
    for d in ("model", "logs", "bin"):  # what start_server creates in any app folder: empty, harmless
        (app / d).mkdir()
    assert changes(before, snapshot(app)) == []

    (app / "model" / "spmamba.pt").write_bytes(b"a model")
    (app / "logs" / "app.log").write_text("log")
    diff = changes(before, snapshot(app))
    assert diff == ["added logs/app.log", "added model/spmamba.pt"]

    after = snapshot(app)
    (app / "model" / "spmamba.pt").write_bytes(b"another model")
    assert changes(after, snapshot(app)) == ["changed model/spmamba.pt"]
