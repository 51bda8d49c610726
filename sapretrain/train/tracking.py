"""Tracking on clusters: one run id per output directory, trackers that resume it, logs kept next
to an fsspec ``run.output_dir``.

- ``{run.output_dir}/run.json`` is written once, on the first start, and read on every later start:
  W&B resumes that run (``id``, ``resume="allow"``) after a requeue instead of opening a new one.
- TensorBoard after a resume from step S: the writer purges the events of steps > S (``purge_step``),
  the steps that will be trained again, as ``MetricsLog`` drops their lines from ``metrics.jsonl``.
- With an object-store ``run.output_dir`` the logs live in a local mirror (``trainer.log_dir``):
  :class:`LogMirror` copies it to ``{run.output_dir}/logs/`` at every checkpoint, on a preemption
  stop and at the end, and on a start whose local mirror is missing or behind (a fresh node) first
  brings the remote copy back. A failed copy is a warning: training goes on, the checkpoints are
  what a resume needs.

Rank 0 only (the trainer calls these on the main process).
"""
from __future__ import annotations

import json
import os
import sys
import uuid

from sapretrain import storage

RUN_FILE = "run.json"
LOGS = "logs"  # the remote copy of the local log mirror: {run.output_dir}/logs/
# An outage of the log storage is waited out for at most this long per copy (the checkpoint
# writes wait the full storage budget; logs are not worth stalling training for that long).
COPY_RETRY_SECONDS = 60.0


def run_identity(output_dir: str, log=print) -> dict:
    """The run's ``{"id", "name"}``: read from ``{output_dir}/run.json``, or created there on the
    first start. The id stays the same across resumes and requeues of this output directory."""
    url = f"{output_dir.rstrip('/')}/{RUN_FILE}"
    if storage.exists(url):
        run = json.loads(storage.read_bytes(url))
        if not isinstance(run, dict) or not isinstance(run.get("id"), str) or not run["id"]:
            raise SystemExit(f"{url}: no run id in it ({run!r}); delete the file to start a new tracked run")
        return run
    name = output_dir.rstrip("/").rsplit("/", 1)[-1] or "run"
    # W&B ids: letters and digits only (no / \ # ? % :), unique per project.
    run = {"id": uuid.uuid4().hex[:16], "name": name}
    storage.write_bytes_atomic(url, json.dumps(run, indent=1).encode() + b"\n")
    log(f"tracked run {run['name']} (id {run['id']}) in {url}")
    return run


def tracker_init_kwargs(run: dict, start_step: int, log_dir: str) -> dict:
    """``init_kwargs`` of ``accelerator.init_trackers`` for a start at ``start_step`` (0: fresh).

    W&B: the same run on every start (``resume="allow"`` also creates it the first time); its
    local files go to the log mirror, so they are copied with the logs (``WANDB_MODE=offline``
    runs can be synced later from there). TensorBoard: events of steps > ``start_step`` are
    purged (they are trained again)."""
    return {
        "wandb": {"id": run["id"], "resume": "allow", "name": run["name"], "dir": log_dir},
        "tensorboard": {"purge_step": start_step + 1},
    }


def remote_logs(output_dir: str) -> str | None:
    """Where the logs are copied: ``{output_dir}/logs`` for a URL output; None for a local one
    (the logs are written there directly)."""
    out = output_dir.rstrip("/")
    return f"{out}/{LOGS}" if storage.is_url(out) else None


class LogMirror:
    """The local log directory and its copy at ``remote`` (files: metrics.jsonl, training.png, the
    tracker files under it). Every failure is a one-line warning and a False return."""

    def __init__(self, local: str, remote: str, retry_seconds: float = COPY_RETRY_SECONDS):
        self.local = local
        self.remote = remote.rstrip("/")
        self.retry_seconds = retry_seconds
        self._sent: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) last copied

    def restore(self, step: int) -> bool:
        """Before the trackers start: bring the remote copy back when it holds more of steps
        1..``step`` than the local mirror (a fresh node: no local mirror at all)."""
        metrics = os.path.join(self.local, "metrics.jsonl")
        try:
            fs, root = storage.url_to_fs(self.remote)
            remote_metrics = f"{root}/metrics.jsonl"
            if not self._retry(lambda: fs.exists(remote_metrics), "look for"):
                return False
            remote_covered = last_step(self._retry(lambda: fs.cat_file(remote_metrics), "read"), step)
            local_covered = last_step(_read(metrics), step) if os.path.exists(metrics) else -1
            if remote_covered <= local_covered:
                return False
            files = [p for p in self._retry(lambda: fs.find(root), "list") if not p.endswith("/")]
            for path in files:
                target = os.path.join(self.local, *path[len(root):].strip("/").split("/"))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                self._retry(lambda: fs.get_file(path, target), "read")
        except Exception as e:  # noqa: BLE001 -- a missing log copy never stops a resume
            _warn(f"could not restore the logs from {self.remote}: {_one_line(e)}; the curves before this "
                  "start may be incomplete (training is not affected)")
            return False
        print(f"restored {len(files)} log file(s) from {self.remote} (logged steps up to {remote_covered})",
              flush=True)
        return True

    def sync(self) -> bool:
        """Copy the local files that changed since the last copy (whole files: a PUT is atomic)."""
        try:
            fs, root = storage.url_to_fs(self.remote)
            for rel, stamp in sorted(_files(self.local).items()):
                if self._sent.get(rel) == stamp:
                    continue
                local = os.path.join(self.local, rel)
                self._retry(lambda: fs.put_file(local, f"{root}/{rel.replace(os.sep, '/')}"), "write")
                self._sent[rel] = stamp
        except Exception as e:  # noqa: BLE001 -- a failed log copy never stops training
            _warn(f"could not copy the logs {self.local} to {self.remote}: {_one_line(e)}; training goes on "
                  "(the checkpoints are complete), the next checkpoint tries again")
            return False
        return True

    def _retry(self, fn, what: str):
        return storage.retry_transient(fn, f"{what} {self.remote}", seconds=self.retry_seconds)


def last_step(metrics: bytes, up_to: int) -> int:
    """The last step ≤ ``up_to`` logged in ``metrics.jsonl`` content (-1: none)."""
    last = -1
    for raw in metrics.splitlines():
        try:
            step = json.loads(raw).get("step")
        except (ValueError, AttributeError):
            continue
        if isinstance(step, int) and not isinstance(step, bool) and step <= up_to:
            last = max(last, step)
    return last


def _files(root: str) -> dict[str, tuple[int, int]]:
    """Files under ``root`` (relative path -> (size, mtime_ns)), temporary ``*.tmp.*`` files left out."""
    found = {}
    for directory, _, names in os.walk(root):
        for name in names:
            if ".tmp." in name:
                continue
            path = os.path.join(directory, name)
            stat = os.stat(path)
            found[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
    return found


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
