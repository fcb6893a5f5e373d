"""Hardware decisions made once: CPU threads and numeric precision."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import contextmanager
from functools import lru_cache


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(threads: int | None = None) -> int:
    """Pin torch to the cores we may really use.

    torch sizes its pool from the host's core count; on a shared or containerised machine that
    oversubscribes the cores we have, and two busy processes on 2 cores can run 45x slower.
    Under torchrun each rank gets its share.
    """
    import torch
    world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = threads or max(1, available_cores() // world)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


# glibc's mallopt parameters (malloc.h) and the values it starts with
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_TOP_PAD: 128 * 1024, _M_MMAP_MAX: 65536}
# while training: never map a block of its own, keep up to 2 GiB free at the heap's top (mallopt
# takes a C int: a larger value wraps, and 1 << 46 silently became 0, trim always), grow it by
# 256 MiB at a time
_TRAINING_ALLOCATOR = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1, _M_TOP_PAD: 256 << 20}


@lru_cache(maxsize=1)
def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def training_allocator():
    """Keep freed memory in the process while training (glibc only; elsewhere a no-op).

    Why: glibc serves every block over its mmap threshold (32 MiB at most) with a fresh mmap
    and unmaps it on free, so each step's big tensors (every weight's gradient, a forward's
    activations, the optimizer's temporaries) come back as new pages, which the kernel faults in
    and zeroes one 4 KiB page at a time. PyTorch's CPU allocator is plain posix_memalign, no
    cache. Measured on SmolLM2-135M full fine-tuning (2-core EPYC, bench/train.py's rows), the
    five steps of the run: 49.7 / 46.8 s as glibc starts, 44.0 with no mmaps and no trim, 41.1
    with a 256 MiB top pad as well; peak RSS 7.3 -> 7.6 GB (freed blocks are reused, not
    returned). The same effect as running under jemalloc or tcmalloc, which PyTorch's CPU
    performance guides recommend, without a preload. On leaving, glibc's defaults come back and
    the heap is trimmed, so a long-lived process (a notebook) gets its memory back.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    for param, value in _TRAINING_ALLOCATOR.items():
        libc.mallopt(ctypes.c_int(param), ctypes.c_int(value))
    try:
        yield
    finally:
        for param, value in _GLIBC_DEFAULTS.items():
            libc.mallopt(ctypes.c_int(param), ctypes.c_int(value))
        libc.malloc_trim(0)


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def resolve_precision(precision: str) -> str:
    """'auto' -> bf16 where the hardware runs it natively (CUDA Ampere+, AVX-512 BF16 / AMX
    CPUs: measured 1.5x faster than fp32 here), fp16 on older CUDA GPUs, else fp32."""
    import torch
    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            from tunelab.errors import TunelabError
            raise TunelabError("fp16 mixed precision needs a CUDA GPU; use bf16 or fp32",
                               field="precision")
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def torch_dtype(precision: str):
    """The weights' dtype for inference at a precision ('auto' resolved as for training):
    bf16 where the hardware runs it natively (generation ~1.6x faster than fp32 here)."""
    import torch
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        from tunelab.errors import TunelabError
        raise TunelabError(f"unknown precision '{precision}' (auto, bf16, fp16 or fp32)",
                           field="precision")
    return {"bf16": torch.bfloat16, "fp16": torch.float16,
            "fp32": torch.float32}[resolve_precision(precision)]
