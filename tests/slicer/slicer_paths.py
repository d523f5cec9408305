"""Where the Slicer module's files are (imported by conftest and the tests; a plain module so any test order works)."""
import os

MODULE_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "slicer_extension", "AnomalyDetection"))
