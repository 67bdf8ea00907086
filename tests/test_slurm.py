"""The project's SLURM scripts on a real one-node SLURM cluster started here (slurm/local_cluster.sh).

Needs root and apt (Debian/Ubuntu): installs slurm-wlm and munge if missing, starts munged, slurmctld
and slurmd on localhost (or finds them running), then submits slurm/fed_ddp.sbatch and
slurm/sweep.sbatch with ``sbatch --wait`` the way a user does. The jobs run the project's interpreter
through FED_DDP_PYTHON.

Elsewhere it skips, saying why; with FED_DDP_REQUIRE_SLURM=1 (what .ci/run sets) it fails instead,
so CI cannot pass without having run it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

TINY = str(ROOT / "configs" / "tiny_test.yaml")
# the tiny job runs a strategy and a callback from files outside the package: user code on every rank under SLURM
PLUGIN = [f"run.plugins=[{ROOT / 'examples' / 'fedema.py'}]", "fed.strategy=fedema", "fed.strategy_args.beta=0.5",
          f"run.callbacks=[{ROOT / 'examples' / 'probes.py'}:DeltaNorm]"]


def _why_not() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root: slurm/local_cluster.sh installs slurm-wlm/munge and starts their daemons"
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        return "needs apt-get/dpkg (Debian or Ubuntu) to install slurm-wlm and munge"
    return None


REQUIRED = os.environ.get("FED_DDP_REQUIRE_SLURM", "0") not in ("", "0")
JOB_NAMES = ("fedtest", "fedbad", "fedsweep")  # the test's jobs; stale ones of an interrupted run are cancelled


def _skip(why: str):
    if REQUIRED:
        pytest.fail(f"FED_DDP_REQUIRE_SLURM is set but the SLURM test cannot run here: {why}")
    print(f"test_slurm: skipped: {why}", file=sys.stderr)
    pytest.skip(why)


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    if _why_not():
        _skip(_why_not())
    p = subprocess.run(["bash", str(ROOT / "slurm" / "local_cluster.sh")], check=False, capture_output=True,
                       text=True, timeout=900)
    if p.returncode == 77:
        _skip(p.stderr.strip())
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    print(p.stderr.strip(), file=sys.stderr)
    _scancel()
    return p.stderr


def _scancel() -> None:
    subprocess.run(["scancel", "--name", ",".join(JOB_NAMES)], check=False, capture_output=True, timeout=60)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "FED_DDP_PYTHON": sys.executable}


@pytest.fixture(scope="module")
def jobs(cluster, tiny_base, tmp_path_factory):
    """Three submissions at once, each ``sbatch --wait --parsable`` as a user types it: the tiny config,
    a bad config, and a two-point sweep array over the uplink codec (needs the comm.uplink key).
    Returns {name: (exit code, job id, folder)}."""
    out = tmp_path_factory.mktemp("slurm")
    sweep = out / "sweep.yaml"
    sweep.write_text(f"""name: t
method: grid
program: fed_ddp/sweep.py
command: ["${{env}}", python, -m, fed_ddp.sweep, run, {TINY}, tracking.wandb.group=tsweep, "${{args_no_hyphens}}"]
parameters:
  comm.uplink: {{values: [[], [topk, int8]]}}
""")
    common = [f"model.pretrained={tiny_base}", "eval.images_per_prompt=2", "eval.inference_steps=2",
              "eval.sample_seeds=[0]"]
    for name in ("tiny", "bad", "sweep"):
        (out / name).mkdir()
    submit = {  # name: sbatch options, script, script arguments
        "tiny": (["--job-name=fedtest", f"--output={out}/tiny/%x-%j.out"], "slurm/fed_ddp.sbatch",
                 [TINY, *common, f"run.output_dir={out}/tiny", *PLUGIN]),
        "bad": (["--job-name=fedbad", f"--output={out}/bad/%x-%j.out"], "slurm/fed_ddp.sbatch",
                [TINY, "fed.strategy=fedmagic"]),
        "sweep": (["--array=0-1", "--job-name=fedsweep", f"--output={out}/sweep/%x-%A_%a.out"], "slurm/sweep.sbatch",
                  [str(sweep), *common, "fed.num_clients=1", "fed.rounds=1", "fed.local_steps=1", "lora.rank=2",
                   "comm.min_numel=0", f"run.output_dir={out}/sweep"]),
    }
    procs = {name: subprocess.Popen(["sbatch", "--wait", "--parsable", *opts, script, *args], cwd=ROOT, env=_env(),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (opts, script, args) in submit.items()}
    results = {}
    try:
        for name, p in procs.items():
            stdout, stderr = p.communicate(timeout=600)
            job = stdout.strip().split(";")[0]
            assert job.isdigit(), f"{name}: {stdout} {stderr}"
            results[name] = (p.returncode, job, out / name)
            print(f"SLURM {name}: job {job}, exit {p.returncode}, run time {_job_time(job)}", file=sys.stderr)
    finally:
        if any(p.poll() is None for p in procs.values()):  # timed out: take the jobs down with the waiters
            _scancel()
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
    return results


def _job_time(job: str) -> str:
    info = subprocess.run(["scontrol", "show", "job", job], check=False, capture_output=True, text=True).stdout
    times = re.findall(r"RunTime=(\S+)", info)
    return ",".join(times) if times else "?"


def test_sbatch_runs_the_tiny_config(jobs):
    code, job, out = jobs["tiny"]
    log = (out / f"fedtest-{job}.out").read_text()
    assert code == 0, log[-4000:]
    run_dir = out / f"fedtest-{job}"  # run.name = <job name>-<job id>
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/final/server_state.safetensors",
                 "checkpoints/final/pytorch_lora_weights.safetensors"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["run"] == f"fedtest-{job}" and summary["rounds"] == 2 and summary["num_clients"] == 2
    assert f"python {sys.executable}" in log  # the job used the project's interpreter
    assert "ranks per node 3" in log
    assert set(re.findall(r"\[(server r0|worker0 r1|worker1 r2)\]", log)) == {"server r0", "worker0 r1", "worker1 r2"}
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (cfg["fed"]["strategy"], cfg["fed"]["strategy_args"]) == ("fedema", {"beta": 0.5})
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r.get("step_norm", 0) > 0] == [1, 2]  # the plug-in callback, every round


def test_sbatch_bad_config_fails_with_one_line(jobs):
    code, job, out = jobs["bad"]
    log = (out / f"fedbad-{job}.out").read_text()
    assert code == 2, log
    # the built-in names, from a fresh interpreter (a plug-in another test imported may be registered in this one)
    names = subprocess.run([sys.executable, "-c", "from fed_ddp.strategies import REGISTRY; print(sorted(REGISTRY))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert log.strip().splitlines() == [f"fed-ddp: config error: fed.strategy='fedmagic': must be one of {names}"]


def test_sweep_array_runs_every_grid_point(jobs):
    code, job, out = jobs["sweep"]
    logs = {i: (out / f"fedsweep-{job}_{i}.out").read_text() for i in (0, 1)}
    assert code == 0, {i: log[-3000:] for i, log in logs.items()}
    sent = {}
    for i, (codec, chain) in enumerate((("fp32", []), ("topk+int8", ["topk", "int8"]))):
        run_dir = out / f"tsweep-uplink{codec}-{job}"  # <group>-<swept values>-<array job id>
        assert (run_dir / "summary.json").is_file(), logs[i][-3000:]
        assert f"point {i}:" in logs[i]
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())  # the list arrived whole through sbatch/srun
        assert cfg["comm"]["uplink"] == chain and cfg["tracking"]["wandb"]["group"] == "tsweep"
        assert cfg["fed"]["num_clients"] == 1 and cfg["lora"]["rank"] == 2
        sent[codec] = json.loads((run_dir / "summary.json").read_text())["bytes_up_total"]
    assert sent["topk+int8"] < sent["fp32"] / 4, sent
