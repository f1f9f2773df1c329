"""Copies this extension into a webui together with the qdrift source it installs from.

    python integrations/sd-webui/bundle.py /path/to/stable-diffusion-webui-forge/extensions/qdrift

A plain copy of ``integrations/sd-webui`` has no qdrift source (qdrift is not on the package index), so its
``install.py`` could not install it. This writes the extension files plus ``qdrift-src/`` (``pyproject.toml``,
``README.md`` and the ``qdrift`` package of this checkout); ``install.py`` installs from there and replaces an
installed qdrift of another version. Run it again after updating the checkout, then restart the webui.
Standard library only.
"""

import argparse
import os
import shutil
import sys

HERE = os.path.dirname(os.path.realpath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "qdrift-src")


def bundle(dest: str) -> str:
    """Writes the extension and ``qdrift-src`` to ``dest`` (replacing an earlier bundle there); returns ``dest``.

    Raises:
        ValueError: if this file is not inside a qdrift checkout, or ``dest`` is inside it.
    """
    if not (os.path.isfile(os.path.join(REPO, "pyproject.toml")) and os.path.isdir(os.path.join(REPO, "qdrift"))):
        raise ValueError(f"bundle.py must run from a qdrift checkout ({REPO} is not one)")
    dest = os.path.abspath(dest)
    if os.path.commonpath([dest, REPO]) == REPO:
        raise ValueError(f"the destination {dest} is inside the qdrift checkout; give the webui's extensions/qdrift")
    shutil.copytree(HERE, dest, ignore=_IGNORE, dirs_exist_ok=True)
    src = os.path.join(dest, "qdrift-src")
    if os.path.isdir(src):
        shutil.rmtree(src)
    shutil.copytree(os.path.join(REPO, "qdrift"), os.path.join(src, "qdrift"), ignore=_IGNORE)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(REPO, name), os.path.join(src, name))
    return dest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", help="the webui's extensions/qdrift folder")
    try:
        print("Q-Drift extension written to", bundle(parser.parse_args().dest))
    except ValueError as e:
        sys.exit(f"bundle.py: {e}")
