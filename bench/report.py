"""What the benchmarks share: the --config/--workdir/--out arguments, a markdown table on
stdout and a JSON file of the results."""
import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def workdir_parser(name: str, description: str = "") -> argparse.ArgumentParser:
  """A parser with the arguments of the benchmarks that run on a digits workdir: --config
  (configs/FILE.py[:variant]), --workdir (required) and --out (bench/results/NAME.json)."""
  ap = argparse.ArgumentParser(description=description)
  ap.add_argument("--config", default="configs/digits.py:ink",
                  help="configs/FILE.py[:variant]")
  ap.add_argument("--workdir", required=True, help="the run's directory")
  ap.add_argument("--out", default=f"bench/results/{name}.json", help="results JSON")
  return ap


def load_config(spec: str):
  """The ConfigDict of "path/to/config.py[:variant]" (as absl's config flag reads it)."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise SystemExit(f"--config={spec!r}: no config file {path!r}.")
  configs = os.path.join(REPO, "configs")
  if configs not in sys.path:
    sys.path.insert(0, configs)
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def print_table(head: tuple[str, ...], rows: list[list[str]]) -> None:
  """Prints a markdown table: `head` and one list of already formatted cells per row."""
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(cells) + " |" for cells in rows]
  print("\n".join(lines))


def run_child(script: str, *argv) -> dict:
  """`python script *argv` in a fresh process on one CPU device (no forced device count, no
  huge pages), from the repository root: the JSON object on the last line of its stdout."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "CTRL_JAX_HUGEPAGES": "0"}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a plain run on this machine
  proc = subprocess.run([sys.executable, os.path.abspath(script), *argv], cwd=REPO, env=env,
                        capture_output=True, text=True)
  if proc.returncode:
    raise SystemExit(f"{argv} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(path: str, payload: dict) -> None:
  """Writes `payload` plus the machine's description to `path` (folders created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({**payload, "machine": platform.platform(), "cpu_count": os.cpu_count(),
               "libc": platform.libc_ver()}, f, indent=2)
  print(f"wrote {path}")


def lower_and_compile(fn, *args):
  """(compiled, lower seconds, compile seconds) of a jitted `fn` at `args`."""
  import time  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  lowered = fn.lower(*args)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, lower_s, time.perf_counter() - t0


def median_seconds(fn, *args, repeats: int) -> float:
  """Median wall time of `repeats` calls of `fn(*args)` (each waited for), after one warm-up."""
  import statistics  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)
