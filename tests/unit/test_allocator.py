"""train.allocator: the environment that preloads jemalloc, and how a process tells which allocator it runs on."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ropo_ray.config.training import TrainConfig
from ropo_ray.train.allocator import JEMALLOC, allocator_warning, loaded_allocator, worker_env

PROBE = "from ropo_ray.train.allocator import loaded_allocator; print(loaded_allocator())"


def run_probe(env: dict[str, str], probe: str = PROBE) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    return subprocess.run([sys.executable, "-c", probe], env={**clean, **env}, capture_output=True, text=True,
                          check=True)


def test_worker_env_preloads_jemalloc_first_and_keeps_other_preloads():
    assert worker_env("system") == {}
    assert worker_env("system", "/opt/libfoo.so") == {}  # the workers inherit it untouched
    assert worker_env("jemalloc") == {"LD_PRELOAD": "libjemalloc.so.2"}
    assert worker_env("jemalloc", conf="dirty_decay_ms:-1") == {"LD_PRELOAD": "libjemalloc.so.2",
                                                                "MALLOC_CONF": "dirty_decay_ms:-1"}
    assert worker_env("system", conf="dirty_decay_ms:-1") == {}  # glibc has no use for jemalloc's options
    assert worker_env("jemalloc", "/opt/libfoo.so  /usr/lib/x86_64-linux-gnu/libjemalloc.so.2") == {
        "LD_PRELOAD": "libjemalloc.so.2 /opt/libfoo.so"}
    with pytest.raises(ValueError, match="tcmalloc"):
        worker_env("tcmalloc")


def test_loaded_allocator_reads_the_mapped_libraries():
    libc = "7f1c2a000000-7f1c2a028000 r--p 00000000 fd:01 1835 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    heap = "55d0c4a6b000-55d0c4a8c000 rw-p 00000000 00:00 0 [heap]\n"
    jemalloc = "7f1c29c00000-7f1c29c0b000 r--p 00000000 fd:01 2201 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    assert loaded_allocator(libc + heap) == "system"
    assert loaded_allocator(libc + jemalloc + heap) == "jemalloc"
    # a file that merely mentions jemalloc in a folder name is not the library
    assert loaded_allocator(libc + "7f00-7f01 r--p 0 fd:01 9 /home/u/libjemalloc-notes/data.bin\n") == "system"


def test_a_process_started_with_the_worker_env_runs_on_jemalloc():
    """The real preload, as Ray starts a worker with these env_vars (needs Debian's libjemalloc2, which the
    project's setup installs)."""
    assert run_probe({}).stdout.strip() == "system"
    started = run_probe(worker_env("jemalloc"))
    assert "cannot be preloaded" not in started.stderr, f"{JEMALLOC} is missing: apt-get install libjemalloc2"
    assert started.stdout.strip() == "jemalloc"


def test_allocator_warning_names_the_missing_library():
    assert allocator_warning("jemalloc", "jemalloc") is None
    assert allocator_warning("system", "system") is None
    assert "libjemalloc2" in allocator_warning("jemalloc", "system")
    assert "glibc" in allocator_warning("jemalloc", "system")


def test_a_worker_started_with_the_default_conf_keeps_its_freed_pages():
    """jemalloc reads train.jemalloc_conf from the worker env: decay -1 (never return freed pages) by default,
    against jemalloc's own 10,000 ms dirty / 0 ms muzzy decay (its documented defaults in 5.3) without it.
    Read back through jemalloc's mallctl in the started process, not from the env we set."""
    probe = ("from ropo_ray.train.allocator import jemalloc_option as o; "
             "print(o('opt.dirty_decay_ms'), o('opt.muzzy_decay_ms'))")
    conf = TrainConfig().jemalloc_conf
    assert run_probe(worker_env("jemalloc", conf=conf), probe).stdout.split() == ["-1", "-1"]
    assert run_probe(worker_env("jemalloc"), probe).stdout.split() == ["10000", "0"]
    assert run_probe({}, probe).stdout.split() == ["None", "None"]  # glibc: no jemalloc to ask
