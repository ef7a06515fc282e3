"""Start the real daemon with the fake enhancer: `python tests/run_daemon.py --config X run`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fake_enhancer import factory  # noqa: E402
from watcher.daemon import main  # noqa: E402


def _audit_outside(marker: str, out: str) -> None:
    """Test aid (PE_AUDIT_OUTSIDE=folder, PE_AUDIT_LOG=file): record with a stack every listing or
    open (by path or by descriptor) inside `folder`, one the daemon must never touch."""
    import traceback

    def where(arg):
        if isinstance(arg, int):
            try:
                return os.readlink(f"/proc/self/fd/{arg}")
            except OSError:
                return ""
        if isinstance(arg, (str, bytes)):
            return os.path.realpath(os.fsdecode(arg))
        return ""

    def hook(event, args):
        w = where(args[0]) if event in ("os.scandir", "os.listdir", "open") and args else ""
        if w == marker.rstrip("/") or w.startswith(marker.rstrip("/") + "/"):
            with open(out, "a") as f:
                f.write(f"{event} {w}\n{''.join(traceback.format_stack())}\n")
    sys.addaudithook(hook)


if os.environ.get("PE_AUDIT_OUTSIDE"):
    _audit_outside(os.environ["PE_AUDIT_OUTSIDE"], os.environ.get("PE_AUDIT_LOG", "/tmp/pe-audit.log"))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], enhancer_factory=factory))
