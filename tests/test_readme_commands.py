"""Every shell command in the code blocks of README.md and docs/*.md, checked, so neither can drift from the code.

Commands come from the fenced blocks of README.md and every docs/*.md (```bash / ```sh / ```console: every line; untagged blocks:
the lines that start with a known executable or an existing file, so output samples are not commands),
with ``\\`` continuations joined, ``$ `` / ``host0$ `` prompts and ``# comments`` dropped and ``&&`` chains
split. Each one must have an entry in CHECKS (the command as written, whitespace collapsed; or a pattern
for commands still to come) that says how it is checked, so a new README command fails here until someone
classifies it:

- EXEC: fast and offline, run exactly as written by bash in a fresh copy of the checkout (HF_HUB_OFFLINE=1,
  the venv first on PATH); exit 0, and stdout equal to the line's ``# comment`` where CHECKS asks. A plain
  ``fed-ddp plan`` / ``fed-ddp new`` line (no environment words, pipes or redirections) runs through the real
  ``fed_ddp.cli.main`` in this process, in that copy, with the same environment: its words and exit status are
  what the console script would get, without a fresh interpreter importing diffusers (~5 s a line).
- EXEC_ON_RUNS: the same, in a copy holding tiny finished runs (made in process) under the names the line
  reads (``runs/quickstart``, ``runs/wireless``, ``runs/scaling-*``).
- LAUNCH: ``fed-ddp run`` / ``compare`` through the real ``fed_ddp.cli.main`` in this process, every check
  before the launch included (config and overrides, ranks, data split, privacy calibration, run
  directory), with only the launcher (or compare's training) and the tiny base's pretraining replaced by
  recorders: the launch must be the README's words on 1 + W ranks.
- NEEDS_MODEL: LAUNCH where ``model.pretrained`` names a directory that is not on this machine: the line is
  checked with a hub id in its place, then skipped, naming the directory.
- GENERATE, TORCHRUN, SBATCH, MULTI_NODE, MAKE, SCRIPT: long or cluster-only; their real parser, files,
  config and overrides are checked (see each function).
- NETWORK: pip and W&B; the executable and the files they name are checked, then skipped, naming why.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

BIN = Path(sys.executable).parent
SHELL_TAGS = {"bash", "sh", "shell", "console"}
KNOWN = {"fed-ddp", "python", "python3", "torchrun", "make", "pip", "sbatch", "srun", "wandb", "bash", "deepspeed",
         "accelerate", "huggingface-cli", "git", "cd", "export"}  # first words that make a line a command
PROMPT = re.compile(r"^[\w.@-]*\$\s+")  # "$ " or "host0$ "
ENV_WORD = re.compile(r"^[A-Za-z_]\w*=")


@dataclass(frozen=True)
class Command:
    line: int  # README line the command starts on
    text: str  # as written (prompt and comment dropped), whitespace collapsed: the CHECKS key
    shell: str  # what bash runs
    comment: str  # the line's trailing "# ..." text
    file: str = "README.md"  # README.md or docs/NAME.md

    @property
    def words(self) -> list[str]:
        return shlex.split(self.shell)

    @property
    def env(self) -> dict[str, str]:
        env = {}
        for w in self.words:
            if not ENV_WORD.match(w):
                break
            k, v = w.split("=", 1)
            env[k] = v
        return env

    @property
    def argv(self) -> list[str]:
        return self.words[len(self.env):]


def _first_word(line: str) -> str:
    words = shlex.split(line, comments=True) if line.strip() else []
    words = [w for w in words if not ENV_WORD.match(w)][:1]
    return words[0] if words else ""


def _is_command(line: str) -> bool:
    try:
        first = _first_word(PROMPT.sub("", line))
    except ValueError:  # unbalanced quotes: prose, not a command
        return False
    return first in KNOWN or ("/" in first and (ROOT / first.replace("$PWD/", "")).is_file())


def _split(line: str) -> list[tuple[str, str]]:
    """One README command line -> [(command, comment)], split at && (comments dropped, quotes kept)."""
    lex = shlex.shlex(line, posix=False, punctuation_chars="&;|")
    lex.whitespace_split, lex.commenters = True, ""
    out, cur = [], []
    for tok in lex:
        if tok.startswith("#"):
            break
        if tok == "&&":
            out.append(cur)
            cur = []
        elif tok in (";", "|", "||", "&") or set(tok) <= set("&;|"):
            raise ValueError(f"{line!r}: shell operator {tok!r} is not supported here; split the line or extend _split")
        else:
            cur.append(tok)
    out.append(cur)
    m = re.search(r"(?:^|\s)#\s*(.*)$", line)
    return [(" ".join(words), m.group(1).strip() if m else "") for words in out if words]


def extract(markdown: str, file: str = "README.md") -> list[Command]:
    """The shell commands of a markdown text's fenced code blocks."""
    cmds, lang, pending, start = [], None, "", 0
    for no, raw in enumerate(markdown.splitlines(), 1):
        fence = re.match(r"^\s*```\s*(\S*)", raw)
        if fence:
            lang = None if lang is not None else fence.group(1).lower()
            continue
        if lang is None or (lang and lang not in SHELL_TAGS):
            continue
        line = pending + raw.strip() if pending else raw.strip()
        start = start if pending else no
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = PROMPT.sub("", line)
        if not line or line.startswith("#") or (not lang and not _is_command(line)):
            continue
        cmds += [Command(start, text, text, comment, file) for text, comment in _split(line)]
    return cmds


DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
COMMANDS = [c for f in DOCS for c in extract((ROOT / f).read_text(), f)]


# ---- how each README command is checked ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    kind: str
    note: str = ""  # NETWORK / NEEDS_MODEL: why it cannot run here
    stdout: bool = False  # EXEC: stdout must equal the command's "# comment"


EXEC, EXEC_ON_RUNS, LAUNCH, GENERATE, TORCHRUN, SBATCH, MULTI_NODE, MAKE, SCRIPT = (
    Check(k) for k in ("exec", "exec_on_runs", "launch", "generate", "torchrun", "sbatch", "multi_node", "make",
                       "script"))


def network(why: str) -> Check:
    return Check("network", why)


def needs_model(why: str) -> Check:
    return Check("needs_model", why)


CHECKS: dict[str | re.Pattern, Check] = {
    # two commands
    "make demo": MAKE,
    "make test": MAKE,
    "pip install torch": network("downloads torch from PyPI"),
    'pip install -e ".[test]"': network("downloads the dependencies from PyPI"),
    "fed-ddp run configs/quickstart.yaml": LAUNCH,
    # quickstart
    "fed-ddp run configs/quickstart.yaml fed.rounds=3 lora.rank=4 run.name=try2": LAUNCH,
    "torchrun --standalone --nproc-per-node 5 -m fed_ddp.train configs/quickstart.yaml": TORCHRUN,
    'fed-ddp generate runs/quickstart/checkpoints/final --prompt "a handwritten digit seven" --out seven.png':
        EXEC_ON_RUNS,
    "fed-ddp compare configs/quickstart.yaml": LAUNCH,
    "fed-ddp compare configs/quickstart.yaml --strategies fedavg,scaffold,flexlora": LAUNCH,
    # strategies, ranks, personalization
    "fed-ddp run configs/quickstart.yaml fed.strategy=flexlora": LAUNCH,
    "fed-ddp run configs/quickstart.yaml run.plugins=[examples/fedema.py] fed.strategy=fedema fed.strategy_args.beta=0.5":
        LAUNCH,
    "fed-ddp run configs/quickstart.yaml run.callbacks=[examples/probes.py:DeltaNorm]": LAUNCH,
    'fed-ddp run configs/quickstart.yaml train.objective=prior "train.prior_prompts=[a handwritten digit zero,a '
    'handwritten digit three]"': LAUNCH,
    "fed-ddp run configs/quickstart.yaml run.plugins=[examples/annealed_offset.py] fed.strategy=annealed_offset "
    "train.objective=annealed_offset": LAUNCH,
    "fed-ddp plan configs/quickstart.yaml run.plugins=[examples/sign_codec.py] comm.uplink=[sign] comm.min_numel=0":
        EXEC,
    "fed-ddp run configs/quickstart.yaml run.plugins=[examples/sign_codec.py] comm.uplink=[sign] comm.min_numel=0":
        LAUNCH,
    "fed-ddp new strategy my_lab/fedlion.py": EXEC,  # writes into the test's checkout of the repository
    "fed-ddp run configs/population.yaml lora.client_ranks=[2,4,8]": LAUNCH,
    "fed-ddp run configs/quickstart.yaml personal.mode=split": LAUNCH,
    'fed-ddp generate runs/quickstart/checkpoints/final --client 2 --prompt "a handwritten digit nine"': GENERATE,
    "fed-ddp compare configs/quickstart.yaml --strategies fedavg,scaffold,flexlora,fedyogi:server_lr=0.01": LAUNCH,
    "fed-ddp compare configs/quickstart.yaml eval.every=8 --strategies fedavg,scaffold,fedavgm:server_momentum=0.5,"
    "flexlora,ffa_lora,fedprox,fedadam:server_lr=0.01,fedadagrad:server_lr=0.01,fedyogi:server_lr=0.01": LAUNCH,
    "fed-ddp run configs/quickstart.yaml lora.client_ranks=[2,4,8] fed.strategy=flexlora": LAUNCH,
    "fed-ddp run configs/quickstart.yaml personal.mode=finetune": LAUNCH,
    # populations
    "fed-ddp run configs/population.yaml": LAUNCH,
    "fed-ddp run configs/quickstart.yaml fed.num_clients=200 fed.clients_per_round=20 fed.workers=4": LAUNCH,
    "fed-ddp run configs/population.yaml fed.sampling=uniform fed.sample_rate=null fed.clients_per_round=10": LAUNCH,
    "fed-ddp plan configs/population.yaml fed.num_clients=100000": EXEC,
    # privacy
    "fed-ddp run configs/population.yaml privacy.dp.noise_multiplier=1.0 privacy.dp.clip_norm=0.05": LAUNCH,
    "fed-ddp run configs/population.yaml privacy.dp.target_epsilon=8 privacy.dp.delta=1e-5": LAUNCH,
    "fed-ddp plan configs/population.yaml privacy.dp.target_epsilon=8": EXEC,
    "fed-ddp run configs/population.yaml privacy.secagg=true comm.uplink=[int8]": LAUNCH,
    # wireless
    "fed-ddp run configs/wireless.yaml": LAUNCH,
    "fed-ddp run configs/wireless.yaml wireless.deadline_s=20 wireless.scheduler=best_channel": LAUNCH,
    "fed-ddp run configs/wireless.yaml fed.sampling=age": LAUNCH,
    "fed-ddp run configs/wireless.yaml train.method=full train.lr=1e-3": LAUNCH,
    "fed-ddp plan configs/sd15_lora_deepspeed.yaml --wireless": EXEC,
    "fed-ddp report runs/wireless": EXEC_ON_RUNS,
    ".venv/bin/python benchmarks/paper_claims.py": SCRIPT,
    # cluster
    "FED_DDP_PYTHON=$PWD/.venv/bin/python sbatch slurm/fed_ddp.sbatch configs/quickstart.yaml fed.rounds=20": SBATCH,
    "sbatch --nodes 2 --gpus-per-node 4 slurm/fed_ddp.sbatch configs/quickstart.yaml fed.num_clients=7": SBATCH,
    "NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=host0:29400 launch/multi_node.sh configs/quickstart.yaml": MULTI_NODE,
    "NNODES=2 NODE_RANK=1 RDZV_ENDPOINT=host0:29400 launch/multi_node.sh configs/quickstart.yaml": MULTI_NODE,
    "python -m fed_ddp.sweep count configs/sweeps/scaling.yaml": Check("exec", stdout=True),
    "wandb sweep configs/sweeps/scaling.yaml": network("registers the sweep with the W&B server"),
    "wandb agent ENTITY/fed_ddp/SWEEP_ID": network("asks the W&B server for grid points"),
    "sbatch --array=0-26 slurm/sweep.sbatch configs/sweeps/scaling.yaml tracking.wandb.mode=offline": SBATCH,
    "wandb sync runs/scaling-*/wandb/offline-run-*": network("uploads the offline runs to the W&B server"),
    "fed-ddp report runs/scaling-* --out runs/scaling-report": EXEC_ON_RUNS,
    # docs/cluster.md
    "sbatch slurm/fed_ddp.sbatch configs/quickstart.yaml": SBATCH,
    "sbatch slurm/fed_ddp.sbatch configs/quickstart.yaml fed.rounds=20 lora.rank=16": SBATCH,
    "sbatch --nodes 2 --cpus-per-task 16 -p cpu slurm/fed_ddp.sbatch configs/quickstart.yaml fed.num_clients=15": SBATCH,
    "sbatch --nodes 2 --gpus-per-node 4 -p gpu slurm/fed_ddp.sbatch configs/quickstart.yaml fed.num_clients=7": SBATCH,
    "sbatch slurm/fed_ddp_multinode.sbatch configs/quickstart.yaml fed.num_clients=7": SBATCH,
    "launch/single_node.sh configs/quickstart.yaml fed.rounds=3": MULTI_NODE,
    re.compile(r"NNODES=2 NODE_RANK=[01] RDZV_ENDPOINT=host0:29400 launch/multi_node\.sh configs/quickstart\.yaml"
               r" fed\.num_clients=7"): MULTI_NODE,
    "python -m fed_ddp.sweep check configs/sweeps/scaling.yaml": EXEC,
    "sbatch --array=0-26%3 slurm/sweep.sbatch configs/sweeps/scaling.yaml": SBATCH,
    "wandb sync --dry-run runs/scaling-*/wandb/offline-run-*": network("asks the W&B server what it holds"),
    "sudo slurm/local_cluster.sh": Check("root", "root and Debian's slurm-wlm (tests/test_slurm.py runs it)"),
    "sinfo": Check("root", "a running SLURM controller (tests/test_slurm.py starts one)"),
    "FED_DDP_PYTHON=$PWD/.venv/bin/python sbatch --wait slurm/fed_ddp.sbatch configs/tiny_test.yaml": SBATCH,
    # compressed exchange
    "fed-ddp plan configs/quickstart.yaml comm.uplink=[topk,int8] comm.downlink=[fp16]": EXEC,
    'fed-ddp plan configs/quickstart.yaml --unet sd15 lora.rank=4 "lora.targets=[to_q,to_k,to_v,to_out.0]"': EXEC,
    "fed-ddp run configs/quickstart.yaml comm.uplink=[topk,int8] comm.downlink=[fp16] comm.min_numel=0": LAUNCH,
    "fed-ddp run configs/quickstart.yaml comm.uplink=[segtopk,int4] comm.topk_fraction=0.09 comm.topk_block=64 "
    "comm.min_numel=0": LAUNCH,
    # big clients
    "fed-ddp run configs/quickstart.yaml configs/deepspeed/zero2.yaml fed.ranks_per_client=2": LAUNCH,
    "fed-ddp run configs/sd15_lora_deepspeed.yaml model.pretrained=/models/stable-diffusion-v1-5":
        needs_model("SD v1.5 weights at /models/stable-diffusion-v1-5 (a GPU cluster's copy)"),
    # model families (the README section may still be on its way: these patterns may match nothing yet)
    re.compile(r"fed-ddp plan configs/((sdxl|sd3|flux)_lora_deepspeed\.yaml|quickstart\.yaml model\.family=\w+)( \S+)*"):
        EXEC,
    re.compile(r"fed-ddp run configs/quickstart\.yaml model\.family=(sd|sdxl|sd3|flux)( \S+=\S+)*"): LAUNCH,
    re.compile(r"fed-ddp run configs/(sdxl|sd3|flux)_lora_deepspeed\.yaml model\.pretrained=/\S+( \S+=\S+)*"):
        needs_model("the family's weights in a local directory (a GPU cluster's copy)"),
}


def check_of(cmd: Command) -> Check | None:
    if cmd.text in CHECKS:
        return CHECKS[cmd.text]
    return next((c for k, c in CHECKS.items() if isinstance(k, re.Pattern) and k.fullmatch(cmd.text)), None)


def _id(cmd: Command) -> str:
    return f"{'' if cmd.file == 'README.md' else cmd.file + ':'}L{cmd.line}:{cmd.text[:70]}"


# ---- the extractor --------------------------------------------------------------------------------------------------

def test_extract_reads_continuations_prompts_env_chains_and_skips_output():
    md = """```bash
# a comment line
fed-ddp plan a.yaml \\
    fed.rounds=2   # two rounds
host0$ NNODES=2 launch/multi_node.sh b.yaml
wandb sweep s.yaml && wandb agent E/P/ID   # both
```
```
Generation accuracy: 0.8 %
fed-ddp run c.yaml lora.rank=4
runs/quickstart/
```
```python
pipe = load()
```
fed-ddp run not-in-a-block.yaml"""
    got = [(c.line, c.text, c.comment) for c in extract(md)]
    assert got == [(3, "fed-ddp plan a.yaml fed.rounds=2", "two rounds"),
                   (5, "NNODES=2 launch/multi_node.sh b.yaml", ""),
                   (6, "wandb sweep s.yaml", "both"), (6, "wandb agent E/P/ID", "both"),
                   (10, "fed-ddp run c.yaml lora.rank=4", "")]
    env_cmd = extract(md)[1]
    assert env_cmd.env == {"NNODES": "2"} and env_cmd.argv == ["launch/multi_node.sh", "b.yaml"]
    with pytest.raises(ValueError, match="shell operator"):
        extract("```bash\nfed-ddp plan a.yaml | tee x\n```")


def test_readme_has_commands_and_every_one_is_classified():
    assert len(COMMANDS) >= 40, [c.text for c in COMMANDS]
    missing = [c for c in COMMANDS if check_of(c) is None]
    assert not missing, ("README commands with no entry in CHECKS (add them, with how to check them):\n"
                         + "\n".join(f"    {c.text!r}: ...,  # {c.file} line {c.line}" for c in missing))


def test_no_stale_entries():
    texts = {c.text for c in COMMANDS}
    stale = [k for k in CHECKS if isinstance(k, str) and k not in texts]
    assert not stale, f"CHECKS entries no README command matches any more (remove or update them): {stale}"


# ---- the checks -----------------------------------------------------------------------------------------------------

def _checkout(where: Path) -> Path:
    """A fresh copy of the repository root: links to its files, no runs/ or logs/."""
    where.mkdir(parents=True, exist_ok=True)
    for entry in ROOT.iterdir():
        if entry.name not in ("runs", "logs", ".git", "__pycache__", ".pytest_cache"):
            (where / entry.name).symlink_to(entry)
    return where


def _env(cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "MPLBACKEND": "Agg", "PWD": str(cwd),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}


IN_PROCESS = {"plan", "new"}  # fed-ddp subcommands that start no process and read no stdin


def _in_process(cmd: Command, cwd: Path, monkeypatch) -> subprocess.CompletedProcess:
    import contextlib
    import io

    from fed_ddp.cli import main

    for k, v in _env(cwd).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(cmd.argv[1:])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(cmd.argv, code, out.getvalue(), err.getvalue())


def _exec(cmd: Command, check: Check, cwd: Path, timeout: int = 120, monkeypatch=None) -> subprocess.CompletedProcess:
    plain = not cmd.env and not set("|<>;&`$") & set(cmd.shell)
    if monkeypatch is not None and plain and cmd.argv[0] == "fed-ddp" and cmd.argv[1:2] and cmd.argv[1] in IN_PROCESS:
        proc = _in_process(cmd, cwd, monkeypatch)
    else:
        proc = subprocess.run(["bash", "-c", cmd.shell], cwd=cwd, env=_env(cwd), capture_output=True, text=True,
                              timeout=timeout, check=False)
    assert proc.returncode == 0, f"{cmd.file} line {cmd.line} fails as written: {cmd.shell}\n{proc.stderr[-3000:]}"
    if check.stdout:
        assert proc.stdout.strip() == cmd.comment, (cmd.shell, proc.stdout, cmd.comment)
    return proc


def _config(args: list[str]):
    from fed_ddp.config import load_config, split_args

    files, overrides = split_args(args)
    return load_config(files, overrides)


class _Launches:
    """Records what fed-ddp run would launch (torch's elastic_launch) and compare would train."""

    def __init__(self):
        self.nproc, self.args, self.compared, self.bases = None, None, None, []

    def elastic_launch(self, config, entrypoint):
        self.nproc = config.nproc_per_node

        def launch(*args):
            self.args = (entrypoint, *args)
        return launch

    def compare(self, cfg, **kwargs):
        self.compared = (cfg, kwargs)

    def base_path(self, model, show_progress=True):  # the tiny base's pretraining (minutes) is not repeated here
        self.bases.append(model.pretrained)
        return model.pretrained or "tiny base"


def _launch(argv: list[str], monkeypatch, capsys) -> None:
    """``fed-ddp run|compare ...`` through fed_ddp.cli.main, up to the launch."""
    import torch.distributed.launcher.api

    import fed_ddp.compare
    import fed_ddp.diffusion.models
    from fed_ddp import cli

    rec = _Launches()
    monkeypatch.setattr(torch.distributed.launcher.api, "elastic_launch", rec.elastic_launch)
    monkeypatch.setattr(fed_ddp.compare, "compare", rec.compare)
    monkeypatch.setattr(fed_ddp.diffusion.models, "base_path", rec.base_path)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("FED_DDP_LAUNCHER_PID", "0")  # cmd_run sets it; restored after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the pre-flight reads a denoiser config: never from the network here
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert argv[0] == "fed-ddp" and argv[1] in ("run", "compare"), argv
    try:
        rc = cli.main(argv[1:])
    except SystemExit as e:  # argparse: an unknown option or a missing argument
        rc = e.code
    assert rc == 0, f"{' '.join(argv)} exits {rc}: {capsys.readouterr().err.strip()}"
    if argv[1] == "run":  # 1 server + W workers, running fed_ddp.train on the README's words
        from fed_ddp.distributed.nodes import auto_workers

        cfg = _config(argv[2:])
        extra = []  # fed.workers=null on a CPU machine: the launcher caps the workers at the cores and says so
        if (w := auto_workers(cfg)) is not None:
            cfg.fed.workers, extra = w, [f"fed.workers={w}"]
        assert rec.nproc == cfg.world_size
        assert rec.args == (sys.executable, "-u", "-m", "fed_ddp.train", *argv[2:], *extra)
    else:
        assert rec.compared is not None, "compare never started"


def _parse(parser, argv: list[str]):
    """parser.parse_args, an argparse error as a test failure naming it."""
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"{parser.prog} {' '.join(argv)}: argparse exits {e.code} (see the captured stderr; "
                             f"a real option missing from a parser here must be added to it)") from None


def _run_dirs() -> dict[Path, object]:
    """{run directory: config} of every README line that LAUNCHes a fed-ddp run."""
    return {(cfg := _config(c.argv[2:])).run.dir: cfg for c in COMMANDS
            if check_of(c) == LAUNCH and c.argv[:2] == ["fed-ddp", "run"]}


def _generate(cmd: Command) -> None:
    """Parse with fed-ddp's parser; the checkpoint is in a run directory a README run writes, with the client."""
    from fed_ddp import cli

    args = _parse(cli.build_parser(), cmd.argv[1:])
    assert args.fn is cli.cmd_generate
    ckpt = Path(args.checkpoint)
    assert ckpt.parent.name == "checkpoints" and re.fullmatch(r"final|round_\d{4}", ckpt.name), ckpt
    runs = _run_dirs()
    assert ckpt.parent.parent in runs, f"{ckpt}: no README `fed-ddp run` writes {ckpt.parent.parent} ({list(runs)})"
    if args.client is not None:  # some README run into that directory keeps personal adapters for the client
        cfgs = [_config(c.argv[2:]) for c in COMMANDS if check_of(c) == LAUNCH and c.argv[:2] == ["fed-ddp", "run"]]
        assert any(c.run.dir == ckpt.parent.parent and c.personal.mode != "none"
                   and args.client < c.fed.num_clients for c in cfgs), f"--client {args.client}: no such personal run"


def _torchrun(cmd: Command) -> None:
    """torch's own torchrun parser; the module exists; nproc is the config's world size."""
    import importlib.util

    from torch.distributed.run import get_args_parser

    assert shutil.which("torchrun", path=str(BIN)), "torchrun is not in the venv"
    a = _parse(get_args_parser(), cmd.argv[1:])
    assert a.module and importlib.util.find_spec(a.training_script), a.training_script
    cfg = _config(a.training_script_args)
    assert int(a.nproc_per_node) == cfg.world_size, (a.nproc_per_node, cfg.world_size)


def _nodes(args: list[str], capsys) -> None:
    """fed_ddp.distributed.nodes: what launch/*.sh and slurm/*.sbatch run first (config, ranks per node)."""
    from fed_ddp.distributed import nodes

    rc = nodes.main(args)
    assert rc == 0, f"python -m fed_ddp.distributed.nodes {' '.join(args)}: {capsys.readouterr().err.strip()}"


def _sbatch(cmd: Command, cwd: Path, capsys) -> None:
    """sbatch's options as the README uses them, the script, $FED_DDP_PYTHON, and the job's first step."""
    import argparse

    p = argparse.ArgumentParser(prog="sbatch")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("-p", "--partition", default=None)
    p.add_argument("--wait", action="store_true")
    p.add_argument("--array", default=None)
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = _parse(p, cmd.argv[1:])  # an sbatch option not listed above fails: add it with what it means here
    assert (cwd / a.script).is_file(), a.script
    if "FED_DDP_PYTHON" in cmd.env:
        py = Path(cmd.env["FED_DDP_PYTHON"].replace("$PWD", str(cwd)))
        assert py.is_file() and os.access(py, os.X_OK), py
    if a.script == "slurm/sweep.sbatch":  # one array task per grid point, each a valid fed_ddp.sbatch job
        from fed_ddp.sweep import grid, load_sweep, point_args

        first, last = map(int, a.array.split("%")[0].split("-"))  # %K: at most K at a time
        sweep = load_sweep(a.args[0])
        assert (first, last) == (0, len(grid(sweep)) - 1), f"--array={a.array} for {len(grid(sweep))} grid points"
        for i in range(first, last + 1):
            _nodes(["--nnodes", "1", *point_args(sweep, i, a.args[1:])], capsys)
    else:
        assert a.script in ("slurm/fed_ddp.sbatch", "slurm/fed_ddp_multinode.sbatch") and a.array is None, a
        header = re.search(r"^#SBATCH --nodes[= ](\d+)", (cwd / a.script).read_text(), re.MULTILINE)
        if header and "--nodes" not in cmd.argv:  # the script's own default
            a.nodes = int(header.group(1))
        gpus = ["--gpus", str(a.gpus_per_node)] if a.gpus_per_node else []
        _nodes(["--nnodes", str(a.nodes), *gpus, *a.args], capsys)


def _multi_node(cmd: Command, cwd: Path, capsys) -> None:
    env = cmd.env if cmd.env else {"NNODES": "1", "NODE_RANK": "0", "RDZV_ENDPOINT": "localhost:0"}  # single_node.sh
    assert {"NNODES", "NODE_RANK", "RDZV_ENDPOINT"} <= set(env), env
    assert re.fullmatch(r"[\w.-]+:\d+", env["RDZV_ENDPOINT"]), env["RDZV_ENDPOINT"]
    script = cwd / cmd.argv[0]
    assert script.is_file() and os.access(script, os.X_OK), script
    _nodes(["--nnodes", env["NNODES"], "--node-rank", env["NODE_RANK"], *cmd.argv[1:]], capsys)


def _make(cmd: Command, cwd: Path, monkeypatch, capsys) -> None:
    """make -n TARGET (what it would run); a `fed-ddp run` in the recipe is checked like a README LAUNCH."""
    assert cmd.argv[0] == "make" and len(cmd.argv) == 2, cmd.argv
    proc = subprocess.run(["make", "-n", cmd.argv[1]], cwd=cwd, env=_env(cwd), capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.splitlines():
        words = shlex.split(line)
        if words and Path(words[0]).name == "fed-ddp":
            _launch(["fed-ddp", *words[1:]], monkeypatch, capsys)


def _script(cmd: Command, cwd: Path) -> None:
    exe, script = cwd / cmd.argv[0], cwd / cmd.argv[1]
    assert exe.exists() and os.access(exe, os.X_OK), exe
    compile(script.read_text(), str(script), "exec")


def _network(cmd: Command, check: Check, cwd: Path) -> None:
    exe = cmd.argv[0]
    assert shutil.which(exe, path=str(BIN)), f"{exe} is not in the venv"
    if exe == "pip":
        import tomllib

        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {})
        for spec in cmd.argv[2:]:
            m = re.fullmatch(r"(\.)(?:\[(\w+)\])?", spec)
            if m:
                assert (cwd / "pyproject.toml").is_file() and (m.group(2) is None or m.group(2) in extras), spec
    elif cmd.argv[1] == "sweep":
        from fed_ddp.sweep import main as sweep_main

        assert sweep_main(["check", cmd.argv[2]]) == 0
    pytest.skip(f"{check.note} (network)")


def _needs_model(cmd: Command, check: Check, monkeypatch, capsys) -> None:
    """LAUNCH where the model directory exists; else the line with a hub id in its place, then a skip."""
    argv = list(cmd.argv)
    i = next(i for i, a in enumerate(argv) if a.startswith("model.pretrained="))
    path = Path(argv[i].split("=", 1)[1])
    if not (path / "model_index.json").exists():  # a hub id whose denoiser config ships here: read, not downloaded
        from fed_ddp.diffusion.meta import BUILTIN_DENOISERS, KNOWN_HUB_IDS

        family = _config([a for a in argv[2:] if a is not argv[i]]).model.family
        argv[i] = "model.pretrained=" + next(h for h, n in KNOWN_HUB_IDS.items() if BUILTIN_DENOISERS[n][0] == family)
    _launch(argv, monkeypatch, capsys)
    if argv != cmd.argv:
        pytest.skip(f"needs {check.note}; the rest of the line was checked with a hub id in its place")


@pytest.fixture(scope="module")
def runs_checkout(tmp_path_factory):
    """A checkout holding tiny finished runs where the README's generate and report lines read them."""
    import torch
    from inproc_runs import finished_run

    from fed_ddp.diffusion.models import quiet_libraries
    from fed_ddp.diffusion.tiny import build_pipeline

    quiet_libraries()
    where = _checkout(tmp_path_factory.mktemp("readme") / "repo")
    base = where.parent / "tiny-random"
    torch.manual_seed(0)
    build_pipeline().save_pretrained(base)
    finished_run(base, where / "runs", "quickstart")
    finished_run(base, where / "runs", "wireless", "wireless.enabled=true")
    shutil.copytree(where / "runs" / "quickstart", where / "runs" / "scaling-num_clients2-rank4-uplinkfp32")
    return where


@pytest.mark.parametrize("cmd", COMMANDS, ids=_id)
def test_readme_command(cmd: Command, tmp_path, monkeypatch, capsys, request):
    check = check_of(cmd)
    if check is None:
        pytest.fail(f"{cmd.file} line {cmd.line}: {cmd.text!r} has no entry in CHECKS")
    cwd = _checkout(tmp_path / "repo")
    monkeypatch.chdir(cwd)
    if check.kind == "exec":
        _exec(cmd, check, cwd, monkeypatch=monkeypatch)
    elif check.kind == "exec_on_runs":
        where = request.getfixturevalue("runs_checkout")
        _exec(cmd, check, where)
        if cmd.argv[:2] == ["fed-ddp", "report"] and "wireless" in cmd.text:
            assert (where / "runs" / "report" / "wireless.png").is_file()
    elif check.kind == "launch":
        _launch(cmd.argv, monkeypatch, capsys)
    elif check.kind == "needs_model":
        _needs_model(cmd, check, monkeypatch, capsys)
    elif check.kind == "generate":
        _generate(cmd)
    elif check.kind == "torchrun":
        _torchrun(cmd)
    elif check.kind == "sbatch":
        _sbatch(cmd, cwd, capsys)
    elif check.kind == "multi_node":
        _multi_node(cmd, cwd, capsys)
    elif check.kind == "make":
        _make(cmd, cwd, monkeypatch, capsys)
    elif check.kind == "script":
        _script(cmd, cwd)
    elif check.kind == "network":
        _network(cmd, check, cwd)
    elif check.kind == "root":  # what it runs is there; running it needs what the note says
        if "/" in cmd.argv[-1]:
            assert os.access(cwd / cmd.argv[-1], os.X_OK), cmd.argv[-1]
        pytest.skip(f"needs {check.note}")
    else:
        pytest.fail(f"unknown check kind {check.kind!r}")
