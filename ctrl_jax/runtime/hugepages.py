"""Transparent huge pages for XLA:CPU's buffers: the launchers re-execute themselves once with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`.

Why: XLA:CPU allocates an executable's temporary buffer afresh on every call, and glibc serves
allocations that large with a fresh mmap, so every call touches hundreds of MiB of new 4 KiB
pages, each a page fault the kernel must zero. One CTRL update of the digits `ink` config
(1.7 s) took 259 000 page faults and 0.6 s of kernel time. glibc ≥ 2.35 can advise the kernel
to back malloc's mappings with 2 MiB pages (the `glibc.malloc.hugetlb=1` tunable); a kernel
whose THP mode is "madvise" (the common default) then faults 512× less (bench/host_alloc.py).
With THP "always" the kernel already does it; with "never" nothing helps.

glibc reads tunables only at process start, hence the re-execution; it happens before jax is
imported, so it costs a fraction of a second. `CTRL_JAX_HUGEPAGES=0` turns it off.
"""
import os
import platform
import re
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "CTRL_JAX_HUGEPAGES"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> str:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"; "" if unknown)."""
  try:
    with open(path) as f:
      match = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return ""
  return match.group(1) if match else ""


def hugepage_environment(environ: Mapping[str, str], libc: tuple[str, str],
                         mode: str) -> Optional[dict[str, str]]:
  """The environment to re-execute with, or None when it would change nothing.

  Args:
    environ: the current environment.
    libc: (name, version) of the C library, as `platform.libc_ver()` gives it.
    mode: the kernel's THP mode (`thp_mode()`).
  """
  if environ.get(OPT_OUT, "1") == "0":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in tunables:  # already set (by us or by the user): never loop
    return None
  name, version = libc
  numbers = tuple(int(v) for v in re.findall(r"\d+", version)[:2])
  if name != "glibc" or len(numbers) < 2 or numbers < (2, 35) or mode != "madvise":
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{TUNABLE}=1"]))}


def reexec_with_hugepages() -> None:
  """Replaces this process by the same command line with huge pages on, when that helps.

  Call it first thing in a `__main__` (before jax is imported); it returns only when nothing is
  to be gained (or on a failure to re-execute, which it reports).
  """
  env = hugepage_environment(os.environ, platform.libc_ver(), thp_mode())
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError as e:  # e.g. a sandbox that forbids exec: run on, slower
    print(f"[hugepages] could not re-execute with {TUNABLE}=1 ({e}); continuing without "
          "huge pages.", file=sys.stderr, flush=True)
