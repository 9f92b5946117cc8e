"""The job scripts, offline. The interpreter check (launch/check_python.sh, sourced by
gpu_single.sh and tpu_vm.sh): a Python older than 3.11 stops them with one line saying what to
install, before anything is created, installed or downloaded. tpu_vm.sh: its --dry_run listing
(gcloud commands, host scripts, per-process environment) and, against a fake `gcloud` that
executes the host command here in a fake $HOME, the install (uv's Python 3.11 when REMOTE_PYTHON
is older; once per host) and the stages. Fake interpreters, uv, pip and curl are stub scripts.
The hub downloads' allow patterns (models/sd.py, models/weights.py) against the file lists of
the real SD1.5 and CLIP repositories."""
import ast
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(REPO, "launch", "check_python.sh")


def _stub(folder, name: str, version: str) -> str:
  """An executable that prints `version` whatever it is asked (a fake `python -c …`)."""
  path = os.path.join(folder, name)
  with open(path, "w") as f:
    f.write(f"#!/bin/sh\necho {version}\n")
  os.chmod(path, 0o755)
  return path


def _bash(*args, **env) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                        env={**os.environ, **env})


def _assert_one_line(proc, *parts):
  assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for part in parts:
    assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize("version", ["3.11", "3.12", "3.13", "4.0"])
def test_python_3_11_and_newer_pass(tmp_path, version):
  proc = _bash(CHECK, _stub(tmp_path, "python", version))
  assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_this_interpreter_passes():
  proc = _bash(CHECK, sys.executable)
  assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("version", ["3.10", "3.9", "2.7"])
def test_an_older_python_is_refused_in_one_line_saying_what_to_install(tmp_path, version):
  stub = _stub(tmp_path, "python3", version)
  _assert_one_line(_bash(CHECK, stub), f"PYTHON={stub} is {version}", "uv python install 3.11",
                   "python3.11-venv")
  # $PYTHON is the default interpreter, and the variable named can be another one
  _assert_one_line(_bash(CHECK, PYTHON=stub), f"is {version}")
  _assert_one_line(_bash(CHECK, stub, "REMOTE_PYTHON"), f"REMOTE_PYTHON={stub} is {version}")


def test_a_missing_interpreter_is_refused_in_one_line(tmp_path):
  _assert_one_line(_bash(CHECK, str(tmp_path / "python9")), "no Python interpreter",
                   "uv python install 3.11")


def test_gpu_single_stops_before_creating_the_venv(tmp_path):
  venv = tmp_path / "venv"
  proc = _bash(os.path.join(REPO, "launch", "gpu_single.sh"), "configs/aesthetic.py",
               str(tmp_path / "run"), PYTHON=_stub(tmp_path, "python3", "3.10"), VENV=str(venv))
  _assert_one_line(proc, "is 3.10", "uv python install 3.11", "PYTHON")
  assert proc.stdout == "" and not venv.exists() and not (tmp_path / "run").exists()


TPU_VM = os.path.join(REPO, "launch", "tpu_vm.sh")
TPU_ARGS = ("ctrl-v5e", "us-west4-a", "configs/aesthetic.py", "gs://bucket/runs/aesthetic")


def _exe(path, text: str) -> str:
  path = str(path)
  with open(path, "w") as f:
    f.write("#!/bin/sh\n" + text)
  os.chmod(path, 0o755)
  return path


def _fake_gcloud(bin_dir, log) -> str:
  """Records its arguments; runs an ssh --command here (the one 'host' is this machine)."""
  path = os.path.join(bin_dir, "gcloud")
  with open(path, "w") as f:
    f.write("#!/usr/bin/env bash\n"
            f"echo \"$*\" >> {log}\n"
            "for a in \"$@\"; do\n"
            "  case $a in --command=*) exec bash -c \"${a#--command=}\";; esac\n"
            "done\n")
  os.chmod(path, 0o755)
  return path


def _lines(path) -> list[str]:
  return open(path).read().splitlines() if os.path.exists(path) else []


def _words(line: str) -> list[str]:
  """The words bash reads from `line` (a printed command, pasted into a shell)."""
  out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line],
                       capture_output=True, text=True, check=True, timeout=10).stdout
  return out.split("\0")[:-1]


def _host_script(gcloud_words: list[str]) -> str:
  """The script an `ssh --worker=all --command="bash -c SCRIPT"` runs on every host."""
  command = [w for w in gcloud_words if w.startswith("--command=")]
  assert len(command) == 1, gcloud_words
  bash, flag, script = _words(command[0][len("--command="):])
  assert (bash, flag) == ("bash", "-c")
  return script


# ----------------------------------------------------------------------------- tpu_vm --dry_run

def _dry_run(tmp_path, *args, **env) -> subprocess.CompletedProcess:
  """tpu_vm.sh --dry_run with a recording fake gcloud first on PATH and TMPDIR=tmp/t."""
  bin_dir, tmp = tmp_path / "bin", tmp_path / "t"
  bin_dir.mkdir(exist_ok=True)
  tmp.mkdir(exist_ok=True)
  _fake_gcloud(bin_dir, tmp_path / "gcloud.log")
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp), "HOME": str(tmp_path),
         **env}
  return _bash(TPU_VM, *args, **env)


@pytest.mark.parametrize("where", ["first", "last"])
def test_tpu_vm_dry_run_lists_every_command_and_each_process_environment(tmp_path, where):
  args = ("--dry_run",) + TPU_ARGS if where == "first" else TPU_ARGS + ("--dry_run",)
  proc = _dry_run(tmp_path, *args, ACCELERATOR_TYPE="v5e-16")
  assert (proc.returncode, proc.stderr) == (0, ""), (proc.stdout, proc.stderr)
  # nothing ran: no gcloud call, no tarball
  assert _lines(tmp_path / "gcloud.log") == [] and os.listdir(tmp_path / "t") == []
  lines = proc.stdout.splitlines()
  assert all(line.startswith(("gcloud ", "#")) for line in lines), proc.stdout
  commands = [_words(line) for line in lines if line.startswith("gcloud ")]
  assert [c[:5] for c in commands] == [["gcloud", "compute", "tpus", "tpu-vm", "scp"]] + [
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]] * 3
  for c in commands:
    assert "--worker=all" in c and "--zone=us-west4-a" in c, c
  scp, untar, install, run = commands
  tarball = os.path.join(tmp_path, "t", "ctrl_jax_src.tgz")
  assert scp[5:7] == [tarball, "ctrl-v5e:ctrl_jax_src.tgz"]
  assert f"tar czf {tarball}" in proc.stdout  # the local tar, as a comment
  assert "tar xzf ~/ctrl_jax_src.tgz -C ~/ctrl_jax" in _host_script(untar)

  install = _host_script(install)
  assert "check_python ()" in install  # the function travels with the command
  for part in ('check_python "$PY" REMOTE_PYTHON 2>/dev/null', "astral.sh/uv/install.sh",
               "pip install --user uv", "uv python install 3.11", "uv python find 3.11",
               'check_python "$PY" REMOTE_PYTHON || exit 1', '"$PY" -m venv "$V"',
               "PY=python3\n", ".ctrl_jax_tpu_installed", 'jax[tpu]==$JAX_VERSION'):
    assert part in install, part
  order = ["uv python install", 'check_python "$PY" REMOTE_PYTHON || exit 1', '"$PY" -m venv']
  assert [install.index(part) for part in order] == sorted(install.index(p) for p in order)

  run = _host_script(run)
  assert "export CTRL_JAX_DISTRIBUTED=1" in run
  flags = "--config=configs/aesthetic.py --workdir=gs://bucket/runs/aesthetic"
  stages = [line for line in run.splitlines() if " -m ctrl_jax.launch." in line]
  assert stages == [f"~/ctrl_jax_venv/bin/python -m ctrl_jax.launch.{stage} {flags}"
                    for stage in ("fit_classifier", "finetune")]

  workers = re.findall(r"^# worker (\d+): CTRL_JAX_DISTRIBUTED=1 \(process_id (\d+) of 4, "
                       r"coordinator: worker 0, from TPU metadata\)$", proc.stdout, re.M)
  assert workers == [(str(i), str(i)) for i in range(4)]
  assert "TPU VM metadata" in proc.stdout


def test_tpu_vm_dry_run_needs_no_gcloud(tmp_path):
  """PATH holds nothing but `dirname`: no gcloud, gsutil, git, tar or curl to run."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  os.symlink(shutil.which("dirname"), bin_dir / "dirname")
  proc = subprocess.run(["/bin/bash", TPU_VM, *TPU_ARGS, "--dry_run", "--config.num_epochs=8"],
                        capture_output=True, text=True, timeout=30, cwd=REPO,
                        env={"PATH": str(bin_dir), "HOME": str(tmp_path), "NUM_WORKERS": "2",
                             "WEIGHTS_FROM": "gs://bucket/weights/sd15/"})
  assert (proc.returncode, proc.stderr) == (0, ""), (proc.stdout, proc.stderr)
  commands = [_words(line) for line in proc.stdout.splitlines() if line.startswith("gcloud ")]
  assert len(commands) == 5  # scp, untar, install, weights, stages
  weights = _host_script(commands[3])
  assert "gsutil -m -q rsync -r gs://bucket/weights/sd15 ~/weights/sd15" in weights
  assert _host_script(commands[4]).count("--config.num_epochs=8") == 2
  assert "# worker 1: CTRL_JAX_DISTRIBUTED=1 (process_id 1 of 2," in proc.stdout


@pytest.mark.parametrize("accelerator, hosts", [
    ("v4-8", 1), ("v4-32", 4), ("v5p-8", 1), ("v5p-128", 16), ("v5litepod-4", 1),
    ("v5litepod-8", 1), ("v5e-16", 4), ("v5litepod-256", 64), ("v6e-8", 1), ("v6e-64", 16)])
def test_tpu_vm_hosts_of_a_slice_type(tmp_path, accelerator, hosts):
  proc = _dry_run(tmp_path, *TPU_ARGS, "--dry_run", SYNC="0", ACCELERATOR_TYPE=accelerator)
  assert proc.returncode == 0, proc.stderr
  ids = re.findall(r"^# worker (\d+): .* of (\d+),", proc.stdout, re.M)
  assert ids == [(str(i), str(hosts)) for i in range(hosts)]


@pytest.mark.parametrize("env, message", [
    (dict(ACCELERATOR_TYPE="v3-8"), "ACCELERATOR_TYPE=v3-8 is not"),
    (dict(NUM_WORKERS="0"), "NUM_WORKERS=0 is not a positive integer"),
    (dict(STAGES="fit_classifier nope"), "STAGES: 'nope'"),
    (dict(WEIGHTS_FROM="/data/sd15"), "WEIGHTS_FROM: '/data/sd15' is not gs://")])
def test_tpu_vm_refuses_bad_settings_in_one_line(tmp_path, env, message):
  _assert_one_line(_dry_run(tmp_path, *TPU_ARGS, "--dry_run", **env), message)
  assert _lines(tmp_path / "gcloud.log") == []


# ----------------------------------------------------------------------------- tpu_vm, run

def _host(tmp_path, *, uv_python: str = "3.11", with_uv: bool = True):
  """A fake host: $HOME with the repository copy, a fake gcloud running the host commands here,
  REMOTE_PYTHON a 3.10 stub named python3; uv (if `with_uv`) installs a stub Python
  `uv_python` whose `-m venv DIR` makes DIR/bin/{pip,python} stubs. Every stub logs its calls."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  (home / "ctrl_jax").mkdir(parents=True)
  bin_dir.mkdir()
  log = tmp_path / "calls.log"
  _fake_gcloud(bin_dir, tmp_path / "gcloud.log")
  old = _stub(bin_dir, "python3", "3.10")
  _exe(bin_dir / "curl", "exit 22\n")  # no network
  venv_pip = _exe(tmp_path / "venv_pip", f'echo "pip $*" >> {log}\n')
  venv_python = _exe(tmp_path / "venv_python",
                     'case "$1" in\n'
                     '  -c) case "$2" in *importlib*) echo 0.10.2;; *) echo python 3.11;; esac;;\n'
                     f'  -m) echo "run CTRL_JAX_DISTRIBUTED=$CTRL_JAX_DISTRIBUTED $PWD $*" >> {log};;\n'
                     'esac\n')
  py311 = _exe(tmp_path / "uv_python",
               f'case "$1" in\n  -c) echo {uv_python};;\n'
               f'  -m) echo "python $*" >> {log}; mkdir -p "$3/bin"; cp {venv_pip} "$3/bin/pip"; '
               f'cp {venv_python} "$3/bin/python";;\nesac\n')
  if with_uv:
    _exe(bin_dir / "uv", f'echo "uv $*" >> {log}\n[ "$2" = find ] && echo {py311}\nexit 0\n')
  env = dict(SYNC="0", REMOTE_PYTHON=old, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}")
  return home, log, env


def test_tpu_vm_installs_python_3_11_with_uv_once_then_runs_the_stages(tmp_path):
  home, log, env = _host(tmp_path)
  proc = _bash(TPU_VM, *TPU_ARGS, "--config.num_epochs=8", **env)
  assert proc.returncode == 0, (proc.stdout, proc.stderr)
  assert "installing Python 3.11 with uv" in proc.stdout
  venv, src = home / "ctrl_jax_venv", home / "ctrl_jax"
  flags = "--config=configs/aesthetic.py --workdir=gs://bucket/runs/aesthetic --config.num_epochs=8"
  stages = [f"run CTRL_JAX_DISTRIBUTED=1 {src} -m ctrl_jax.launch.{stage} {flags}"
            for stage in ("fit_classifier", "finetune")]
  assert _lines(log) == [
      "uv python install 3.11", "uv python find 3.11", f"python -m venv {venv}",
      "pip install -q --upgrade pip", f"pip install -q -e {src}",
      "pip install -q jax[tpu]==0.10.2 gcsfs", *stages]
  assert (venv / ".ctrl_jax_tpu_installed").read_text() == "jax[tpu]==0.10.2 python 3.11\n"
  assert len(_lines(tmp_path / "gcloud.log")) == 2  # install, stages
  # a rerun installs nothing (the marker), and runs the stages again
  proc = _bash(TPU_VM, *TPU_ARGS, "--config.num_epochs=8", **env)
  assert proc.returncode == 0 and "uv" not in proc.stdout, (proc.stdout, proc.stderr)
  assert _lines(log)[8:] == stages


def test_tpu_vm_keeps_a_good_remote_python(tmp_path):
  home, log, env = _host(tmp_path)
  env["REMOTE_PYTHON"] = str(tmp_path / "uv_python")  # 3.11: used as is, uv not called
  assert _bash(TPU_VM, *TPU_ARGS, STAGES="finetune", **env).returncode == 0
  assert _lines(log)[0] == f"python -m venv {home / 'ctrl_jax_venv'}"
  assert not any(line.startswith("uv ") for line in _lines(log))


def test_tpu_vm_stops_before_the_venv_when_uv_python_is_still_old(tmp_path):
  """The check runs on the host after uv: a wrong interpreter stops it in one line before the
  venv, and no stage runs."""
  home, log, env = _host(tmp_path, uv_python="3.10")
  proc = _bash(TPU_VM, *TPU_ARGS, **env)
  _assert_one_line(proc, f"REMOTE_PYTHON={tmp_path / 'uv_python'} is 3.10",
                   "uv python install 3.11")
  assert not (home / "ctrl_jax_venv").exists()
  assert _lines(log) == ["uv python install 3.11", "uv python find 3.11"]
  assert len(_lines(tmp_path / "gcloud.log")) == 1  # the environment step only: no stage ran


def test_tpu_vm_without_uv_or_network_fails_in_one_line(tmp_path):
  if shutil.which("uv"):
    pytest.skip("a real uv is on PATH")
  home, log, env = _host(tmp_path, with_uv=False)
  proc = _bash(TPU_VM, *TPU_ARGS, **env)
  _assert_one_line(proc, "could not install uv", "~/ctrl_jax_uv.log", "REMOTE_PYTHON")
  assert not (home / "ctrl_jax_venv").exists() and _lines(log) == []
  assert (home / "ctrl_jax_uv.log").exists()


# ----------------------------------------------------------------------------- hub downloads

# The files of the hub repositories the SD configs name (stable-diffusion-v1-5/
# stable-diffusion-v1-5, openai/clip-vit-large-patch14), plus other formats' copies.
SD15_REPO = [
    ".gitattributes", "README.md", "model_index.json", "v1-inference.yaml",
    "v1-5-pruned.ckpt", "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors", "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors",
    "safety_checker/model.fp16.safetensors", "safety_checker/pytorch_model.bin",
    "safety_checker/pytorch_model.fp16.bin", "safety_checker/flax_model.msgpack",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin", "text_encoder/flax_model.msgpack",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin", "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_flax_model.msgpack",
    "unet/model.onnx", "unet/weights.pb",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.bin", "vae/diffusion_flax_model.msgpack",
    "vae_decoder/model.onnx", "text_encoder/model.onnx"]
# What models/sd.py's load_sd opens: weights.load_unet / load_vae / load_text_encoder read each
# component's config.json and PyTorch safetensors (find_torch_weights: the fp32 file first),
# CLIPTokenizer.from_pretrained the tokenizer files.
SD15_NEEDED = [
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json"]
CLIP_REPO = [
    ".gitattributes", "README.md", "config.json", "flax_model.msgpack", "merges.txt",
    "model.safetensors", "preprocessor_config.json", "pytorch_model.bin",
    "special_tokens_map.json", "tf_model.h5", "tokenizer.json", "tokenizer_config.json",
    "vocab.json"]
# aesthetic.load_clip_vision and clip_score.ClipScorer: config.json, model.safetensors, and the
# slow CLIPTokenizer's files.
CLIP_NEEDED = ["config.json", "merges.txt", "model.safetensors", "special_tokens_map.json",
               "tokenizer_config.json", "vocab.json"]


def _constant(module: str, name: str):
  """A module-level literal of ctrl_jax/models/MODULE.py, read without importing jax."""
  with open(os.path.join(REPO, "ctrl_jax", "models", module + ".py")) as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
      return ast.literal_eval(node.value)
  raise KeyError(name)


def _kept(files, patterns):
  from huggingface_hub.utils import filter_repo_objects  # pylint: disable=g-import-not-at-top
  return sorted(filter_repo_objects(files, allow_patterns=list(patterns)))


def test_sd_download_keeps_exactly_what_the_loader_reads():
  patterns = _constant("sd", "SD_FILES")
  assert _kept(SD15_REPO, patterns) == sorted(SD15_NEEDED)
  # a sharded component: its index and shards, not another variant's
  sharded = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors.index.json",
             "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
             "unet/diffusion_pytorch_model-00002-of-00002.safetensors"]
  others = ["unet/diffusion_pytorch_model.fp16-00001-of-00002.safetensors",
            "unet/diffusion_pytorch_model-00001-of-00002.bin"]
  assert _kept(sharded + others, patterns) == sorted(sharded)


def test_clip_download_keeps_exactly_what_the_loaders_read():
  patterns = _constant("weights", "CLIP_FILES")
  assert _kept(CLIP_REPO, patterns) == sorted(CLIP_NEEDED)
  sharded = ["config.json", "model.safetensors.index.json",
             "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
  assert _kept(sharded + ["model.fp16-00001-of-00002.safetensors"], patterns) == sorted(sharded)


def test_resolve_folder_callers_pass_their_patterns():
  """sd.load_sd passes SD_FILES; the CLIP callers (clip_score, and the aesthetic classifier
  through the default) CLIP_FILES."""
  def source(path):
    with open(os.path.join(REPO, path)) as f:
      return f.read()
  assert "weights.resolve_folder(path_or_hub_id, SD_FILES)" in source("ctrl_jax/models/sd.py")
  assert "resolve_folder(folder, weights.CLIP_FILES)" in source("ctrl_jax/models/clip_score.py")
  assert "allow_patterns: Sequence[str] = CLIP_FILES" in source("ctrl_jax/models/weights.py")
