"""Let torch >= 2.6's ``weights_only`` loading read mmengine 0.10.7 checkpoints, without disabling it.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that means
``weights_only=True``, and resume / ``mim test --checkpoint`` fail with "Weights only load failed"
because an mmengine checkpoint's ``message_hub`` holds :class:`HistoryBuffer` objects (numpy arrays
inside), and each buffer pickles its statistics methods as ``getattr(HistoryBuffer, 'min')`` etc.

Instead of ``weights_only=False`` (arbitrary code execution from a checkpoint), :func:`mmengine_safe_globals`
allowlists exactly those globals, and only while it is open:

* ``HistoryBuffer`` (plain data) and the numpy array / dtype / scalar reconstructors (the set
  torch's own documentation names for numpy);
* ``builtins.getattr`` is bound to :func:`restricted_getattr`, which only returns
  ``HistoryBuffer``'s own statistics methods. Allowlisting the real ``getattr`` would let a
  checkpoint walk from any allowed object to ``__globals__`` and ``eval``.

Every other global still makes ``torch.load`` refuse the file. The plugin's own loads (and mmengine's
local-file loads, through the loader :mod:`.checkpoint` registers with mmengine's ``CheckpointLoader``)
open the context; any other ``torch.load`` in the process sees torch's allow-list unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.registry import RUNNERS  # the root registry: mmpretrain.tools.train builds runner_type there
from mmengine.runner import Runner

#: Name under which pickle records ``getattr`` (protocol 2 writes ``__builtin__``, torch maps it).
GETATTR_NAME = "builtins.getattr"
#: HistoryBuffer's built-in statistics; its instances pickle references to these methods.
HISTORY_STATISTICS: frozenset[str] = frozenset({"min", "max", "current", "mean"})


def _numpy_globals() -> list[tuple[Any, str]]:
    """numpy reconstructors under both module spellings (numpy 1 ``numpy.core``, numpy 2 ``numpy._core``)."""
    multiarray = np.core.multiarray if not hasattr(np, "_core") else np._core.multiarray
    result: list[tuple[Any, str]] = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        result.append((multiarray._reconstruct, f"{module}._reconstruct"))
        result.append((multiarray.scalar, f"{module}.scalar"))
    result += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for name in dir(getattr(np, "dtypes", None)):  # numpy >= 1.25: one class per dtype
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            result.append((cls, f"numpy.dtypes.{name}"))
    return result


def restricted_getattr(obj: Any, name: str) -> Any:
    """``getattr`` limited to ``HistoryBuffer``'s registered statistics methods (what checkpoints use)."""
    # The class-level registry only fills on first instantiation, hence the fixed built-in set.
    allowed = HISTORY_STATISTICS | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and name in allowed:
        return getattr(HistoryBuffer, name)
    raise torch.serialization.pickle.UnpicklingError(
        f"Refusing getattr({obj!r}, {name!r}) while loading a checkpoint: only HistoryBuffer statistics "
        f"methods {sorted(allowed)} are allowlisted by memmamba_plugins."
    )


def mmengine_checkpoint_globals() -> list[Any]:
    """The globals an mmengine checkpoint needs beyond torch's ``weights_only`` defaults."""
    return [HistoryBuffer, (restricted_getattr, GETATTR_NAME), *_numpy_globals()]


@contextlib.contextmanager
def mmengine_safe_globals() -> Iterator[None]:
    """Within the block, ``torch.load(weights_only=True)`` also accepts :func:`mmengine_checkpoint_globals`.

    Only the entries the process has not allowlisted itself are added, and they are removed on exit,
    so torch's allow-list afterwards is exactly what it was before (``torch.serialization.safe_globals``
    alone would also remove an entry the user had added with ``add_safe_globals``). torch's allow-list
    is process-wide: a ``torch.load`` in another thread while the block is open sees the entries too.
    """
    present = set(torch.serialization.get_safe_globals())
    extra = [entry for entry in mmengine_checkpoint_globals() if entry not in present]
    with torch.serialization.safe_globals(extra):
        yield


#: The only torch.distributed backend that runs without GPUs.
CPU_DIST_BACKEND = "gloo"
#: Seconds a collective (DDP's gradient all-reduce, a barrier, the metric gather) waits for the other
#: processes before it raises, when ``env_cfg.dist_cfg.timeout`` is not set: torch's own gloo default.
#: A process that died is usually noticed at once (its sockets close, and the launcher stops the rest);
#: this bounds the wait for one that hangs (frozen, deadlocked, or on a host that went away).
DEFAULT_DIST_TIMEOUT_S = 1800


def dist_timeout(env_cfg: dict) -> datetime.timedelta:
    """``env_cfg['dist_cfg']['timeout']`` (seconds, as mmengine reads it) as a ``timedelta``; default 30 min.

    Raises:
        ValueError: the timeout is not a positive number of seconds.
    """
    timeout = (env_cfg.get("dist_cfg") or {}).get("timeout")
    if timeout is None:
        return datetime.timedelta(seconds=DEFAULT_DIST_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(
            f"env_cfg.dist_cfg.timeout must be a positive number of seconds (e.g. "
            f"env_cfg=dict(dist_cfg=dict(backend='gloo', timeout=600))), got {timeout!r}."
        )
    return datetime.timedelta(seconds=timeout)


@RUNNERS.register_module()
class CPUDistributedRunner(Runner):
    """mmengine ``Runner`` that can take the ``--launcher pytorch`` path on hosts without CUDA.

    mmengine 0.10.7's ``_init_dist_pytorch`` always calls ``torch.cuda.set_device(local_rank)``,
    which raises on a CPU host before any process group exists. The Runner only initialises the
    process group when none exists yet, so this subclass creates a gloo group first when CUDA is
    unavailable and otherwise behaves exactly like ``Runner``. Select it with
    ``--cfg-options runner_type=CPUDistributedRunner`` (a smoke test of the multi-GPU path on CPU).

    ``env_cfg.dist_cfg.timeout`` (seconds, default :data:`DEFAULT_DIST_TIMEOUT_S`) bounds how long a
    process waits in a collective for the others: when one of them hangs, the rest raise after that
    long and the launcher stops the run, instead of all of them waiting forever.
    """

    def setup_env(self, env_cfg: dict) -> None:  # noqa: D102 - see the class docstring
        if self.distributed and not torch.cuda.is_available() and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend=CPU_DIST_BACKEND, timeout=dist_timeout(env_cfg))
        super().setup_env(env_cfg)
