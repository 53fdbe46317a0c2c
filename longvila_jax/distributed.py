"""Multi-host start-up: `jax.distributed` from explicit flags, or from the cluster's launcher.

JAX's coordination service is the engine; this module only decides whether and how to call
`jax.distributed.initialize` before anything touches a device:

- explicit `coordinator`, `num_processes`, `process_id` (the `--coordinator`,
  `--num_processes`, `--process_id` flags: local tests, Kubernetes manifests);
- otherwise, when a launcher started several tasks (SLURM `srun` with more than one task,
  Open MPI `mpirun` with more than one rank, a Kubernetes indexed Job with the `kubernetes`
  package installed), JAX's own cluster detection with no arguments;
- otherwise nothing: one process, as before.

Failures are bounded: a process that cannot reach the coordinator fails after `timeout_s`
with a message naming the address, and a process that dies is noticed by the others
through the coordination service's heartbeats (`heartbeat_s`), which then stop instead of
waiting forever in a collective.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time

import jax
from absl import logging


class DistributedError(RuntimeError):
    """The multi-process start-up failed (bad flags, unreachable coordinator)."""


def _launched_tasks() -> str | None:
    """The launcher that started more than one task of this job, if any."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return "SLURM"
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if ("JOB_COMPLETION_INDEX" in os.environ and "KUBERNETES_SERVICE_HOST" in os.environ
            and importlib.util.find_spec("kubernetes") is not None):
        return "Kubernetes"
    return None


def _slurm_local_devices() -> list[int] | None:
    """Under SLURM with one task per node, every GPU SLURM gave the task.

    JAX's SLURM detection assumes one task per GPU and shows each task only GPU
    `SLURM_LOCALID`; with one task per node (all GPUs of a host in one process, as the mesh's
    `local` axis wants) that would leave seven of eight GPUs unused. A `JAX_LOCAL_DEVICE_IDS`
    the user set wins (JAX reads it).
    """
    if os.environ.get("SLURM_NTASKS_PER_NODE") != "1" or "JAX_LOCAL_DEVICE_IDS" in os.environ:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    count = len(visible.split(",")) if visible else int(os.environ.get("SLURM_GPUS_ON_NODE", 0))
    return list(range(count)) or None


def _check_explicit(coordinator, num_processes, process_id) -> None:
    given = {"--coordinator": coordinator, "--num_processes": num_processes,
             "--process_id": process_id}
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise DistributedError(f"{', '.join(missing)} missing: --coordinator, --num_processes "
                               "and --process_id go together")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"--coordinator: expected HOST:PORT, got {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedError(f"--process_id={process_id} is not in [0, --num_processes="
                               f"{num_processes})")


def _wait_for_coordinator(coordinator: str, timeout_s: float) -> None:
    """Block until the coordinator's port accepts connections, or fail naming it.

    JAX's own client aborts the whole process (a fatal log and a stack trace) when it cannot
    register in time; probing first turns the common case, a wrong address or a coordinator
    that never started, into a one-line error.
    """
    host, _, port = coordinator.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise DistributedError(f"cannot reach the coordinator {coordinator} within "
                                       f"{timeout_s:g} s ({err.strerror or err})") from None
            time.sleep(0.5)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300,
               heartbeat_s: int = 100) -> bool:
    """Start `jax.distributed` when asked or launched as several tasks; returns whether it
    did. Logs this process's index, the process count and its local devices."""
    explicit = any(x is not None for x in (coordinator, num_processes, process_id))
    launcher = None
    if explicit:
        _check_explicit(coordinator, num_processes, process_id)
        if process_id != 0:  # process 0 hosts the coordinator
            _wait_for_coordinator(coordinator, timeout_s)
    else:
        launcher = _launched_tasks()
        if launcher is None:
            return False
    # CPU devices of several processes talk through gloo; GPUs ignore this and use NCCL.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id,
                                   local_device_ids=(_slurm_local_devices()
                                                     if launcher == "SLURM" else None),
                                   initialization_timeout=timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_s)
    except Exception as err:  # JAX raises its runtime's error types; keep one line
        where = coordinator or f"the {launcher} coordinator"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise DistributedError(f"cannot start jax.distributed with coordinator {where} "
                               f"within {timeout_s} s: {reason}") from None
    logging.warning("process %d of %d (%s), local devices: %s", jax.process_index(),
                    jax.process_count(), launcher or f"coordinator {coordinator}",
                    ", ".join(str(d) for d in jax.local_devices()))
    return True
