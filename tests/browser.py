"""A report page as a person sees it: headless Chromium (Debian's `chromium` package) driven over the
DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages ending in NUL on file descriptors
3 and 4), so no driver, websocket library or network port is needed.

`render(path)` loads a page alone (file://) or, with kfp_frame=True, as the KFP UI shows an HTML
artifact: the page's text as the srcdoc of an <iframe sandbox="allow-scripts"> that is at least
600 px high (kubeflow/pipelines frontend/src/components/viewers/HTMLViewer.tsx). It returns the
console errors, uncaught exceptions and failed loads, the size of every image and SVG, and a
full-page PNG screenshot.

Also a command: `python tests/browser.py PAGE.html [SHOT.png] [--kfp]`.
"""

from __future__ import annotations

import base64
import fcntl
import html
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Chromium without a desktop session, a sandbox (containers run it as root), a GPU, or any
# background traffic of its own (updates, sync, field trials, QUIC probes).
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
)
CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# Two animation frames: the layout and paint that follow a resize have happened.
SETTLE = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(true))))"
# The size of every <img> and inline <svg> of the document, and whether each image decoded.
MEASURE = """JSON.stringify(Array.from(document.querySelectorAll('img, svg')).map(e => {
  const r = e.getBoundingClientRect();
  return {tag: e.tagName.toLowerCase(), alt: e.getAttribute('alt') || '', width: r.width, height: r.height,
          natural: e.tagName === 'IMG' ? [e.naturalWidth, e.naturalHeight] : null,
          complete: e.tagName === 'IMG' ? e.complete : true};
}))"""


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


@dataclass
class Page:
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    figures: list[dict] = field(default_factory=list)  # MEASURE's entries
    screenshot: bytes = b""  # PNG
    title: str = ""


class Chromium:
    """One headless browser; use as a context manager."""

    def __init__(self, binary: str | None = None, timeout: float = 60.0):
        binary = binary or find_chromium()
        if not binary:
            raise BrowserError(f"no Chromium found (looked for {', '.join(CANDIDATES)})")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="cascade-rcnn-chromium-")
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:  # in the child: its ends of the pipes become fds 3 (read) and 4 (write)
            r = fcntl.fcntl(to_child_r, fcntl.F_DUPFD, 10)
            w = fcntl.fcntl(from_child_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self.proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=fds,
            close_fds=False,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict] = []

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_child, self._from_child):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("Chromium did not answer in time")
            ready, _, _ = select.select([self._from_child], [], [], left)
            if ready:
                chunk = os.read(self._from_child, 1 << 20)
                if not chunk:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise BrowserError(f"Chromium exited ({self.proc.poll()}): {err[-2000:]}")
                self._buf += chunk
        message, _, self._buf = self._buf.partition(b"\0")
        return json.loads(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout=None) -> dict:
        self._next_id += 1
        msg: dict = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def render(self, path: str | Path, *, kfp_frame: bool = False, width: int = 1280) -> Page:
        path = Path(path).resolve()
        if kfp_frame:
            host = Path(self.profile) / "kfp-host.html"
            srcdoc = html.escape(path.read_text(encoding="utf-8"), quote=True)
            host.write_text(
                "<!DOCTYPE html><html><head><meta charset='utf-8'><title>KFP HTML viewer</title></head>"
                "<body style='margin:0'><iframe id='artifact' sandbox='allow-scripts' "
                f"style='border:1px solid #ddd;box-sizing:border-box;width:100%;min-height:600px;height:600px' "
                f'srcdoc="{srcdoc}"></iframe></body></html>',
                encoding="utf-8",
            )
            url = host.as_uri()
        elif path.suffix not in (".html", ".htm"):  # a KFP artifact file is named after its output
            alone = Path(self.profile) / f"{path.name}.html"
            shutil.copyfile(path, alone)
            url = alone.as_uri()
        else:
            url = path.as_uri()
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self._enable(session)
        # A sandboxed iframe may run in a process of its own (a target of its own): attach to it
        # paused, so that its console is watched from its first line.
        self.send(
            "Target.setAutoAttach",
            {"autoAttach": True, "waitForDebuggerOnStart": True, "flatten": True},
            session=session,
        )
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=session)
        sessions = [session]
        deadline = time.monotonic() + self.timeout
        seen = 0  # events arrive while commands wait for their replies too: walk them all in order
        loaded = False
        while not loaded:
            if seen == len(self.events):
                self._next_event(deadline)
            event = self.events[seen]
            seen += 1
            if event.get("method") == "Target.attachedToTarget":
                child = event["params"]["sessionId"]
                sessions.append(child)
                self._enable(child)
                self.send("Runtime.runIfWaitingForDebugger", session=child)
            loaded = event.get("method") == "Page.loadEventFired" and event.get("sessionId") == session
        evaluate_in: dict = {"session": session}
        if kfp_frame:
            if len(sessions) > 1:  # the artifact's frame is a target of its own
                evaluate_in = {"session": sessions[1]}
            else:
                tree = self.send("Page.getFrameTree", session=session)["frameTree"]
                frame = tree["childFrames"][0]["frame"]["id"]
                world = self.send("Page.createIsolatedWorld", {"frameId": frame}, session=session)
                evaluate_in = {"session": session, "contextId": world["executionContextId"]}
        # The frame's own load event may come before its Page domain is on: ask its document instead.
        while self._evaluate("document.readyState", **evaluate_in) != "complete":
            if time.monotonic() > deadline:
                raise BrowserError(f"{path}: the page did not finish loading")
            time.sleep(0.05)
        figures = json.loads(self._evaluate(MEASURE, **evaluate_in))
        title = self._evaluate("document.title", **evaluate_in)
        metrics = self.send("Page.getLayoutMetrics", session=session)
        height = int(metrics["cssContentSize"]["height"])
        if kfp_frame:  # grow the frame to its page, as a reader scrolls through it
            height = max(600, int(self._evaluate("document.documentElement.scrollHeight", **evaluate_in)) + 4)
            self._evaluate(f"document.getElementById('artifact').style.height = '{height}px'", session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": max(600, min(height, 16000)), "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        # Let the resized page (and the frame's own process) lay out and paint before the picture.
        for where in ({"session": session}, evaluate_in):
            params = {"expression": SETTLE, "awaitPromise": True, "returnByValue": True}
            if "contextId" in where:
                params["contextId"] = where["contextId"]
            self.send("Runtime.evaluate", params, session=where["session"])
        shot = self.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        page = Page(figures=figures, screenshot=base64.b64decode(shot), title=title)
        page.errors = _errors(self.events, set(sessions))
        self.send("Target.closeTarget", {"targetId": target})
        return page

    def _enable(self, session: str) -> None:
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)

    def _next_event(self, deadline: float) -> dict:
        event = self._read_message(deadline)
        self.events.append(event)
        return event

    def _evaluate(self, expression: str, session: str, contextId: int | None = None):
        params: dict = {"expression": expression, "returnByValue": True}
        if contextId is not None:
            params["contextId"] = contextId
        return self.send("Runtime.evaluate", params, session=session)["result"]["value"]


def _errors(events: list[dict], sessions: set[str]) -> list[str]:
    out = []
    for e in events:
        if e.get("sessionId") not in sessions:
            continue
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append(f"exception: {d.get('text')} {d.get('exception', {}).get('description', '')}")
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(
                "console.error: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
            )
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            out.append(f"load failed: {p.get('errorText')} ({p.get('type')})")
    return out


def check_page(browser: Chromium, path: str | Path, min_figures: int = 1) -> dict[str, Page]:
    """Render `path` alone and in a KFP-style sandboxed frame; each must load with no console error,
    exception or failed load, and every image must have decoded and be laid out at a nonzero size.
    Returns both renderings ({"alone": Page, "kfp": Page})."""
    pages = {"alone": browser.render(path), "kfp": browser.render(path, kfp_frame=True)}
    for how, page in pages.items():
        assert not page.errors, f"{path} ({how}): {page.errors}"
        assert len(page.figures) >= min_figures, f"{path} ({how}): {page.figures}"
        for fig in page.figures:
            assert fig["width"] > 0 and fig["height"] > 0, f"{path} ({how}): {fig}"
            if fig["tag"] == "img":
                assert fig["complete"] and min(fig["natural"]) > 0, f"{path} ({how}): {fig} did not decode"
        assert page.screenshot.startswith(b"\x89PNG")
    return pages


def main(argv: list[str]) -> int:
    kfp = "--kfp" in argv
    args = [a for a in argv if a != "--kfp"]
    page_path = args[0]
    shot = args[1] if len(args) > 1 else str(Path(page_path).with_suffix(".png"))
    with Chromium() as browser:
        page = browser.render(page_path, kfp_frame=kfp)
    Path(shot).write_bytes(page.screenshot)
    print(
        json.dumps(
            {"title": page.title, "errors": page.errors, "figures": page.figures, "screenshot": shot},
            indent=1,
        )
    )
    return 1 if page.errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
