import os

# vLLM's CPU backend reserves this many GiB of KV cache per engine; tests need little.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Two cores: keep each process from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
