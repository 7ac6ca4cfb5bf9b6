"""In-tree PEP 517 backend: setuptools plus the start-up hook's ``.pth`` file at the wheel root.

anomalib resolves ``--model PyramidMamba`` only among already-imported classes, so the package ships
``memmamba_plugins_hook.pth`` (one line, ``import memmamba_plugins_hook``) into site-packages.
setuptools cannot place a file at the root of site-packages: ``data_files`` land in the data scheme,
and its editable wheels (PEP 660) skip data files altogether. This backend delegates everything to
``setuptools.build_meta`` and adds the ``.pth`` to the finished regular and editable wheels,
updating the wheel's RECORD.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 - re-export the other PEP 517/660 hooks

#: The start-up hook's .pth, relative to the project root (next to pyproject.toml).
PTH_NAME = "memmamba_plugins_hook.pth"
_ROOT = Path(__file__).resolve().parent.parent


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _add_pth(wheel_path: Path) -> None:
    """Rewrite ``wheel_path`` with the .pth at its root (no-op when it is there already)."""
    data = (_ROOT / PTH_NAME).read_bytes()
    with zipfile.ZipFile(wheel_path) as src:
        if PTH_NAME in src.namelist():
            return
        entries = [(info, src.read(info.filename)) for info in src.infolist()]
    tmp = wheel_path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        dst.writestr(PTH_NAME, data)
        for info, content in entries:
            if info.filename.endswith(".dist-info/RECORD"):
                lines = content.decode().splitlines()
                lines.insert(0, _record_line(PTH_NAME, data))
                content = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, content)
    tmp.replace(wheel_path)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):  # noqa: ANN001, ANN201
    """setuptools' ``build_wheel`` plus the hook's .pth."""
    name = _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
    _add_pth(Path(wheel_directory) / name)
    return name


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):  # noqa: ANN001, ANN201
    """setuptools' ``build_editable`` plus the hook's .pth."""
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    _add_pth(Path(wheel_directory) / name)
    return name
