"""IHE PDI web content (mastering.webcontent) and the disc label (mastering.label), without a
browser: names and places on the medium, well-formed XHTML, links, escaping, wording, sizes.

The synthetic model here (``make_model``) is also what tests/test_browser.py opens in Chromium.
"""

from __future__ import annotations

import datetime as dt
import io
import posixpath
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from PIL import Image, ImageDraw, ImageStat
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset

from mastering import label, webcontent
from mastering.webcontent import (
    Collector,
    Site,
    WebImage,
    WebPatient,
    WebSeries,
    WebStudy,
    build,
    estimate_bytes,
    format_date,
    format_name,
    format_time,
    load_site,
    medium_bytes,
    write_files,
)

XHTML = "{http://www.w3.org/1999/xhtml}"
CT = "1.2.840.10008.5.1.4.1.1.2"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
CREATED = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
HOSTILE = "<script>alert('pwned')</script> & <b>bold</b>"
#: pydicom's character set test files and how their Patient's Name must read
CHARSET_NAMES = {
    "chrGerm.dcm": "Äneas, Rüdiger",
    "chrRuss.dcm": "Люкceмбypг",
    "chrH31.dcm": "Yamada, Tarou (山田, 太郎; やまだ, たろう)",
    "chrGreek.dcm": "Διονυσιος",
}
PDF = b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


# -- the synthetic model ---------------------------------------------------------------------


def jpeg(text: str, shade: int, size: tuple[int, int] = (128, 128)) -> bytes:
    """A small JPEG that looks different for every text and shade."""
    img = Image.new("L", size, shade)
    draw = ImageDraw.Draw(img)
    draw.rectangle([8, 8, size[0] - 8, 40], fill=255 - shade)
    draw.ellipse([20 + shade % 60, 50, 70 + shade % 60, 100], fill=(shade + 128) % 256)
    draw.text((12, 16), text, fill=shade)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def rendering(tag: str, shade: int, *, presets: tuple[str, ...] = ("Lung",),
              frames: int = 1) -> SimpleNamespace:
    """What mastering.render returns, in shape: frames, presets (the first is the file's
    default window), extra, thumbnail, summary (machine keys)."""
    def frame(i: int, name: str, value: int) -> SimpleNamespace:
        return SimpleNamespace(frame=i + 1, jpeg=jpeg(f"{tag}/{i + 1} {name}", value),
                               width=128, height=128, preset=name)

    return SimpleNamespace(
        frames=[frame(i, "default", (shade + 40 * i) % 256) for i in range(frames)],
        presets=[SimpleNamespace(name="Soft tissue", center=40, width=400),
                 SimpleNamespace(name="Lung", center=-600, width=1500)],
        extra={p: [frame(i, p, 255 - (shade + 40 * i) % 256) for i in range(frames)]
               for p in presets},
        thumbnail=jpeg(tag, shade, (48, 48)),
        summary={"rows": "128", "columns": "128", "frames": str(frames),
                 "instance_number": "1", "slice_location": f"{shade / 10}"})


def dataset(charset_file: str, *, study: str, series: str, sop: str, modality: str = "CT",
            number: int = 1, description: str = "", sop_class: str = CT) -> Dataset:
    """A data set whose patient module comes from one of pydicom's character set files (so the
    names are really encoded in that character set) and whose other keys are set here."""
    ds = pydicom.dcmread(get_charset_files(charset_file)[0])
    ds.PatientID = f"ID-{Path(charset_file).stem[3:].upper()}"
    ds.PatientBirthDate, ds.PatientSex = "19700102", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, sop
    ds.SOPClassUID, ds.Modality = sop_class, modality
    ds.StudyDate, ds.StudyTime = "20240301", "101500.25"
    ds.StudyDescription = description
    ds.SeriesDescription = f"{modality} series"
    ds.SeriesNumber, ds.InstanceNumber = series[-1], number
    ds.InstitutionName, ds.AccessionNumber = "General Hospital", "ACC-1"
    ds.ReferringPhysicianName = "Who^Doctor^^Dr."
    return ds


def pdf_dataset(base: Dataset) -> Dataset:
    ds = Dataset()
    for kw in ("PatientID", "PatientName", "StudyInstanceUID", "SpecificCharacterSet"):
        setattr(ds, kw, getattr(base, kw))
    ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.9.1.3", "1.9.1.3.1"
    ds.SOPClassUID, ds.Modality = webcontent.PDF_STORAGE, "DOC"
    ds.DocumentTitle, ds.MIMETypeOfEncapsulatedDocument = "Radiology report", "application/pdf"
    ds.EncapsulatedDocument = PDF + b"\0"
    ds.SeriesNumber = 3
    return ds


def sr_dataset(base: Dataset) -> Dataset:
    ds = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    for kw in ("PatientID", "StudyInstanceUID"):
        setattr(ds, kw, getattr(base, kw))
    ds.SeriesInstanceUID = "1.9.1.3"
    return ds


def make_model() -> list[WebPatient]:
    """Four patients named in four character sets. The first has a hostile Study Description,
    a CT series with a second window preset (not on its last image), a 3-frame US image and a
    series of documents (PDF, SR)."""
    c = Collector()
    for i in range(3):
        ds = dataset("chrGerm.dcm", study="1.9.1", series="1.9.1.1", sop=f"1.9.1.1.{i}",
                     number=i + 1, description=HOSTILE)
        c.add(ds, rendering(f"CT{i + 1}", 30 + 70 * i, presets=("Lung",) if i < 2 else ()),
              file_id=("DICOM", "PT000000", "ST000000", "SE000000", f"IM{i:06d}"))
    us = dataset("chrGerm.dcm", study="1.9.1", series="1.9.1.2", sop="1.9.1.2.1",
                 modality="US", description=HOSTILE, sop_class=US_MULTIFRAME)
    c.add(us, rendering("US", 90, presets=(), frames=3))
    c.add(pdf_dataset(us))
    c.add(sr_dataset(us))
    for n, name in enumerate(list(CHARSET_NAMES)[1:], 2):
        for i in range(2):
            ds = dataset(name, study=f"1.9.{n}", series=f"1.9.{n}.1", sop=f"1.9.{n}.1.{i}",
                         modality="MR", number=i + 1, description=f"Study {n}")
            c.add(ds, rendering(f"MR{n}.{i}", 60 * i + 20 * n, presets=()))
    return c.patients


SITE = Site(institution="St. Elsewhere & Partners", department="Radiology",
            address="1 Main Street\nSpringfield", phone="+1 555 0100", product="mastering 0.1.0")


@pytest.fixture(scope="module")
def model() -> list[WebPatient]:
    return make_model()


@pytest.fixture(scope="module")
def files(model) -> dict[str, webcontent.Content]:
    return {"/".join(c): v for c, v in build(model, volume=1, volumes=2, site=SITE,
                                             created=CREATED)}


def data(content: webcontent.Content) -> bytes:
    return content.read_bytes() if isinstance(content, Path) else content


def parse(content: webcontent.Content) -> ET.Element:
    return ET.fromstring(data(content))


def links(page: ET.Element) -> list[str]:
    """Every reference a page makes: a@href, img@src, link@href, script@src."""
    out = []
    for tag, attr in (("a", "href"), ("img", "src"), ("link", "href"), ("script", "src")):
        out += [e.get(attr) for e in page.iter(XHTML + tag) if e.get(attr)]
    return out


def resolve(page: str, href: str) -> str:
    return posixpath.normpath(posixpath.join(posixpath.dirname(page), href.split("#")[0]))


def crawl(files: dict[str, webcontent.Content], start: str = "INDEX.HTM") -> set[str]:
    """Everything reachable from INDEX.HTM by links alone (no scripting)."""
    seen, todo = {start}, [start]
    while todo:
        page = todo.pop()
        for href in links(parse(files[page])):
            target = resolve(page, href)
            if target not in seen:
                seen.add(target)
                if target.endswith(".HTM"):
                    todo.append(target)
    return seen


# -- values from DICOM ---------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", CHARSET_NAMES.items())
def test_names_are_decoded_by_their_character_set(name, expected):
    ds = pydicom.dcmread(get_charset_files(name)[0])
    assert webcontent.patient_from_dataset(ds).name == expected


def test_format_name_date_time():
    assert format_name("Doe^Jane^Q^Dr.^Jr.") == "Doe, Dr. Jane Q Jr."
    assert format_name("Doe") == "Doe"
    assert format_name("") == format_name(None) == ""
    assert format_name("=山田^太郎") == "山田, 太郎"
    assert format_date("20240102") == format_date("2024.01.02") == "2024-01-02"
    assert format_date("2024") == "2024"
    assert format_time("101500.25") == "10:15:00"
    assert format_time("1015") == "10:15"
    assert format_time("10") == "10:00"
    assert format_time("10:15:00") == "10:15:00"


def test_objects_get_a_readable_summary():
    sr = webcontent.object_from_dataset(pydicom.dcmread(get_testdata_file("test-SR.dcm")))
    assert (sr.kind, sr.title) == ("SR", "Diagnosis")
    assert ("Completion", "COMPLETE") in sr.summary
    assert any(v == "3 cm" for _k, v in sr.summary)
    plan = webcontent.object_from_dataset(pydicom.dcmread(get_testdata_file("rtplan.dcm")))
    assert plan.kind == "RT PLAN" and ("Fractions", "30") in plan.summary
    ecg = webcontent.object_from_dataset(pydicom.dcmread(get_testdata_file("waveform_ecg.dcm")))
    assert ecg.kind == "ECG" and ("Group 1", "12 channels, 1000 Hz, 10.0 s") in ecg.summary
    base = dataset("chrGerm.dcm", study="1", series="1.1", sop="1.1.1")
    pdf = webcontent.object_from_dataset(pdf_dataset(base))
    assert (pdf.kind, pdf.title, pdf.pdf) == ("PDF", "Radiology report", PDF)


def test_collector_groups_in_order_and_spools(tmp_path):
    c = Collector(spool=tmp_path)
    for sop, series in (("1.1", "1.8.1"), ("1.2", "1.8.2"), ("1.3", "1.8.1")):
        c.add(dataset("chrGerm.dcm", study="1.8", series=series, sop=sop), rendering(sop, 50))
    (patient,) = c.patients
    (study,) = patient.studies
    assert [len(s.images) for s in study.series] == [2, 1]
    assert study.modalities == ["CT"]
    image = study.series[0].images[0]
    assert all(isinstance(j, Path) and j.parent == tmp_path for j in image.jpegs)
    assert isinstance(image.presets["Lung"][0], Path) and isinstance(image.thumbnail, Path)
    assert image.preset == "Soft tissue" and image.windows["Lung"] == (-600.0, 1500.0)


# -- the medium ----------------------------------------------------------------------------


def test_names_places_and_kinds_of_files(files):
    """PDI-07/09/10/13/14/15: root files, IHE_PDI web content only, 8.3 names, no autorun."""
    assert {"README.TXT", "INDEX.HTM"} <= set(files)
    for path in files:
        comps = path.split("/")
        assert len(comps) <= webcontent.MAX_COMPONENTS
        assert webcontent.FILE_NAME.fullmatch(comps[-1]), path
        assert all(webcontent.DIR_NAME.fullmatch(c) for c in comps[:-1]), path
        assert comps[0] in ("README.TXT", "INDEX.HTM", "IHE_PDI", "VIEWER"), path
        if comps[0] == "IHE_PDI":
            assert comps[-1].rsplit(".", 1)[1] in ("HTM", "JPG", "PNG", "CSS", "PDF"), path
    assert {p for p in files if p.startswith("VIEWER/")} == {"VIEWER/VIEWER.JS",
                                                             "VIEWER/VIEWER.CSS"}
    assert not any(p.split("/")[-1].startswith("AUTORUN") for p in files)
    series = "IHE_PDI/PT000000/ST000000/SE000000/"
    assert {series + n for n in ("SERIES.HTM", "THUMB.JPG", "A0000001.HTM", "A0000001.JPG",
                                 "B0000001.JPG", "B0000002.JPG", "B0000003.HTM")} <= set(files)
    assert series + "B0000003.JPG" not in files  # the third image has no lung window


def test_pages_are_well_formed_xhtml(files):
    pages = [p for p in files if p.endswith(".HTM")]
    assert len(pages) > 20
    for path in pages:
        text = data(files[path]).decode("utf-8")
        assert text.startswith('<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN"')
        root = ET.fromstring(text)
        assert root.tag == XHTML + "html" and root.get("lang") == "en"
        meta = root.find(f"{XHTML}head/{XHTML}meta")
        assert meta is not None and meta.get("content") == "text/html; charset=utf-8"
        for element in root.iter():
            assert element.tag == element.tag.lower(), (path, element.tag)


#: XHTML 1.0 Strict elements and attributes the pages may use (all also valid HTML)
STRICT_TAGS = {"html", "head", "meta", "title", "link", "script", "style", "body", "div", "p",
               "span", "a", "img", "h1", "h2", "h3", "table", "thead", "tbody", "tr", "th",
               "td", "ol", "li", "strong", "br"}
STRICT_ATTRS = {"class", "id", "href", "src", "alt", "title", "rel", "type", "content",
                "http-equiv", "lang", "{http://www.w3.org/XML/1998/namespace}lang", "defer"}
INLINE = {"a", "img", "span", "strong", "br"}


def test_pages_use_only_xhtml_strict_markup(files):
    for path, content in files.items():
        if not path.endswith(".HTM"):
            continue
        root = parse(content)
        for element in root.iter():
            tag = element.tag.removeprefix(XHTML)
            assert tag in STRICT_TAGS, (path, tag)
            assert set(element.attrib) <= STRICT_ATTRS, (path, tag, element.attrib)
            if tag in ("body", "ol", "table", "tbody", "thead"):
                assert not {c.tag.removeprefix(XHTML) for c in element} & INLINE, (path, tag)
        assert all(i.get("alt") is not None for i in root.iter(XHTML + "img")), path


def test_every_link_resolves_and_every_image_is_reachable_without_script(files):
    reached = crawl(files)
    assert reached <= set(files), reached - set(files)
    web = {p for p in files if p.startswith("IHE_PDI/") and p.rsplit(".")[-1] in ("HTM",
                                                                                  "JPG", "PDF")}
    assert web <= reached, sorted(web - reached)[:5]


def test_nothing_is_loaded_from_outside_the_medium(files):
    for path, content in files.items():
        if path.endswith(".HTM"):
            for href in links(parse(content)):
                assert ":" not in href and not href.startswith(("/", "\\")), (path, href)
        text = data(content).decode("utf-8", "replace") if path[-3:] in ("HTM", ".JS", "CSS") \
            else ""
        for marker in ("http:", "https:", "url(", "@import", "fetch(", "XMLHttpRequest"):
            hits = text.count(marker)
            allowed = 2 if marker == "http:" and path.endswith(".HTM") else 0  # DOCTYPE, xmlns
            assert hits <= allowed, (path, marker)


def test_only_the_viewer_script_is_referenced(files):
    for path, content in files.items():
        if path.endswith(".HTM"):
            scripts = list(parse(content).iter(XHTML + "script"))
            assert all(resolve(path, s.get("src")) == "VIEWER/VIEWER.JS" for s in scripts)
            assert all(not (s.text or "").strip() for s in scripts)
            if path.startswith("IHE_PDI/"):
                assert len(scripts) == 1


def test_markup_in_dicom_text_is_escaped(files):
    index = data(files["INDEX.HTM"]).decode()
    assert "<script>alert" not in index and "&lt;script&gt;alert(&#39;pwned&#39;)" in index
    heading = "".join(parse(files["INDEX.HTM"]).find(f".//{XHTML}h3").itertext())
    assert HOSTILE in heading
    readme = data(files["README.TXT"]).decode("utf-8-sig")
    assert HOSTILE in readme  # plain text: shown as it is


def test_control_characters_are_stripped():
    study = WebStudy("1", description="bad\x1b[31m\x00 text\x07")
    patient = WebPatient("Doe\x0c, Jane", "ID\x01", studies=[study])
    out = {"/".join(c): v for c, v in build([patient], web=False, created=CREATED)}
    readme = data(out["README.TXT"]).decode()
    assert "bad[31m text" in readme and "Doe, Jane" in readme and "\x1b" not in readme
    ET.fromstring(out["INDEX.HTM"])  # XML 1.0 would refuse the control characters


def test_readme_says_what_how_who_and_privacy(files):
    raw = data(files["README.TXT"])
    text = raw.decode("utf-8-sig")
    assert raw.startswith(b"\xef\xbb\xbf")  # non-ASCII names: BOM for older editors
    assert "\r\n" in text and "\n" not in text.replace("\r\n", "")
    for needle in ("INDEX.HTM", "DICOMDIR", "personal health information", "Äneas, Rüdiger",
                   "Люкceмбypг", "2024-03-01", "St. Elsewhere & Partners", "Springfield",
                   "+1 555 0100", "mastering 0.1.0", "Volume 1 of 2", "DICOM PLUS WEB",
                   "3 images", "1 image (3 frames)", "2 documents", "2024-05-06"):
        assert needle in text, needle


def test_index_lists_patients_studies_and_series(files):
    page = parse(files["INDEX.HTM"])
    text = " ".join(page.itertext())
    for name in CHARSET_NAMES.values():
        assert name in text
    for needle in ("General Hospital", "Who, Dr. Doctor", "ACC-1", "2024-03-01 10:15:00",
                   "CT, US, DOC", "3 images"):
        assert needle in text, needle
    thumbs = [i.get("src") for i in page.iter(XHTML + "img")]
    assert "IHE_PDI/PT000000/ST000000/SE000000/THUMB.JPG" in thumbs


def test_series_page_lists_every_frame_with_annotations(files):
    page = parse(files["IHE_PDI/PT000000/ST000000/SE000001/SERIES.HTM"])
    items = page.find(f".//{XHTML}ol[@id='images']")
    titles = [a.get("title") for a in items.iter(XHTML + "a")]
    assert len(titles) == 3 and "Frame 2/3" in titles[1]
    assert titles[1] == "Instance 1 · Frame 2/3 · Slice location (mm): 9.00"
    ct = parse(files["IHE_PDI/PT000000/ST000000/SE000000/SERIES.HTM"])
    classes = [a.get("class") for a in ct.find(f".//{XHTML}ol[@id='images']").iter(XHTML + "a")]
    assert classes == ["has-B", "has-B", None]
    presets = [a.text for a in ct.iter(XHTML + "a") if "preset" in (a.get("class") or "")]
    assert presets == ["Soft tissue", "Lung"]


def test_preset_pages_fall_back_to_the_default_jpeg(files):
    base = "IHE_PDI/PT000000/ST000000/SE000000/"
    img = parse(files[base + "B0000003.HTM"]).find(f".//{XHTML}img[@id='view']")
    assert img.get("src") == "A0000003.JPG"
    img = parse(files[base + "B0000002.HTM"]).find(f".//{XHTML}img[@id='view']")
    assert img.get("src") == "B0000002.JPG"
    assert data(files[base + "B0000001.JPG"]) != data(files[base + "A0000001.JPG"])


def test_documents_are_listed_and_pdf_placed(files):
    base = "IHE_PDI/PT000000/ST000000/"
    pdf = [p for p in files if p.endswith(".PDF")]
    assert pdf == [base + "SE000002/D0000001.PDF"] and data(files[pdf[0]]) == PDF
    text = " ".join(parse(files[base + "SE000002/SERIES.HTM"]).itertext())
    assert "PDF: Radiology report" in text and "SR: Diagnosis" in text and "3 cm" in text


def test_estimate_is_what_build_writes(model):
    total = estimate_bytes(model, site=SITE)
    written = medium_bytes(build(model, site=SITE, created=CREATED))
    assert total == written
    fixed = estimate_bytes([], site=SITE)
    assert 0 < fixed < total
    assert estimate_bytes(model[:1], site=SITE) < total
    one = WebPatient("A", "1", studies=[WebStudy("1", series=[WebSeries("1", images=[
        WebImage("1.1", jpegs=[b"x" * 5000])])])])
    assert estimate_bytes([one], sector=2048) % 2048 != 0  # directory records count too
    assert estimate_bytes([one]) - fixed >= 3 * 2048  # the JPEG, its page, the series page


def test_site_settings_language_logo_and_template_override(tmp_path, model):
    Image.new("RGB", (60, 20), "navy").save(tmp_path / "logo.png")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "readme.txt").write_text("Own README for {{ site.institution }}\n")
    (tmp_path / "site.toml").write_text(
        'institution = "Klinikum Süd"\nlanguage = "de"\nlogo = "logo.png"\n'
        'templates = "mine"\naddress = ["Hauptstr. 1", "12345 Musterstadt"]\n'
        '[messages]\nindex_heading = "Ihre Bilder"\n', encoding="utf-8")
    site = load_site(tmp_path / "site.toml")
    assert site.address == "Hauptstr. 1\n12345 Musterstadt"
    out = {"/".join(c): v for c, v in build(model, site=site, created=CREATED)}
    assert out["IHE_PDI/LOGO.PNG"] == tmp_path / "logo.png"
    index = parse(out["INDEX.HTM"])
    assert index.get("lang") == "de"
    text = " ".join(index.itertext())
    assert "Ihre Bilder" in text and "Geburtsdatum" in text and "Klinikum Süd" in text
    assert "IHE_PDI/LOGO.PNG" in [i.get("src") for i in index.iter(XHTML + "img")]
    assert data(out["README.TXT"]).decode("utf-8-sig") == "Own README for Klinikum Süd\r\n"
    assert "Bild {n} von {count}" in data(out["VIEWER/VIEWER.JS"]).decode()


def test_bad_site_settings_are_refused(tmp_path):
    (tmp_path / "a.toml").write_text('institution = "X"\ninstitutoin = "typo"\n')
    with pytest.raises(ValueError, match="institutoin"):
        load_site(tmp_path / "a.toml")
    (tmp_path / "b.json").write_text('{"logo": "logo.gif"}')
    with pytest.raises(ValueError, match="logo"):
        load_site(tmp_path / "b.json")
    with pytest.raises(ValueError, match="language"):
        build([], site=Site(language="../../etc"))
    with pytest.raises(ValueError, match="volume"):
        build([], volume=3, volumes=2)


def test_dicom_only_media_get_readme_and_index_only(model):
    out = {"/".join(c): v for c, v in build(model, web=False, created=CREATED)}
    assert set(out) == {"README.TXT", "INDEX.HTM"}
    index = parse(out["INDEX.HTM"])
    assert index.find(f".//{XHTML}style") is not None and not links(index)
    assert "DICOM ONLY" in " ".join(index.itertext())
    assert "INDEX.HTM" not in data(out["README.TXT"]).decode("utf-8-sig")


def test_write_files_streams_paths(tmp_path, files):
    src = tmp_path / "src.jpg"
    src.write_bytes(b"\xff\xd8jpeg")
    write_files([(("IHE_PDI", "X.JPG"), src), (("README.TXT",), b"hi")], tmp_path / "out")
    assert (tmp_path / "out" / "IHE_PDI" / "X.JPG").read_bytes() == b"\xff\xd8jpeg"


def test_names_that_break_iso9660_are_refused():
    with pytest.raises(ValueError, match="ISO 9660"):
        webcontent.check_names([(("IHE_PDI", "index.htm"), b"")])
    with pytest.raises(ValueError, match="auto-run"):
        webcontent.check_names([(("AUTORUN.INF",), b"")])


# -- the label -----------------------------------------------------------------------------


def test_label_svg_has_what_pdi_asks(model):
    svg = label.label_svg(model[:1], volume=2, volumes=3, site=SITE, web=True, created=CREATED)
    root = ET.fromstring(svg)
    texts = {t.get("class"): "".join(t.itertext()) for t in root.iter(
        "{http://www.w3.org/2000/svg}text")}
    assert texts["name"] == "Äneas, Rüdiger"
    assert texts["patient"] == "ID-GERM · born 1970-01-02"
    assert texts["institution"] == "St. Elsewhere & Partners"
    assert texts["kind"] == "DICOM PLUS WEB" and texts["volume"] == "Volume 2 of 3"
    assert texts["created"] == "Created 2024-05-06"
    assert texts["study"].startswith("2024-03-01 · CT, US, DOC · <script>")
    assert "<script>" not in svg  # escaped


def test_label_fits_and_shortens_long_text():
    long = WebPatient("Verylongfamilyname-" * 6 + ", Given", "X" * 64, studies=[
        WebStudy(str(i), date="2024-01-01", description="D" * 200) for i in range(7)])
    lay, _r = label.layout([long], volume=1, volumes=1, web=False)
    for line in lay.lines:
        assert line.width <= label.SIZE, line
    assert any(line.text.endswith("…") for line in lay.lines if line.role == "name")
    assert [ln.text for ln in lay.lines if ln.role == "more"] == ["and 3 more studies"]
    assert [ln.text for ln in lay.lines if ln.role == "kind"] == ["DICOM ONLY"]


def test_label_png_is_a_300_dpi_disc(model):
    png = label.label_png(model[2:3], volume=1, volumes=1, site=SITE, web=True, created=CREATED)
    img = Image.open(io.BytesIO(png))
    assert img.size == (1417, 1417) and round(img.info["dpi"][0]) == 300
    gray = img.convert("L")
    assert ImageStat.Stat(gray).extrema[0][0] < 50  # there is dark text on it
    top = gray.crop((300, 150, 1117, 480))
    assert ImageStat.Stat(top).mean[0] < 250  # the patient block above the hub


def test_label_files_go_beside_the_output(tmp_path, model):
    svg, png = label.write_label(tmp_path / "OUT-1.iso", model[:1], volume=1, volumes=2,
                                 site=SITE, web=False, created=CREATED)
    assert (svg.name, png.name) == ("OUT-1.label.svg", "OUT-1.label.png")
    assert "DICOM ONLY" in svg.read_text(encoding="utf-8")
    assert Image.open(png).size == (1417, 1417)
    assert label.label_paths(tmp_path / "USB")[0].name == "USB.label.svg"


def test_real_renderings_fit(tmp_path):
    """mastering.render's Rendering goes straight into the Collector."""
    render = pytest.importorskip("mastering.render")
    c = Collector()
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        path = get_testdata_file(name)
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        c.add(ds, render.render(path) if render.renderable(path) else None)
    files = {"/".join(k): v for k, v in build(c.patients, created=CREATED)}
    images = [i for p in c.patients for s in p.studies for se in s.series for i in se.images]
    assert len(images) == 2
    mr = next(i for i in images if i.summary.get("modality") == "MR")
    assert mr.preset and mr.preset != "default" and mr.preset in mr.windows
    for path, content in files.items():
        if path.endswith(".HTM"):
            parse(content)
    assert sum(p.endswith(".JPG") for p in files) >= 2


def test_without_the_viewer_no_script_is_referenced(model):
    out = {"/".join(c): v for c, v in build(model, viewer=False, created=CREATED)}
    assert not any(p.startswith("VIEWER/") for p in out)
    for path, content in out.items():
        if path.endswith(".HTM"):
            assert not list(parse(content).iter(XHTML + "script")), path
    assert crawl(out) <= set(out)
