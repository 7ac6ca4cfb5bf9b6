"""Refuse truncated or corrupt checkpoints with one message that names the file, before ``torch.load``.

``torch.save`` (and so every Lightning checkpoint) writes a zip archive. A truncated copy has lost the
zip's central directory at the end, and ``torch.load`` fails with a miniz "failed finding central
directory" error; a file that is no checkpoint at all fails deep in the unpickler (``KeyError: 101``);
a flipped bit inside a tensor loads silently, because ``torch.load`` does not verify the CRC-32 that
``torch.save`` records for every entry. :func:`check_checkpoint_file` checks the archive and those CRCs
with the standard library and raises :class:`CorruptCheckpointError` instead. It never unpickles
anything, so the ``weights_only`` safety of the load that follows is untouched.

Both ways in are covered: :meth:`PyramidMamba.load_from_checkpoint` (Python, ``anomalib export``) checks
first, and :class:`CheckedCheckpointIO` (anomalib's :class:`AnomalibCheckpointIO` plus the check) serves
the Trainer's ``--ckpt_path`` restores of ``anomalib fit/validate/test/predict``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from anomalib.engine.plugins.checkpoint_io import AnomalibCheckpointIO

#: First byte of a pickle (protocol 2+): ``torch.save(..., _use_new_zipfile_serialization=False)`` files
#: are plain pickles, not zips; they are left to ``torch.load``.
PICKLE_PROTOCOL_MARKER = b"\x80"
#: Bytes read at a time while the CRC-32 of an entry is checked.
CRC_CHUNK_BYTES = 1 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or corrupt (or no checkpoint at all)."""


def _corrupt(path: Path, problem: str) -> CorruptCheckpointError:
    msg = (
        f"Checkpoint {str(path)!r} is truncated or corrupt: {problem}. It cannot be loaded; copy it again "
        "from where it was saved (an interrupted download or copy leaves exactly this), or use another "
        "checkpoint, e.g. the `weights/lightning/model.ckpt` of an earlier run."
    )
    return CorruptCheckpointError(msg)


def check_checkpoint_file(path: str | Path) -> None:
    """Raise :class:`CorruptCheckpointError` unless ``path`` is a complete, undamaged checkpoint archive.

    Remote paths (``s3://...``) and legacy (non-zip) ``torch.save`` files are left to ``torch.load``.

    Raises:
        FileNotFoundError: ``path`` is a local path that does not exist or is a folder.
        CorruptCheckpointError: the zip archive is incomplete, an entry's CRC-32 does not match, or the
            file is neither a zip nor a pickle.
    """
    if "://" in str(path):  # fsspec URL: Lightning reads it, there is no local file to inspect
        return
    path = Path(path).expanduser()
    if not path.is_file():
        where = "is a folder" if path.is_dir() else "does not exist"
        msg = (
            f"Checkpoint {str(path)!r} {where}; pass the `.ckpt` file written by training with `--ckpt_path`."
        )
        raise FileNotFoundError(msg)
    if not zipfile.is_zipfile(path):
        with path.open("rb") as file:
            if file.read(len(PICKLE_PROTOCOL_MARKER)) == PICKLE_PROTOCOL_MARKER:
                return
        size = path.stat().st_size
        raise _corrupt(
            path, f"its {size} bytes hold no complete zip archive, which every torch/Lightning checkpoint is"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            for entry in archive.infolist():
                # torch.serialization.set_crc32_options(False) writes 0 for every CRC: nothing to verify.
                if entry.CRC == 0:
                    continue
                with archive.open(entry) as member:  # raises BadZipFile at the end on a CRC mismatch
                    while member.read(CRC_CHUNK_BYTES):
                        pass
    # A damaged directory surfaces as any of these (a flipped name byte: UnicodeDecodeError, a flipped
    # method or flag field: NotImplementedError or RuntimeError), each meaning "not a readable zip".
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError, RuntimeError) as exc:
        raise _corrupt(path, f"the zip archive is damaged ({exc})") from exc


class CheckedCheckpointIO(AnomalibCheckpointIO):
    """anomalib's checkpoint IO (same allow-list, same ``weights_only``) that checks the file first."""

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Any = None,  # noqa: ANN401 - whatever torch.load's map_location takes
        weights_only: bool = True,
    ) -> dict[str, Any]:
        """Check ``path`` with :func:`check_checkpoint_file`, then load it as anomalib does."""
        check_checkpoint_file(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
