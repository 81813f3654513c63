"""Checkpoints that never lose a run: orbax ``CheckpointManager`` + guards.

* ``workdir/checkpoints/<step>/{state,meta}``: the ``TrainState`` (params,
  optimizer state, step, RNG, memory bank, weight average; the step is also
  the data position) and a JSON record (step, data position, config fingerprint).
  Saved every ``checkpoint.every_steps``, at the end, and on SIGTERM; the
  last ``checkpoint.keep`` are kept. Saves are asynchronous (orbax copies the
  arrays to host before ``save`` returns, so the donated state is safe) and
  committed atomically: a process killed mid-save leaves an uncommitted
  temporary folder that orbax ignores.
* Restore tries the latest step first; a checkpoint that cannot be read
  (partial, corrupt) is reported, moved to ``workdir/checkpoints_corrupt/``
  (only skipped when ``read_only``, as evaluation opens it), and the
  previous one is tried. A state saved before a ``TrainState`` field
  existed restores with that field empty when it is empty now (an option
  that is off); other differences of fields, and a readable checkpoint whose
  arrays do not fit the state (another optimizer chain or model), are
  refused, untouched.
* A workdir whose ``config.json`` (or checkpoint fingerprint) comes from an
  incompatible config raises ``IncompatibleCheckpointError`` before anything
  is written. Keys in ``RESUME_SAFE_KEYS`` (run length, logging, checkpoint
  and evaluation settings) may change between restarts, and options added
  to the config since the run was saved may be present at their neutral
  default (its checkpoints' fingerprint, that of the saved ``config.json``,
  is then accepted). Each checkpoint also records its config, so one
  written before such an upgrade stays accepted by the same rule after
  ``config.json`` has been rewritten.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from typing import Any, Mapping, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath
from absl import logging

from contrastive_jax._checks import check_int

__all__ = [
    "Checkpointer",
    "IncompatibleCheckpointError",
    "PreemptionFlag",
    "RESUME_SAFE_KEYS",
    "compatible_view",
    "config_fingerprint",
    "check_workdir_config",
]

# Top-level config keys that do not change what a checkpoint contains or how
# the run continues bit-for-bit up to the saved step.
RESUME_SAFE_KEYS = frozenset({
    "num_steps", "num_epochs", "log_every", "eval_every", "checkpoint",
    "eval", "progress_bar", "distributed", "data_dir", "num_devices",
    "max_train_seconds",
})


class IncompatibleCheckpointError(ValueError):
  """The workdir holds a run of a different configuration."""


def compatible_view(config_dict: Mapping[str, Any]) -> dict:
  return {k: v for k, v in config_dict.items() if k not in RESUME_SAFE_KEYS}


def config_fingerprint(config_dict: Mapping[str, Any]) -> str:
  blob = json.dumps(compatible_view(config_dict), sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _diff(old, new, prefix=""):
  out = []
  keys = sorted(set(old) | set(new)) if isinstance(old, dict) and isinstance(
      new, dict) else None
  if keys is None:
    return [f"{prefix}: {old!r} -> {new!r}"] if old != new else []
  for k in keys:
    if k not in old and not new[k]:
      # An option added to the config after the run was saved, at its
      # neutral default (0, False, ""): the saved run behaved the same.
      continue
    if k not in old:
      out.append(f"{prefix}{k}: (absent) -> {new[k]!r}")
    elif k not in new:
      out.append(f"{prefix}{k}: {old[k]!r} -> (absent)")
    else:
      out.extend(_diff(old[k], new[k], f"{prefix}{k}."))
  return [d.replace(".:", ":") for d in out]


def _comparable(config_dict: Mapping[str, Any]) -> dict:
  """The config as JSON reads it back (tuples as lists), less the
  resume-safe keys."""
  return compatible_view(json.loads(json.dumps(config_dict, default=str)))


def check_workdir_config(workdir: str, config_dict: Mapping[str, Any]
                         ) -> str | None:
  """Raises if ``workdir`` has checkpoints of an incompatible config.

  Returns:
    The fingerprint of the workdir's saved config when it is compatible
    (``None`` without checkpoints). It differs from ``config_dict``'s when
    the saved run predates an option now at its neutral default; its
    checkpoints carry it, so ``Checkpointer(also_accept=...)`` takes it.
  """
  ckpt_dir = os.path.join(workdir, "checkpoints")
  path = os.path.join(workdir, "config.json")
  has_ckpt = os.path.isdir(ckpt_dir) and any(
      n.isdigit() for n in os.listdir(ckpt_dir))
  if not has_ckpt or not os.path.exists(path):
    return None
  with open(path) as f:
    old = json.load(f)
  diffs = _diff(compatible_view(old), _comparable(config_dict))
  if diffs:
    raise IncompatibleCheckpointError(
        f"Workdir {workdir} holds checkpoints of a different config; it is"
        " left untouched. Differences (saved -> requested):\n  "
        + "\n  ".join(diffs) + "\nUse another --workdir, or delete this one"
        " to start over.")
  return config_fingerprint(old)


class PreemptionFlag:
  """Set by SIGTERM (preemption notice); the loop saves and exits."""

  def __init__(self):
    self._event = threading.Event()
    self._previous = None

  def install(self) -> "PreemptionFlag":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and stopping.")
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def uninstall(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Checkpointer:
  """Save / restore-with-fallback around ``ocp.CheckpointManager``."""

  def __init__(self, workdir: str, *, fingerprint: str, keep: int = 3,
               async_save: bool = True, also_accept: Sequence[str | None] = (),
               config: Mapping[str, Any] | None = None,
               read_only: bool = False):
    """``fingerprint`` (and ``config``, when given) is written into each
    save; restores accept a checkpoint whose recorded config differs from
    ``config`` only as ``check_workdir_config`` allows, else one whose
    fingerprint is ``fingerprint`` or in ``also_accept``. ``read_only``:
    never write, move or delete (unreadable checkpoints are skipped)."""
    keep = check_int("checkpoint.keep", keep, 1)
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._corrupt_dir = os.path.abspath(
        os.path.join(workdir, "checkpoints_corrupt"))
    self._fingerprint = fingerprint
    self._accepted = {fingerprint, *(f for f in also_accept if f)}
    self._config = None if config is None else _comparable(config)
    self._read_only = read_only
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save and not read_only)
    self._manager = self._new_manager()

  def _new_manager(self):
    return ocp.CheckpointManager(self.directory, options=self._options,
                                 item_names=("state", "meta"))

  @property
  def manager(self) -> ocp.CheckpointManager:
    return self._manager

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore_latest(self, abstract_state):
    """``(state, step)`` of the newest readable checkpoint, or ``(None, None)``.

    Raises:
      IncompatibleCheckpointError: a readable checkpoint of another config.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        meta = self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      self._check_config(step, meta)
      if (meta.get("config") is None
          and meta.get("config_fingerprint") not in self._accepted):
        raise IncompatibleCheckpointError(
            f"Checkpoint {self.directory}/{step} was written by a config with"
            f" fingerprint {meta.get('config_fingerprint')}, not"
            f" {self._fingerprint}; it is left untouched. Use another"
            " --workdir, or delete this one to start over.")
      try:
        saved_fields = self._saved_fields(step)
      except Exception as e:  # pylint: disable=broad-except
        self._set_aside(step, e)
        continue
      target, fill = self._restore_target(abstract_state, saved_fields, step)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))["state"]
      except Exception as e:  # pylint: disable=broad-except
        if self._readable(step):
          raise IncompatibleCheckpointError(
              f"Checkpoint {self.directory}/{step} is readable but its arrays"
              " do not fit this run's training state (another optimizer"
              " chain, model or version of contrastive_jax wrote it):"
              f" {type(e).__name__}: {str(e)[:500]}. It is left untouched;"
              " use another --workdir, or the code that wrote it.") from e
        self._set_aside(step, e)
        continue
      if fill is not None:
        restored = abstract_state.replace(**restored, **fill)
      logging.info("Resumed from checkpoint step %d (%s).", step,
                   self.directory)
      return restored, step
    return None, None

  def _check_config(self, step: int, meta: Mapping[str, Any]) -> None:
    saved = meta.get("config")
    if saved is None or self._config is None:
      return
    diffs = _diff(saved, self._config)
    if diffs:
      raise IncompatibleCheckpointError(
          f"Checkpoint {self.directory}/{step} was written by a different"
          " config; it is left untouched. Differences (saved -> requested):"
          "\n  " + "\n  ".join(diffs) + "\nUse another --workdir, or delete"
          " this one to start over.")

  def _readable(self, step: int) -> bool:
    """Whether the saved state reads back as it was saved (no target)."""
    try:
      self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore()))
      return True
    except Exception:  # pylint: disable=broad-except
      return False

  def _saved_fields(self, step: int) -> set[str] | None:
    """Top-level names of the saved state's tree (``None``: not a dict)."""
    path = epath.Path(self.directory) / str(step) / "state"
    tree = ocp.StandardCheckpointHandler().metadata(path)
    tree = getattr(tree, "tree", tree)
    return set(tree) if isinstance(tree, dict) else None

  def _restore_target(self, abstract_state, saved_fields, step):
    """``(target, fill)``: a state saved before a dataclass field existed
    restores into the fields it has; the new ones, empty in
    ``abstract_state`` (an option that is off), are ``fill``-ed.

    Raises:
      IncompatibleCheckpointError: the saved fields differ otherwise (another
        version of the code); the checkpoint is left untouched.
    """
    if saved_fields is None or not dataclasses.is_dataclass(abstract_state):
      return abstract_state, None
    fields = {f.name: getattr(abstract_state, f.name)
              for f in dataclasses.fields(abstract_state)}
    if set(fields) == saved_fields:
      return abstract_state, None
    new = set(fields) - saved_fields
    if saved_fields - set(fields) or any(
        jax.tree.leaves(fields[n]) for n in new):
      raise IncompatibleCheckpointError(
          f"Checkpoint {self.directory}/{step} holds the state fields"
          f" {sorted(saved_fields)}; this code expects {sorted(fields)}. It"
          " was written by another version of contrastive_jax and is left"
          " untouched.")
    return ({n: v for n, v in fields.items() if n in saved_fields},
            {n: fields[n] for n in new})

  def _set_aside(self, step: int, error: Exception) -> None:
    src = os.path.join(self.directory, str(step))
    if self._read_only:
      logging.warning("Checkpoint %s cannot be read (%s: %s); trying the"
                      " previous one.", src, type(error).__name__,
                      str(error)[:300])
      return
    dst = os.path.join(self._corrupt_dir, f"{step}-{int(time.time())}")
    logging.warning(
        "Checkpoint %s cannot be read (%s: %s); moving it to %s and falling"
        " back to the previous checkpoint.", src, type(error).__name__,
        str(error)[:300], dst)
    if jax.process_index() == 0:
      os.makedirs(self._corrupt_dir, exist_ok=True)
      shutil.move(src, dst)
    self._manager.close()
    self._manager = self._new_manager()

  def save(self, step: int, state, *, force: bool = False) -> bool:
    if step in self._manager.all_steps():
      return False
    meta = {"step": int(step), "data_position": int(step),
            "config_fingerprint": self._fingerprint, "time": time.time()}
    if self._config is not None:
      meta["config"] = self._config
    return self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        force=force)

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
