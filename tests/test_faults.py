"""Faults: a training process killed mid-epoch resumes to the uninterrupted result; a DDP peer that
dies or hangs ends the run with an error instead of a wait without end.

Everything runs as a user would, in subprocesses on CPU (``mim train mmpretrain``, anomalib's
``Engine`` and ``anomalib train``) with the toy models and generated data of the e2e tests. To kill or
freeze a process at an exact point (not at a time that depends on the machine's load), the runs carry a
small instrumentation hook/callback (written into ``tmp_path``) that, when the ``FAULT_PAUSE_AT``
environment variable names ``epoch,batch,rank``, records the process id and sleeps after that training
step; the test then SIGKILLs that process, or leaves it hanging. Without the variable it does nothing,
so the reference and resumed runs use the very same config.

Measured (torch 2.14, mmengine 0.10.7, Lightning 2.6.6, anomalib 2.7.0, one thread per process):

* MemoryMamba, killed in epoch 2 and resumed with ``--resume``: weights and optimiser state equal to an
  uninterrupted run's bit for bit (max abs diff 0.0), same val metrics. Exact because the toy config
  draws no random numbers in the main process (no random augmentation with ``num_workers=0``,
  ``drop_path_rate=0``): mmengine does not checkpoint the generators' states either.
* Pyramid-Mamba, killed in epoch 2 and resumed with ``ckpt_path=last.ckpt``: bit for bit as well (max abs
  diff 0.0, same test metrics), with feature noise and drop-path on, because ``PyramidMamba`` saves the
  generators' states in its checkpoints (Lightning restores no RNG state; without them the same resume
  gave weights up to 0.16 apart and different test metrics).
* DDP (gloo, 2 processes), rank 1 SIGKILLed: rank 0 fails within about a second ("Connection closed by
  peer"); rank 1 hung: rank 0 fails after the configured timeout (20 s here), with either launcher.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("mmpretrain") is None or importlib.util.find_spec("anomalib") is None,
        reason="needs mmpretrain and anomalib",
    ),
]

REPO = Path(__file__).resolve().parents[1]
MIM = Path(sys.executable).with_name("mim")
#: Upper bound for one toy run (they take 10-25 s on a loaded 2-core machine).
RUN_TIMEOUT_S = 240
#: The DDP timeout the tests configure, and how much later than it the run must have ended.
DDP_TIMEOUT_S = 20
DDP_EXIT_MARGIN_S = 30
#: Largest weight / optimiser-state difference accepted between a resumed and an uninterrupted run
#: (measured: 0.0 for both plugins, i.e. bit-identical).
RESUME_ATOL = 1e-6

MM_HOOK = '''
"""Test instrumentation (mmengine): with FAULT_PAUSE_AT=epoch,batch,rank, sleep after that step."""
import os
import time
from pathlib import Path

from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS


def _write(name, text):
    folder = Path(os.environ["FAULT_DIR"])
    (folder / (name + ".tmp")).write_text(text)
    os.replace(folder / (name + ".tmp"), folder / name)


@HOOKS.register_module()
class FaultPauseHook(Hook):
    priority = "LOWEST"  # after the LoggerHook: the step's log line is out first

    def before_train(self, runner):
        if "FAULT_DIR" in os.environ:
            _write(f"rank{get_rank()}.pid", str(os.getpid()))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        at = os.environ.get("FAULT_PAUSE_AT")
        if at and tuple(map(int, at.split(","))) == (runner.epoch, batch_idx, get_rank()):
            _write("paused", str(os.getpid()))
            time.sleep(3600)
'''

PL_CALLBACK = '''
"""Test instrumentation (Lightning): with FAULT_PAUSE_AT=epoch,batch,rank, sleep after that step."""
import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


def _write(name, text):
    folder = Path(os.environ["FAULT_DIR"])
    (folder / (name + ".tmp")).write_text(text)
    os.replace(folder / (name + ".tmp"), folder / name)


class FaultPauseCallback(Callback):
    def setup(self, trainer, pl_module, stage):
        if "FAULT_DIR" in os.environ and stage == "fit":
            _write(f"rank{trainer.global_rank}.pid", str(os.getpid()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        at = os.environ.get("FAULT_PAUSE_AT")
        if at and tuple(map(int, at.split(","))) == (trainer.current_epoch, batch_idx, trainer.global_rank):
            _write("paused", str(os.getpid()))
            time.sleep(3600)
'''

#: Pyramid-Mamba through anomalib's Engine: a checkpoint after every epoch (``last.ckpt`` too), seeded.
#: (The Engine, not ``anomalib train``: anomalib 2.7's CLI accepts ``--seed_everything`` but never applies
#: it, so two CLI runs start from different random weights and cannot be compared.)
PL_SCRIPT = """
import json, sys
from pathlib import Path

import lightning
from anomalib.callbacks import ModelCheckpoint
from anomalib.engine import Engine

from fault_callback import FaultPauseCallback
from memmamba_plugins.pyramid_mamba import MVTec, PyramidMamba

root, out = sys.argv[1], Path(sys.argv[2])
resume = sys.argv[3] if len(sys.argv) > 3 else None
lightning.seed_everything(0)
model = PyramidMamba(**json.loads({model!r}))
datamodule = MVTec(root=root, categories=["alpha", "beta"], train_batch_size=2, eval_batch_size=4, num_workers=0)
checkpoints = ModelCheckpoint(dirpath=out / "checkpoints", save_last=True, every_n_epochs=1, save_top_k=-1)
engine = Engine(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                default_root_dir=out, callbacks=[checkpoints, FaultPauseCallback()])
results = engine.train(model, datamodule=datamodule, ckpt_path=resume)
print("METRICS " + json.dumps(results[0]))
"""


# -- helpers -------------------------------------------------------------------------------------------
def _env(helpers: Path, fault_dir: Path, pause_at: str | None = None) -> dict[str, str]:
    """The run's environment; ``fault_dir`` (one per run) receives the instrumentation's pid records."""
    fault_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", FAULT_DIR=str(fault_dir))
    env["PYTHONPATH"] = os.pathsep.join([str(helpers), str(REPO), os.environ.get("PYTHONPATH", "")])
    env.pop("FAULT_PAUSE_AT", None)
    if pause_at is not None:
        env["FAULT_PAUSE_AT"] = pause_at
    return env


class Run:
    """One launched command, in a process group of its own; :meth:`stop` ends whatever is left of it."""

    def __init__(
        self, cmd: list[str], cwd: Path, log: Path, helpers: Path, fault_dir: Path, pause_at: str | None
    ) -> None:
        self.log, self.fault_dir = log, fault_dir
        env = _env(helpers, fault_dir, pause_at)
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.proc.args[:3]} still running after {timeout} s:\n{self.output()[-3000:]}")

    def succeed(self) -> str:
        code = self.wait()
        assert code == 0, self.output()[-4000:]
        return self.output()

    def stop(self) -> None:
        """SIGKILL what is left of this run: its process group and the ranks it recorded.

        torchrun starts each worker in a session of its own, out of reach of the group's signal.
        Only processes this run started are signalled.
        """
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for record in self.fault_dir.glob("rank*.pid"):
            pid = int(record.read_text())
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launch(tmp_path: Path):
    """``launch(cmd, log_name, helpers, fault_dir, pause_at=None)``; every run is stopped at teardown."""
    runs: list[Run] = []
    # mim creates ~/.cache/mim at import with an exists-then-makedirs check: two `mim` processes
    # started together on a fresh machine race on it and one dies with FileExistsError.
    (Path.home() / ".cache" / "mim").mkdir(parents=True, exist_ok=True)

    def start(
        cmd: list[str], log_name: str, helpers: Path, fault_dir: Path, pause_at: str | None = None
    ) -> Run:
        run = Run(cmd, tmp_path, tmp_path / log_name, helpers, fault_dir, pause_at)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop()


def _wait_for_file(path: Path, run: Run, timeout: float = RUN_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if run.proc.poll() is not None:
            pytest.fail(f"exited ({run.proc.returncode}) before writing {path.name}:\n{run.output()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {path.name} after {timeout} s:\n{run.output()[-3000:]}")
        time.sleep(0.1)
    return path.read_text()


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _complete_archive(path: Path) -> bool:
    """Every torch/Lightning checkpoint is a zip; a truncated one has lost its central directory."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except zipfile.BadZipFile:
        return False


def _load(path: Path) -> dict:
    # Files this test has just written; weights_only=False only to read their optimiser/loop state too.
    return torch.load(path, map_location="cpu", weights_only=False)


def _max_abs_diff(a: object, b: object) -> float:
    """Largest difference between two nested structures of tensors (and equal-or-not for the rest)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (sorted(a), sorted(b))
        return max((_max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    assert a == b, (a, b)
    return 0.0


# -- MemoryMamba (mmengine) ----------------------------------------------------------------------------
def _mm_config(tmp_path: Path, data: Path, extra: str = "") -> Path:
    from test_memory_mamba_e2e import TOY_CONFIG

    (tmp_path / "helpers").mkdir(exist_ok=True)
    (tmp_path / "helpers" / "fault_hooks.py").write_text(MM_HOOK)
    cfg = tmp_path / "toy.py"
    base = REPO / "configs" / "memorymamba_gc10_scratch.py"  # lr 1e-3: the weights move enough to compare
    cfg.write_text(
        TOY_CONFIG.format(base=str(base), root=str(data))
        + """
custom_imports = dict(imports=['memmamba_plugins.memory_mamba', 'fault_hooks'], allow_failed_imports=False)
custom_hooks = [dict(type='ClassListCheckHook'), dict(type='FaultPauseHook')]
randomness = dict(seed=0, deterministic=True)
train_cfg = dict(max_epochs=3, val_interval=1)
optim_wrapper = dict(optimizer=dict(lr=1e-2))
# a learning rate that changes every iteration: a scheduler restored wrongly would show in the weights
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0, end=3,
                        convert_to_iter_based=True)]
"""
        + extra
    )
    return cfg


def _mm_val_metrics(output: str, epoch: int) -> dict[str, str]:
    lines = [
        line for line in output.splitlines() if f"Epoch(val) [{epoch}]" in line and "accuracy/top1" in line
    ]
    assert lines, output[-3000:]
    return dict(re.findall(r"((?:accuracy|single-label)/[\w-]+): ([-+0-9.eE]+)", lines[-1]))


def test_memory_mamba_killed_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path: Path, launch) -> None:
    from test_memory_mamba_e2e import make_dataset

    data = tmp_path / "data"
    make_dataset(data, {"train": 8, "val": 3})  # 16 training images, batch 4: 4 iterations per epoch
    cfg = _mm_config(tmp_path, data)
    helpers, faults = tmp_path / "helpers", tmp_path / "faults"
    train = [str(MIM), "train", "mmpretrain", str(cfg), "--work-dir"]
    reference = launch([*train, str(tmp_path / "reference")], "ref.log", helpers, faults / "reference")
    work = tmp_path / "work"
    killed = launch([*train, str(work)], "killed.log", helpers, faults, "1,1,0")
    pid = int(_wait_for_file(faults / "paused", killed))
    # after epoch 1's checkpoint, in the middle of epoch 2 (its 2nd of 4 iterations is logged)
    assert (work / "epoch_1.pth").is_file() and not (work / "epoch_2.pth").exists()
    assert "Epoch(train) [2][2/4]" in killed.output()
    os.kill(pid, signal.SIGKILL)
    assert killed.wait() != 0
    killed.stop()  # nothing of it may run on next to the resumed run
    for path in work.glob("*.pth"):
        assert _complete_archive(path), f"{path.name} is truncated"
    assert (work / "last_checkpoint").read_text().strip() == str(work / "epoch_1.pth")

    # mmengine writes a checkpoint in place (open 'wb', write), then names it in `last_checkpoint`: a kill
    # during epoch 2's save would leave a partial epoch_2.pth next to a `last_checkpoint` that still names
    # epoch_1.pth. Leave exactly that behind: `--resume` must take epoch_1.pth all the same.
    partial = (work / "epoch_1.pth").read_bytes()
    (work / "epoch_2.pth").write_bytes(partial[: len(partial) // 2])

    resumed = launch([*train, str(work), "--resume"], "resumed.log", helpers, faults / "resumed")
    out = resumed.succeed()
    assert "resumed epoch: 1" in out and "Epoch(train) [2][1/4]" in out
    reference_out = reference.succeed()

    final, expected = _load(work / "epoch_3.pth"), _load(tmp_path / "reference" / "epoch_3.pth")
    assert final["meta"]["epoch"] == expected["meta"]["epoch"] == 3
    assert final["meta"]["iter"] == expected["meta"]["iter"] == 12
    weights = _max_abs_diff(final["state_dict"], expected["state_dict"])
    optimizer = _max_abs_diff(final["optimizer"]["state"], expected["optimizer"]["state"])
    print(f"MemoryMamba resume: max |weights diff| {weights:.3g}, max |optimiser state diff| {optimizer:.3g}")
    assert weights <= RESUME_ATOL and optimizer <= RESUME_ATOL
    assert _max_abs_diff(final["param_schedulers"], expected["param_schedulers"]) == 0.0
    # the weights did move: a resume that restored nothing would not pass the comparison above
    first = _load(work / "epoch_2.pth")["state_dict"]
    assert _max_abs_diff(first, final["state_dict"]) > 1e-3
    assert _mm_val_metrics(out, 3) == _mm_val_metrics(reference_out, 3)
    for path in [*work.glob("*.pth"), *(tmp_path / "reference").glob("*.pth")]:
        assert _complete_archive(path), f"{path.name} is truncated"


def test_memory_mamba_dist_timeout_setting() -> None:
    from memmamba_plugins.memory_mamba.compat import DEFAULT_DIST_TIMEOUT_S, dist_timeout

    assert dist_timeout({}).total_seconds() == DEFAULT_DIST_TIMEOUT_S == 1800
    assert dist_timeout({"dist_cfg": {"backend": "gloo"}}).total_seconds() == DEFAULT_DIST_TIMEOUT_S
    assert dist_timeout({"dist_cfg": {"timeout": 20}}).total_seconds() == 20
    assert dist_timeout({"dist_cfg": {"timeout": 2.5}}).total_seconds() == 2.5
    for bad in (0, -5, "20", True):
        with pytest.raises(ValueError, match="env_cfg.dist_cfg.timeout"):
            dist_timeout({"dist_cfg": {"timeout": bad}})


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_memory_mamba_ddp_ends_when_a_peer_dies_or_hangs(tmp_path: Path, launch, fault: str) -> None:
    """``env_cfg.dist_cfg.timeout`` bounds rank 0's wait on a hung rank 1; a killed rank ends the run at once."""
    from test_memory_mamba_e2e import make_dataset

    data = tmp_path / "data"
    make_dataset(data, {"train": 8, "val": 2})
    cfg = _mm_config(
        tmp_path, data, f"env_cfg = dict(dist_cfg=dict(backend='gloo', timeout={DDP_TIMEOUT_S}))\n"
    )
    faults = tmp_path / "faults"
    cmd = [
        str(MIM), "train", "mmpretrain", str(cfg), "--work-dir", str(tmp_path / "work"),
        "--launcher", "pytorch", "--gpus", "2",
        "--cfg-options", "runner_type=CPUDistributedRunner",
        "model_wrapper_cfg.type=MMDistributedDataParallel", "model_wrapper_cfg.device_ids=None",
    ]  # fmt: skip
    # rank 1 stops after its first step; rank 0 goes on into the next gradient all-reduce
    run = launch(cmd, "ddp.log", tmp_path / "helpers", faults, "0,0,1")
    rank1 = int(_wait_for_file(faults / "paused", run))
    rank0 = int(_wait_for_file(faults / "rank0.pid", run))
    if fault == "killed":
        os.kill(rank1, signal.SIGKILL)
    start = time.monotonic()
    code = run.wait(timeout=DDP_TIMEOUT_S + DDP_EXIT_MARGIN_S + 60)
    elapsed = time.monotonic() - start
    left = [pid for pid in (rank0, rank1) if _alive(pid)]
    out = run.output()
    print(f"MemoryMamba DDP, rank 1 {fault}: the run ended {elapsed:.1f} s later with code {code}")
    assert code != 0, out[-3000:]
    assert elapsed <= DDP_TIMEOUT_S + DDP_EXIT_MARGIN_S, out[-3000:]
    if fault == "killed":
        assert "Connection closed by peer" in out or "ChildFailedError" in out, out[-3000:]
    else:
        assert elapsed >= DDP_TIMEOUT_S - 1, "ended before the timeout: something else failed\n" + out[-3000:]
        assert f"Timed out waiting {DDP_TIMEOUT_S * 1000}ms" in out, out[-3000:]
    # torchrun's agent stops every worker once one has failed
    assert not left, f"processes {left} still running after the run ended"


# -- Pyramid-Mamba (Lightning / anomalib) --------------------------------------------------------------
def _pl_helpers(tmp_path: Path) -> Path:
    helpers = tmp_path / "helpers"
    helpers.mkdir(exist_ok=True)
    (helpers / "fault_callback.py").write_text(PL_CALLBACK)
    return helpers


def test_pyramid_mamba_killed_mid_epoch_resumes_to_the_uninterrupted_run(tmp_path: Path, launch) -> None:
    from test_pyramid_mamba import SIZE, TINY, make_mvtec_like

    from memmamba_plugins.pyramid_mamba.lightning_model import RNG_STATES_KEY

    dataset = make_mvtec_like(tmp_path / "mvtec")  # 8 training images, batch 2: 4 steps per epoch
    helpers, faults = _pl_helpers(tmp_path), tmp_path / "faults"
    # feature noise (default) and drop-path on: the resumed run must continue the random draws too
    model = {
        **TINY,
        "decoder_depths": [1, 1, 1, 1],
        "drop_path_rate": 0.1,
        "input_size": SIZE,
        "visualizer": False,
    }
    script = helpers / "train_pyramid.py"
    script.write_text(PL_SCRIPT.format(model=json.dumps(model)))
    train = [sys.executable, str(script), str(dataset)]
    reference = launch([*train, str(tmp_path / "reference")], "ref.log", helpers, faults / "reference")
    work = tmp_path / "work"
    checkpoints = work / "checkpoints"
    killed = launch([*train, str(work)], "killed.log", helpers, faults, "1,1,0")
    pid = int(_wait_for_file(faults / "paused", killed))
    # after epoch 1's checkpoint, in the middle of epoch 2 (Lightning counts epochs from 0)
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    os.kill(pid, signal.SIGKILL)
    assert killed.wait() != 0
    killed.stop()  # nothing of it may run on next to the resumed run
    for path in checkpoints.glob("*.ckpt"):
        assert _complete_archive(path), f"{path.name} is truncated"
    last = _load(checkpoints / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (0, 4) and RNG_STATES_KEY in last

    # resume in place: the resumed run writes the same folder, so engine.train's test reads the final last.ckpt
    resumed = launch(
        [*train, str(work), str(checkpoints / "last.ckpt")], "res.log", helpers, faults / "resumed"
    )
    out = resumed.succeed()
    assert "Restored all states from the checkpoint" in out
    reference_out = reference.succeed()

    final, expected = (
        _load(checkpoints / "last.ckpt"),
        _load(tmp_path / "reference" / "checkpoints" / "last.ckpt"),
    )
    assert (final["epoch"], final["global_step"]) == (expected["epoch"], expected["global_step"]) == (2, 12)
    weights = _max_abs_diff(final["state_dict"], expected["state_dict"])
    optimizer = _max_abs_diff(final["optimizer_states"], expected["optimizer_states"])
    print(
        f"Pyramid-Mamba resume: max |weights diff| {weights:.3g}, max |optimiser state diff| {optimizer:.3g}"
    )
    assert weights <= RESUME_ATOL and optimizer <= RESUME_ATOL
    assert _max_abs_diff(final["lr_schedulers"], expected["lr_schedulers"]) == 0.0
    assert _max_abs_diff(_load(checkpoints / "epoch=0-step=4.ckpt")["state_dict"], final["state_dict"]) > 1e-3

    def metrics(output: str) -> dict[str, float]:
        return json.loads(next(line for line in output.splitlines() if line.startswith("METRICS "))[8:])

    assert metrics(out) == metrics(reference_out)
    for path in [*checkpoints.glob("*.ckpt"), *(tmp_path / "reference").rglob("*.ckpt")]:
        assert _complete_archive(path), f"{path.name} is truncated"

    # Outside a fit (no Trainer: load_from_checkpoint, export) the saved states leave the process's alone.
    from memmamba_plugins.pyramid_mamba import PyramidMamba

    module = PyramidMamba(**model)
    before = torch.get_rng_state()
    module.on_load_checkpoint(last)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_pyramid_mamba_ddp_ends_when_a_peer_dies_or_hangs(tmp_path: Path, launch, fault: str) -> None:
    """``--trainer.strategy.timeout`` bounds rank 0's wait on a hung rank 1; a killed rank ends the run at once."""
    from test_pyramid_mamba import make_mvtec_like
    from test_pyramid_mamba_e2e import TINY_CLI, _anomalib_cli

    dataset = make_mvtec_like(tmp_path / "mvtec")
    helpers, faults = _pl_helpers(tmp_path), tmp_path / "faults"
    timeout = time.strftime("%H:%M:%S", time.gmtime(DDP_TIMEOUT_S))
    cmd = [
        *_anomalib_cli(), "train", "--model", "PyramidMamba", *TINY_CLI, "--model.decoder_depths", "[1, 1, 1, 1]",
        "--data", "MVTec", "--data.root", str(dataset), "--data.categories", "[alpha, beta]",
        "--data.train_batch_size", "2", "--data.eval_batch_size", "4", "--data.num_workers", "0",
        "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "DDPStrategy", "--trainer.strategy.timeout", timeout,
        "--trainer.callbacks+=fault_callback.FaultPauseCallback",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--default_root_dir", str(tmp_path / "results"),
    ]  # fmt: skip
    run = launch(cmd, "ddp.log", helpers, faults, "0,0,1")
    rank1 = int(_wait_for_file(faults / "paused", run))
    if fault == "killed":
        os.kill(rank1, signal.SIGKILL)
    start = time.monotonic()
    code = run.wait(timeout=DDP_TIMEOUT_S + DDP_EXIT_MARGIN_S + 60)
    elapsed = time.monotonic() - start
    # Lightning's launcher does not stop its child processes when rank 0 fails with an error: a hung
    # rank 1 is left running (the `launch` fixture stops it); a killed one is gone.
    rank1_left = _alive(rank1)
    out = run.output()
    print(f"Pyramid-Mamba DDP, rank 1 {fault}: rank 0 ended {elapsed:.1f} s later with code {code}")
    assert code != 0, out[-3000:]
    assert elapsed <= DDP_TIMEOUT_S + DDP_EXIT_MARGIN_S, out[-3000:]
    if fault == "killed":
        assert not rank1_left
    else:
        assert elapsed >= DDP_TIMEOUT_S - 1, "ended before the timeout: something else failed\n" + out[-3000:]
        assert re.search(r"Application timeout|Timed out", out), out[-3000:]
