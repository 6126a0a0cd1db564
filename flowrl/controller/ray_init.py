"""Start (or join) Ray so that worker processes can import flowrl and see the driver's settings."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray

import flowrl

# Driver environment variables that workers inherit (explicit env_vars override them).
FORWARDED_PREFIXES = ("FLOWRL_", "VLLM_", "HF_", "TRANSFORMERS_", "TOKENIZERS_", "NCCL_", "GLOO_", "TORCH_")
FORWARDED_NAMES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "PYTORCH_CUDA_ALLOC_CONF",
    "CUDA_DEVICE_MAX_CONNECTIONS",
)

# ``ray.init`` options that keep Ray's start-up lines and the workers' output off the driver's
# console (Ray's errors still show): for workers that write to their own files
# (``WorkerGroup(log_path=...)``). ``init_ray(**QUIET)``.
QUIET: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}


def package_root() -> str:
    """The folder that holds the ``flowrl`` package: workers need it on PYTHONPATH."""
    return str(Path(flowrl.__file__).resolve().parent.parent)


def worker_env(env_vars: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment handed to every worker: forwarded driver variables, PYTHONPATH, overrides."""
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES}
    paths = [package_root(), os.getcwd(), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    env.update(env_vars or {})
    return env


def init_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    env_vars: Mapping[str, str] | None = None,
    **ray_kwargs: Any,
) -> dict[str, float]:
    """Start a local Ray cluster (``address=None``) or join one (``address="auto"`` or "ip:port").

    Workers get ``PYTHONPATH`` with flowrl's checkout and the driver's working directory,
    the driver's ``VLLM_*``, ``OMP_NUM_THREADS``, ``HF_*``, ... variables, and ``env_vars``.
    Other keyword arguments go to ``ray.init``. Returns the cluster's resources. If Ray is
    already running in this process it is left as it is.
    """
    if ray.is_initialized():
        return dict(ray.cluster_resources())
    if address is not None and (num_cpus is not None or num_gpus is not None):
        raise ValueError(
            f"init_ray(address={address!r}): num_cpus/num_gpus describe a new local cluster; an existing "
            "cluster keeps the resources it was started with, so leave them out"
        )
    env = worker_env(env_vars)
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # A local cluster's processes inherit the driver's environment: setting it here
        # avoids a job-level runtime_env, which would make Ray start a fresh (slower)
        # worker process for every actor instead of reusing its prestarted ones.
        os.environ.update(env)
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **ray_kwargs)
    else:
        runtime_env = dict(ray_kwargs.pop("runtime_env", None) or {})
        runtime_env["env_vars"] = {**env, **runtime_env.get("env_vars", {})}
        ray.init(address=address, runtime_env=runtime_env, **ray_kwargs)
    return dict(ray.cluster_resources())


def node_cpus() -> list[float]:
    """The CPUs of each alive node of the running cluster."""
    return [float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n["Alive"]]
