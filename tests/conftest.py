"""Settings every test shares."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_storage_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own SOFIM_TUNE_STORAGE would send every CLI test's study to their storage.
    monkeypatch.delenv("SOFIM_TUNE_STORAGE", raising=False)
