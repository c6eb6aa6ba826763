"""A headless Chromium driven over the Chrome DevTools Protocol, for the tests of the API's page.

    chromium = Chromium(find_chromium())       # the system's Chromium (Debian: apt-get install chromium)
    page = Page(websocket to chromium.page_ws_url())
    page.open(url); page.fill("#response", "Hello"); page.click("#score"); page.js("document.title")

Chromium listens on a 127.0.0.1 port (`--remote-debugging-port=0`, read back from DevToolsActivePort);
typing goes through Input.insertText, clicks and hovers through Input.dispatchMouseEvent, so the page
sees real input events. Nothing is downloaded, and no driver binary is needed.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

DESKTOP = (1200, 900)
"""The viewport a page returns to after a screenshot at another width."""


def find_chromium() -> str | None:
    candidates = [os.environ.get("TLCR_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                  shutil.which("google-chrome"), shutil.which("google-chrome-stable"), "/usr/lib/chromium/chromium"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


class Page:
    """One browser tab over CDP: send(method, **params) -> result; events are kept in `events`."""

    def __init__(self, ws):
        self.ws = ws
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"CDP {method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def js(self, expression: str):
        """Evaluate in the page (promises awaited); the value comes back as JSON."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or expression}")
            time.sleep(0.05)

    def viewport(self, width: int, height: int, scale: float = 1, mobile: bool = False) -> None:
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=scale,
                  mobile=mobile)

    def open(self, url: str) -> None:
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete' && document.documentElement.dataset.ready === '1'",
                      what=f"{url} to load")
        # The page asks GET v1/model on load; let that answer land before the test acts.
        self.wait_for("document.querySelector('#model-info').textContent !== ''", what="the model info line")

    def center(self, selector: str, index: int = 0) -> tuple[float, float]:
        box = self.js(f"""(() => {{ const el = document.querySelectorAll({json.dumps(selector)})[{index}];
            el.scrollIntoView({{block: 'center'}}); const r = el.getBoundingClientRect();
            return [r.left + r.width / 2, r.top + r.height / 2]; }})()""")
        return box[0], box[1]

    def click(self, selector: str, index: int = 0) -> None:
        x, y = self.center(selector, index)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def hover(self, selector: str, index: int = 0) -> None:
        x, y = self.center(selector, index)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def key(self, key: str, code: int) -> None:
        for kind in ("rawKeyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def fill(self, selector: str, text: str, index: int = 0) -> None:
        """Focus the field, select what is there, and type over it (Backspace when `text` is empty)."""
        self.js(f"(() => {{ const el = document.querySelectorAll({json.dumps(selector)})[{index}]; "
                "el.focus(); el.select(); })()")
        if text:
            self.send("Input.insertText", text=text)
        else:
            self.key("Backspace", 8)
        got = self.js(f"document.querySelectorAll({json.dumps(selector)})[{index}].value")
        assert got == text, f"typing into {selector}[{index}] left {got!r}"

    def screenshot(self, path: Path, width: int, scale: float = 1, mobile: bool = False) -> Path:
        """The whole page at `width` CSS pixels, as PNG."""
        self.viewport(width, 800, scale, mobile)
        height = int(self.js("Math.ceil(document.documentElement.scrollHeight)"))
        self.viewport(width, height, scale, mobile)
        # Let the page lay out and paint what the taller viewport uncovered, or it comes out blank.
        self.js("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => setTimeout(r, 100))))")
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path.write_bytes(base64.b64decode(shot["data"]))
        self.viewport(*DESKTOP)
        return path

    def errors(self) -> list[str]:
        """Uncaught exceptions and error-level console/log entries, except failed fetches (the 401s and 422s
        these tests provoke on purpose)."""
        found = []
        for event in self.events:
            if event["method"] == "Runtime.exceptionThrown":
                found.append(json.dumps(event["params"]["exceptionDetails"])[:500])
            elif event["method"] == "Log.entryAdded":
                entry = event["params"]["entry"]
                if entry.get("level") == "error" and entry.get("source") != "network":
                    found.append(f"{entry.get('source')}: {entry.get('text')}")
            elif event["method"] == "Runtime.consoleAPICalled" and event["params"].get("type") in ("error", "assert"):
                found.append(json.dumps(event["params"].get("args"))[:500])
        return found


class Chromium:
    """Headless Chromium in its own session (so its whole process group can be killed), fresh profile."""

    FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--disable-extensions", "--no-default-browser-check",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")

    def __init__(self, binary: str):
        self.profile = Path(tempfile.mkdtemp(prefix="tlcr-chromium-"))
        self.log = self.profile.parent / (self.profile.name + ".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([binary, *self.FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and len(active.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"Chromium did not open its DevTools port: {self.log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.port = int(active.read_text().split()[0])

    def page_ws_url(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=30) as reply:
            targets = json.load(reply)
        return next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started, nothing else
        self.proc.wait(timeout=30)
        shutil.rmtree(self.profile, ignore_errors=True)
        self.log.unlink(missing_ok=True)
