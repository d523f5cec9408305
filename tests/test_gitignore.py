"""What README's and docs/CLI.md's own example commands write in the checkout is ignored by git; code is not."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ignored(path: str) -> bool:
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO, capture_output=True)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode == 0


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs git and a checkout")
def test_example_outputs_are_ignored_and_code_is_not():
    for path in ("data/train/normal-0000.nii.gz", "my_studies/case.nii.gz", "studies/datastore_v2.json",
                 "results/scores.csv", "pred/scores.csv", "demo/model/demo.pt", "model.pt"):
        assert _ignored(path), path
    for path in ("lib/spmamba/data/synthetic.py", "tests/data/README.md", "benchmarks/results/app_fast.json",
                 "apps/spmamba_app/main.py"):
        assert not _ignored(path), path
