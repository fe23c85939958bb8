"""DICOMDIR records for every leaf type the inputs need, judged by dciodvfy and pydicom."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.fileset import FileSet
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mastering import dicomdir, profiles
from mastering.pipeline import Options, master

from .conftest import dciodvfy_errors, dcmdump, extract_iso, make_ct


def _code(value: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, "DCM", meaning
    return c


def _instance(folder: Path, name: str, sop_class: str, modality: str, **attrs) -> Path:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName, ds.PatientID = "Ærø^Åse", "PID-UTF8"
    ds.PatientBirthDate, ds.PatientSex = "19800101", "F"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = "1.2.3.9", "20240102", "0930", "7"
    ds.AccessionNumber, ds.StudyDescription = "ACC1", "Knie – MRT"
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesNumber = generate_uid(), modality, 900
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = "20240102", "101010"
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def _ref_series() -> Sequence:
    img = Dataset()
    img.ReferencedSOPClassUID, img.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.3"
    item = Dataset()
    item.SeriesInstanceUID, item.ReferencedImageSequence = "1.2.3.4.1.1", Sequence([img])
    return Sequence([item])


LEAVES = {
    "PRESENTATION": ("1.2.840.10008.5.1.4.1.1.11.1", "PR", dict(
        PresentationCreationDate="20240102", PresentationCreationTime="1100",
        ContentLabel="GSPS", ContentDescription="", ContentCreatorName="",
        ReferencedSeriesSequence=_ref_series())),
    "KEY OBJECT DOC": ("1.2.840.10008.5.1.4.1.1.88.59", "KO", dict(
        ConceptNameCodeSequence=Sequence([_code("113000", "Of Interest")]))),
    "ENCAP DOC": ("1.2.840.10008.5.1.4.1.1.104.1", "DOC", dict(
        MIMETypeOfEncapsulatedDocument="application/pdf", DocumentTitle="Befund",
        EncapsulatedDocument=b"%PDF-1.4\n%%EOF\n\0")),
    "REGISTRATION": ("1.2.840.10008.5.1.4.1.1.66.1", "REG", dict(ContentLabel="REG")),
    "FIDUCIAL": ("1.2.840.10008.5.1.4.1.1.66.2", "FID", dict(ContentLabel="FID")),
    "RT TREAT RECORD": ("1.2.840.10008.5.1.4.1.1.481.4", "RTRECORD", dict(
        TreatmentDate="20240103", TreatmentTime="080000")),
    "RT PLAN": ("1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN", dict(RTPlanLabel="PLAN A")),
    "RT STRUCTURE SET": ("1.2.840.10008.5.1.4.1.1.481.3", "RTSTRUCT", dict(
        StructureSetLabel="SS")),
    "VALUE MAP": ("1.2.840.10008.5.1.4.1.1.67", "RWV", dict(ContentLabel="MAP")),
    "RAW DATA": ("1.2.840.10008.5.1.4.1.1.66", "OT", {}),
    "MEASUREMENT": ("1.2.840.10008.5.1.4.1.1.78.1", "LEN", dict(ContentLabel="LENS")),
    "SR DOCUMENT": ("1.2.840.10008.5.1.4.1.1.88.22", "SR", dict(
        CompletionFlag="COMPLETE", VerificationFlag="UNVERIFIED",
        ConceptNameCodeSequence=Sequence([_code("11528-7", "Radiology Report")]))),
    "PALETTE": ("1.2.840.10008.5.1.4.39.1", "OT", dict(ContentLabel="HOTIRON")),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dd")
    for rtype, (sop, modality, attrs) in LEAVES.items():
        _instance(tmp / "in", rtype.replace(" ", "_") + ".dcm", sop, modality, **attrs)
    make_ct(tmp / "in", "ct.dcm")
    master([tmp / "in"], tmp / "m.iso", Options(profiles.load("STD-GEN-DVD-JPEG")))
    return tmp, extract_iso(tmp / "m.iso", tmp / "x")


@pytest.mark.oracle
def test_every_record_type_passes_dciodvfy(mixed) -> None:
    _tmp, root = mixed
    assert dciodvfy_errors(root / "DICOMDIR") == []
    dcmdump(root / "DICOMDIR")


def test_record_types_and_hierarchy(mixed) -> None:
    _tmp, root = mixed
    dd = pydicom.dcmread(root / "DICOMDIR")
    types = [r.DirectoryRecordType for r in dd.DirectoryRecordSequence]
    for rtype in LEAVES:
        assert rtype in types, rtype
    fs = FileSet(dd)
    assert len(list(fs)) == len(LEAVES) + 1
    palette = next(r for r in dd.DirectoryRecordSequence if r.DirectoryRecordType == "PALETTE")
    roots = _root_offsets(dd)
    assert palette.seq_item_tell in roots  # a root-level record: no PATIENT above it


def _root_offsets(dd: pydicom.Dataset) -> list[int]:
    by_offset = {r.seq_item_tell: r for r in dd.DirectoryRecordSequence}
    out, nxt = [], dd.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity
    while nxt:
        out.append(nxt)
        nxt = by_offset[nxt].OffsetOfTheNextDirectoryRecord
    assert out[-1] == dd.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity
    return out


def test_offsets_point_at_item_tags(mixed) -> None:
    _tmp, root = mixed
    data = (root / "DICOMDIR").read_bytes()
    dd = pydicom.dcmread(root / "DICOMDIR")
    for rec in dd.DirectoryRecordSequence:
        for off in (rec.OffsetOfTheNextDirectoryRecord,
                    rec.OffsetOfReferencedLowerLevelDirectoryEntity):
            if off:
                assert struct.unpack_from("<HH", data, off) == (0xFFFE, 0xE000)
    assert dd.FileSetConsistencyFlag == 0
    assert dd.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert dd.file_meta.MediaStorageSOPClassUID == dicomdir.MEDIA_STORAGE_DIRECTORY


def test_profile_keys_and_charset(mixed) -> None:
    _tmp, root = mixed
    dd = pydicom.dcmread(root / "DICOMDIR")
    recs = {r.DirectoryRecordType: r for r in dd.DirectoryRecordSequence}
    assert recs["PATIENT"].PatientBirthDate and recs["PATIENT"].PatientSex  # H.3-2 1C keys
    assert recs["IMAGE"].Rows == 8 and recs["IMAGE"].Columns == 8  # H.3-2 Type 1 keys
    utf8 = next(r for r in dd.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT"
                and r.PatientID == "PID-UTF8")
    assert utf8.SpecificCharacterSet == "ISO_IR 192" and utf8.PatientName == "Ærø^Åse"
    study = next(r for r in dd.DirectoryRecordSequence if r.DirectoryRecordType == "STUDY"
                 and r.get("StudyDescription") == "Knie – MRT")
    assert study.AccessionNumber == "ACC1"
    sr = recs["SR DOCUMENT"]
    assert sr.ConceptNameCodeSequence[0].CodeValue == "11528-7"


@pytest.mark.oracle
def test_the_oracle_can_fail(mixed, tmp_path: Path) -> None:
    """dciodvfy must notice a Type 1 key emptied in an otherwise good DICOMDIR."""
    _tmp, root = mixed
    dd = pydicom.dcmread(root / "DICOMDIR")
    patient = next(r for r in dd.DirectoryRecordSequence if r.DirectoryRecordType == "PATIENT")
    patient.PatientID = ""
    study = next(r for r in dd.DirectoryRecordSequence if r.DirectoryRecordType == "STUDY")
    del study.StudyDate
    dd.save_as(tmp_path / "DICOMDIR")
    errors = dciodvfy_errors(tmp_path / "DICOMDIR")
    assert any("Patient ID" in e or "PatientID" in e for e in errors), errors
    assert any("StudyDate" in e or "Study Date" in e for e in errors), errors


@pytest.mark.oracle
def test_odd_length_value_is_padded_in_the_record(tmp_path: Path) -> None:
    """A modality that wrote an odd-length Study Description (not allowed, but seen) must not
    make our DICOMDIR unreadable: the record's copy is padded to even length."""
    src = make_ct(tmp_path / "in", "a.dcm", StudyDescription="ABCD")
    data = src.read_bytes()
    odd = data.replace(b"\x08\x00\x30\x10LO\x04\x00ABCD", b"\x08\x00\x30\x10LO\x03\x00ABC")
    assert odd != data
    src.write_bytes(odd)
    master([tmp_path / "in"], tmp_path / "o.iso", Options(profiles.load("STD-GEN-CD")))
    root = extract_iso(tmp_path / "o.iso", tmp_path / "x")
    assert dciodvfy_errors(root / "DICOMDIR") == []
    study = next(r for r in pydicom.dcmread(root / "DICOMDIR").DirectoryRecordSequence
                 if r.DirectoryRecordType == "STUDY")
    assert study.StudyDescription == "ABC"
