"""Shared pytest set-up: the `slow` marker runs only with --runslow (CI passes it); a session-wide guard fails the
run when a test wrote into the repository's app folder (tests/app_folder_guard.py)."""
from __future__ import annotations

import os

import pytest

from app_folder_guard import APP_DIR, changes, snapshot

# Keep the 2-core CI machine responsive when several test processes or servers run at once.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session", autouse=True)
def app_folder_untouched():
    """Snapshot apps/spmamba_app (its model/ folder included) before the first test and compare after the last: a
    test that writes into it (a model, MONAI Label's logs/ ...) would change what `spmamba serve` and `make demo`
    serve, so the run fails (an error at the teardown of the last test) and says what changed."""
    before = snapshot(APP_DIR)
    yield
    diff = changes(before, snapshot(APP_DIR))
    if diff:
        shown = "\n  ".join(diff[:20]) + (f"\n  ... and {len(diff) - 20} more" if len(diff) > 20 else "")
        pytest.fail(f"the tests wrote into the repository's app folder {APP_DIR} (use a copy of the app, or "
                    f"--conf model_dir / the log in tmp_path):\n  {shown}", pytrace=False)
