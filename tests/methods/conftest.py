"""The seam tests import the toy method from this folder (and pass it to subprocesses through PYTHONPATH)."""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
