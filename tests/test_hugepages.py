"""ctrl_jax.runtime.hugepages: when the launchers re-execute with glibc's huge-page tunable, and
that it takes effect (a page-fault count, on hosts where it applies)."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from ctrl_jax.runtime import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = ("glibc", "2.36")


@pytest.mark.parametrize("environ,libc,mode,expected", [
    ({}, GLIBC, "madvise", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC, "madvise",
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, "madvise", None),  # the user's choice
    ({"CTRL_JAX_HUGEPAGES": "0"}, GLIBC, "madvise", None),
    ({}, ("glibc", "2.31"), "madvise", None),  # no such tunable before 2.35
    ({}, ("", ""), "madvise", None),           # musl, macOS
    ({}, GLIBC, "always", None),               # the kernel already does it
    ({}, GLIBC, "never", None),                # nothing would help
    ({}, GLIBC, "", None),
])
def test_hugepage_environment(environ, libc, mode, expected):
  env = hugepages.hugepage_environment({"PATH": "/bin", **environ}, libc, mode)
  if expected is None:
    assert env is None
  else:
    assert env["GLIBC_TUNABLES"] == expected
    assert env["PATH"] == "/bin"


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert hugepages.thp_mode(str(path)) == "madvise"
  assert hugepages.thp_mode(str(tmp_path / "missing")) == ""


_CHILD = textwrap.dedent("""
    import os, resource, sys
    print("start", os.getpid(), flush=True)
    from ctrl_jax.runtime import hugepages
    hugepages.reexec_with_hugepages()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = bytearray(512 * 2**20)  # malloc'd and zero-filled (numpy would madvise by itself)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print("tunables", os.environ.get("GLIBC_TUNABLES", ""), "pid", os.getpid(),
          "faults", faults, "size", len(x), flush=True)
""")


def _child(env_overrides):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CTRL_JAX_HUGEPAGES")}
  env.update(env_overrides)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split()
  return out


@pytest.mark.skipif(hugepages.hugepage_environment({}, platform.libc_ver(),
                                                   hugepages.thp_mode()) is None,
                    reason="this host gains nothing (not glibc ≥ 2.35 with THP 'madvise')")
def test_reexec_keeps_the_process_and_cuts_page_faults():
  on = _child({})
  off = _child({"CTRL_JAX_HUGEPAGES": "0"})
  # Re-executed once (two "start" lines), in place (same pid: a parent's kill still reaches it).
  assert on.count("start") == 2 and off.count("start") == 1
  assert on[1] == on[3] == on[on.index("pid") + 1]
  assert on[on.index("tunables") + 1] == "glibc.malloc.hugetlb=1"
  assert on[on.index("size") + 1] == off[off.index("size") + 1] == str(512 * 2**20)
  faults_on = int(on[on.index("faults") + 1])
  faults_off = int(off[off.index("faults") + 1])
  # 4 KiB pages: ≥ 131 072 faults for 512 MiB; 2 MiB pages: ~256 (the kernel may fall back to
  # small pages for some of them when memory is fragmented, hence only a 4× bound).
  assert faults_off > 100_000, faults_off
  assert faults_on < faults_off / 4, (faults_on, faults_off)
