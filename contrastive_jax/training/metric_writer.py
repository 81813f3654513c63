"""Scalar metrics to TensorBoard event files, without TensorFlow.

Uses the ``tensorboard`` package's own event-file writer and protos (what
``torch.utils.tensorboard`` does), so the accelerator machine, which has no
TensorFlow, still writes events. Without ``tensorboard`` installed it falls
back to ``metrics.jsonl`` only (always written too, easy to grep).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Mapping

from absl import logging

__all__ = ["MetricWriter"]


class MetricWriter:
  """Writes ``{name: float}`` scalars per step; only on process 0."""

  def __init__(self, logdir: str, *, enabled: bool = True):
    self._enabled = enabled
    self._events = None
    self._jsonl = None
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    self._jsonl = open(os.path.join(logdir, "metrics.jsonl"), "a")
    try:
      # Only the protos and the record framing: tensorboard's EventFileWriter
      # would import all of TensorFlow (15 s) just for its gfile.
      from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
      from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
      from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.warning("tensorboard is not installed: metrics go to"
                      " metrics.jsonl only.")
      return
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    name = (f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
            f".{os.getpid()}.0")
    self._file = open(os.path.join(logdir, name), "wb")
    self._events = RecordWriter(self._file)
    self._events.write(event_pb2.Event(
        wall_time=time.time(), file_version="brain.Event:2"
    ).SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    if self._events is not None:
      values = [self._summary_pb2.Summary.Value(tag=k, simple_value=v)
                for k, v in scalars.items()]
      self._events.write(self._event_pb2.Event(
          wall_time=time.time(), step=int(step),
          summary=self._summary_pb2.Summary(value=values)).SerializeToString())
    # Written every log_every steps only: flushing keeps `tail -f` and
    # TensorBoard current during hour-long runs at no measurable cost.
    self.flush()

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._events is not None:
      self._file.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._events is not None:
      self._file.close()
      self._events = None
