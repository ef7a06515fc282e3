"""One exception root for the enhancer. `kind` is the sidecar's `error.kind`."""


class EnhanceError(Exception):
    kind = "internal"


class PermanentError(EnhanceError):
    """The photo itself cannot be done; retrying changes nothing."""


class TransientError(EnhanceError):
    """The photo may succeed on another attempt (smaller tile, other device)."""


class UndecodableError(PermanentError):
    kind = "undecodable"


class UnsupportedError(PermanentError):
    kind = "unsupported"


class TooLargeError(PermanentError):
    kind = "too_large"


class AnimatedError(PermanentError):
    kind = "animated"


class OutOfMemoryError(TransientError):
    kind = "out_of_memory"


class DeviceError(TransientError):
    kind = "device"


class WeightsMissingError(EnhanceError):
    """Weight files are absent or do not verify: not the photo's fault; jobs wait."""

    kind = "weights_missing"

    def __init__(self, message: str, missing: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])
