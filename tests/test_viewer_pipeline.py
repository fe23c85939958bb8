"""--viewer end to end: an ISO with IHE PDI web content, read back by xorriso, checked by our
verify, dciodvfy, and opened from file:// in headless Chromium."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mastering import profiles
from mastering.pipeline import Options, master
from mastering.verify import verify

from .conftest import ct_series, dciodvfy_errors, extract_iso, isoinfo_listing, make_ct, sample
from .test_browser import Watched, not_blank, screenshot

HOSTILE = "<script>alert('x')</script> Knie"


def _pdf(folder: Path) -> Path:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.104.1", generate_uid()
    ds.PatientName, ds.PatientID, ds.StudyInstanceUID = "DOE^JANE", "PID1", "1.2.3.4.1"
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "1.2.77", "DOC", 5, 1
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "120000", "1"
    ds.MIMETypeOfEncapsulatedDocument, ds.DocumentTitle = "application/pdf", "Befund"
    ds.EncapsulatedDocument = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(folder / "pdf.dcm", enforce_file_format=True)
    return folder / "pdf.dcm"


def _inputs(tmp: Path) -> list[Path]:
    src = tmp / "in"
    for i in range(1, 4):
        make_ct(src, f"ct{i}.dcm", instance=i, rows=64, value=40 * i, StudyDescription=HOSTILE,
                WindowCenter=40, WindowWidth=400)
    _pdf(src)
    return [src, sample("SC_rgb_rle_2frame.dcm"), sample("test-SR.dcm"),
            Path(pydicom.data.get_charset_files("chrRuss.dcm")[0])]


@pytest.fixture(scope="module")
def pdi_iso(tmp_path_factory) -> tuple[Path, Path, object]:
    tmp = tmp_path_factory.mktemp("pdi")
    report = master(_inputs(tmp), tmp / "pdi.iso", Options(
        profiles.load("STD-GEN-CD"), viewer=True, workers=2, fileset_id="PDI_TEST"))
    return tmp, extract_iso(tmp / "pdi.iso", tmp / "x"), report


@pytest.mark.oracle
def test_medium_layout_and_conformance(pdi_iso) -> None:
    tmp, root, report = pdi_iso
    names = [n for n, _ in isoinfo_listing(tmp / "pdi.iso")]
    assert {"/DICOMDIR.;1", "/INDEX.HTM;1", "/README.TXT;1"} <= set(names)
    assert not any("AUTORUN" in n for n in names)
    assert any(n.startswith("/IHE_PDI/") and n.endswith(".JPG;1") for n in names)
    assert any(n.startswith("/VIEWER/") for n in names)
    result = verify(tmp / "pdi.iso", profiles.load("STD-GEN-CD"))
    assert result.ok, result.violations
    assert dciodvfy_errors(root / "DICOMDIR") == []
    assert report.web["images"] == 5 and report.web["objects"] == 2  # 3 CT, SC, Russian MR
    frames = 3 + 2 + 1  # CT slices, the two-frame SC, the MR
    default = [p for p in (root / "IHE_PDI").rglob("A*.JPG")]
    assert len(default) == frames
    for page in (root / "IHE_PDI").rglob("*.HTM"):
        ET.fromstring(page.read_bytes())  # well-formed XHTML
    assert list((root / "IHE_PDI").rglob("*.PDF"))


def test_readme_and_labels(pdi_iso) -> None:
    tmp, root, report = pdi_iso
    readme = (root / "README.TXT").read_text(encoding="utf-8")
    assert "INDEX.HTM" in readme and "DICOMDIR" in readme
    assert "DOE" in readme.upper()
    svg, png = tmp / "pdi.label.svg", tmp / "pdi.label.png"
    assert sorted(report.labels) == sorted([str(svg), str(png)])
    text = svg.read_text(encoding="utf-8")
    ET.fromstring(text)
    assert "DICOM PLUS WEB" in text
    assert Image.open(png).size[0] > 500
    assert not list(root.rglob("*.label.*"))  # the label is not on the medium


@pytest.mark.browser
def test_index_from_the_disc_in_chromium(pdi_iso) -> None:
    from playwright import sync_api

    from .test_browser import ARGS, CHROMIUM

    _tmp, root, _ = pdi_iso
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            w = Watched(browser)
            page = w.open(root / "INDEX.HTM")
            body = page.inner_text("body")
            assert HOSTILE in body  # markup from DICOM is text
            assert "Иванов" in body or "Ivanov" in body or "Люкceмбypг" in body or "Luk" in body
            assert not_blank(screenshot(page))
            series = sorted((root / "IHE_PDI").rglob("SERIES.HTM"))
            page = w.open(series[0])
            assert not_blank(screenshot(page))
            assert w.problems == []
            w.close()
        finally:
            browser.close()


def test_each_volume_indexes_its_own_content(tmp_path: Path) -> None:
    for s in range(3):
        ct_series(tmp_path / "in", 1, 3, first=s, SeriesDescription=f"SERIES_{s}")
    prof = profiles.load("STD-GEN-CD").with_capacity(200_000)
    report = master([tmp_path / "in"], tmp_path / "o.iso", Options(prof, viewer=True, workers=1))
    assert len(report.volumes) >= 2
    seen = []
    for n, vol in enumerate(report.volumes):
        assert Path(vol.path).stat().st_size <= 200_000
        root = extract_iso(Path(vol.path), tmp_path / f"x{n}")
        index = (root / "INDEX.HTM").read_text(encoding="utf-8")
        here = {f"SERIES_{s}" for s in range(3) if f"SERIES_{s}" in index}
        on_disc = {pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription
                   for p in (root / "DICOM").rglob("IM*")}
        assert here == on_disc
        seen += sorted(here)
        assert verify(Path(vol.path), prof).ok
        assert Path(vol.path).with_suffix(".label.svg").exists()
    assert sorted(seen) == ["SERIES_0", "SERIES_1", "SERIES_2"]
    assert subprocess.run(["true"]).returncode == 0
