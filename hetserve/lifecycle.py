"""Process lifecycle shared by the daemons: logging set-up, and running until a signal."""

from __future__ import annotations

import asyncio
import logging
import signal

log = logging.getLogger(__name__)


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(level=level.upper(), format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")


async def run_until_signal(main) -> None:
    """Await `main`; SIGINT/SIGTERM cancel it so its `finally` blocks close sockets cleanly."""
    task = asyncio.ensure_future(main)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        log.info("stopped by signal")
