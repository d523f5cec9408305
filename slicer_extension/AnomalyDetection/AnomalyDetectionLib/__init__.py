"""Qt-free parts of the Anomaly Detection module: the server client, the MRML logic and a small task runner.

Importable in Slicer's Python and headless with ``slicer-core`` (PyPI); never imports qt, ctk or ``spmamba``.
"""
