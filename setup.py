"""Build hook only (the metadata is in pyproject.toml): an installed wheel carries the repository's
documented default config.yaml as watcher/default-config.yaml, so `photoenhanced init` writes the
same file, comments and all, without a checkout. One place owns the defaults: config.yaml."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return              # editable (scripts/setup): watcher/init.py reads the checkout's config.yaml
        src = Path(__file__).resolve().parent / "config.yaml"
        if src.is_file():       # an sdist built without it still builds; init then says what is missing
            self.mkpath(str(Path(self.build_lib) / "watcher"))
            self.copy_file(str(src), str(Path(self.build_lib) / "watcher" / "default-config.yaml"))


setup(cmdclass={"build_py": BuildPy})
