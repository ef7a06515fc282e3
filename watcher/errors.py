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

    def __init__(self, message: str, folder: str = ""):
        super().__init__(message)
        self.folder = folder


class LockedError(WatcherError):
    pass
