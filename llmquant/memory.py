"""Memory: what is free on a device, and giving freed memory back to the system between layers."""

from __future__ import annotations

import functools

import torch


def free_bytes(device: torch.device, all_gpus: bool = False) -> int:
    """Bytes free on ``device``: a GPU's free memory (with ``all_gpus``: summed over every visible GPU), or the
    host's available memory."""
    if device.type == "cuda":
        gpus = range(torch.cuda.device_count()) if all_gpus else [device]
        return sum(torch.cuda.mem_get_info(g)[0] for g in gpus)
    import psutil

    return psutil.virtual_memory().available


@functools.cache
def _libc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def give_memory_back(device: torch.device | None = None) -> None:
    """Return freed heap memory to the system. glibc raises its mmap threshold each time a large block is
    freed, so the next layer's temporaries come from the heap and, once freed, stay counted in the process's
    memory (measured: +400 MB per layer of a 1B model) unless trimmed. With a CUDA ``device`` (between decoder
    layers), also the blocks PyTorch's caching allocator keeps for reuse, so that one layer's sizes do not fragment
    the next's and the GPU's free memory reads true (what the memory checks read)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def peaks(device: torch.device) -> dict:
    """The process's peak memory so far: host (resident set) and, on a CUDA device, GPU memory allocated."""
    import resource

    out = {"host_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # (Linux counts KB)
    if torch.device(device).type == "cuda":
        out["gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


M_MMAP_THRESHOLD = -3  # mallopt: allocations of at least this many bytes get their own mapping
STEADY_MMAP_THRESHOLD = 4 << 20


def steady_heap() -> None:
    """From now on, serve every allocation of 4 MB or more with its own mapping, unmapped as soon as it is freed.

    By default glibc raises that threshold (up to 32 MB) each time a large block is freed, so that a calibrated
    layer's many weight-sized temporaries (4 to 32 MB) come from the heap, fragment it and stay counted until
    trimmed; how much is left over depends on the order things were freed, so each layer peaks differently and the
    run's peak is the worst of them. Measured with GPTQ on a 4-layer model of the 1B model's widths: 1.05 GB
    without, 0.97 GB with 4 MB in about the same time; 1 MB took a third longer (every smaller temporary mapped and
    faulted in anew), 16 MB saved nothing."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim the pages now; their contents are kept (re-read from the file when used)


def _file_mapping(start: int, end: int) -> bool:
    """Whether the bytes [start, end) of this process lie in one mapping of a file (not anonymous memory)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= start < hi:
                    return end <= hi and len(parts) == 6 and parts[4] != "0" and not parts[5].startswith("[")
    except OSError:  # not Linux
        pass
    return False


def maps_a_file(t) -> bool:
    """Whether a tensor's bytes are a view of a mapped file (see :func:`give_file_pages_back`)."""
    return (t is not None and t.device.type == "cpu" and t.numel() > 0
            and _file_mapping(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))


def give_file_pages_back(tensors) -> int:
    """Drop from this process's memory the pages of CPU tensors that are views of a mapped file (transformers and
    safetensors load a tensor whose dtype matches the file's without copying it): once read they stay counted in
    the process's resident memory until the mapping closes, although the file holds them. The kernel reads them
    again from the file if a tensor is used again, so nothing changes but the memory; a tensor in anonymous memory
    is left alone. Returns the bytes advised."""
    import mmap

    madvise = _madvise()
    if madvise is None:
        return 0
    page = mmap.PAGESIZE
    done = 0
    for t in tensors:
        if t is None or not t.is_contiguous() or not maps_a_file(t):
            continue
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        lo, hi = -(-start // page) * page, end // page * page  # only the pages that hold nothing else
        if hi <= lo:
            continue
        if madvise(lo, hi - lo, MADV_PAGEOUT) == 0:
            done += hi - lo
    return done


@functools.cache
def _madvise():
    import ctypes

    libc = _libc()
    if libc is None or not hasattr(libc, "madvise"):
        return None
    f = libc.madvise
    f.argtypes, f.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return f


def import_bitsandbytes():
    """Import bitsandbytes without the compiler it pulls in for functions a run does not call.

    On import, bitsandbytes (0.45 to 0.50) wraps four pure-PyTorch fallbacks (blockwise and 4-bit dequantization for
    devices or shapes without a native kernel, two optimizer steps) in ``torch.compile``, which imports Inductor
    before anything is compiled: 0.1 GB more at the peak of a streamed run on the CPU, and over a second. Imported
    here, those four stay plain functions (bitsandbytes' wrapper already falls back to them whenever compiling
    fails); every other kernel is bitsandbytes' own. Does nothing once bitsandbytes is imported."""
    import sys

    import torch

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]

    def plain(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    compile_ = torch.compile
    torch.compile = plain
    try:
        import bitsandbytes
    finally:
        torch.compile = compile_
    return bitsandbytes
