"""The memory allocator of the training workers (`train.allocator`): glibc's malloc or jemalloc.

A training step allocates and frees activations of many sizes. glibc's malloc keeps much of what the first
forward touched in its heap (its mmap threshold rises with the sizes it sees freed), so a worker's resident
memory settles well above what it holds live; jemalloc returns freed pages to the kernel after a decay time
and keeps the peak closer to the live set (measured side by side in benchmarks/BENCHMARKS.md).

An allocator has to be in place before the process allocates anything, so it cannot be switched from
Python: the Ray Train worker actors are started with `LD_PRELOAD` in their runtime env
(`RunConfig.worker_runtime_env`). The library is named, not given as a path, so each node's dynamic loader
finds its own copy (Debian and Ubuntu: `apt-get install libjemalloc2`; the project's setup installs it). A
node without it starts the worker on glibc's malloc (the loader prints that it ignored the preload); the
worker then says so (`allocator_warning`), and trains as before.

jemalloc's own options travel the same way, as MALLOC_CONF (`train.jemalloc_conf`). By default the workers
keep their freed pages (no decay): jemalloc's default returns pages freed for 10 s gradually, starting at
once, so every step faulted in fresh zeroed pages for activations the previous step had just freed.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

JEMALLOC = "libjemalloc.so.2"


def worker_env(allocator: str, inherited: str = "", conf: str = "") -> dict[str, str]:
    """Environment variables that start a worker process on `allocator` ("system" or "jemalloc").

    `inherited`: an LD_PRELOAD the workers would otherwise get (kept after jemalloc, which must come first
    to replace malloc). `conf`: jemalloc's options (MALLOC_CONF; empty: its defaults)."""
    if allocator == "system":
        return {}
    if allocator == "jemalloc":
        others = [lib for lib in inherited.split() if lib and Path(lib).name != JEMALLOC]
        return {"LD_PRELOAD": " ".join([JEMALLOC, *others]), **({"MALLOC_CONF": conf} if conf else {})}
    raise ValueError(f"train.allocator: unknown allocator {allocator!r} (system, jemalloc)")


def jemalloc_option(name: str) -> int | None:
    """The value of jemalloc's integer-valued option `name` (e.g. "opt.dirty_decay_ms") in this process, read
    through its `mallctl`; None when jemalloc is not loaded."""
    if loaded_allocator() != "jemalloc":
        return None
    value, size = ctypes.c_ssize_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
    mallctl = ctypes.CDLL(None).mallctl  # the preloaded library's symbol, found in the global scope
    if mallctl(name.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) != 0:
        raise ValueError(f"jemalloc has no option {name!r}")
    return value.value


def loaded_allocator(maps: str | None = None) -> str:
    """"jemalloc" when this process has jemalloc mapped (/proc/self/maps, or `maps`), else "system"."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:  # not Linux: no preload was attempted either
            return "system"
    return "jemalloc" if any(Path(line.split()[-1]).name.startswith("libjemalloc")
                             for line in maps.splitlines() if "/" in line) else "system"


def allocator_warning(asked: str, loaded: str) -> str | None:
    """A warning when the worker does not run on the allocator the config asked for, else None."""
    if asked == loaded:
        return None
    if asked == "jemalloc":
        return (f"train.allocator=jemalloc, but {JEMALLOC} is not loaded in this worker (not installed on this "
                "node? apt-get install libjemalloc2): it runs on glibc's malloc, with a higher peak memory")
    return f"train.allocator={asked}, but this worker runs on {loaded}"
