"""Worker processes started by the API server (`BNSERVE_WORKERS`), and the stale-job reaper.

Workers are separate processes running exactly `python -m service.worker`, the same program an
operator runs on another machine: training never shares the API's event loop or GIL. A worker
that exits is started again (after a pause, so a crash loop cannot spin); on shutdown each gets
SIGTERM, hands its job back to the queue, and is killed if it has not exited in time. Each is
tied to this process (`service.worker.parent`), so a server killed outright takes them with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

from service.jobs import JobQueue
from service.loops import PeriodicLoop
from service.settings import Settings, settings_env

log = logging.getLogger(__name__)

RESTART_DELAY_S = 2.0
STOP_TIMEOUT_S = 15.0


class WorkerSupervisor:
    def __init__(self, settings: Settings, queue: JobQueue) -> None:
        self._settings = settings
        self._queue = queue
        self._procs: list[subprocess.Popen[bytes]] = []
        self._loop: PeriodicLoop | None = None
        # The pipe whose write end ties the workers to this process's life.
        self._tie: tuple[int, int] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        """Start a worker tied to this process (service/worker/parent.py): it dies with us."""
        env = {**os.environ, **settings_env(self._settings)}
        if self._tie is None:
            # Both ends close-on-exec: only the workers get the read end, through pass_fds.
            self._tie = os.pipe()
        read_fd = self._tie[0]
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.worker", "--parent-fd", str(read_fd)],
            env=env,
            pass_fds=(read_fd,),
        )
        log.info("started training worker pid %d", proc.pid)
        return proc

    async def start(self) -> None:
        self._procs = [self._spawn() for _ in range(self._settings.WORKERS)]
        interval = min(RESTART_DELAY_S, self._settings.JOB_STALE_AFTER_S / 3)
        self._loop = PeriodicLoop("worker supervision", interval, self._watch)
        self._loop.start()

    async def _watch(self) -> None:
        for i, proc in enumerate(self._procs):
            if proc.poll() is not None:
                log.error(
                    "training worker pid %d exited with %s; restarting",
                    proc.pid,
                    proc.returncode,
                )
                self._procs[i] = self._spawn()
        # Also here, so jobs of dead workers end even when no worker is left to notice.
        await asyncio.to_thread(
            self._queue.reap_stale,
            self._settings.JOB_STALE_AFTER_S,
            self._settings.JOB_MAX_ATTEMPTS,
        )

    async def stop(self) -> None:
        if self._loop is not None:
            await self._loop.stop()
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self._wait_all)

    def _wait_all(self) -> None:
        for proc in self._procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
                proc.wait()
        if self._tie is not None:
            for fd in self._tie:
                os.close(fd)
            self._tie = None


@contextlib.contextmanager
def supervised_workers(settings: Settings, queue: JobQueue) -> Iterator[WorkerSupervisor]:
    """A supervisor on an event loop of its own thread, for a parent that runs no loop itself.

    `python -m service` with BNSERVE_API_WORKERS > 1 hands the main thread to uvicorn's process
    manager; the training workers are then started once, here, instead of once per API process.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="worker-supervisor", daemon=True)
    thread.start()
    supervisor = WorkerSupervisor(settings, queue)
    asyncio.run_coroutine_threadsafe(supervisor.start(), loop).result()
    try:
        yield supervisor
    finally:
        asyncio.run_coroutine_threadsafe(supervisor.stop(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
