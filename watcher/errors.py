"""One exception root for the watcher."""


class WatcherError(Exception):
    pass


class ConfigError(WatcherError):
    """Bad config: every problem found, each naming its key path. Exit 78."""

    def __init__(self, problems: list[str], path: str = ""):
        self.problems = list(problems)
        self.path = path
        where = f"{path}: " if path else ""
        super().__init__(where + "; ".join(self.problems))


class InvalidTransition(WatcherError):
    pass


class UnknownJob(WatcherError):
    pass


class FolderError(WatcherError):
    """A folder problem (disk full, read-only, missing): not the photo's fault; the job waits."""

    def __init__(self, message: str, folder: str = "", unsafe: bool = False):
        super().__init__(message)
        self.folder = folder
        self.unsafe = unsafe        # a symlink planted below a folder: only this job waits, with backoff


class LockedError(WatcherError):
    pass


class QueueCorrupt(WatcherError):
    """The queue file is not a database, is truncated or malformed. `open_queue`/`Queue.quarantine`
    move it aside and a new queue is rebuilt from the folders."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path            # the queue file


class StateUnavailable(WatcherError):
    """The queue's storage cannot be used now (state_dir full, read-only, I/O error, cannot open,
    busy past the busy timeout and the retries). Not the photo's fault: wait and try again.
    `reason` is short and human ("state_dir full"); the transaction was rolled back."""

    def __init__(self, reason: str, path: str = "", code: str | None = None, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.path = path            # the queue file
        self.code = code            # SQLite's error name, e.g. "SQLITE_FULL", when known


class LeaseLost(WatcherError):
    """This host's claim on a job is no longer current (its lease expired and the job went back
    to pending, or another host claimed it with a newer fencing token). Nothing was recorded: the
    worker stops before its next irreversible step and leaves the job to its new owner."""

    def __init__(self, message: str, job: int | None = None):
        super().__init__(message)
        self.job = job
