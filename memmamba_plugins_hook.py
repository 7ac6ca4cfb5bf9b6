"""Start-up hook that registers memmamba-plugins' anomalib model and datamodule.

anomalib has no plugin mechanism: ``anomalib train --model PyramidMamba --data MVTec`` resolves short
names only among ``AnomalibModule``/``AnomalibDataModule`` subclasses that are already imported. The
``memmamba_plugins_hook.pth`` file in site-packages imports this module at interpreter start-up. It
only installs a meta-path finder: nothing else is imported (no torch, no anomalib), so programs that
never touch anomalib pay nothing. When ``anomalib.models`` finishes loading, the finder imports
:mod:`memmamba_plugins.pyramid_mamba`, which defines ``PyramidMamba`` and ``MVTec``.

Set ``MEMMAMBA_PLUGINS_NO_HOOK=1`` to disable it.

This is a top-level module on purpose: importing ``memmamba_plugins`` would not import torch either,
but a separate module keeps the start-up path independent of the package's ``__init__``.
"""

from __future__ import annotations

import os
import sys
import warnings

#: The module whose loading triggers the plugin import.
TRIGGER = "anomalib.models"
#: The module that registers the plugin's classes by defining them.
PLUGIN = "memmamba_plugins.pyramid_mamba"
DISABLE_ENV = "MEMMAMBA_PLUGINS_NO_HOOK"


def _load_plugin() -> None:
    try:
        __import__(PLUGIN)
    except Exception as exc:  # never break anomalib because of the plugin
        warnings.warn(f"memmamba-plugins: could not register {PLUGIN} with anomalib: {exc!r}", stacklevel=2)


class _AnomalibModelsFinder:
    """Meta-path finder that wraps the loader of ``anomalib.models`` to import the plugin after it."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001, ANN201 - importlib protocol
        if fullname != TRIGGER:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the search below from finding us again
        from importlib.util import find_spec

        spec = find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module) -> None:  # noqa: ANN001
            original(module)
            _load_plugin()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Install the finder (idempotent); import the plugin now if anomalib.models is loaded already."""
    if os.environ.get(DISABLE_ENV, "").strip() not in ("", "0"):
        return
    if TRIGGER in sys.modules:
        _load_plugin()
        return
    if not any(isinstance(f, _AnomalibModelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AnomalibModelsFinder())


install()
