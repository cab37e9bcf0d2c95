"""libbpf through ctypes: open and load an object, its maps (lookup, update, batch update, delete,
keys), and BPF_PROG_TEST_RUN. Knows nothing about DSR.

libbpf 1.x returns -errno from int functions and NULL (errno set) from pointer functions; every
pointer-returning function gets restype c_void_p, or ctypes truncates the pointer to an int.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from vipd.errors import DataplaneError

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "bpf" / "dsr.c"
OBJECT = REPO / "build" / "dsr.o"
CLANG_FLAGS = ("-O2", "-g", "-Wall", "-target", "bpf", "-I/usr/include/x86_64-linux-gnu")


class BpfError(DataplaneError):
    """libbpf or the kernel refused: loading, a map operation, a test run."""


class _TestRunOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
                ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
                ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


_lib: Optional[ctypes.CDLL] = None


def libbpf() -> ctypes.CDLL:
    """libbpf.so.1 with the signatures vipd uses. BpfError when it cannot be loaded."""
    global _lib
    if _lib is not None:
        return _lib
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("bpf") or "libbpf.so.1", use_errno=True)
    except OSError as e:
        raise BpfError(f"libbpf is not installed (Debian: libbpf1): {e}") from None
    vp, i, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "bpf_object__open_file": (vp, [ctypes.c_char_p, vp]),
        "bpf_object__load": (i, [vp]),
        "bpf_object__close": (None, [vp]),
        "bpf_object__find_program_by_name": (vp, [vp, ctypes.c_char_p]),
        "bpf_object__find_map_by_name": (vp, [vp, ctypes.c_char_p]),
        "bpf_program__fd": (i, [vp]),
        "bpf_map__fd": (i, [vp]),
        "bpf_map__key_size": (u, [vp]),
        "bpf_map__value_size": (u, [vp]),
        "bpf_map__max_entries": (u, [vp]),
        "bpf_map__type": (i, [vp]),
        "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (i, [i, vp, vp]),
        "bpf_map_delete_elem": (i, [i, vp]),
        "bpf_map_get_next_key": (i, [i, vp, vp]),
        "bpf_map_update_batch": (i, [i, vp, vp, ctypes.POINTER(u), vp]),
        "bpf_prog_test_run_opts": (i, [i, ctypes.POINTER(_TestRunOpts)]),
        "libbpf_num_possible_cpus": (i, []),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    _lib = lib
    return lib


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise BpfError(f"{what}: {os.strerror(-rc)} (errno {-rc})")
    return rc


PERCPU_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH


class BpfMap:
    """One map of a loaded object; keys and values are bytes of the map's exact sizes."""

    def __init__(self, ptr: int, name: str) -> None:
        lib = libbpf()
        self.name = name
        self.fd = lib.bpf_map__fd(ptr)
        self.key_size = lib.bpf_map__key_size(ptr)
        self.value_size = lib.bpf_map__value_size(ptr)
        self.max_entries = lib.bpf_map__max_entries(ptr)
        self.percpu = lib.bpf_map__type(ptr) in PERCPU_TYPES
        self.ncpus = lib.libbpf_num_possible_cpus() if self.percpu else 1
        self._stride = (self.value_size + 7) // 8 * 8 if self.percpu else self.value_size

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: key of {len(key)} bytes, the map takes {self.key_size}")
        return ctypes.create_string_buffer(key, len(key))

    def update(self, key: bytes, value: bytes) -> None:
        if len(value) != self.value_size or self.percpu:
            raise ValueError(f"{self.name}: value of {len(value)} bytes, the map takes {self.value_size}")
        v = ctypes.create_string_buffer(value, len(value))
        _check(libbpf().bpf_map_update_elem(self.fd, self._key(key), v, 0), f"update {self.name}")

    def lookup(self, key: bytes) -> Optional[bytes]:
        """The value (percpu maps: the per-CPU values concatenated, each padded to 8 bytes)."""
        size = self._stride * self.ncpus
        v = ctypes.create_string_buffer(size)
        rc = libbpf().bpf_map_lookup_elem(self.fd, self._key(key), v)
        if rc == -2:
            return None
        _check(rc, f"lookup {self.name}")
        return v.raw

    def percpu_values(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key) or b""
        return [raw[i * self._stride:i * self._stride + self.value_size] for i in range(self.ncpus)]

    def delete(self, key: bytes) -> bool:
        rc = libbpf().bpf_map_delete_elem(self.fd, self._key(key))
        if rc == -2:
            return False
        _check(rc, f"delete {self.name}")
        return True

    def keys(self) -> Iterator[bytes]:
        lib = libbpf()
        cur: Optional[ctypes.Array[ctypes.c_char]] = None
        nxt = ctypes.create_string_buffer(self.key_size)
        for _ in range(self.max_entries + 1):
            rc = lib.bpf_map_get_next_key(self.fd, cur, nxt)
            if rc == -2:
                return
            _check(rc, f"next key of {self.name}")
            yield nxt.raw
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)

    def update_batch(self, keys: bytes, values: bytes, count: int) -> None:
        """One syscall for `count` elements (arrays: the slot numbers as u32 keys)."""
        if len(keys) != count * self.key_size or len(values) != count * self.value_size:
            raise ValueError(f"{self.name}: batch sizes do not match {count} elements")
        n = ctypes.c_uint32(count)
        _check(libbpf().bpf_map_update_batch(self.fd, keys, values, ctypes.byref(n), None),
               f"batch update {self.name}")
        if n.value != count:
            raise BpfError(f"batch update {self.name}: {n.value} of {count} elements written")


@dataclass
class TestRun:
    verdict: int  # the program's return value
    data: bytes  # the frame after the program
    duration_ns: int  # mean per repetition


class BpfObject:
    """A loaded object file. Its fds live as long as this object (close() or process exit); a tc
    filter that attached the program keeps program and maps alive after that."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        lib = libbpf()
        self._lib = lib
        ptr = lib.bpf_object__open_file(os.fsencode(path), None)
        if not ptr:
            err = ctypes.get_errno()
            raise BpfError(f"cannot open {path}: {os.strerror(err)}")
        self._ptr: Optional[int] = ptr
        rc = lib.bpf_object__load(ptr)
        if rc < 0:
            lib.bpf_object__close(ptr)
            self._ptr = None
            raise BpfError(f"the kernel refused {path}: {os.strerror(-rc)} (errno {-rc}); "
                           "needs CAP_BPF/CAP_SYS_ADMIN and a kernel with BPF and tc BPF support")

    def program_fd(self, name: str) -> int:
        prog = self._lib.bpf_object__find_program_by_name(self._ptr, name.encode())
        if not prog:
            raise BpfError(f"no program {name!r} in the object")
        return _check(self._lib.bpf_program__fd(prog), f"fd of {name}")

    def map(self, name: str) -> BpfMap:
        m = self._lib.bpf_object__find_map_by_name(self._ptr, name.encode())
        if not m:
            raise BpfError(f"no map {name!r} in the object")
        return BpfMap(m, name)

    def test_run(self, prog: str, frame: bytes, *, repeat: int = 1, ctx: bytes | None = None) -> TestRun:
        """BPF_PROG_TEST_RUN: run the program on `frame` (repeat times) in the kernel, no traffic."""
        out = ctypes.create_string_buffer(max(len(frame), 64) + 256)
        din = ctypes.create_string_buffer(frame, len(frame))
        opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.addressof(din),
                            data_out=ctypes.addressof(out), data_size_in=len(frame),
                            data_size_out=len(out), repeat=repeat)
        cbuf = None
        if ctx is not None:
            cbuf = ctypes.create_string_buffer(ctx, len(ctx))
            opts.ctx_in, opts.ctx_size_in = ctypes.addressof(cbuf), len(ctx)
        _check(self._lib.bpf_prog_test_run_opts(self.program_fd(prog), ctypes.byref(opts)), "test run")
        return TestRun(opts.retval, out.raw[:opts.data_size_out], opts.duration)

    def close(self) -> None:
        if self._ptr:
            self._lib.bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def compile_object(out: Path = OBJECT, source: Path = SOURCE) -> Path:
    """clang the program into `out` (what `make bpf` does) when it is missing or older than the
    source. BpfError naming what is missing when clang or the headers are not there."""
    if out.exists() and out.stat().st_mtime >= source.stat().st_mtime:
        return out
    clang = shutil.which("clang")
    if clang is None:
        raise BpfError("clang is not installed (Debian: clang llvm libbpf-dev linux-libc-dev): "
                       f"cannot build {source.name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    res = subprocess.run([clang, *CLANG_FLAGS, "-c", str(source), "-o", str(tmp)],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise BpfError(f"clang could not build {source.name}: {res.stderr.strip().splitlines()[-1:]}")
    tmp.replace(out)
    return out


def find_object() -> Path:
    """The director's object: $VIPD_DSR_OBJECT, else build/dsr.o (compiled from bpf/dsr.c if needed)."""
    env = os.environ.get("VIPD_DSR_OBJECT")
    if env:
        if not os.path.exists(env):
            raise BpfError(f"VIPD_DSR_OBJECT={env} does not exist")
        return Path(env)
    if not SOURCE.exists():
        if OBJECT.exists():
            return OBJECT
        raise BpfError(f"neither {OBJECT} nor its source {SOURCE} is installed")
    return compile_object()


def unavailable() -> str | None:
    """Why this host cannot run the DSR director (None: libbpf loads and the object is there or
    buildable). Read-only apart from building build/dsr.o; the kernel's own verdict comes at load."""
    try:
        libbpf()
        find_object()
    except BpfError as e:
        return str(e)
    if not os.path.exists("/sys/fs/bpf") and not os.path.exists("/proc/sys/kernel/unprivileged_bpf_disabled"):
        return "this kernel has no BPF support (no /proc/sys/kernel/unprivileged_bpf_disabled)"
    return None
