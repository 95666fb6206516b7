"""Training checkpoints: atomic writes, rotation, and validated loading.

Layout of a run directory::

    <run>/checkpoints/ckpt_00001000.pt   one file per saved step (the last ``keep`` are kept)
    <run>/checkpoints/latest             text: the file name of the newest checkpoint

A checkpoint is one ``torch.save`` dict (:data:`FORMAT` names its layout):
``params`` (name -> tensor), ``optimizer`` (the meta-optimizer's state), ``step`` (meta-steps
completed), ``config`` (the run's :class:`~imaml_ext.config.TrainConfig` as a dict), ``model``
(the model's class and shapes), ``rng`` (torch CPU / CUDA generator states; the task sampler is
seeded by (seed, step) and needs none), ``log`` (byte offset of the metrics log at this step, so
a resumed run truncates what an interrupted one wrote after it) and ``counters``.

Writes are atomic: the dict goes to a temp file in the same directory, is flushed and fsync'ed,
then ``os.replace``d onto its name (and the directory fsync'ed), so a crash mid-write leaves the
previous checkpoints intact and never a half-written file under a checkpoint name.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from imaml_ext._atomic import atomic_write, sweep_stale_temps
from imaml_ext.config import identity_mismatch

log = logging.getLogger("imaml_ext.checkpoint")

FORMAT = "imaml_ext.checkpoint/1"
CKPT_DIR = "checkpoints"
LATEST = "latest"
_NAME = re.compile(r"^ckpt_(\d{8,})\.pt$")


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, corrupt, truncated, or of another run."""


class ConfigMismatchError(CheckpointError):
    """A checkpoint whose model or algorithm differs from the one requested."""


def ckpt_name(step: int) -> str:
    return f"ckpt_{step:08d}.pt"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a temp file in the same directory + fsync + os.replace
    (imaml_ext._atomic; temp files of killed writers are swept on the next write of that name,
    and :func:`save_checkpoint` sweeps those of every checkpoint name)."""
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` made atomic (serialised in memory first, then :func:`atomic_write_bytes`)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint file in ``run_dir/checkpoints``, oldest first."""
    d = Path(run_dir) / CKPT_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep: int = 3) -> Path:
    """Writes ``state`` (which must hold ``step``) as the run's newest checkpoint, atomically,
    points ``latest`` at it, and deletes all but the ``keep`` newest checkpoint files up to its
    step. It never deletes the file just written, and leaves files of later steps alone (a run
    resumed from an older checkpoint: they belonged to the abandoned continuation, and counted
    as newest they made the rotation delete the new file, ``latest`` then naming a missing
    one)."""
    d = Path(run_dir) / CKPT_DIR
    d.mkdir(parents=True, exist_ok=True)
    step = int(state["step"])
    path = d / ckpt_name(step)
    integrity = {"sha256": tensor_digest([state.get("params", {}), state.get("optimizer", {})])}
    atomic_torch_save({"format": FORMAT, **state, "integrity": integrity}, path)
    atomic_write_bytes(d / LATEST, (path.name + "\n").encode())
    # a writer killed at another step left its temp file (as large as a checkpoint) there
    sweep_stale_temps(path, names=r"ckpt_\d{8,}\.pt")
    upto = [(s, p) for s, p in list_checkpoints(run_dir) if s <= step and p != path]
    for _, old in upto[:max(len(upto) - (keep - 1), 0)] if keep > 0 else []:
        try:
            old.unlink()
        except OSError as exc:
            log.warning("imaml_ext: could not delete old checkpoint %s: %s", old, exc)
    return path


def tensor_digest(tree) -> str:
    """SHA-256 of the tensors in a (nested) dict/list of tensors and plain data, in a fixed
    order: their dtypes, shapes and bytes (each moved to the CPU, contiguous)."""
    h = hashlib.sha256()

    def visit(x, key: str) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().resolve_conj().resolve_neg().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}:".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer, not a copy
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                visit(x[k], f"{key}/{k}")
        elif isinstance(x, (list, tuple)):
            for i, y in enumerate(x):
                visit(y, f"{key}/{i}")
    visit(tree, "")
    return h.hexdigest()


def load_checkpoint_file(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """Loads and validates one checkpoint file; :class:`CheckpointError` names the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # weights_only: tensors and plain data only, so that a foreign file cannot run code on
        # load (TorchVersion: the version string of checkpoints written before 2026-11-29)
        from torch.torch_version import TorchVersion  # noqa: PLC0415
        with torch.serialization.safe_globals([TorchVersion]):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt file
        if "Unsupported global" in str(exc):  # a class or function, not damage
            raise CheckpointError(
                f"checkpoint {path} holds Python objects beyond tensors and plain data, which "
                f"imaml_ext never writes; refused (loading it would run its code)") from exc
        with open(path, "rb") as f:
            head = f.read(2)
        # neither torch.save's zip nor a pickle, and not named as a checkpoint (one whose first
        # bytes a crash damaged is reported as corrupt below)
        if head and head != b"PK" and head[:1] != b"\x80" and not _NAME.match(path.name):
            raise CheckpointError(
                f"{path} is not a checkpoint (not a file torch.save writes): give a run folder or "
                f"one of its {CKPT_DIR}/ckpt_<step>.pt files") from None
        # (the first line: torch's own advice to reload with weights_only=False does not apply)
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: "
                              f"{first}); delete it or resume from an older one") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not an imaml_ext checkpoint (format {got!r}, expected "
                              f"{FORMAT!r})")
    missing = [k for k in ("params", "optimizer", "step", "config") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is corrupt")
    want = state.get("integrity", {}).get("sha256")
    if want is not None and tensor_digest([state["params"], state["optimizer"]]) != want:
        # damage inside a tensor's bytes unpickles fine (a flipped weight read 7652)
        raise CheckpointError(f"checkpoint {path} is damaged: its parameters or optimizer state "
                              f"do not match the checksum written with them; delete it or "
                              f"resume from an older one")
    state["path"] = str(path)
    return state


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint file ``path`` names: the file itself, or a run directory's newest one
    (its ``latest`` pointer, else the highest step)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"--resume/--checkpoint {p} does not exist")
    # absolute (symlinks kept), so that "." inside checkpoints/ has the folder's name
    p = Path(os.path.abspath(p))
    ckdir = p / CKPT_DIR if (p / CKPT_DIR).is_dir() else p
    latest = ckdir / LATEST
    if latest.is_file():
        try:
            name = latest.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:  # damaged: the highest step instead
            log.warning("imaml_ext: ignoring unreadable %s (%s)", latest, exc)
            name = ""
        if name and (ckdir / name).is_file():
            return ckdir / name
    found = list_checkpoints(ckdir.parent if ckdir.name == CKPT_DIR else p)
    if not found:
        raise CheckpointError(f"no checkpoint found in {p} (expected {CKPT_DIR}/ckpt_*.pt)")
    return found[-1][1]


def load_latest(path: str | Path, map_location="cpu") -> dict[str, Any]:
    """Loads the checkpoint ``path`` names (a file, or a run directory).

    A file that is corrupt raises :class:`CheckpointError` naming it. In a run directory, a
    corrupt newest checkpoint is reported (a warning naming it) and the next older valid one is
    used; if none is valid the error names every file tried.
    """
    p = Path(path)
    first = find_checkpoint(p)
    if p.is_file():
        return load_checkpoint_file(first, map_location)
    run = first.parent.parent if first.parent.name == CKPT_DIR else first.parent
    # then the older ones, newest first: a checkpoint of a later step than the one `latest`
    # names belongs to a continuation abandoned by a resume from an older one
    m = _NAME.match(first.name)
    below = int(m.group(1)) if m else None
    candidates = [first] + [q for s, q in reversed(list_checkpoints(run))
                            if q != first and (below is None or s < below)]
    errors = []
    for c in candidates:
        try:
            state = load_checkpoint_file(c, map_location)
        except CheckpointError as exc:
            errors.append(str(exc))
            log.warning("imaml_ext: %s; trying an older checkpoint", exc)
            continue
        return state
    raise CheckpointError("no valid checkpoint in " + str(p) + ": " + "; ".join(errors))


def model_signature(params: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, Any]:
    """The model's identity: class, repr of its hyper-parameters and every parameter's shape."""
    return {"class": type(model).__name__,
            "repr": model.extra_repr() if hasattr(model, "extra_repr") else "",
            "shapes": {k: list(v.shape) for k, v in params.items()}}


def check_compatible(state: dict[str, Any], config: dict[str, Any],
                     model_sig: dict[str, Any] | None = None) -> None:
    """Raises :class:`ConfigMismatchError` naming every identity field (model or algorithm) on
    which the checkpoint ``state`` and the requested ``config`` disagree."""
    diffs = identity_mismatch(state["config"], config)
    if model_sig is not None and "model" in state:
        saved = state["model"]
        if saved.get("class") != model_sig["class"]:
            diffs.append(f"model class: checkpoint {saved.get('class')!r}, requested "
                         f"{model_sig['class']!r}")
        a, b = saved.get("shapes", {}), model_sig["shapes"]
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                diffs.append(f"parameter {k}: checkpoint shape {a.get(k)}, requested {b.get(k)}")
    if model_sig is not None and not diffs:
        # the tensors themselves, not only the signature saved beside them (a resume copied
        # whatever keys the file held: a missing one kept its fresh initialisation, a [1] one
        # was broadcast)
        params, want = state.get("params", {}), model_sig["shapes"]
        for k in sorted(set(params) | set(want)):
            got = list(params[k].shape) if isinstance(params.get(k), torch.Tensor) else None
            if got != want.get(k):
                diffs.append(f"params[{k!r}]: checkpoint holds "
                             f"{'nothing' if k not in params else got}, the model needs "
                             f"{want.get(k, 'no such parameter')}")
    if diffs:
        raise ConfigMismatchError(
            f"checkpoint {state.get('path', '?')} was written with other settings than these "
            f"(they fix the run: its model, algorithm and task stream): " + "; ".join(diffs)
            + ". Resume without those options (the run keeps its own), or start a new run "
              "with another --out")


__all__ = ["CheckpointError", "ConfigMismatchError", "FORMAT", "atomic_torch_save",
           "atomic_write_bytes", "check_compatible", "ckpt_name", "find_checkpoint",
           "list_checkpoints", "load_checkpoint_file", "load_latest", "model_signature",
           "save_checkpoint"]
