"""The HTML run report: content, self-containment, and a headless Chromium screenshot (the calibration maths of
the classification section are tested in test_classification.py)."""

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from matplotlib.image import imread

from textune.cli import main
from textune.errors import TextuneError
from textune.report import build_report, write_report

CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Resources(HTMLParser):
    """Every URL-valued attribute (src, href, srcset, poster, data) and every CSS url(...) of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.urls, self.styles, self.text = [], [], [], []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href", "srcset", "poster", "data", "action") and value is not None:
                self.urls.append(value)
            if name == "style" and value:
                self.styles.append(value)
        if tag == "img":
            self.images.append(dict(attrs).get("src", ""))
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        self._in_style = False

    def handle_data(self, data):
        (self.styles if self._in_style else self.text).append(data)


def parse(page: str) -> Resources:
    r = Resources()
    r.feed(page)
    return r


def test_report_has_every_section_and_is_self_contained(trained_run):
    page = build_report(trained_run)
    r = parse(page)
    text = " ".join(r.text)
    for heading in ("Diagnosis", "Learning curves", "Final validation metrics", "Confusion matrix", "Calibration",
                    "Expected calibration error", "Most confidently wrong", "Label balance", "Token lengths",
                    "Config", "Precision-recall curve"):
        assert heading in text, heading
    assert "negative" in text and "positive" in text  # label names in the confusion matrix
    assert len(r.images) == 5  # loss, metrics, lr, reliability, precision-recall (a binary classifier)
    for src in r.images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC  # no broken image
    assert not [u for u in r.urls if not u.startswith("data:")], "only data: URIs may be referenced"
    css = " ".join(r.styles)
    assert "url(" not in css and "@import" not in css and "@font-face" not in css
    assert "<script" not in page.lower() and "<link" not in page.lower()


def test_report_of_an_unfinished_run_says_what_is_missing(trained_run, tmp_path):
    run = tmp_path / "running"
    run.mkdir()
    for name in ("history.jsonl", "config.yaml", "data_stats.json"):
        shutil.copy(trained_run / name, run / name)
    text = " ".join(parse(build_report(run)).text)
    assert "metrics.json is missing (the run has not finished)" in text
    assert "validation_predictions.jsonl is missing" in text
    assert "Learning curves" in text


def test_report_errors_name_the_problem(tmp_path):
    with pytest.raises(TextuneError, match="run folder not found"):
        write_report(tmp_path / "nope")
    with pytest.raises(TextuneError, match="has no history.jsonl"):
        write_report(tmp_path)


def test_cli_report_writes_run_report_html(trained_run, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("model", "checkpoints"))
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()
    assert f"report written to {run / 'report.html'}" in capsys.readouterr().out


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium; `make test` "
                                                  "installs it when it can)")
def test_report_renders_in_headless_chromium(trained_run, tmp_path):
    page = tmp_path / "report.html"
    write_report(trained_run, page)
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([str(CHROMIUM), *flags, f"--screenshot={shot}", "--window-size=1280,2400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.is_file() and shot.stat().st_size > 50_000
    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels[..., :3].std() > 0.05  # something was drawn, not a blank page

    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    r = parse(dom)
    assert "Most confidently wrong validation examples" in " ".join(r.text)
    assert len(r.images) == 5 and all(src.startswith("data:image/png;base64,") for src in r.images)
