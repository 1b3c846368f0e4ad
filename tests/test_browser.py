"""The built book in a real browser: every page opens in headless Chromium without JavaScript errors, every
plotly figure and every formula renders, nothing is fetched from the network and every internal link resolves.

Chromium is driven over the DevTools protocol through `--remote-debugging-pipe` (no port, no extra package):
console errors, uncaught exceptions, failed loads and every request come back as events, which is more exact
than scraping `--enable-logging=stderr` (whose lines carry no console level). Each page is opened in a fresh
browser context (empty storage, like a first visit) and checked once its figures and MathJax have finished,
not after a fixed time budget. The whole of each page lands in `book/_build/screenshots/` for review, in
pieces (`<page>.png`, `<page>-2.png`, ...: Chromium leaves what lies far below the viewport unpainted). The
book built by tests/test_book.py earlier in the session is used; it is built here when missing.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from weightscope.publish.book import BOOK, chapter_sources

HTML = BOOK / "_build" / "html"
SCREENSHOTS = BOOK / "_build" / "screenshots"
SKIPPED_PAGES = {"genindex.html", "search.html"}


def _find_chromium() -> str | None:
    for name in (os.environ.get("WEIGHTSCOPE_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


CHROMIUM = _find_chromium()
FLAGS = [
    "--headless", "--no-sandbox", "--no-first-run", "--disable-background-networking", "--disable-sync",
    "--disable-component-update", "--disable-default-apps", "--disable-extensions", "--disable-dev-shm-usage",
    "--mute-audio", "--hide-scrollbars",
    # WebGL in a GPU-less headless browser is software-rendered; without this flag Chromium warns that the
    # automatic fallback is deprecated (and may drop it). Only the book's own file:// pages are opened here.
    "--enable-unsafe-swiftshader",
]
VIEWPORT = {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}
TILE_HEIGHT = 6000  # px per screenshot piece: one capture of a long page is blank below about 10,000 px
# scroll a piece into view and wait until it is painted (two frames, then a pause for late layout)
SCROLL_JS = ("window.scrollTo(0, %(y)d); new Promise(r => requestAnimationFrame(() => "
             "requestAnimationFrame(() => setTimeout(() => r(1), 300))))")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Chromium is not installed (no `chromium`, `chromium-browser` or `google-chrome` on PATH; "
        "Debian/Ubuntu: apt-get install chromium; or set WEIGHTSCOPE_CHROMIUM=/path/to/chrome)",
    ),
]


# --- a minimal DevTools-protocol client over --remote-debugging-pipe (fd 3: commands in, fd 4: replies) ---


class Browser:
    def __init__(self, executable: str, profile: Path, log: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds():  # in the child: the protocol pipes become fds 3 and 4 (via fds >= 10: no clash)
            a = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [executable, *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=wire_fds, close_fds=False, start_new_session=True,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self.log_path = log
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    def _receive(self, timeout: float) -> None:
        ready, _, _ = select.select([self._from_browser], [], [], timeout)
        if ready:
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited; its log:\n{self.log_tail()}")
            self._buffer += chunk
        while b"\0" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\0", 1)
            self.events.append(json.loads(raw))

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self._next_id += 1
        call = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            call["sessionId"] = session
        os.write(self._to_browser, json.dumps(call).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self.events):
                if message.get("id") == call["id"]:
                    del self.events[i]
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message.get("result", {})
            if time.monotonic() > deadline:
                raise TimeoutError(f"Chromium did not answer {method} within {timeout} s")
            self._receive(0.05)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._receive(min(left, 0.05))

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
            self.proc.wait(10)
        except Exception:
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group (start_new_session above)
            self.proc.wait(10)
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        self._log.close()


# --- what one page looks like once loaded ---

SETTLE_JS = """
new Promise(resolve => {
  const t0 = performance.now();
  const mathjax = new Promise(done => {
    if (!(window.MathJax && MathJax.Hub && MathJax.Hub.Register)) return done("absent");
    MathJax.Hub.Register.StartupHook("End", () => done("done"));  // replays if typesetting already ended
  });
  let mathjaxState = "pending";
  mathjax.then(state => { mathjaxState = state; });
  (function poll() {
    const divs = [...document.querySelectorAll("div.plotly-graph-div")];
    const rendered = divs.filter(d => d.querySelector("svg.main-svg")
                                      && d.getBoundingClientRect().height > 0);
    const ready = rendered.length === divs.length && mathjaxState !== "pending";
    if (!ready && performance.now() - t0 < %(timeout_ms)d) return setTimeout(poll, 100);
    resolve(JSON.stringify({
      url: location.href,
      plotly_divs: divs.length,
      plotly_rendered: rendered.length,
      main_svgs: document.querySelectorAll("svg.main-svg").length,
      mathjax: mathjaxState,
      math_elements: document.querySelectorAll(".math.notranslate").length,
      math_frames: document.querySelectorAll("[id^='MathJax-Element-'][id$='-Frame']").length,
      math_errors: document.querySelectorAll(".MathJax_Error, .noError, merror").length,
      waited_ms: Math.round(performance.now() - t0),
    }));
  })();
})
"""


@dataclass
class Visit:
    page: str
    stats: dict
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _visit(browser: Browser, page: Path) -> Visit:
    t0 = time.monotonic()
    rel = page.relative_to(HTML).as_posix()
    context = browser.send("Target.createBrowserContext")["browserContextId"]  # fresh storage: a first visit
    target = browser.send("Target.createTarget", {"url": "about:blank", "browserContextId": context})
    target = target["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    try:
        for domain in ("Runtime", "Log", "Network", "Page"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Emulation.setDeviceMetricsOverride", VIEWPORT, session=session)
        browser.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
        deadline = time.monotonic() + 60
        while not any(e.get("method") == "Page.loadEventFired" and e.get("sessionId") == session
                      for e in browser.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{rel}: no load event within 60 s")
            browser.drain(0.1)
        result = browser.send("Runtime.evaluate", {"expression": SETTLE_JS % {"timeout_ms": 30000},
                                                   "awaitPromise": True, "returnByValue": True},
                              session=session, timeout=45)
        stats = json.loads(result["result"]["value"])
        browser.drain(0.3)  # late console messages
        visit = Visit(rel, stats)
        _collect(visit, [e for e in browser.events if e.get("sessionId") == session])
        if stats["url"] == page.resolve().as_uri():  # not a redirect page (index.html): keep a screenshot
            visit.screenshots = _screenshot(browser, session, rel)
    finally:
        browser.events = [e for e in browser.events if e.get("sessionId") != session]
        browser.send("Target.closeTarget", {"targetId": target})
        browser.send("Target.disposeBrowserContext", {"browserContextId": context})
    visit.seconds = time.monotonic() - t0
    return visit


def _collect(visit: Visit, events: list[dict]) -> None:
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            visit.errors.append(f"{details.get('text', 'Uncaught')} {text} ({details.get('url', '')}:"
                                f"{details.get('lineNumber', '?')})")
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            if params["type"] in ("error", "assert"):
                visit.errors.append(f"console.{params['type']}: {text}")
            elif params["type"] == "warning":
                visit.warnings.append(text)
        elif method == "Log.entryAdded":
            entry = params["entry"]
            if entry["level"] == "error":
                visit.errors.append(f"{entry['text']} ({entry.get('url', '')})")
            elif entry["level"] == "warning":
                visit.warnings.append(entry["text"])
        elif method == "Network.requestWillBeSent":
            visit.requests.append(params["request"]["url"])


def _screenshot(browser: Browser, session: str, rel: str) -> list[Path]:
    """The whole page in pieces of TILE_HEIGHT px: the viewport is made one piece tall and scrolled to each
    piece before it is captured (a single capture beyond the viewport leaves the lower part unpainted):
    <page>.png, <page>-2.png, ..."""
    height = int(browser.send("Page.getLayoutMetrics", session=session)["cssContentSize"]["height"])
    stem = SCREENSHOTS / Path(rel).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    for old in stem.parent.glob(f"{stem.name}-*.png"):  # pieces of a longer earlier version
        old.unlink()
    browser.send("Emulation.setDeviceMetricsOverride", {**VIEWPORT, "height": min(height, TILE_HEIGHT)},
                 session=session)
    outs = []
    for i, y in enumerate(range(0, max(height, 1), TILE_HEIGHT)):
        browser.send("Runtime.evaluate", {"expression": SCROLL_JS % {"y": y}, "awaitPromise": True},
                     session=session)  # the last piece: the browser scrolls only as far as the page goes
        clip = {"x": 0, "y": y, "width": VIEWPORT["width"], "height": min(TILE_HEIGHT, height - y), "scale": 1}
        shot = browser.send("Page.captureScreenshot", {"format": "png", "clip": clip}, session=session,
                            timeout=60)
        out = stem.parent / (f"{stem.name}.png" if i == 0 else f"{stem.name}-{i + 1}.png")
        out.write_bytes(base64.b64decode(shot["data"]))
        outs.append(out)
    return outs


# --- the static side: links and loads in the page's HTML ---

LOADING_RELS = {"stylesheet", "preload", "modulepreload", "prefetch", "icon", "shortcut", "manifest",
                "apple-touch-icon"}  # <link rel=...> that make the browser fetch something
SRC_TAGS = ("script", "img", "iframe", "embed", "source", "audio", "video", "track")


class _Refs(HTMLParser):
    """Every URL a page refers to, with what refers to it, and the ids it defines (link targets)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute or rel, url)
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("name"):
            self.ids.add(a["name"])
        if tag == "link" and a.get("href"):
            self.refs.append((tag, (a.get("rel") or "").lower(), a["href"]))
        elif tag in ("a", "area") and a.get("href"):
            self.refs.append((tag, "href", a["href"]))
        elif tag in SRC_TAGS and a.get("src"):
            self.refs.append((tag, "src", a["src"]))
        elif tag == "meta" and (a.get("http-equiv") or "").lower() == "refresh":
            content = a.get("content") or ""
            if "url=" in content:
                self.refs.append((tag, "refresh", content.split("url=", 1)[1].strip()))


_PARSED: dict[Path, _Refs] = {}


def _parse(path: Path) -> _Refs:
    if path not in _PARSED:
        parser = _Refs()
        parser.feed(path.read_text(errors="replace"))
        _PARSED[path] = parser
    return _PARSED[path]


def _is_load(tag: str, kind: str) -> bool:
    return tag != "a" and tag != "area" and (tag != "link" or bool(set(kind.split()) & LOADING_RELS))


# --- fixtures ---


def _pages() -> list[Path]:
    def wanted(p: Path) -> bool:  # not under _static/, _sources/ ...
        parts = p.relative_to(HTML).parts
        return p.name not in SKIPPED_PAGES and not any(part.startswith("_") for part in parts)

    return sorted(p for p in HTML.rglob("*.html") if wanted(p))


@pytest.fixture(scope="module")
def book_html() -> Path:
    """The built book: from tests/test_book.py earlier in this session, or built here when it is missing."""
    if not (HTML / "index.html").is_file():
        proc = subprocess.run([sys.executable, "-m", "weightscope.publish.book", "--target", "demo"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (HTML / "index.html").is_file()
    return HTML


@pytest.fixture(scope="module")
def visits(book_html, tmp_path_factory) -> dict[str, Visit]:
    tmp = tmp_path_factory.mktemp("chromium")
    browser = Browser(CHROMIUM, tmp / "profile", tmp / "chromium.log")
    try:
        try:
            browser.send("Browser.getVersion", timeout=60)
        except (RuntimeError, TimeoutError) as err:
            pytest.fail(f"headless Chromium ({CHROMIUM}) did not start: {err}\n{browser.log_tail()}")
        shutil.rmtree(SCREENSHOTS, ignore_errors=True)
        out = {}
        for page in _pages():
            visit = _visit(browser, page)
            out[visit.page] = visit
            print(f"{visit.page}: {visit.seconds:.1f} s, {visit.stats}", file=sys.stderr)
        return out
    finally:
        browser.close()


# --- the checks ---


def test_every_chapter_page_is_checked(visits):
    expected = {"index.html", "intro.html"} | {f"demo/{s.stem}.html" for s in chapter_sources()}
    assert expected <= set(visits), sorted(expected - set(visits))


def test_no_javascript_errors(visits):
    # Nothing is allow-listed: any uncaught exception, console.error or failed load fails the page.
    errors = {page: v.errors for page, v in visits.items() if v.errors}
    assert not errors, json.dumps(errors, indent=1)


def test_every_plotly_figure_renders(visits, book_html):
    problems = {}
    for page, v in visits.items():
        in_html = (book_html / page).read_text(errors="replace").count('class="plotly-graph-div"')
        s = v.stats
        if s["url"] != (book_html / page).resolve().as_uri():
            continue  # a redirect page: its target is checked on its own
        if s["plotly_divs"] < in_html or s["plotly_rendered"] != s["plotly_divs"]:
            problems[page] = (f"{in_html} figure(s) in the HTML, {s['plotly_divs']} in the DOM, "
                              f"{s['plotly_rendered']} drawn")
    assert not problems, problems
    assert sum(v.stats["plotly_rendered"] for v in visits.values()) > 0, "no plotly figure in the whole book"


def test_math_renders(visits):
    problems = {}
    for page, v in visits.items():
        s = v.stats
        typeset = s["mathjax"] == "done" and s["math_frames"] >= s["math_elements"] and not s["math_errors"]
        if s["math_elements"] and not typeset:
            problems[page] = (f"MathJax {s['mathjax']}: {s['math_frames']} of {s['math_elements']} formulas "
                              f"typeset, {s['math_errors']} error(s)")
    assert not problems, problems
    assert any(v.stats["math_frames"] for v in visits.values()), "no typeset formula in the whole book"


def test_nothing_is_loaded_from_the_network(visits, book_html):
    static = {}
    for page in visits:
        loads = [url for tag, kind, url in _parse(book_html / page).refs
                 if _is_load(tag, kind) and url.lower().startswith(("http:", "https:", "//"))]
        if loads:
            static[page] = loads
    assert not static, f"pages that load from the network: {static}"
    fetched = {page: [u for u in v.requests if urlsplit(u).scheme not in ("file", "data", "blob", "about")]
               for page, v in visits.items()}
    fetched = {page: urls for page, urls in fetched.items() if urls}
    assert not fetched, f"requests the browser made beyond the book's files: {fetched}"


def test_internal_links_resolve(visits, book_html):
    root = book_html.resolve()
    broken = {}
    for page in visits:
        path = (book_html / page).resolve()
        for tag, kind, url in _parse(path).refs:
            parts = urlsplit(url)
            if parts.scheme or url.startswith("//") or not url.strip():
                continue  # external (checked above for loads) or mailto:/javascript:/data:
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            if target.is_dir():
                target = target / "index.html"
            problem = None
            if not target.is_relative_to(root):
                problem = "points outside the built book"
            elif not target.is_file():
                problem = "missing file"
            elif (parts.fragment and target.suffix == ".html"
                  and unquote(parts.fragment) not in _parse(target).ids):
                problem = f"no id {parts.fragment!r} in {target.relative_to(root)}"
            if problem:
                broken.setdefault(page, []).append(f"<{tag} {kind}> {url}: {problem}")
    assert not broken, json.dumps(broken, indent=1)


def _png_values(data: bytes) -> int:
    """How many distinct byte values a PNG's decompressed image data holds (a blank piece: a handful)."""
    import struct
    import zlib

    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return len(set(zlib.decompress(idat)))


def test_screenshots_saved(visits):
    shots = {page: v.screenshots for page, v in visits.items() if v.screenshots}
    assert set(shots) >= {p for p in visits if p.startswith("demo/")}, "a chapter has no screenshot"
    for page, pieces in shots.items():
        for shot in pieces:
            data = shot.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (page, shot, len(data))
            assert _png_values(data) > 16, f"{shot} is blank: that part of the page was not painted"


def test_each_page_is_quick(visits):
    slow = {page: round(v.seconds, 1) for page, v in visits.items() if v.seconds > 30}
    assert not slow, f"pages that took more than 30 s to load and settle: {slow}"


PAGE_MB = 3.0  # the most a chapter page may weigh (its figures' data and tables; plotly.js is served once)


def test_pages_carry_their_data_not_the_plotly_library(book_html):
    """plotly.js (4.8 MB) is served once from the book's static folder, not embedded in every page: before
    that, every chapter page of the demo weighed about 5 MB, almost all of it the library."""
    assert (book_html / "_static" / "plotly.min.js").is_file()
    heavy = {}
    for page in _pages():
        text = page.read_text(errors="replace")
        if "plotly-graph-div" in text and ("plotly.js v" in text or len(text) > PAGE_MB * 1e6):
            heavy[str(page.relative_to(book_html))] = round(len(text) / 1e6, 2)
    assert not heavy, f"pages embedding plotly.js or over {PAGE_MB} MB (MB): {heavy}"
