"""The doctor's HTML report: content, self-containment, and rendering in real headless Chromium.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
separated by NUL bytes on file descriptors 3 and 4), so the test sees every console message with
its level, uncaught exceptions, failed resource loads and every request the page makes, with the
standard library only. ``scripts/ensure_chromium.sh`` installs Chromium; the tests fail without it.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from gradwise.doctor.report import _decimate, report_run, write_report
from gradwise.errors import GradwiseError

# ---------------------------------------------------------------------------------------------
# a synthetic run directory in the format the Doctor and the Trainer write

LAYERS = ["features.0", "features.3", "head"]
ACTION = "rolled back to step 100; lowered lr 3e-3 -> 1e-3; clip 1.0"
FINDINGS = [
    {
        "code": "GW210",
        "name": "dead-relus",
        "severity": "warning",
        "step": 250,
        "message": "62% of the units after features.1 never fire.",
        "evidence": {"dead_fraction": 0.62, "layer_index": 1},
        "fixes": ["Use LeakyReLU or GELU in place of ReLU.", "Lower the learning rate."],
        "references": ["He et al. 2015, Delving deep into rectifiers"],
        "count": 1,
        "last_step": 250,
    },
    {
        "code": "GW302",
        "name": "exploding-gradients",
        "severity": "error",
        "step": 120,
        "message": "The gradient norm jumped to 512, 165x its recent median.",
        "evidence": {"grad_norm": 512.0, "median_recent": 3.1},
        "fixes": ["Clip gradients at norm 1.0.", "Lower the learning rate 3x."],
        "references": ["Pascanu et al. 2013, On the difficulty of training RNNs"],
        "count": 3,
        "last_step": 180,
    },
    {
        "code": "GW105",
        "name": "no-warmup",
        "severity": "info",
        "step": 0,
        "message": "Training starts at the peak learning rate.",
        "evidence": {},
        "fixes": ["Warm up for 5% of the steps."],
        "references": [],
    },
]
REPAIRS = [{"step": 130, "code": "GW302", "action": ACTION, "rolled_back_to": 100}]
RECIPE = """\
task: classification
model: {name: cnn}
optim: {name: adamw, lr: 0.003, weight_decay: 0.05}
schedule: {name: warmup_cosine, warmup: 0.05}
data: {batch_size: 64}
train: {epochs: 20, grad_clip: 1.0}
"""


def telemetry(steps: int = 400, every: int = 10, layers: list[str] = LAYERS) -> dict[str, Any]:
    """Smooth, deterministic telemetry with a gradient spike at step 120."""
    s = list(range(0, steps + 1, every))
    wobble = [1 + 0.3 * math.sin(i) for i in range(len(s))]
    return {
        "sample_every": every,
        "loss": [
            [t, 2.3 * math.exp(-t / 100) + 0.1 + 0.05 * w] for t, w in zip(s, wobble, strict=True)
        ],
        "lr": [[t, 3e-3 * min(1.0, (t + 1) / 20)] for t in s],
        "grad_norm": [[t, 512.0 if t == 120 else 1.5 * w] for t, w in zip(s, wobble, strict=True)],
        "layers": layers,
        "layer_grad_norm": {
            n: [[t, 0.1 * (i + 1) * w] for t, w in zip(s, wobble, strict=True)]
            for i, n in enumerate(layers)
        },
        "update_ratio": {
            n: [[t, 1e-3 * 3.0 ** (i - 1) * w] for t, w in zip(s, wobble, strict=True)]
            for i, n in enumerate(layers)
        },
        "activations": {
            "features.1": {
                "kind": "ReLU",
                "mean": [[t, 0.4] for t in s],
                "std": [[t, 0.9 - t / steps / 2] for t in s],
                "dead": [[t, 0.62 * t / steps] for t in s],
                "saturated": [],
            },
            "features.4": {
                "kind": "Tanh",
                "mean": [[t, 0.01] for t in s],
                "std": [[t, 0.6] for t in s],
                "saturated": [[t, 0.1 + 0.2 * t / steps] for t in s],
            },
        },
        "val": [
            {"step": t, "loss": 2.0 * math.exp(-t / 100) + 0.2, "metric": 1 - math.exp(-t / 100)}
            for t in s[10::10]
        ],
    }


def make_run(
    root: Path, tel: dict | None = None, findings: list | None = None, repairs: list | None = None
) -> Path:
    """A run directory with metrics.jsonl, recipe.yaml and the doctor's three files."""
    run = root / "digits-cnn"
    (run / "doctor").mkdir(parents=True)
    (run / "doctor" / "telemetry.json").write_text(json.dumps(telemetry() if tel is None else tel))
    (run / "doctor" / "findings.json").write_text(
        json.dumps(FINDINGS if findings is None else findings)
    )
    (run / "doctor" / "repairs.json").write_text(
        json.dumps(REPAIRS if repairs is None else repairs)
    )
    (run / "recipe.yaml").write_text(RECIPE)
    lines = [
        {
            "step": t,
            "epoch": 1,
            "time": t / 10,
            "split": "train",
            "loss": 1.0,
            "lr": 1e-3,
            "grad_norm": 1.0,
        }
        for t in range(10, 401, 10)
    ]
    lines += [
        {"split": "val", "step": t, "epoch": t // 100, "val_loss": 0.5, "val_accuracy": 0.9}
        for t in (100, 200, 300, 400)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of a run with every file and every telemetry key (rendered once per module)."""
    return report_run(make_run(tmp_path_factory.mktemp("full")))


# ---------------------------------------------------------------------------------------------
# HTML helpers


class _Page(HTMLParser):
    """The visible text of a page and every URL it refers to (src, href, CSS url(...))."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.text: list[str] = []
        self.urls: list[str] = []
        self.tags: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("script", "style"):
            self._skip += 1
        self.urls += [
            v or ""
            for k, v in attrs
            if k in ("src", "href", "xlink:href", "srcset", "action", "data")
        ]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if self._skip:
            import re

            self.urls += re.findall(r"url\(\s*['\"]?([^'\")]*)", data)
            self.urls += ["@import"] if "@import" in data else []
        else:
            self.text.append(data)


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def plain(html: str) -> str:
    """The visible text with whitespace collapsed."""
    return " ".join(" ".join(parse(html).text).split())


# ---------------------------------------------------------------------------------------------
# content


def test_report_shows_findings_curves_layers_activations_and_repairs(full_report: Path) -> None:
    assert full_report == full_report.parent / "report.html"
    html = full_report.read_text(encoding="utf-8")
    text = plain(html)

    assert "digits-cnn" in text
    assert "1 error, 1 warning (1 note, 1 automatic repair)" in text
    for item in ("adamw", "0.003", "warmup_cosine", "batch size", "64", "grad clip"):
        assert item in text
    for finding in FINDINGS:
        assert finding["code"] in text and finding["name"] in text and finding["message"] in text
        for fix in finding["fixes"]:
            assert fix in text
        for ref in finding["references"]:
            assert ref in text
    for value in ("512", "3.1", "0.62", "median_recent", "dead_fraction"):
        assert value in text
    assert "step 120 – 180 · fired 3×" in text
    assert ACTION in text and "rolled back to" in text
    # errors first, then warnings, then info
    assert (
        text.index("GW302 exploding-gradients")
        < text.index("GW210 dead-relus")
        < text.index("GW105 no-warmup")
    )
    # sections in the expert's order, each chart an inline SVG
    ids = ['id="findings"', 'id="curves"', 'id="layers"', 'id="activations"', 'id="repairs"']
    assert [html.index(i) for i in ids] == sorted(html.index(i) for i in ids)
    for chart in ("loss", "lr", "grad-norm", "layer-grad-norm", "update-ratio", "activations"):
        assert f'<figure class="chart" id="chart-{chart}">\n<svg' in html
    assert "not available" not in text


def test_report_is_self_contained(full_report: Path) -> None:
    html = full_report.read_text(encoding="utf-8")
    page = parse(html)
    assert "svg" in page.tags and "script" in page.tags
    assert "link" not in page.tags and "iframe" not in page.tags and "img" not in page.tags
    assert page.urls, "the page's own anchors (#findings...) should have been seen"
    for url in page.urls:
        assert url.startswith(("#", "data:")), f"reference to something outside the file: {url!r}"
    assert 'src="http' not in html and 'href="http' not in html and "@import" not in html


def test_missing_telemetry_says_what_is_not_available(tmp_path: Path) -> None:
    run = make_run(
        tmp_path, tel={"loss": telemetry()["loss"], "layer_grad_norm": {}}, findings=[], repairs=[]
    )
    (run / "metrics.jsonl").unlink()
    (run / "recipe.yaml").unlink()
    text = plain(report_run(run).read_text(encoding="utf-8"))
    assert "healthy: no warnings or errors" in text
    assert "No findings" in text and "No repairs" in text
    for what in (
        "Recipe",
        "Learning rate",
        "Gradient norm",
        "Per-layer gradient norms",
        "Update-to-weight ratios",
        "Activation statistics",
    ):
        assert f"{what}: not available" in text
    assert "Loss: not available" not in text  # the loss is there


def test_run_without_doctor_files_uses_metrics(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    shutil.rmtree(run / "doctor")
    out = report_run(run, tmp_path / "elsewhere" / "r.html")
    html = out.read_text(encoding="utf-8")
    text = plain(html)
    assert out == tmp_path / "elsewhere" / "r.html" and not (run / "report.html").exists()
    assert "Training loss (from metrics.jsonl)" in text
    assert "No findings" in text
    for chart in ("loss", "lr", "grad-norm"):
        assert f'id="chart-{chart}"' in html
    assert "Per-layer gradient norms: not available" in text


def test_write_report_with_nothing_at_all(tmp_path: Path) -> None:
    out = write_report(tmp_path / "r.html", telemetry={}, findings=[])
    text = plain(out.read_text(encoding="utf-8"))
    assert "gradwise report" in text and "No findings" in text and "Loss: not available" in text


def test_degenerate_telemetry_still_renders(tmp_path: Path, browser: Chromium) -> None:
    """NaN, null, zero and malformed values, one-point series: the report renders, no errors."""
    tel = {
        "loss": [[5, math.nan], [6, math.inf], [7, None], "junk", [8], [9, 2.5]],
        "lr": [[5, 0.0]],
        "grad_norm": [[5, 0.0], [6, -1.0]],
        "layers": ["a", "b"],
        "layer_grad_norm": {"a": [[5, 0.0]], "b": [[5, 0.0], [6, 0.0]]},
        "update_ratio": {"a": [[5, 0.0]]},
        "activations": {"r": {"kind": "ReLU", "std": [[5, 0.0]], "dead": [[5, 1.0]]}, "x": "junk"},
        "val": [{"step": 5, "loss": None, "metric": None}],
    }
    findings = [{"code": "GW999"}, {"severity": "odd", "evidence": {"x": "text"}}, "junk"]
    out = write_report(
        tmp_path / "r.html", telemetry=tel, findings=findings, repairs=[{"step": 6}, 3]
    )
    text = plain(out.read_text(encoding="utf-8"))
    assert "GW999" in text and "NaN or infinite at 3 sampled steps" in text
    page = render(browser, out)
    assert page.problems == []


def test_damaged_doctor_file_is_a_clear_error(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / "doctor" / "findings.json").write_text('[{"code": "GW3')
    with pytest.raises(GradwiseError, match=r"findings\.json is not valid JSON"):
        report_run(run)
    with pytest.raises(GradwiseError, match="not a directory"):
        report_run(tmp_path / "missing")


def test_long_runs_are_downsampled(tmp_path: Path) -> None:
    tel = telemetry(steps=10_000, every=1, layers=[f"blocks.{i}" for i in range(12)])
    tel["grad_norm"][7777][1] = 1e4  # a one-step spike must survive the downsampling
    out = write_report(tmp_path / "r.html", telemetry=tel, findings=FINDINGS, repairs=REPAIRS)
    assert out.stat().st_size < 2_000_000

    x = np.arange(10_000, dtype=float)
    y = np.ones(10_000)
    y[7777] = 1e4
    dx, dy = _decimate(x, y, 1000)
    assert len(dx) <= 1000 and 7777 in dx and dy.max() == 1e4 and np.all(np.diff(dx) > 0)


# ---------------------------------------------------------------------------------------------
# headless Chromium over the DevTools protocol


class Chromium:
    """Headless Chromium, driven over ``--remote-debugging-pipe`` with the standard library."""

    def __init__(self, profile: Path) -> None:
        binary = shutil.which("chromium")
        assert binary, "chromium is not installed: run scripts/ensure_chromium.sh (make test does)"
        to_chrome_read, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_write = os.pipe()
        # the child's ends must not be fds 3 or 4 themselves, or the redirections below clash
        to_chrome_read, from_chrome_write = _above_4(to_chrome_read), _above_4(from_chrome_write)
        args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--mute-audio",
            "about:blank",
        ]
        # the protocol is on fds 3 (commands in) and 4 (replies and events out): a small Python
        # launcher puts the pipes there and execs chromium (sh cannot redirect fds above 9)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _LAUNCH,
                str(to_chrome_read),
                str(from_chrome_write),
                binary,
                *args,
            ],
            pass_fds=(to_chrome_read, from_chrome_write),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_read)
        os.close(from_chrome_write)
        self._messages: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._next_id = 0
        self.events: list[dict] = []

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._from_chrome, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self._messages.put(json.loads(message))
        self._messages.put(None)

    def send(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 30,
    ) -> dict:
        """Send a command and return its result; events that arrive meanwhile go to ``events``."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._get(timeout)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, session: str, timeout: float = 30) -> dict:
        """The first event ``method`` of tab ``session``, received now or before."""
        for event in self.events:
            if event.get("method") == method and event.get("sessionId") == session:
                return event
        while True:
            event = self._get(timeout)
            self.events.append(event)
            if event.get("method") == method and event.get("sessionId") == session:
                return event

    def _get(self, timeout: float) -> dict:
        try:
            message = self._messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"chromium sent nothing for {timeout} s") from None
        assert message is not None, "chromium closed the DevTools pipe"
        return message

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):  # it may have gone already
            self.send("Browser.close", timeout=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_chrome)
        self._reader.join(timeout=5)
        os.close(self._from_chrome)


_LAUNCH = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"


def _above_4(fd: int) -> int:
    """``fd`` moved to a number above 4 (closing the original)."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
    os.close(fd)
    return high


class Rendered:
    """What a page did in the browser: problems, requests, visible text, screenshot."""

    def __init__(self, events: list[dict], text: str, png: bytes, checks: Any) -> None:
        self.text, self.png, self.checks = text, png, checks
        self.problems: list[str] = []
        self.requests: list[str] = []
        for event in events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params["type"] in (
                "error",
                "warning",
                "assert",
            ):
                args = " ".join(
                    str(a.get("value", a.get("description", ""))) for a in params["args"]
                )
                self.problems.append(f"console.{params['type']}: {args}")
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                self.problems.append(
                    f"uncaught: {details.get('exception', {}).get('description', details['text'])}"
                )
            elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
                self.problems.append(f"log {params['entry']['level']}: {params['entry']['text']}")
            elif method == "Network.requestWillBeSent":
                self.requests.append(params["request"]["url"])


def render(browser: Chromium, html_file: Path, script: str = "null") -> Rendered:
    """Open ``html_file`` in a new tab, run ``script`` in it, and record what happened there."""
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    attached = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})
    session = attached["sessionId"]

    def send(method: str, params: dict | None = None) -> dict:
        return browser.send(method, params, session=session)

    def evaluate(expression: str) -> Any:
        result = send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    try:
        for domain in ("Runtime", "Log", "Network", "Page"):
            send(f"{domain}.enable")
        viewport = {"width": 1280, "height": 1800, "deviceScaleFactor": 1, "mobile": False}
        send("Emulation.setDeviceMetricsOverride", viewport)
        navigated = send("Page.navigate", {"url": html_file.resolve().as_uri()})
        assert "errorText" not in navigated, navigated
        browser.wait_for("Page.loadEventFired", session)
        text = evaluate("document.body.innerText")
        checks = evaluate(script)
        png = base64.b64decode(send("Page.captureScreenshot", {"format": "png"})["data"])
        evaluate("1")  # a round trip, so that every event of the page has arrived
    finally:
        browser.send("Target.closeTarget", {"targetId": target})
    events = [e for e in browser.events if e.get("sessionId") == session]
    return Rendered(events, text, png, checks)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    """One headless Chromium for the module; each page gets its own tab."""
    chromium = Chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


# measured in the browser: every chart's size, and the severity filter at work
CHECKS = """({
  charts: Array.from(document.querySelectorAll("figure.chart svg"), s => s.getBoundingClientRect().height),
  hidden: (document.querySelector("input[data-filter=error]").click(),
           document.querySelector(".finding.error").hidden),
  warningShown: !document.querySelector(".finding.warning").hidden,
})"""


def test_report_renders_in_chromium_without_console_errors(
    full_report: Path, browser: Chromium
) -> None:
    page = render(browser, full_report, CHECKS)

    assert page.problems == []
    assert page.requests and all(url.startswith(("file:", "data:")) for url in page.requests), (
        page.requests
    )
    for finding in FINDINGS:
        assert finding["code"] in page.text and finding["message"] in page.text
    assert ACTION in page.text
    # six charts, each laid out with a real height; the filter's JavaScript ran
    assert len(page.checks["charts"]) == 6 and min(page.checks["charts"]) > 100
    assert page.checks["hidden"] is True and page.checks["warningShown"] is True

    assert len(page.png) > 10_000
    image = Image.open(io.BytesIO(page.png)).convert("RGB")
    assert image.size == (1280, 1800)
    assert image.getcolors(maxcolors=64) is None, "the screenshot is (nearly) a single colour"


@pytest.mark.parametrize(
    ("injected", "expected"),
    [
        ('<script>console.error("injected failure")</script>', "console.error: injected failure"),
        ("<script>null.boom()</script>", "uncaught: TypeError"),
        ('<img src="missing-image.png" alt="">', "log error: Failed to load resource"),
    ],
)
def test_console_check_catches_errors(
    full_report: Path, browser: Chromium, tmp_path: Path, injected: str, expected: str
) -> None:
    broken = tmp_path / "broken.html"
    broken.write_text(
        full_report.read_text(encoding="utf-8").replace("</body>", f"{injected}\n</body>")
    )
    page = render(browser, broken)
    assert any(p.startswith(expected) for p in page.problems), page.problems


def test_ensure_chromium_script_leaves_an_installed_chromium_alone() -> None:
    script = Path(__file__).parents[2] / "scripts" / "ensure_chromium.sh"
    result = subprocess.run(["sh", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout == "", result.stderr
