"""Checkpoint safety: no load path of either plugin runs code from a checkpoint, and the plugin's
allow-list for mmengine checkpoints is scoped to its own loads.

The crafted checkpoint pickles ``os.system`` through ``__reduce__``: unpickling it would run
``touch <marker>``. Every path must raise and leave no marker. The MemoryMamba paths give
:class:`UnsafeCheckpointError` naming the offending global; anomalib / Lightning give torch's own
``UnpicklingError``. Everything runs on CPU with toy models (one subprocess, for a fresh interpreter).
"""

from __future__ import annotations

import io
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmpretrain")

from mmengine.logging import HistoryBuffer  # noqa: E402
from mmengine.runner import CheckpointLoader, Runner, load_checkpoint  # noqa: E402

import memmamba_plugins.memory_mamba  # noqa: E402, F401  (registers the modules and the loader)
from memmamba_plugins.memory_mamba import MemoryMamba, UnsafeCheckpointError  # noqa: E402
from memmamba_plugins.memory_mamba.checkpoint import load_from_local_checked, load_vmamba_pretrained  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOY = {"depths": (1, 1), "embed_dim": 8}
#: How the refusal names the payload: ``os.system`` pickles as ``posix.system`` (``nt.system`` on Windows).
PAYLOAD_NAME = r"(posix|nt|os)\.system"
SUBPROCESS_TIMEOUT_S = 120


class _Payload:
    """Unpickling this runs ``touch marker``; a safe loader never calls it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _toy() -> MemoryMamba:
    return MemoryMamba(arch=dict(TOY), coarse_slots=4, fine_slots=4, drop_path_rate=0.0)


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "the checkpoint's payload was executed"


def _crafted(tmp: Path, marker: Path, layout: str) -> Path:
    """A checkpoint shaped like the ones each path expects, with the payload where metadata goes."""
    weights = {k: v for k, v in _toy().state_dict().items()}
    content = {
        "vmamba": {"model": weights, "config": _Payload(marker)},
        "mmengine": {"meta": {"epoch": 1, "iter": 2}, "state_dict": weights, "message_hub": _Payload(marker)},
        "lightning": {
            "state_dict": {},
            "hyper_parameters": _Payload(marker),
            "pytorch-lightning_version": "2.6",
        },
        "weights": {"conv_stem.weight": torch.zeros(1), "extra": _Payload(marker)},
    }[layout]
    path = tmp / f"{layout}.pth"
    torch.save(content, path)
    return path


# -- MemoryMamba / mmengine ---------------------------------------------------------------------
def vmamba_pretrained_function(tmp: Path, marker: Path) -> None:
    load_vmamba_pretrained(_toy(), str(_crafted(tmp, marker, "vmamba")))


def init_cfg_pretrained(tmp: Path, marker: Path) -> None:
    path = _crafted(tmp, marker, "vmamba")
    MemoryMamba(arch=dict(TOY), init_cfg={"type": "Pretrained", "checkpoint": str(path)}).init_weights()


def mmengine_load_checkpoint(tmp: Path, marker: Path) -> None:
    """``load_from`` / ``mim test --checkpoint`` end in this function."""
    load_checkpoint(_toy(), str(_crafted(tmp, marker, "mmengine")), map_location="cpu")


def mmengine_runner_resume(tmp: Path, marker: Path) -> None:
    """``mim train --resume``: ``Runner.resume`` reads the file through ``CheckpointLoader``."""
    runner = Runner(
        model=_toy(),
        work_dir=str(tmp / "work"),
        experiment_name=f"resume-{tmp.name}",
        default_scope="mmpretrain",
    )
    runner.resume(str(_crafted(tmp, marker, "mmengine")))


def plain_torch_load(tmp: Path, marker: Path) -> None:
    torch.load(_crafted(tmp, marker, "mmengine"), weights_only=True)


# -- Pyramid-Mamba / anomalib -------------------------------------------------------------------
def pyramid_load_from_checkpoint(tmp: Path, marker: Path) -> None:
    pyramid = pytest.importorskip("memmamba_plugins.pyramid_mamba")
    pyramid.PyramidMamba.load_from_checkpoint(_crafted(tmp, marker, "lightning"))


def anomalib_checkpoint_io(tmp: Path, marker: Path) -> None:
    """What ``Engine(ckpt_path=...)`` restores through (swapped in by ``PyramidMamba.setup``)."""
    checkpoint = pytest.importorskip("memmamba_plugins.pyramid_mamba.checkpoint")
    checkpoint.CheckedCheckpointIO().load_checkpoint(_crafted(tmp, marker, "lightning"))


def anomalib_engine_ckpt_path(tmp: Path, marker: Path) -> None:
    """``anomalib test --ckpt_path``, through the Engine and Trainer."""
    pyramid = pytest.importorskip("memmamba_plugins.pyramid_mamba")
    from anomalib.engine import Engine

    from memmamba_plugins.pyramid_mamba.synthetic import make_synthetic_mvtec

    root = make_synthetic_mvtec(tmp / "mvtec", ("alpha",), size=32, n_train=2, n_test=1)
    model = pyramid.PyramidMamba(
        backbone="resnet18",
        pre_trained=False,
        decoder_dims=(64, 32, 16, 8),
        decoder_depths=(1, 1, 1, 1),
        css_modules=(1, 1, 1, 1),
        d_state=4,
        mff_blocks=1,
        drop_path_rate=0.0,
        input_size=64,
        visualizer=False,
    )
    data = pyramid.MVTec(
        root=root, categories=["alpha"], train_batch_size=2, eval_batch_size=2, num_workers=0
    )
    engine = Engine(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp / "results",
    )
    engine.test(model, datamodule=data, ckpt_path=_crafted(tmp, marker, "lightning"))


# -- offline encoder weights --------------------------------------------------------------------
def pretrained_weights_conversion(tmp: Path, marker: Path) -> None:
    """The shipped-weights converter reads its source with ``torch.load``."""
    pretrained = pytest.importorskip("memmamba_plugins.pretrained")
    pretrained._timm_state_dict(
        pretrained.OFFLINE_WEIGHTS["tf_efficientnet_lite0"], _crafted(tmp, marker, "weights")
    )


def pretrained_weights_cache(tmp: Path, marker: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tampered cache file is refused when ``install_hub_cache`` reads it back."""
    pretrained = pytest.importorskip("memmamba_plugins.pretrained")
    entry = pretrained.OFFLINE_WEIGHTS["tf_efficientnet_lite0"]
    source = entry.source()
    if source is None:
        pytest.skip(f"{entry.module} is not installed")
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp / "cache"))
    cached = pretrained.cache_dir() / f"{entry.architecture}-{source.stem}-timm.pth"
    cached.parent.mkdir(parents=True)
    os.replace(_crafted(tmp, marker, "weights"), cached)
    assert pretrained.timm_weights_file(entry.architecture) == cached
    pretrained.install_hub_cache(entry.architecture, tmp / "hub")


PATHS: list[tuple[str, Callable[..., None], type[BaseException]]] = [
    ("memorymamba-load_vmamba_pretrained", vmamba_pretrained_function, UnsafeCheckpointError),
    ("memorymamba-init_cfg-Pretrained", init_cfg_pretrained, UnsafeCheckpointError),
    ("mmengine-load_checkpoint", mmengine_load_checkpoint, UnsafeCheckpointError),
    ("mmengine-runner-resume", mmengine_runner_resume, UnsafeCheckpointError),
    ("torch-load-weights_only", plain_torch_load, torch.serialization.pickle.UnpicklingError),
    (
        "pyramid-load_from_checkpoint",
        pyramid_load_from_checkpoint,
        torch.serialization.pickle.UnpicklingError,
    ),
    ("anomalib-checkpoint-io", anomalib_checkpoint_io, torch.serialization.pickle.UnpicklingError),
    ("anomalib-engine-ckpt_path", anomalib_engine_ckpt_path, torch.serialization.pickle.UnpicklingError),
    ("pretrained-conversion", pretrained_weights_conversion, torch.serialization.pickle.UnpicklingError),
    ("pretrained-cache", pretrained_weights_cache, torch.serialization.pickle.UnpicklingError),
]


@pytest.mark.parametrize(("load", "error"), [p[1:] for p in PATHS], ids=[p[0] for p in PATHS])
def test_crafted_checkpoint_is_refused(
    load: Callable[..., None],
    error: type[BaseException],
    tmp_path: Path,
    marker: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kwargs = {"monkeypatch": monkeypatch} if "monkeypatch" in load.__code__.co_varnames else {}
    with pytest.raises(error) as info:
        load(tmp_path, marker, **kwargs)
    assert re.search(PAYLOAD_NAME, str(info.value)), str(info.value)
    assert not marker.exists()


def test_refusal_names_the_file_and_the_fix(tmp_path: Path, marker: Path) -> None:
    path = _crafted(tmp_path, marker, "mmengine")
    with pytest.raises(
        UnsafeCheckpointError, match=r"mmengine\.pth' was refused .* pickles \['posix\.system'\]"
    ):
        load_from_local_checked(str(path))
    with pytest.raises(UnsafeCheckpointError, match="Do not switch weights_only off"):
        load_from_local_checked(str(path))


# -- the allow-list is scoped --------------------------------------------------------------------
def _history_checkpoint(path: Path) -> Path:
    buffer = HistoryBuffer()
    buffer.update(1.5)
    torch.save(
        {"meta": {"epoch": 1}, "message_hub": {"loss": buffer}, "state_dict": {"w": torch.ones(2)}}, path
    )
    return path


def test_plugin_loads_mmengine_checkpoints_but_leaves_torch_load_alone(tmp_path: Path) -> None:
    path = _history_checkpoint(tmp_path / "epoch_1.pth")
    # the plugin's own loader and mmengine's CheckpointLoader (load_from, resume, mim test) read it ...
    assert load_from_local_checked(str(path))["message_hub"]["loss"].current() == 1.5
    assert CheckpointLoader.load_checkpoint(str(path), map_location="cpu")["meta"] == {"epoch": 1}
    # ... while torch's allow-list stays as it was, before, during nothing and after those loads
    assert HistoryBuffer not in torch.serialization.get_safe_globals()
    with pytest.raises(torch.serialization.pickle.UnpicklingError, match="HistoryBuffer"):
        torch.load(path, weights_only=True)


def test_scoped_load_keeps_the_users_own_allow_list(tmp_path: Path) -> None:
    """An entry the user allowlisted themselves (one the plugin also needs) survives the plugin's load."""
    path = _history_checkpoint(tmp_path / "epoch_1.pth")
    saved = torch.serialization.get_safe_globals()
    try:
        torch.serialization.add_safe_globals([HistoryBuffer])
        load_from_local_checked(str(path))
        assert HistoryBuffer in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(saved)


def test_importing_the_plugin_changes_no_torch_load(tmp_path: Path) -> None:
    """In a fresh interpreter: plain ``torch.load(weights_only=True)`` and torch's allow-list are the same
    after importing the plugin as before (with the frameworks it builds on already imported)."""
    history = _history_checkpoint(tmp_path / "epoch_1.pth")
    blob = io.BytesIO()
    torch.save({"w": torch.ones(2)}, blob)
    (tmp_path / "plain.pth").write_bytes(blob.getvalue())
    script = textwrap.dedent(
        f"""
        import torch

        def outcome(path):
            try:
                return ("loaded", sorted(torch.load(path, weights_only=True)))
            except Exception as exc:
                return (type(exc).__name__, str(exc))

        # The frameworks first: importing them (and torch submodules they load) adds torch's own entries.
        import mmcv.cnn.bricks, mmengine.runner, mmengine.hooks, mmpretrain.models, mmpretrain.datasets  # noqa

        paths = [{str(history)!r}, {str(tmp_path / "plain.pth")!r}]
        before = [outcome(p) for p in paths], sorted(map(repr, torch.serialization.get_safe_globals()))
        import memmamba_plugins.memory_mamba  # noqa: F401
        after = [outcome(p) for p in paths], sorted(map(repr, torch.serialization.get_safe_globals()))
        assert before == after, (before, after)
        assert before[0][0][0] == "UnpicklingError" and before[0][1][0] == "loaded", before
        print("same")
        """
    )
    env = dict(
        os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0 and "same" in proc.stdout, proc.stdout + proc.stderr[-3000:]
