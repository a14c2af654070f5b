"""Placement and exact command lines of the example jobs under a fake Slurm environment (2, 4
and 6 nodes, and the 7B one-node split), without starting anything."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_trapo.config import ConfigError, LaunchConfig, TrainConfig, load_config
from megatron_trapo.launch.hosts import expand_nodelist, scontrol_hostnames
from megatron_trapo.launch.job import build_job
from megatron_trapo.launch.placement import place

ROOT = Path(__file__).resolve().parents[2]
CFG_32B = str(ROOT / "examples/configs/trapo_qwen2.5_32b.yaml")
CFG_7B = str(ROOT / "examples/configs/trapo_qwen2.5_math_7b.yaml")
PY = sys.executable


def slurm_env(nodelist, nnodes, job_id="4242"):
    # what sbatch gives the batch step; SLURM_NODEID/SLURM_STEP_NODELIST belong to the batch
    # step (node 0 only) and must not decide the trainer's rendezvous
    return {"SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodelist,
            "SLURM_JOB_NUM_NODES": str(nnodes), "SLURM_NNODES": str(nnodes),
            "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": nodelist.split(",")[0]}


def job(cfg_path, env, *overrides, log_dir):
    cfg = load_config(TrainConfig, cfg_path, [*overrides, f"log_dir={log_dir}"])
    return build_job(cfg, cfg_path, [*overrides, f"log_dir={log_dir}"], env=env)


def test_six_nodes_32b_four_trainer_two_rollout_nodes(tmp_path):
    j = job(CFG_32B, slurm_env("gpu[01-06]", 6), log_dir=tmp_path / "runs")
    p = j.placement
    assert p.mode == "disaggregated"
    assert p.trainer.hosts == ("gpu01", "gpu02", "gpu03", "gpu04")
    assert p.trainer.gpus == tuple(range(8)) and p.trainer.world_size == 32  # TP8 PP2 DP2
    assert [(s.host, s.gpus, s.port) for s in p.servers] == [
        ("gpu05", tuple(range(8)), 30000), ("gpu06", tuple(range(8)), 30000)]
    plan = str(tmp_path / "runs" / "launch" / "plan.json")
    agent = j.commands["agents"]["gpu05"]
    assert agent.argv == [
        "srun", "--nodes=1", "--ntasks-per-node=1", "--nodelist=gpu05", "--overlap",
        "--kill-on-bad-exit=1", "--job-name=trapo-servers-gpu05", "--export=ALL",
        "--gres=gpu:8", PY, "-m", "megatron_trapo.launch.node_agent", "--plan", plan,
        "--host", "gpu05"]
    server = j.commands["servers"]["server1"]
    assert server.env == {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7",
                          "SGLANG_RETURN_ORIGINAL_LOGPROB": "1"}
    assert server.argv == [
        PY, "-m", "sglang.launch_server", "--model-path", "models/Qwen2.5-32B", "--host",
        "0.0.0.0", "--port", "30000", "--skip-server-warmup", "--tp-size", "8",
        "--mem-fraction-static", "0.85"]
    train = j.commands["trainer"].argv
    assert train[:9] == ["srun", "--nodes=4", "--ntasks-per-node=1",
                         "--nodelist=gpu01,gpu02,gpu03,gpu04", "--overlap", "--kill-on-bad-exit=1",
                         "--job-name=trapo-train", "--export=ALL", "--gres=gpu:8"]
    assert train[9:13] == ["env", "CUDA_DEVICE_MAX_CONNECTIONS=1",
                           "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", "NCCL_NVLS_ENABLE=0"]
    assert train[13:] == [
        PY, "-m", "torch.distributed.run", "--nnodes", "4", "--nproc-per-node", "8",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu01:29500", "--rdzv-id", "4242",
        "-m", "megatron_trapo.cli", "train", "--config", CFG_32B,
        f"log_dir={tmp_path / 'runs'}", "rollout.engine=sglang",
        'rollout.server_urls=["http://gpu05:30000", "http://gpu06:30000"]',
        "rollout.use_router=true"]


def test_four_nodes_32b_two_trainer_nodes(tmp_path):
    j = job(CFG_32B, slurm_env("gpu[11-12],gpu[20-21]", 4), "launch.trainer_nodes=2",
            log_dir=tmp_path)
    p = j.placement
    assert p.trainer.hosts == ("gpu11", "gpu12") and p.trainer.world_size == 16  # DP1
    assert [s.host for s in p.servers] == ["gpu20", "gpu21"]
    assert "--rdzv-endpoint" in j.commands["trainer"].argv
    assert j.commands["trainer"].argv[j.commands["trainer"].argv.index("--rdzv-endpoint") + 1] \
        == "gpu11:29500"  # the first trainer host, not the job's first node by accident


def test_two_nodes_7b_one_trainer_node_eight_single_gpu_servers(tmp_path):
    j = job(CFG_7B, slurm_env("a[1-2]", 2), "launch.trainer_gpus_per_node=8",
            log_dir=tmp_path)
    p = j.placement
    assert p.trainer.hosts == ("a1",) and p.trainer.world_size == 8  # TP4 DP2
    assert [(s.host, s.gpus, s.port) for s in p.servers] == [
        ("a2", (g,), 30000 + g) for g in range(8)]
    assert j.commands["servers"]["server3"].env["CUDA_VISIBLE_DEVICES"] == "3"
    assert "--context-length" in j.commands["servers"]["server0"].argv  # the 16k base


def test_two_nodes_32b_is_refused_with_the_field_to_change(tmp_path):
    with pytest.raises(ConfigError, match="launch.trainer_nodes=4 leaves none of the 2 nodes"):
        job(CFG_32B, slurm_env("gpu[01-02]", 2), log_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"world size 8 is not divisible .* = 16"):
        job(CFG_32B, slurm_env("gpu[01-02]", 2), "launch.trainer_nodes=1", log_dir=tmp_path)


def test_one_node_7b_split_four_plus_four(tmp_path):
    j = job(CFG_7B, slurm_env("gpu07", 1), log_dir=tmp_path)
    p = j.placement
    assert p.mode == "split-node" and p.trainer.gpus == (0, 1, 2, 3)
    assert [(s.gpus, s.port) for s in p.servers] == [((4,), 30000), ((5,), 30001),
                                                      ((6,), 30002), ((7,), 30003)]
    train = j.commands["trainer"].argv
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3" in train  # set inside the step, after Slurm's own
    assert train[train.index("--nproc-per-node") + 1] == "4"


def test_one_node_without_a_split_is_refused():
    with pytest.raises(ConfigError, match="launch.trainer_gpus_per_node below"):
        place(["n1"], LaunchConfig())
    with pytest.raises(ConfigError, match="is not a multiple of launch.server_tp_size=2"):
        place(["n1"], LaunchConfig(trainer_gpus_per_node=5, server_tp_size=2))
    with pytest.raises(ConfigError, match="launch.colocate=true is not available"):
        LaunchConfig(colocate=True)


def test_container_option_wraps_every_step(tmp_path):
    j = job(CFG_7B, slurm_env("gpu07", 1), "launch.container_image=nvcr.io#trapo:latest",
            "launch.container_mounts=/lustre:/lustre", log_dir=tmp_path)
    for cmd in [*j.commands["agents"].values(), j.commands["trainer"]]:
        assert "--container-image=nvcr.io#trapo:latest" in cmd.argv
        assert "--container-mounts=/lustre:/lustre" in cmd.argv
        assert "python" in cmd.argv  # the container's interpreter, not this machine's path


def dry_run(script, nodelist, nnodes, tmp_path, *overrides, job_id="99"):
    env = dict(os.environ, PYTHON=PY, **slurm_env(nodelist, nnodes, job_id))
    proc = subprocess.run(["bash", str(ROOT / "examples" / script), "--dry-run",
                           f"log_dir={tmp_path}", *overrides], env=env, capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "launch" / "plan.json").exists()  # nothing written, nothing started
    return proc.stdout.splitlines()


def test_dry_run_of_the_32b_script_prints_every_command_and_the_plan(tmp_path):
    out = dry_run("run_trapo_32b.sh", "gpu[01-06]", 6, tmp_path)
    assert out[0] == ("placement: disaggregated; trainer 4 node(s) × 8 GPU(s) = world 32 "
                      "(tp=8 pp=2 cp=1); 2 server(s) of TP 8")
    agents = [line for line in out if line.startswith("  [servers on ")]
    assert [a.split("]")[0] for a in agents] == ["  [servers on gpu05", "  [servers on gpu06"]
    trainer = next(line for line in out if line.startswith("  [trainer] "))
    assert "--nodelist=gpu01,gpu02,gpu03,gpu04" in trainer and "--rdzv-id 99" in trainer
    assert "servers: 2 × TP 8 on gpu05, gpu06" in "\n".join(out)
    assert "per-GPU memory on h100-80gb" in "\n".join(out) and out[-1] == "fits with headroom"


def test_dry_run_of_the_32b_script_on_four_nodes(tmp_path):
    out = dry_run("run_trapo_32b.sh", "n[1-4]", 4, tmp_path, "launch.trainer_nodes=2")
    assert out[0].startswith("placement: disaggregated; trainer 2 node(s) × 8 GPU(s) = world 16")
    assert "  server0: n3 GPUs 0,1,2,3,4,5,6,7 → http://n3:30000" in out
    assert "  server1: n4 GPUs 0,1,2,3,4,5,6,7 → http://n4:30000" in out


def test_dry_run_of_the_7b_script_one_node_and_two(tmp_path):
    out = dry_run("run_trapo_qwen2.5_math_7b.sh", "gpu07", 1, tmp_path)
    assert out[0] == ("placement: split-node; trainer 1 node(s) × 4 GPU(s) = world 4 "
                      "(tp=4 pp=1 cp=1); 4 server(s) of TP 1")
    assert [line for line in out if line.startswith("  server")] == [
        f"  server{i}: gpu07 GPUs {4 + i} → http://gpu07:{30000 + i}" for i in range(4)]
    servers = [line for line in out if line.startswith("    [server")]
    assert servers[2].startswith("    [server2] CUDA_VISIBLE_DEVICES=6 "
                                 "SGLANG_RETURN_ORIGINAL_LOGPROB=1 ")
    assert servers[2].endswith(" -m sglang.launch_server --model-path models/Qwen2.5-Math-7B-16k "
                               "--host 0.0.0.0 --port 30002 --skip-server-warmup --tp-size 1 "
                               "--mem-fraction-static 0.85 --context-length 16384")
    out = dry_run("run_trapo_qwen2.5_math_7b.sh", "gpu[07-08]", 2, tmp_path,
                  "launch.trainer_gpus_per_node=8")
    assert out[0].startswith("placement: disaggregated; trainer 1 node(s) × 8 GPU(s) = world 8")
    assert sum(line.startswith("    [server") for line in out) == 8


@pytest.mark.parametrize("spec, hosts", [
    ("gpu[01-03,07],login5", ["gpu01", "gpu02", "gpu03", "gpu07", "login5"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("single", ["single"]),
])
def test_nodelist_expansion(spec, hosts):
    assert expand_nodelist(spec) == hosts
    slurm = scontrol_hostnames(spec)
    if slurm is not None:  # where Slurm's own expansion runs, both agree
        assert slurm == hosts


def test_bad_nodelist_is_a_clear_error():
    with pytest.raises(ConfigError, match="unbalanced"):
        expand_nodelist("gpu[01-03")
    with pytest.raises(ConfigError, match="bad range"):
        expand_nodelist("gpu[05-01]")
