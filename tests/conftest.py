import os

# vLLM's CPU backend reserves this many GiB of KV cache per engine; tests need little.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Two cores: keep each process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_ray_per_module():
    """A test module that starts Ray stops it, so the next module's cluster starts clean."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
