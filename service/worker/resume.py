"""Per-job training states on disk, so a job handed back to the queue resumes where it was.

Layout: `<data dir>/resume/<job id>.safetensors`, one file per job, replaced atomically at the
end of every epoch (temp file, fsync, `os.replace`, folder fsync: `service.files`), so a crash at
any moment leaves the previous epoch's state or the new one, never a mix. The file is removed
when the job ends; a file whose job has ended or no longer exists (a worker killed between the
two, a queued job cancelled, a model deleted with its jobs) is removed by `sweep`, which every
start of the server and every idle round of a worker runs.

Blocking: call from a thread.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from service.files import Owner, publish, write_durably
from service.jobs import FINAL, JobQueue
from service.training.state import TrainState, decode, encode

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
# Job ids are uuid4 hex; anything else never becomes a path.
_JOB_ID = re.compile(r"[0-9a-f]{32}")


class ResumeStore:
    def __init__(self, root: Path, owner: Owner) -> None:
        self.root = root
        self.owner = owner
        root.mkdir(parents=True, exist_ok=True)

    def path(self, job_id: str) -> Path:
        if not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / f"{job_id}{SUFFIX}"

    def save(self, job_id: str, state: TrainState, meta: dict[str, Any]) -> int:
        """Replace the job's saved state with `state`; returns the bytes written."""
        data = encode(state, meta)
        temp = self.owner.temp_path(self.root, tag="state")
        try:
            write_durably(temp, [data])
            publish(temp, self.path(job_id))
        finally:
            temp.unlink(missing_ok=True)
        return len(data)

    def load(self, job_id: str) -> tuple[TrainState, dict[str, Any]] | None:
        """The job's saved (state, meta), or None when there is none or it cannot be read."""
        path = self.path(job_id)
        if not path.exists():
            return None
        try:
            return decode(str(path))
        except Exception as exc:  # a damaged file must not fail the job: it starts over
            log.warning("ignoring unreadable training state %s: %s", path, exc)
            return None

    def remove(self, job_id: str) -> None:
        self.path(job_id).unlink(missing_ok=True)

    def sweep(self, queue: JobQueue) -> list[str]:
        """Delete dead writers' temp files and states of jobs that ended or no longer exist."""
        self.owner.sweep(self.root)
        found = {
            p.name.removesuffix(SUFFIX): p
            for p in self.root.glob(f"*{SUFFIX}")
            if _JOB_ID.fullmatch(p.name.removesuffix(SUFFIX))
        }
        if not found:
            return []
        # Listed before the rows are read: a job's status only ever moves on to FINAL, and a
        # state file is only written for a job that exists, so this never removes a live one.
        statuses = queue.statuses(list(found))
        removed = [
            job_id for job_id in found if job_id not in statuses or statuses[job_id] in FINAL
        ]
        for job_id in removed:
            found[job_id].unlink(missing_ok=True)
        if removed:
            log.info("removed the saved training states of %d ended job(s)", len(removed))
        return removed
