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


# ---------------------------------------------------------------- what a task reads: data and config sections


@pytest.fixture(scope="module")
def ner_run(tiny_model, tmp_path_factory):
    from test_token_classification import ner_overrides, write_conll
    from textune.config import load_config
    from textune.train import train

    d = tmp_path_factory.mktemp("ner-report")
    data = {"train": write_conll(d / "train.conll", 40, seed=1), "validation": write_conll(d / "val.conll", 12, seed=2)}
    return train(load_config(None, ner_overrides(tiny_model, data, d / "ner", **{"train.max_steps": 3})))


def config_rows(page: str) -> dict[str, tuple[str, str]]:
    """section.key -> (row class: changed or default, the value shown) of the report's config panel."""
    import re

    config = page[page.index('<section id="config">'):]
    rows = {}
    for section, table in re.findall(r"<h3>([^<]+)</h3><table>(.*?)</table>", config):
        for kind, key, value in re.findall(r'<tr class="(\w+)"><td class="k">([^<]+)</td><td class="v">([^<]*)</td>',
                                           table):
            rows[f"{section}.{key}"] = (kind, value)
    return rows


def test_an_ner_report_has_no_empty_label_table_and_shows_the_ner_config(ner_run):
    page = build_report(ner_run)
    assert "Label balance: entities per type" in page  # the task's own balance, entities per type
    assert "<h3>Label balance</h3>" not in page  # no generic table: NER writes no label_counts
    assert "Token lengths" in page
    rows = config_rows(page)
    assert {"data.tokens_column", "data.tags_column", "data.label_all_tokens", "train.lr", "run.task"} <= set(rows)
    other_tasks = {"data.label_scale", "data.label_separator", "data.doc_stride", "data.system_prompt",
                   "train.class_weights", "train.threshold", "train.loss_on", "eval.max_new_tokens",
                   "model.chat_template", "pretrain.objective"}
    assert not other_tasks & set(rows)
    assert not any(key.startswith("pretrain.") for key in rows)
    assert rows["train.lr"] == ("changed", "0.005") and rows["train.max_steps"] == ("changed", "3")
    assert rows["train.weight_decay"] == ("default", "0.01") and rows["data.label_all_tokens"][0] == "default"
    assert rows["train.metric"] == ("default", "f1")  # the task's headline, filled in by training, is its default
    assert "default 5.0e-05" in page  # a changed value names its default


def test_a_classifier_report_shows_its_own_keys_and_label_table(trained_run):
    page = build_report(trained_run)
    assert "<h3>Label balance</h3>" in page
    rows = config_rows(page)
    assert "train.class_weights" in rows and "data.label_column" in rows
    assert not {"data.tokens_column", "data.doc_stride", "data.label_scale", "eval.generate_samples"} & set(rows)
    assert rows["model.max_length"] == ("changed", "32") and rows["train.scheduler"] == ("default", "linear")
