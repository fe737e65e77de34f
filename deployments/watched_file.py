"""A small settings file read again when it changes: how secrets rotate without a restart.

The API keys file (``deployments.auth``) and the webhook secrets file
(``deployments.webhooks``) are both :class:`WatchedFile` objects: the file is opened, read
and closed at start (errors are fatal then: a typo must not start an open service), then
its ``stat`` (modification time, size, inode: an editor's atomic rename counts) is checked
at most every ``check_interval_s`` and the file parsed again when it changed. A file that
vanished or no longer parses is logged and the last good content stays in force: failing
closed would lock every client out on a typo, failing open never happens.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Generic, TypeVar

logger = logging.getLogger("multitalk.serve")

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """``parse(text)`` of a file, kept current (see the module docstring). Thread-safe."""

    def __init__(self, path: "str | os.PathLike", parse: Callable[[str], T], what: str = "settings file",
                 check_interval_s: float = 1.0):
        self.path = Path(path).expanduser()
        self.what = what
        self.check_interval_s = check_interval_s
        self._parse = parse
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._value: T = parse(self.path.read_text())
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return st.st_mtime_ns, st.st_size, st.st_ino

    @property
    def value(self) -> T:
        """The parsed content, read again first if the file changed (checked at most every
        ``check_interval_s``)."""
        if time.monotonic() - self._checked >= self.check_interval_s:
            with self._lock:
                if time.monotonic() - self._checked >= self.check_interval_s:
                    self._checked = time.monotonic()
                    self._reload()
        return self._value

    def _reload(self) -> None:
        try:
            stamp = self._stat()
        except FileNotFoundError:
            logger.error("%s %s vanished; keeping what was loaded before", self.what, self.path)
            return
        if stamp == self._stamp:
            return
        try:
            value = self._parse(self.path.read_text())
        except (OSError, ValueError):
            logger.exception("%s %s is invalid; keeping what was loaded before", self.what, self.path)
            return
        self._value, self._stamp = value, stamp
        logger.info("%s reloaded from %s", self.what, self.path)
