"""The host's pip configuration as one pip.conf for an image build, and the paths it names.

pip reads its settings from several files and PIP_* variables (`pip config list` shows them merged).
A build container sees none of them, so this writes the merged settings to one file, which the
build mounts at /etc/pip.conf, and prints a `SRC:DST:ro` bind mount for every local path the
settings name (find-links directories, file:// indexes, constraint files, the CA bundle), so
the build finds the same wheels as the host without a download.

Usage: python3 pip_config.py OUT.conf   (run with the pip whose configuration counts, e.g. .venv's)
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from urllib.parse import unquote, urlparse

# Options whose values are local paths or file:// URLs that the build must see.
PATH_OPTIONS = {
    "find-links",
    "index-url",
    "extra-index-url",
    "constraint",
    "requirement",
    "cert",
    "client-cert",
}
INDEX_OPTIONS = {"index-url", "extra-index-url"}


def pip_settings() -> dict[str, dict[str, str]]:
    """{section: {option: value}} as pip resolves them (environment variables win over files)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
    ).stdout
    files: dict[str, dict[str, str]] = {}
    env: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep:
            continue
        section, _, option = key.rpartition(".")
        value = value.strip().strip("'\"")
        if section == ":env:":
            env[option] = value
        else:
            files.setdefault(section, {})[option] = value
    merged = files.setdefault("global", {})
    merged.update(env)
    return files


def local_paths(option: str, value: str) -> list[str]:
    """The existing local paths that `value` names; an index contributes its parent directory,
    since a file index's pages link to the files next to it (simple/x/ -> ../../files/x.whl)."""
    paths = []
    for token in value.split():
        if token.startswith("file://"):
            path = unquote(urlparse(token).path)
        elif token.startswith("/"):
            path = token
        else:
            continue  # a remote URL: reached over the network
        path = os.path.normpath(path)
        if option in INDEX_OPTIONS:
            path = os.path.dirname(path)
        if os.path.exists(path):
            paths.append(path)
    return paths


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    settings = pip_settings()
    parser = configparser.ConfigParser(interpolation=None)
    mounts: dict[str, str] = {}
    for section, options in settings.items():
        parser[section] = options
        for option, value in options.items():
            if option in PATH_OPTIONS:
                for path in local_paths(option, value):
                    mounts[path] = os.path.realpath(path)
    with open(argv[0], "w") as f:
        parser.write(f)
    # A mount under another one is already visible.
    for path in sorted(mounts):
        if not any(path != other and path.startswith(other.rstrip("/") + "/") for other in mounts):
            print(f"{mounts[path]}:{path}:ro")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
