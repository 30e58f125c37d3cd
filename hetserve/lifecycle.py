"""Process lifecycle shared by the daemons: logging set-up, and running until a signal."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time

log = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, role, logger, msg (and exc when there is one)."""

    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "role": self.role, "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, role: str, as_json: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(role) if as_json else
                         logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


STOP_AGAIN_S = 5.0  # after a signal, cancel again this often while `main` still runs


async def run_until_signal(main) -> None:
    """Await `main`; SIGINT/SIGTERM cancel it so its `finally` blocks close sockets cleanly.

    A cancellation can be lost: Python 3.11's asyncio.wait_for drops one that lands just as the
    awaitable it waits on completes (a host's control loop waits so on every leader message), and
    the daemon then ran on after SIGTERM (seen in tests/test_security.py). So while `main` runs
    after a signal it is cancelled again every STOP_AGAIN_S: time enough for a clean stop first."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        if not task.done():
            task.cancel()
            loop.call_later(STOP_AGAIN_S, stop)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        await task
    except asyncio.CancelledError:
        log.info("stopped by signal")
