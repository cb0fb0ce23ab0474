"""The CPU kernel of the banded rotation (kernels/band_chain.c): built once per machine, loaded with ctypes.

The source is compiled with the system C compiler (`$CC`, default `cc`) into
`$ROPO_RAY_KERNEL_CACHE` (default `~/.cache/ropo_ray/kernels`) for `-march=$ROPO_RAY_KERNEL_MARCH`
(default `native`; an image built for many machines sets a portable level such as `x86-64-v3` and
builds the kernel into the image). The file name hashes the source and the flags, and with `native` this
CPU's feature flags too, so a cache shared between unlike nodes never loads code built for another CPU.
The library is published with an atomic rename, so concurrent Ray workers that build at the same time
each load a complete file. No torch headers: the build takes about a second.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("kernels") / "band_chain.c"


class KernelUnavailable(RuntimeError):
    """The native kernel cannot be built or loaded here (no compiler, or the build failed)."""


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _march() -> str:
    return os.environ.get("ROPO_RAY_KERNEL_MARCH", "native")


def _flags() -> list[str]:
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append(f"-march={_march()}")
    elif platform.machine() in ("aarch64", "arm64"):
        flags.append(f"-mcpu={_march()}")
    return flags


def cache_dir() -> Path:
    return Path(os.environ.get("ROPO_RAY_KERNEL_CACHE", Path.home() / ".cache" / "ropo_ray" / "kernels")).expanduser()


def _build(compiler: str, flags: list[str], target: Path, source: Path = SOURCE) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        out = Path(scratch) / target.name
        # An argument list, never a shell: paths are used as given.
        proc = subprocess.run([compiler, *flags, str(source), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelUnavailable(f"building {source.name} with {compiler} failed:\n{proc.stderr.strip()}")
        os.replace(out, target)


def build_version(source: Path, target: Path) -> None:
    """Build `source` (a version of the kernel) into `target` as `library` builds SOURCE (benchmarks/bench_kernel.py
    compares builds of two revisions); `open_version` loads it."""
    _build(os.environ.get("CC", "cc"), _flags(), target, source)


def open_version(target: Path, names: tuple[str, ...]) -> ctypes.CDLL:
    """A built kernel version with its functions `names` declared (SIGNATURES)."""
    return _declare(ctypes.CDLL(str(target)), names)


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded kernel library, built on first use. Raises KernelUnavailable with the reason."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"no C compiler {compiler!r} on PATH (set CC, or adapter.kernel=torch)")
    flags = _flags()
    cpu = _cpu_flags() if _march() == "native" else ""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *flags, platform.machine(), cpu])
                         .encode()).hexdigest()[:16]
    target = cache_dir() / f"band_chain-{key}.so"
    if not target.exists():
        _build(compiler, flags, target)
    return _declare(ctypes.CDLL(str(target)))


_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {  # the kernel's functions: argument types, result type
    "chain_forward": ([_P, _I32, _P, _I32, _P, _P, _I32, _I64, _I64, _I32], None),
    "chain_backward": ([_P, _I32, _P, _I32, _P, _I32, _P, _P, _P, _I32, _I64, _I64, _I32], None),
    "scale_backward": ([_P, _I32, _P, _I32, _P, _P, _P, _I32, _P, _I64, _I64, _I32], None),
    "scale_forward": ([_P, _I32, _P, _P, _I64, _I64, _I32], None),
    "vector_lanes": ([], _I32),
    "cayley_coefficients": ([_P, _I64, _I64, _I32, _P, _P, _I64, _P, _I64, _P, _I32], None),
    "cayley_coefficients_backward": ([_P, _I64, _P, _P, _I64, _P, _I64, _I64, _I32, _P, _I32], None),
    "count_zeros": ([_P, _I64], _I64),
}


def _declare(lib: ctypes.CDLL, names: tuple[str, ...] = tuple(SIGNATURES)) -> ctypes.CDLL:
    """Give the functions `names` of `lib` their argument and result types (SIGNATURES)."""
    for name in names:
        function = getattr(lib, name)
        function.argtypes, function.restype = SIGNATURES[name]
    return lib


def vector_lanes() -> int:
    """Floats per vector of the built kernel (16 with AVX-512, 8 with AVX, 4 otherwise): factors whose block
    size divides it take the kernel's lane form (rotation.band_layout)."""
    return library().vector_lanes()


def available() -> tuple[bool, str]:
    """(True, "") when the kernel loads, else (False, why)."""
    try:
        library()
    except (KernelUnavailable, OSError) as err:
        return False, str(err)
    return True, ""
