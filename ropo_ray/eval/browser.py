"""Open a page in headless Chromium: a screenshot, and every console error the page caused.

Why the DevTools protocol and not stderr: Chromium 150 (Debian) with `--enable-logging=stderr --v=0` does
print page console messages, as `INFO:CONSOLE:<line>] "bad", source: ...`, but at INFO severity whatever
their level, so console.error() cannot be told from console.log(); and a failed resource load (a missing
<img>) prints nothing at all. So the page is driven over the DevTools protocol through
`--remote-debugging-pipe` (NUL-terminated JSON on the child's fds 3 and 4): no port, no websocket, no
dependency. Three kinds of event count as errors:
  Runtime.consoleAPICalled with type "error" or "assert"   (console.error("bad"))
  Runtime.exceptionThrown                                     (an uncaught exception: "Uncaught Error: boom")
  Log.entryAdded with level "error"                           ("Failed to load resource: net::ERR_FILE_NOT_FOUND")
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
import tempfile
import time
from pathlib import Path
from typing import IO

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
SETTLE_SECONDS = 0.3  # after the load event, for errors raised by late scripts
WIDTH, HEIGHT = 1280, 2400
# Puts the pipe ends on the fds 3 and 4 that --remote-debugging-pipe uses, then becomes the browser
# (subprocess cannot map fds, dash cannot redirect fds above 9, and preexec_fn is unsafe with threads).
_TRAMPOLINE = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
               "os.execvp(sys.argv[3], sys.argv[3:])")


class BrowserError(RuntimeError):
    """Chromium could not be started, exited early, timed out or answered a command with an error."""


def find_chromium() -> str | None:
    """Path of the first of chromium, chromium-browser, google-chrome on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class DevToolsPipe:
    """The DevTools protocol over a pair of pipes: commands out, answers and events back (events are kept)."""

    def __init__(self, write_fd: int, read_fd: int):
        self.write_fd, self.read_fd = write_fd, read_fd
        self.events: list[dict] = []
        self._buffer = b""
        self._next_id = 0

    def receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self.read_fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("no message from Chromium before the deadline")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise BrowserError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, deadline: float, session: str | None = None, **params) -> dict:
        """Send one command and wait for its answer, keeping the events that arrive meanwhile."""
        self._next_id += 1
        command = {"id": self._next_id, "method": method, "params": params}
        if session:
            command["sessionId"] = session
        data = json.dumps(command).encode() + b"\0"
        while data:
            data = data[os.write(self.write_fd, data):]
        while True:
            message = self.receive(deadline)
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, deadline: float) -> None:
        while not any(event.get("method") == method for event in self.events):
            self.events.append(self.receive(deadline))

    def drain(self, seconds: float) -> None:
        """Collect the events of the next `seconds`."""
        end = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self.receive(end))
        except TimeoutError:
            pass


def chromium_args(user_data_dir: str) -> list[str]:
    args = ["--headless", "--disable-gpu", "--remote-debugging-pipe", f"--user-data-dir={user_data_dir}",
            f"--window-size={WIDTH},{HEIGHT}", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
            "--mute-audio", "--disable-background-networking", "--disable-dev-shm-usage", "about:blank"]
    if os.geteuid() == 0:
        args.insert(0, "--no-sandbox")  # Chromium refuses to start as root with its sandbox
    return args


def _launch(binary: str, user_data_dir: str, log: IO[str]) -> tuple[subprocess.Popen, DevToolsPipe]:
    to_child, from_child = os.pipe(), os.pipe()  # (read, write) each
    # Child ends moved to fds >= 10, so dup2 onto 3 and 4 in the trampoline cannot clobber one with the other.
    child_read = fcntl.fcntl(to_child[0], fcntl.F_DUPFD_CLOEXEC, 10)
    child_write = fcntl.fcntl(from_child[1], fcntl.F_DUPFD_CLOEXEC, 10)
    for fd in (to_child[0], from_child[1]):
        os.close(fd)
    try:
        process = subprocess.Popen([sys.executable, "-c", _TRAMPOLINE, str(child_read), str(child_write), binary,
                                    *chromium_args(user_data_dir)],
                                   pass_fds=(child_read, child_write), stdin=subprocess.DEVNULL, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=log)  # a file: a full pipe would block it
    finally:
        os.close(child_read)
        os.close(child_write)
    return process, DevToolsPipe(write_fd=to_child[1], read_fd=from_child[0])


def _text_of(arg: dict) -> str:
    """A console.* argument (a Runtime.RemoteObject) as text."""
    if "value" in arg:
        return str(arg["value"])
    return str(arg.get("description", arg.get("type", "?")))


def console_errors(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions and failed loads among DevTools events, as one line each."""
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append(f"console.{params['type']}: " + " ".join(_text_of(a) for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exception = details.get("exception", {}).get("description", "")
            errors.append(f"{details.get('text', 'Uncaught')} {exception}".strip().splitlines()[0])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            errors.append(f"{entry.get('source', 'log')}: {entry.get('text', '')} {entry.get('url', '')}".strip())
    return errors


def _visit(pipe: DevToolsPipe, url: str, screenshot: Path, deadline: float, full_page: bool) -> None:
    target = pipe.call("Target.createTarget", deadline, url="about:blank")["targetId"]
    session = pipe.call("Target.attachToTarget", deadline, targetId=target, flatten=True)["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        pipe.call(f"{domain}.enable", deadline, session)
    pipe.call("Emulation.setDeviceMetricsOverride", deadline, session, width=WIDTH, height=HEIGHT,
              deviceScaleFactor=1, mobile=False)
    pipe.call("Page.navigate", deadline, session, url=url)
    pipe.wait_for("Page.loadEventFired", deadline)
    pipe.drain(SETTLE_SECONDS)
    params: dict = {"format": "png"}
    if full_page:
        size = pipe.call("Page.getLayoutMetrics", deadline, session)["cssContentSize"]
        params |= {"captureBeyondViewport": True,
                   "clip": {"x": 0, "y": 0, "width": WIDTH, "height": size["height"], "scale": 1}}
    shot = pipe.call("Page.captureScreenshot", deadline, session, **params)
    screenshot.write_bytes(base64.b64decode(shot["data"]))


def _stop(process: subprocess.Popen, pipe: DevToolsPipe) -> None:
    try:
        pipe.call("Browser.close", time.monotonic() + 5)
    except (BrowserError, TimeoutError, OSError):
        pass  # the browser may close the pipe before answering
    for fd in (pipe.write_fd, pipe.read_fd):
        os.close(fd)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    try:  # helpers (zygote, renderer) the browser left behind, in the session started for it
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def render_in_browser(html_path: Path, screenshot: Path, timeout: float = 60, full_page: bool = False) -> dict:
    """Load `html_path` in headless Chromium, save a PNG of the first 1280x2400 px (the whole page with
    `full_page`) and return {"console_errors": [str], "screenshot": Path, "bytes": int}. Raises BrowserError."""
    binary = find_chromium()
    if binary is None:
        raise BrowserError(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)})")
    screenshot = Path(screenshot)
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="ropo-chromium-") as scratch, open(Path(scratch, "err.log"), "w+") as log:
        process, pipe = _launch(binary, str(Path(scratch, "profile")), log)  # a fresh profile every time
        try:
            _visit(pipe, Path(html_path).resolve().as_uri(), screenshot, deadline, full_page)
        except (BrowserError, OSError) as err:  # TimeoutError and BrokenPipeError are OSErrors
            log.seek(0)
            tail = "".join(log.readlines()[-5:])
            raise BrowserError(f"{err} (Chromium exit code {process.poll()}); its stderr ends:\n{tail}") from err
        finally:
            _stop(process, pipe)
    return {"console_errors": console_errors(pipe.events), "screenshot": screenshot,
            "bytes": screenshot.stat().st_size}
