"""Start the real daemon with the fake enhancer: `python tests/run_daemon.py --config X run`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fake_enhancer import factory  # noqa: E402
from watcher.daemon import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], enhancer_factory=factory))
