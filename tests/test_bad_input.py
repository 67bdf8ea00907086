"""Bad input, as a careless or hostile user gives it (issue 28): one row per case.

Each row builds a small tree under ``tmp_path`` (a run directory ``runs/r``, a victim file outside it,
links, tampered checkpoints or run files), runs ``fed-ddp`` in this process (``cli.main``; a few rows as
a user does, in a fresh interpreter) and asserts: a non-zero exit, exactly one ``fed-ddp:`` line naming
what is wrong, no traceback, nothing launched, and not one byte changed outside the run directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

TINY = str(ROOT / "configs" / "tiny_test.yaml")
CASES: dict[str, object] = {}


def case(name: str):
    def add(fn):
        CASES[name] = fn
        return fn
    return add


def run_args(tmp: Path, *overrides: str) -> list[str]:
    return ["run", TINY, f"run.output_dir={tmp}/runs", "run.name=r", *overrides]


def victim(tmp: Path) -> Path:
    v = tmp / "victim"
    v.write_text("precious\n")
    return v


def images(tmp: Path, lines: list[str] | None = None, n: int = 12, caption: str = "a handwritten digit five",
           label: bool = False) -> Path:
    from PIL import Image

    d = tmp / "imgs"
    d.mkdir(exist_ok=True)
    for i in range(n):
        Image.new("L", (8, 8), color=i * 10).save(d / f"{i}.png")
    body = [json.dumps({"file_name": f"{i}.png", "text": caption, **({"label": str(i % 2)} if label else {})})
            for i in range(n)]
    (d / "metadata.jsonl").write_text("\n".join(body + (lines or [])) + "\n")
    return d


def folder_args(tmp: Path, d: Path, *overrides: str) -> list[str]:
    return run_args(tmp, "data.source=imagefolder", f"data.path={d}", "data.partition=iid", *overrides)


# --- 1, 2: links in the run directory ----------------------------------------------------------------------

@case("1 .lock is a symlink to the victim")
def _(tmp, env):
    (tmp / "runs" / "r").mkdir(parents=True)
    os.symlink(victim(tmp), tmp / "runs" / "r" / ".lock")
    return run_args(tmp), [".lock", "symbolic link"]


for _name in ("config.yaml", "partition.json", "metrics.jsonl", "summary.json", ".fed_ddp_run"):
    @case(f"2 dangling {_name} link")
    def _(tmp, env, name=_name):
        (tmp / "runs" / "r").mkdir(parents=True)
        os.symlink(tmp / "elsewhere" / name, tmp / "runs" / "r" / name)  # the target does not exist
        return run_args(tmp), [name, "symbolic link"]


@case("2 the run directory is a symlink")
def _(tmp, env):
    (tmp / "elsewhere").mkdir()
    (tmp / "runs").mkdir()
    os.symlink(tmp / "elsewhere", tmp / "runs" / "r")
    return run_args(tmp), ["runs/r", "symbolic link", "run.output_dir"]


@case("2 a sample of a marked run is a symlink, overwrite")
def _(tmp, env):
    r = tmp / "runs" / "r"
    (r / "samples").mkdir(parents=True)
    (r / "checkpoints" / "round_0001").mkdir(parents=True)
    (r / ".fed_ddp_run").write_text("{}\n")
    os.symlink(victim(tmp), r / "samples" / "round_0001.png")
    return run_args(tmp, "run.overwrite=true"), ["samples/round_0001.png", "symbolic link"]


@case("2 checkpoints/ is a symlink to a folder of the user's, overwrite")
def _(tmp, env):
    r = tmp / "runs" / "r"
    r.mkdir(parents=True)
    (r / ".fed_ddp_run").write_text("{}\n")
    (tmp / "mine" / "round_0001").mkdir(parents=True)
    (tmp / "mine" / "round_0001" / "weights.bin").write_text("mine\n")
    os.symlink(tmp / "mine", r / "checkpoints")
    return run_args(tmp, "run.overwrite=true"), ["checkpoints", "symbolic link"]


# --- 4: overwrite of a folder that merely shares a run's folder names --------------------------------------

@case("4 user folder with samples/ and checkpoints/, overwrite")
def _(tmp, env):
    r = tmp / "runs" / "r"
    for rel, text in (("samples/my_photo.png", "photo"), ("checkpoints/my_model.ckpt", "model")):
        (r / rel).parent.mkdir(parents=True, exist_ok=True)
        (r / rel).write_text(text)
    return run_args(tmp, "run.overwrite=true"), ["no fed_ddp run wrote", "samples/", "checkpoints/"]


@case("4 user folder with a metrics.jsonl only, overwrite")
def _(tmp, env):
    (tmp / "runs" / "r").mkdir(parents=True)
    (tmp / "runs" / "r" / "metrics.jsonl").write_text('{"mine": 1}\n')
    return run_args(tmp, "run.overwrite=true"), ["metrics.jsonl", "no .fed_ddp_run marker"]


# --- 7: data files outside the data folder, labels that do not exist, empty configs ------------------------

@case("7 file_name is absolute")
def _(tmp, env):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp / "outside.png")
    d = images(tmp, [json.dumps({"file_name": str(tmp / "outside.png"), "text": "x"})])
    return folder_args(tmp, d), ["metadata.jsonl:13", "outside the data folder"]


@case("7 file_name climbs out with ..")
def _(tmp, env):
    from PIL import Image

    Image.new("L", (8, 8)).save(tmp / "outside.png")
    d = images(tmp, [json.dumps({"file_name": "../outside.png", "text": "x"})])
    return folder_args(tmp, d), ["metadata.jsonl:13", "outside the data folder"]


@case("7 data.label_field names no field")
def _(tmp, env):
    d = images(tmp, label=True)
    return run_args(tmp, "data.source=imagefolder", f"data.path={d}", "data.label_field=nope"), ["data.label_field", "nope"]


@case("7 empty YAML")
def _(tmp, env):
    (tmp / "empty.yaml").write_text("")
    return ["run", str(tmp / "empty.yaml")], ["empty.yaml", "empty"]


@case("7 comment-only YAML")
def _(tmp, env):
    (tmp / "c.yaml").write_text("# nothing here\n\n")
    return ["run", str(tmp / "c.yaml")], ["c.yaml", "empty"]


# --- 9: resource bounds ------------------------------------------------------------------------------------

for _ov, _needles in (("lora.rank=100000", ["lora.rank", "4,096"]),
                      ("lora.rank=1000", ["lora.rank", "largest rank"]),
                      ("fed.ranks_per_client=1000", ["fed.ranks_per_client", "ranks", "torchrun"]),
                      ("fed.ranks_per_client=5000", ["fed.ranks_per_client", "1,024"]),
                      ("eval.images_per_prompt=10000000", ["eval.images_per_prompt", "10,000"]),
                      ("train.num_threads=1000000", ["train.num_threads", "1,024"]),
                      ("fed.rounds=1000000000000000000000000000000", ["fed.rounds", "1,000,000"]),
                      ("fed.local_steps=100000000", ["fed.local_steps"]),
                      ("train.batch_size=10000000", ["train.batch_size"]),
                      ("fed.num_clients=100000000", ["fed.num_clients"]),
                      ("data.resolution=100000", ["data.resolution", "4,096"]),
                      ("data.resolution=0", ["data.resolution", "[8, 4,096]"]),
                      ("eval.inference_steps=100000", ["eval.inference_steps"]),
                      ("eval.prompts=[" + ",".join(["x"] * 65) + "]", ["eval.prompts", "at most 64"])):
    @case(f"9 {_ov[:40]}")
    def _(tmp, env, ov=_ov, needles=_needles):
        return run_args(tmp, ov), needles


@case("9 a 1 MB caption")
def _(tmp, env):
    d = images(tmp, caption="x" * 2 ** 20)
    return folder_args(tmp, d), ["metadata.jsonl:1", "'text'", "10,000"]


@case("9 report reads an alias-bomb config.yaml")
def _(tmp, env):
    r = copy_run(tmp, env)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    (r / "config.yaml").write_text(bomb)
    return ["report", str(r), "--out", str(tmp / "report")], ["config.yaml"]


# --- 10: before any rank, tracebacks no more ---------------------------------------------------------------

@case("10 run.output_dir is a file")
def _(tmp, env):
    (tmp / "runs").write_text("a file\n")
    return run_args(tmp), ["run.output_dir", "not a folder"]


@case("10 run.output_dir is a symlink loop")
def _(tmp, env):
    os.symlink(tmp / "runs", tmp / "runs")
    return run_args(tmp), ["run.output_dir", "cannot be used"]


@case("10 run.output_dir cannot be written")
def _(tmp, env):
    if os.geteuid() == 0:
        pytest.skip("root writes everywhere")
    (tmp / "runs").mkdir()
    (tmp / "runs").chmod(0o555)
    return run_args(tmp), ["run.output_dir", "cannot be written"]


@case("10 a 300-character run.name")
def _(tmp, env):
    return ["run", TINY, f"run.output_dir={tmp}/runs", "run.name=" + "n" * 300], ["run.name", "128"]


@case("10 .lock is a folder")
def _(tmp, env):
    (tmp / "runs" / "r" / ".lock").mkdir(parents=True)
    return run_args(tmp), [".lock", "not a regular file"]


@case("10 a scalar YAML")
def _(tmp, env):
    (tmp / "s.yaml").write_text("42\n")
    return ["run", str(tmp / "s.yaml")], ["s.yaml", "mapping"]


@case("10 a list YAML")
def _(tmp, env):
    (tmp / "l.yaml").write_text("- a\n- b\n")
    return ["run", str(tmp / "l.yaml")], ["l.yaml", "mapping"]


@case("10 damaged stored config.yaml on resume")
def _(tmp, env):
    r = tmp / "runs" / "r"
    (r / "checkpoints" / "round_0001").mkdir(parents=True)
    (r / ".fed_ddp_run").write_text("{}\n")
    (r / "config.yaml").write_text("run: {name: r\nfed: [\n")
    (r / "metrics.jsonl").write_text("")
    return run_args(tmp, "run.resume=true"), ["run.resume", "stored config is damaged"]


@case("10 a PNG whose header claims 50000x50000")
def _(tmp, env):
    d = images(tmp)
    bomb_png(d / "3.png")
    return folder_args(tmp, d), ["metadata.jsonl:4", "3.png", "pixels"]


# --- 11: accepted by pre-flight before, then every rank crashed ----------------------------------------------

for _ov, _needles in (("run.seed=200000000000000000000", ["run.seed", "4,294,967,295"]),
                      ("run.seed=20000000000000", ["run.seed", "4,294,967,295"]),
                      ("run.seed=-1", ["run.seed=-1", "4,294,967,295"]),
                      ("run.seed=2e20", ["run.seed"]),
                      ("model.tiny.seed=-5", ["model.tiny.seed"]),
                      ("lora.targets=[no_such_module]", ["lora.targets", "no_such_module", "matches no layer"]),
                      ("lora.targets=[no_such_module,nor_this]", ["lora.targets", "nor_this", "matches no layer"]),
                      ("eval.sample_seeds=[]", ["eval.sample_seeds", "1 to 64"]),
                      ("eval.sample_seeds=[-1]", ["eval.sample_seeds"]),
                      ("wireless.seed=-1", ["wireless.seed"]),
                      ("model.pretrained=models/sd15", ["model.pretrained", "models/sd15", "no such folder"]),
                      ("personal.mode=split personal.rank=100000", ["personal.rank"])):
    @case(f"11 {_ov[:40]}")
    def _(tmp, env, ov=_ov, needles=_needles):
        return run_args(tmp, *ov.split()), needles


# --- 12: generate on a tampered checkpoint or with bad options; report on tampered run files ------------------

def copy_ckpt(tmp: Path, env) -> Path:
    c = tmp / "ckpt"
    shutil.copytree(env["ckpt"], c)
    return c


def copy_run(tmp: Path, env) -> Path:
    r = tmp / "run"
    shutil.copytree(env["run"], r, ignore=shutil.ignore_patterns("checkpoints", "clients", ".lock"))
    return r


def gen_args(tmp: Path, ckpt: Path, *opts: str) -> list[str]:
    return ["generate", str(ckpt), "--prompt", "a handwritten digit 3", "--steps", "1", "--out", str(tmp / "g.png"),
            *opts]


def edit_info(c: Path, fn) -> None:
    info = json.loads((c / "fed_ddp.json").read_text())
    (c / "fed_ddp.json").write_text(json.dumps(fn(info)))


@case("12 fed_ddp.json is a list")
def _(tmp, env):
    c = copy_ckpt(tmp, env)
    (c / "fed_ddp.json").write_text("[1, 2]")
    return gen_args(tmp, c), ["fed_ddp.json", "JSON object"]


@case("12 fed_ddp.json lacks base_model")
def _(tmp, env):
    c = copy_ckpt(tmp, env)
    edit_info(c, lambda i: {k: v for k, v in i.items() if k != "base_model"})
    return gen_args(tmp, c), ["fed_ddp.json", "base_model"]


@case("12 fed_ddp.json is not JSON")
def _(tmp, env):
    c = copy_ckpt(tmp, env)
    (c / "fed_ddp.json").write_text("{base_model: ")
    return gen_args(tmp, c), ["fed_ddp.json", "not valid JSON"]


@case("12 fed_ddp.json has bad LoRA settings")
def _(tmp, env):
    c = copy_ckpt(tmp, env)
    edit_info(c, lambda i: {**i, "lora": {**i["lora"], "rank": "big"}})
    return gen_args(tmp, c), ["fed_ddp.json", "lora"]


@case("12 an extra LoRA key")
def _(tmp, env):
    c = copy_ckpt(tmp, env)
    edit_adapter(c, lambda t: {**t, "base_model.model.no_such.lora_A.weight": t[next(iter(t))].clone()})
    return gen_args(tmp, c), ["does not load", "no_such"]


@case("12 a rank mismatch")
def _(tmp, env):
    c = copy_ckpt(tmp, env)
    edit_info(c, lambda i: {**i, "lora": {**i["lora"], "rank": i["lora"]["rank"] * 2}})
    return gen_args(tmp, c), ["does not load", "size mismatch"]


@case("12 a corrupt safetensors header")
def _(tmp, env):
    c = copy_ckpt(tmp, env)
    (c / "pytorch_lora_weights.safetensors").write_bytes(b"\xff" * 8 + b"{not a header")
    return gen_args(tmp, c), ["does not load"]


@case("12 the base is pickled weights only (.bin)")
def _(tmp, env):
    return gen_args(tmp, env["ckpt"], "--base", str(env["bin_base"])), ["base model", "cannot be loaded"]


for _opts, _needles in ((["--num-images", "0"], ["--num-images", "[1, 256]"]),
                        (["--steps", "0"], ["--steps", "[1, 1000]"]),
                        (["--device", "bogus"], ["--device", "bogus"]),
                        (["--device", "cuda:7"], ["--device"]),
                        (["--cell", "100000"], ["--cell", "[8, 1024]"]),
                        (["--seed", "-1"], ["--seed"]),
                        (["--guidance-scale", "nan"], ["--guidance-scale"]),
                        (["--steps", "x"], ["--steps", "invalid int value"]),
                        (["--client", "5"], ["--client=5", "personal"])):
    @case(f"12 generate {' '.join(_opts)}")
    def _(tmp, env, opts=_opts, needles=_needles):
        return gen_args(tmp, env["ckpt"], *opts), needles


@case("12 generate --out into a missing folder")
def _(tmp, env):
    return ["generate", str(env["ckpt"]), "--prompt", "x", "--out", str(tmp / "no" / "g.png")], ["--out",
                                                                                                 "writable folder"]


@case("12 generate --out is a folder")
def _(tmp, env):
    (tmp / "g.png").mkdir()
    return ["generate", str(env["ckpt"]), "--prompt", "x", "--out", str(tmp / "g.png")], ["--out", "folder"]


@case("12 generate on a folder that is no checkpoint")
def _(tmp, env):
    (tmp / "nothing").mkdir()
    return ["generate", str(tmp / "nothing"), "--prompt", "x", "--out", str(tmp / "g.png")], ["no fed_ddp.json"]


def report_args(tmp: Path, r: Path, *more: str) -> list[str]:
    return ["report", str(r), *more, "--out", str(tmp / "report")]


def edit_rows(r: Path, fn) -> None:
    rows = [json.loads(ln) for ln in (r / "metrics.jsonl").read_text().splitlines()]
    (r / "metrics.jsonl").write_text("".join(ln if isinstance(ln, str) else json.dumps(ln) + "\n" for ln in fn(rows)))


@case("12 report: a row that is JSON but no object")
def _(tmp, env):
    r = copy_run(tmp, env)
    edit_rows(r, lambda rows: [*rows[:1], [1, 2], *rows[1:]])
    return report_args(tmp, r), ["metrics.jsonl:2", "object"]


@case("12 report: seconds is a word")
def _(tmp, env):
    r = copy_run(tmp, env)
    edit_rows(r, lambda rows: [{**rows[0], "seconds": "fast"}, *rows[1:]])
    return report_args(tmp, r), ["metrics.jsonl:1", "seconds"]


@case("12 report: summary.json is a list")
def _(tmp, env):
    r = copy_run(tmp, env)
    (r / "summary.json").write_text("[]")
    return report_args(tmp, r), ["summary.json", "object"]


@case("12 report: summary.json is not JSON")
def _(tmp, env):
    r = copy_run(tmp, env)
    (r / "summary.json").write_text("{")
    return report_args(tmp, r), ["summary.json", "not valid JSON"]


@case("12 report: --out is an existing file")
def _(tmp, env):
    (tmp / "report").write_text("mine\n")
    return report_args(tmp, env["run"]), ["--out", "not a folder"]


@case("12 report: a bad middle line")
def _(tmp, env):
    r = copy_run(tmp, env)
    edit_rows(r, lambda rows: [json.dumps(rows[0])[:20] + "\n", *rows[1:]])
    return report_args(tmp, r), ["metrics.jsonl:1"]


@case("12 report: not a run directory")
def _(tmp, env):
    (tmp / "nothing").mkdir()
    return report_args(tmp, tmp / "nothing"), ["nothing"]


@case("12 plan: a bad value")
def _(tmp, env):
    return ["plan", TINY, "lora.rank=0"], ["lora.rank"]


@case("12 plan: an unknown denoiser")
def _(tmp, env):
    return ["plan", TINY, "--denoiser", "no-such-model"], ["no-such-model"]


@case("12 compare: a client that does not exist")
def _(tmp, env):
    return ["compare", TINY, "--client", "99"], ["--client=99"]


@case("12 compare: a bad value")
def _(tmp, env):
    return ["compare", TINY, "fed.rounds=-1"], ["fed.rounds"]


# --- 13: one-line errors that now name the file, the key, the value ------------------------------------------

@case("13 non-UTF-8 YAML")
def _(tmp, env):
    (tmp / "u.yaml").write_bytes(b"run:\n  name: caf\xe9\n")
    return ["run", str(tmp / "u.yaml")], ["u.yaml:2", "not UTF-8"]


@case("13 non-UTF-8 metadata.jsonl")
def _(tmp, env):
    d = images(tmp)
    with open(d / "metadata.jsonl", "ab") as f:
        f.write(b'{"file_name": "1.png", "text": "caf\xe9"}\n')
    return folder_args(tmp, d), ["metadata.jsonl:13", "not UTF-8"]


@case("13 non-UTF-8 metrics.jsonl for report")
def _(tmp, env):
    r = copy_run(tmp, env)
    with open(r / "metrics.jsonl", "r+b") as f:
        f.write(b"\xff")
    return report_args(tmp, r), ["metrics.jsonl:1", "not UTF-8"]


@case("13 a config path containing =")
def _(tmp, env):
    (tmp / "a=b.yaml").write_text((ROOT / "configs" / "tiny_test.yaml").read_text() + "lora:\n  rank: 0\n")
    return ["run", str(tmp / "a=b.yaml"), f"run.output_dir={tmp}/runs"], ["lora.rank"]  # read as a file


@case("13 a config path that does not exist")
def _(tmp, env):
    return ["run", str(tmp / "nope.yaml")], ["nope.yaml"]


# --- the harness -------------------------------------------------------------------------------------------

def bomb_png(path: Path) -> None:
    """A valid PNG whose header claims 50000x50000 pixels (PIL refuses it unless told otherwise)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def edit_adapter(c: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    f = c / "pytorch_lora_weights.safetensors"
    save_file(fn(load_file(f)), f)


def snapshot(root: Path, skip: Path) -> dict[str, tuple]:
    """Every entry under ``root`` but ``skip``'s subtree: kind, and a file's hash or a link's target (lstat:
    nothing followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n != skip]
        for n in [*dirnames, *filenames]:
            p = d / n
            if p == skip:
                continue
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_file():
                out[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[str(p)] = ("dir", p.stat().st_mode & 0o777)
    return out


@pytest.fixture(scope="module")
def env(tiny_base, tmp_path_factory):
    """A finished one-round run of the tiny base (its final checkpoint and its run files), and the same base
    saved as pickled .bin weights only."""
    from inproc_runs import finished_run

    from fed_ddp.diffusion.tiny import build_pipeline

    out = tmp_path_factory.mktemp("bad_input")
    run = finished_run(tiny_base, out, "done", "fed.rounds=1")
    bin_base = out / "bin-base"
    build_pipeline().save_pretrained(bin_base, safe_serialization=False)
    # transformers writes safetensors whatever it is told; the denoiser and the VAE are pickles only
    assert not list((bin_base / "unet").glob("*.safetensors")) and list((bin_base / "unet").glob("*.bin"))
    return {"run": run, "ckpt": run / "checkpoints" / "final", "bin_base": bin_base}


@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test, rather than start ranks or pretrain, if a row gets past the launcher's checks."""
    def launched(*a, **k):
        raise AssertionError("the bad input was accepted: fed-ddp went on to launch")

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", launched)
    monkeypatch.setattr("fed_ddp.diffusion.models.base_path", launched)


def in_process(argv: list[str], capsys) -> tuple[int, str]:
    from fed_ddp import cli

    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def one_line(rc: int, err: str, needles: list[str]) -> str:
    assert rc not in (0, None), err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("fed-ddp:") and "warning:" not in ln]
    assert len(lines) == 1, err[-2000:]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing_outside_the_run(name, tmp_path, env, no_launch, capsys,
                                                                    monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id is looked up, offline at once (no retries for 20 s)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    argv, needles = CASES[name](tmp_path, env)
    run_dir = tmp_path / "runs" / "r"
    before = snapshot(tmp_path, skip=run_dir)
    try:
        rc, err = in_process(argv, capsys)
    finally:
        if (tmp_path / "runs").is_dir() and not (tmp_path / "runs").is_symlink():
            (tmp_path / "runs").chmod(0o755)
    one_line(rc, err, needles)
    assert snapshot(tmp_path, skip=run_dir) == before
    if (tmp_path / "victim").exists():
        assert (tmp_path / "victim").read_text() == "precious\n"


@pytest.mark.parametrize("name", ["1 .lock is a symlink to the victim", "10 a PNG whose header claims 50000x50000"])
def test_as_a_user_runs_it(name, tmp_path, env):
    """The same rows in a fresh interpreter, as ``fed-ddp`` runs (main's own error handling, no capsys)."""
    argv, needles = CASES[name](tmp_path, env)
    before = snapshot(tmp_path, skip=tmp_path / "runs" / "r")
    proc = run_cli(*argv)
    one_line(proc.returncode, proc.stderr, needles)
    assert "launching" not in proc.stderr
    assert snapshot(tmp_path, skip=tmp_path / "runs" / "r") == before


# --- legitimate input, the right behaviour ------------------------------------------------------------------

def test_home_is_expanded_in_every_path_key(tmp_path, monkeypatch):
    from fed_ddp.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    cfg = load_config(TINY, ["run.output_dir=~/runs", "model.cache_dir=~/cache", "data.path=~/imgs",
                             "model.pretrained=~/base"])
    assert cfg.run.dir == tmp_path / "runs" / "tiny_test"
    assert (cfg.model.cache_dir, cfg.data.path, cfg.model.pretrained) == (
        str(tmp_path / "cache"), str(tmp_path / "imgs"), str(tmp_path / "base"))


def test_checkpoints_are_found_by_round_number_without_a_digit_limit(tmp_path):
    from fed_ddp.checkpoint import latest_checkpoint, round_checkpoints

    for r in (998, 9999, 10000, 123456):
        (tmp_path / "checkpoints" / f"round_{r:04d}").mkdir(parents=True)
    (tmp_path / "checkpoints" / "round_0999.tmp").mkdir()
    (tmp_path / "checkpoints" / "final").mkdir()
    assert sorted(round_checkpoints(tmp_path)) == [998, 9999, 10000, 123456]
    assert latest_checkpoint(tmp_path).name == "round_123456"
    assert latest_checkpoint(tmp_path, logged={998, 9999, 10000}).name == "round_10000"


def test_overwrite_removes_only_what_a_run_wrote(tmp_path):
    from fed_ddp.rundir import clear

    r = tmp_path / "r"
    ours = ["config.yaml", "metrics.jsonl", "summary.json", "partition.json", "privacy_ledger.jsonl",
            "checkpoints/round_0001/adapter_model.safetensors", "checkpoints/final/fed_ddp.json",
            "checkpoints/round_0002.tmp/x", "samples/round_0001.png",
            "clients/client_000003/round_0001.safetensors", "wandb/offline-run-2026_1/files/x", "wandb/latest-run"]
    mine = ["notes.txt", "samples/my_photo.png", "checkpoints/my_model.ckpt", "checkpoints/round_1/x",
            "clients/client_000003/my_notes.txt", "clients/alice/round_0001.safetensors", "wandb/my.cfg"]
    for rel in ours + mine:
        (r / rel).parent.mkdir(parents=True, exist_ok=True)
        (r / rel).write_text(rel)
    clear(r)
    left = sorted(str(p.relative_to(r)) for p in r.rglob("*") if p.is_file())
    assert left == sorted(mine)
    assert not (r / "samples" / "round_0001.png").exists() and not (r / "checkpoints" / "final").exists()


def test_a_start_that_completed_no_round_blocks_nothing(tmp_path):
    """A failed start (config.yaml, partition.json, metrics.jsonl, no checkpoint) does not need run.overwrite."""
    from fed_ddp.config import load_config
    from fed_ddp.rundir import MARKER, open_run

    cfg = load_config(TINY, [f"run.output_dir={tmp_path}", "run.name=r"])
    for n in (MARKER, "config.yaml", "partition.json", "metrics.jsonl"):
        (cfg.run.dir / n).parent.mkdir(parents=True, exist_ok=True)
        (cfg.run.dir / n).write_text("{}\n")
    (cfg.run.dir / "samples").mkdir()
    (cfg.run.dir / "samples" / "mine.png").write_text("mine")
    lock, warnings = open_run(cfg)
    lock.release()
    assert [w for w in warnings if "completed no round" in w]
    assert sorted(p.name for p in cfg.run.dir.iterdir()) == [".fed_ddp_run", ".lock", "samples"]
    assert (cfg.run.dir / "samples" / "mine.png").read_text() == "mine"


def test_report_skips_a_last_line_cut_by_a_crash(tmp_path, env, capsys, caplog):
    r = copy_run(tmp_path, env)
    text = (r / "metrics.jsonl").read_text()
    (r / "metrics.jsonl").write_text(text + text.splitlines()[0][:30])
    rc, err = in_process(report_args(tmp_path, r), capsys)
    assert rc == 0, err
    assert any("metrics.jsonl" in m and "line" in m for m in [err, *caplog.messages])


def test_a_resume_after_a_cut_line_keeps_every_row_and_the_totals_of_an_uninterrupted_run(tiny_base, tmp_path):
    """A crash cut round 2's row in half after its checkpoint was written: the resume drops the fragment (with
    a warning naming the file and line), computes round 2 again from round 1's checkpoint, and the run ends as
    an uninterrupted one: one row per round, the same totals, the same final adapter."""
    import logging

    import torch
    from inproc_runs import finished_run
    from safetensors.torch import load_file

    def rows(run: Path) -> list[dict]:
        return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]

    whole = finished_run(tiny_base, tmp_path, "whole", "fed.rounds=3")
    cut = finished_run(tiny_base, tmp_path, "cut", "fed.rounds=2")
    lines = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(ln).get("round") for ln in lines] == [0, 1, 2]  # base, rounds (the final: summary.json)
    (cut / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # no newline: cut
    shutil.rmtree(cut / "checkpoints" / "final")
    (cut / "summary.json").unlink()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        finished_run(tiny_base, tmp_path, "cut", "fed.rounds=3", "run.resume=true")
    finally:
        logging.getLogger().removeHandler(handler)
    said = [r.getMessage() for r in records]
    assert any("metrics.jsonl: line 3 was cut short" in m for m in said), said
    assert any("resuming from round_0001" in m for m in said), said
    got, want = rows(cut), rows(whole)
    assert [r["round"] for r in got] == [r["round"] for r in want] == [0, 1, 2, 3]
    for a, b in zip(got[1:], want[1:]):
        assert (a["num_examples"], a["bytes_up"], a["bytes_down"], a["comm"]) == (
            b["num_examples"], b["bytes_up"], b["bytes_down"], b["comm"])
        assert a["train_loss"] == b["train_loss"]
    s_cut, s_whole = (json.loads((r / "summary.json").read_text()) for r in (cut, whole))
    assert s_cut["comm"]["air"] == s_whole["comm"]["air"]
    assert (s_cut["rounds"], s_cut["bytes_up_total"], s_cut["bytes_down_total"]) == (
        s_whole["rounds"], s_whole["bytes_up_total"], s_whole["bytes_down_total"])
    a, b = (load_file(r / "checkpoints" / "final" / "pytorch_lora_weights.safetensors") for r in (cut, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _untimed(row: dict) -> dict:
    """A row's numbers but its clocks, and without the schema field (what schema 1 did not write)."""
    clocks = ("seconds", "started_at", "train_seconds", "schema", "base_eval_cached")
    return {k: v for k, v in row.items() if k not in clocks}


def test_a_run_directory_written_before_the_schema_still_reports_and_resumes_bit_for_bit(tiny_base, tmp_path):
    """Schema 1 (before ``RoundRecord``): rows without a ``schema`` field and the final evaluation as one more
    line carrying the last round's number. Such a directory loads in ``report`` (its final from that line, not a
    second round 2), and a resume to round 3 gives the adapter and the rows of an uninterrupted run."""
    import torch
    from inproc_runs import finished_run
    from safetensors.torch import load_file

    from fed_ddp.report import load_run

    whole = finished_run(tiny_base, tmp_path, "whole", "fed.rounds=3")
    old = finished_run(tiny_base, tmp_path, "old", "fed.rounds=2")
    rows = [json.loads(ln) for ln in (old / "metrics.jsonl").read_text().splitlines()]
    assert [r["schema"] for r in rows] == [2, 2, 2] and [r["round"] for r in rows] == [0, 1, 2]
    summary = json.loads((old / "summary.json").read_text())
    v1 = [{k: v for k, v in r.items() if k != "schema"} for r in rows] + [{"round": 2, "final": summary["final"]}]
    (old / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in v1))
    (old / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "schema"}))
    run = load_run(old)
    assert sorted(run.rounds) == [1, 2] and run.base.round == 0 and run.rounds[2].schema == 1
    assert run.final == summary["final"] and run.summary.schema == 1
    finished_run(tiny_base, tmp_path, "old", "fed.rounds=3", "run.resume=true")
    got = [json.loads(ln) for ln in (old / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(ln) for ln in (whole / "metrics.jsonl").read_text().splitlines()]
    # the schema-1 lines stay as they were; the resumed round is schema 2; a round indexes one line
    assert [r["round"] for r in got] == [0, 1, 2, 2, 3] and "final" in got[3] and got[4]["schema"] == 2
    assert [_untimed(r) for r in got[:3] + got[4:]] == [_untimed(r) for r in want]
    assert sorted(load_run(old).rounds) == [1, 2, 3]
    a, b = (load_file(r / "checkpoints" / "final" / "pytorch_lora_weights.safetensors") for r in (old, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_targets_another_family_lacks_are_a_warning_not_an_error():
    """A config's target list may cover several families (peft adapts what matches): the pre-flight names what
    matches nothing in this denoiser, and refuses only a list that matches nothing at all."""
    from fed_ddp.config import load_config
    from fed_ddp.preflight import check_model

    cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"), ["model.family=flux"])
    (warning,) = check_model(cfg)
    assert "'proj_in'" in warning and "'time_emb_proj'" in warning and "'to_q'" not in warning
    assert check_model(load_config(str(ROOT / "configs" / "quickstart.yaml"))) == []
