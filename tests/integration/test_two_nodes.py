"""Two Ray nodes on this machine (different resources), workers placed across both, a real step.

``placement.ray_address`` joins the cluster as a driver would join one made with ``ray
start`` on each machine; ``placement.nnodes=2`` puts rank 0 on the driver's node and rank
1 on the other. The step is a critic's (FSDP2 over gloo between the two nodes, no vLLM,
to keep it quick): values, one update whose gradient is all-reduced across the nodes.
"""

from __future__ import annotations

import pytest
import ray
import torch
from omegaconf import OmegaConf

from flowrl.batch import Batch
from flowrl.config import load_config
from flowrl.keys import Keys
from flowrl.models.tiny import make_tiny_model
from flowrl.trainer.placement import connect_ray, place_workers, shutdown_groups
from tests.integration.located import LocatedCritic

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"machine_a": 1}})
    c.add_node(num_cpus=1, resources={"machine_b": 1})
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def step_batch(rows: int = 4, prompt: int = 3, response: int = 5) -> Batch:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(rows, response)  # [B, R]
    mask[1, 3:] = 0
    return Batch(
        {
            Keys.PROMPT_IDS: torch.randint(4, 200, (rows, prompt), generator=g),
            Keys.PROMPT_MASK: torch.ones(rows, prompt, dtype=torch.long),
            Keys.RESPONSE_IDS: torch.randint(4, 200, (rows, response), generator=g),
            Keys.RESPONSE_MASK: mask,
            Keys.RETURNS: torch.randn(rows, response, generator=g),  # [B, R]
        }
    )


def test_workers_span_both_nodes_and_step(cluster, tmp_path):
    make_tiny_model(tmp_path / "model", seed=0)
    cfg = load_config(
        None,
        [
            f"actor.model.path={tmp_path / 'model'}",
            f"critic.model.path={tmp_path / 'model'}",
            "critic.enable=true",
            "critic.micro_batch_size=2",
            "algorithm.advantage.estimator=gae",
            "data.train_files=[unused.jsonl]",
            "actor.mini_batch_size=4",
            "actor.micro_batch_size=2",
            "trainer.num_workers=2",
            f"placement.ray_address={cluster.address}",
            "placement.nnodes=2",
            f"trainer.run_dir={tmp_path / 'run'}",  # the workers' log files go to its logs/
        ],
    )
    resources = connect_ray(cfg)
    assert resources["machine_a"] == 1 and resources["machine_b"] == 1 and resources["CPU"] == 2
    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
    groups = place_workers(cfg, {"critic": LocatedCritic})
    critic = groups["critic"]
    try:
        where = critic.execute_all("node_id")
        assert where == critic.pool.node_ids  # each rank on the node its bundle was pinned to
        assert "machine_a" in nodes[where[0]] and "machine_b" in nodes[where[1]]  # rank 0: the driver's node
        critic.init_model(OmegaConf.to_container(cfg, resolve=True))
        batch = step_batch()
        batch[Keys.VALUES] = critic.compute_values(batch)[Keys.VALUES]  # [B, R], 2 rows from each node
        history = critic.update(batch)
        norms = [h[0]["critic/grad_norm"] for h in history]
        assert len(norms) == 2 and norms[0] > 0 and norms[0] == pytest.approx(norms[1], rel=1e-6)
        after = critic.compute_values(batch)[Keys.VALUES]
        assert after.shape == (4, 5) and not torch.allclose(after, batch[Keys.VALUES])
    finally:
        shutdown_groups(groups)

