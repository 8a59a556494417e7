"""Where each rank's work goes, decided by pure functions so that the CUDA path is
checked on machines without a GPU: the device of a rank, the process-group backend,
where the synchronisation tensors live, DDP's device arguments, the NCCL environment
the launchers set, the straggler report and the torchrun command of a node."""

import pytest

from lnsp.train import distributed as d
from lnsp.config import ConfigError, TrainConfig
from lnsp.launch.ddp import torchrun_argv


@pytest.mark.parametrize("requested,local_rank,gpus,device", [
    ("cuda", 0, 2, "cuda:0"), ("cuda", 1, 2, "cuda:1"), ("auto", 1, 4, "cuda:1"),
    ("auto", 0, 0, "cpu"), ("cpu", 1, 8, "cpu"), ("mps", 0, 0, "mps")])
def test_each_rank_takes_the_gpu_of_its_local_rank(requested, local_rank, gpus, device):
    assert d.device_for(requested, local_rank, gpus) == device


def test_more_ranks_than_gpus_is_a_clear_error():
    with pytest.raises(ConfigError, match="local rank 2 has no GPU: this node has 2"):
        d.device_for("cuda", 2, 2)
    with pytest.raises(ConfigError):
        d.device_for("cuda", 0, 0)


def test_nccl_for_gpus_gloo_for_cpus_and_sync_tensors_where_the_backend_reduces():
    assert d.backend_for("cuda:1") == "nccl" and d.backend_for("cpu") == "gloo"
    assert d.backend_for("mps") == "gloo"
    assert d.sync_device("nccl", "cuda:1") == "cuda:1"
    assert d.sync_device("gloo", "cpu") == "cpu"
    assert d.sync_device("gloo", "mps") == "cpu"


def test_ddp_gets_the_rank_device_on_cuda_and_nothing_on_cpu():
    assert d.ddp_arguments("cuda:3") == {"device_ids": [3], "output_device": 3}
    assert d.ddp_arguments("cuda") == {"device_ids": [0], "output_device": 0}
    assert d.ddp_arguments("cpu") == {}


def test_sync_runs_on_the_dist_device_on_cpu():
    # world 1: no collective, the values pass through; the device field is honoured
    assert d.Dist(0, 1, device="cpu").sync(1.5, True) == (1.5, True)


def test_launchers_set_the_nccl_error_handling_and_flight_recorder(tmp_path):
    env = d.nccl_environment(tmp_path / "dumps")
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert int(env["TORCH_FR_BUFFER_SIZE"]) > 0
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert env["TORCH_FR_DUMP_TEMP_FILE"].startswith(str(tmp_path / "dumps") + "/")


def test_a_rank_with_much_more_work_per_step_is_a_straggler():
    beats = {0: {"work_ms": 10.0, "host": "a"}, 1: {"work_ms": 11.0, "host": "b"},
             2: {"work_ms": 55.0, "host": "c"}}
    beats[2]["work_ms"] = 66.0
    found = d.stragglers(beats)
    assert list(found) == [2] and found[2].startswith("rank 2 on c is a straggler")
    assert "6.0x" in found[2]
    assert d.stragglers({0: {"work_ms": 10.0}, 1: {"work_ms": 40.0}}) == {}  # 4x: noise
    assert d.stragglers({0: {"work_ms": 10.0}}) == {}  # nobody to compare with
    assert d.stragglers({0: {}, 1: {"work_ms": 9.0}}) == {}


def test_a_node_joins_a_c10d_rendezvous_named_after_the_run():
    config = TrainConfig(data="/d", run_dir="/runs/two nodes", max_restarts=1)
    argv = torchrun_argv(config, 1, 2, 1, rendezvous="lnsp-x-node0:29400",
                         python="/opt/lnsp/bin/python")
    assert argv[:3] == ["/opt/lnsp/bin/python", "-m", "torch.distributed.run"]
    assert "--nnodes=2" in argv and "--node-rank=1" in argv
    assert "--rdzv-backend=c10d" in argv and "--rdzv-endpoint=lnsp-x-node0:29400" in argv
    assert "--rdzv-id=two-nodes" in argv and "--max-restarts=1" in argv
    assert not any(a.startswith("--master-addr") for a in argv)


def test_a_job_of_no_nodes_is_refused_in_one_line(small_data, tmp_path):
    from conftest import lnsp

    r = lnsp("launch", "ddp-docker", "--nodes", "0", "--data", small_data, "--run-dir",
             tmp_path / "none", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "Error: --nodes 0 --nproc-per-node 1: both must be >= 1"]
    assert not (tmp_path / "none").exists()
