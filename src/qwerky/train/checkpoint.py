"""Atomic, verified training checkpoints.

Each checkpoint is one file `TAG.pt` written to a temporary name, fsynced and renamed into place, with a
sha256 recorded in `manifest.json` (itself replaced atomically). Loading verifies the hash; a corrupt or
partial file is reported and the previous good checkpoint is used instead. The newest `keep` checkpoints
stay, and the newest *pinned* one (a stage boundary) as well, so a stage that must be rolled back (it
diverged) can always be started again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .parallel import DistInfo

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _umask_mode() -> int:
    """The mode a plainly created file would get (mkstemp's temporaries are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class CheckpointManager:
    """Saves and finds checkpoints in `directory`; keeps the newest `keep`."""

    def __init__(self, directory: str | Path, keep: int = 2) -> None:
        self.dir = Path(directory)
        self.keep = max(1, keep)
        self.loaded_tag: str | None = None  # the tag `load_latest` returned

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def _manifest(self) -> list[dict[str, Any]]:
        try:
            return json.loads(self.manifest_path.read_text())["checkpoints"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return []

    def save(self, payload: dict[str, Any], tag: str, pin: bool = False) -> Path:
        """Write `payload` as TAG.pt and list it last in the manifest; `pin`: kept until a newer pinned one."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{tag}.pt"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.dir)
        os.close(fd)
        try:
            torch.save(payload, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            digest = _sha256(Path(tmp))
            os.chmod(tmp, _umask_mode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        entries = [e for e in self._manifest() if e["file"] != path.name]
        entries.append({"file": path.name, "sha256": digest, "tag": tag, **({"pinned": True} if pin else {})})
        pinned = [e for e in entries if e.get("pinned")][-1:]
        kept = [e for e in entries if e in entries[-self.keep:] or e in pinned]
        self._write(kept, gone=[e for e in entries if e not in kept])
        return path

    def drop(self, tags: Callable[[str], bool]) -> list[str]:
        """Remove the checkpoints whose tag `tags` accepts (a rolled-back stage's); returns their tags."""
        entries = self._manifest()
        gone = [e for e in entries if tags(e["tag"])]
        self._write([e for e in entries if e not in gone], gone)
        return [e["tag"] for e in gone]

    def _write(self, entries: list[dict[str, Any]], gone: list[dict[str, Any]]) -> None:
        """The manifest first (it never lists a missing file), then the files no longer listed."""
        atomic_write_json(self.manifest_path, {"checkpoints": entries})
        for e in gone:
            (self.dir / e["file"]).unlink(missing_ok=True)

    def newest_tag(self) -> str | None:
        entries = self._manifest()
        return entries[-1]["tag"] if entries else None

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint whose hash verifies (its tag in `loaded_tag`); None when there is none."""
        self.loaded_tag = None
        for entry in reversed(self._manifest()):
            path = self.dir / entry["file"]
            if not path.is_file():
                log.warning("checkpoint %s listed but missing; trying the previous one", path)
                continue
            if _sha256(path) != entry["sha256"]:
                log.warning("checkpoint %s is corrupt or partial (sha256 mismatch); using the previous one", path)
                continue
            try:
                payload = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as err:  # noqa: BLE001 - an unreadable file is as bad as a corrupt one
                log.warning("checkpoint %s unreadable (%s); using the previous one", path, err)
                continue
            self.loaded_tag = entry["tag"]
            return payload
        return None


def full_state_dict(model: nn.Module, info: DistInfo, keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The weights of `model` named in `keys` (all when None) as full CPU tensors. Single-process, only those are
    copied; under FSDP2 it is a collective (every rank must call it) that gathers every weight, then filters."""
    if not info.enabled:
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if keys is None or k in keys}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if keys is None else {k: v for k, v in state.items() if k in keys}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], info: DistInfo,
                         strict: bool = True) -> None:
    """The inverse of `full_state_dict`; strict: every key of `model` must be in `state` (else a subset, which the
    caller has checked) and no other."""
    if not info.enabled:
        model.load_state_dict(state, strict=strict)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of this process's own weights, taken before a stage so the guard can undo it. Under FSDP2
    that is each rank's shards: no gather, and the copy costs host memory, not GPU memory."""
    return {k: _local(v).detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Write a `snapshot` back in place (each rank its own shards)."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            _local(v).copy_(saved[k])
