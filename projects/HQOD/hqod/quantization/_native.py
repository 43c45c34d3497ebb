"""
Native CPU kernels of the fake quantizer: one pass forward, one pass backward (input gradient
and the step-gradient sum together: float partial sums per block of 4096, float64 across
blocks), OpenMP over PyTorch's thread count. Also the forward of AQD's integer BN (Eq. 6, scope
"aqd", :class:`~.integer_layers._IntegerBatchNorm`) in one pass, bit-identical to its PyTorch ops.

Plain C, compiled once per machine with the system C compiler (about a second, no PyTorch
headers), cached under ``$HQOD_CACHE_DIR`` (default ``~/.cache/hqod``) by source hash, and
called through ctypes (a few microseconds per call, the GIL released). OpenMP comes from the
``libgomp.so.1`` PyTorch has already loaded, so both share one thread pool. :func:`load`
returns None when no compiler is available; callers then use the other backends.
"""
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

logger = logging.getLogger(__name__)

# The grid of functional._grid: x_hat = (clip(round(x / s + o), qmin, qmax) - o) * s, with
# round-half-to-even (nearbyint in the default rounding mode, as torch.round).
_SOURCE = r"""
#include <math.h>
#include <stdint.h>

#define CLIP(v, lo, hi) ((v) < (lo) ? (lo) : ((v) > (hi) ? (hi) : (v)))
#define BLOCK 4096          /* elements per task: vectorized inner loops, float partial sums */
#define PARALLEL_MIN 65536  /* below this, one thread (no fork/join) */

void hqod_fq_forward_f32(const float* restrict x, float* restrict out, int64_t n, float s,
                         float qmin, float qmax, float off, int nthreads) {
    int64_t nblocks = (n + BLOCK - 1) / BLOCK;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        #pragma omp simd
        for (int64_t i = b * BLOCK; i < end; i++) {
            float r = nearbyintf(x[i] / s + off);
            out[i] = (CLIP(r, qmin, qmax) - off) * s;
        }
    }
}

/* grad_x = g where inside (unrounded test, or rounded when `rounded`), else 0;
   returns sum(g * x_hat - grad_x * x): float within a block, double across blocks. */
double hqod_fq_backward_f32(const float* restrict g, const float* restrict x,
                            float* restrict gx, int64_t n, float s, float qmin, float qmax,
                            float off, int rounded, int nthreads) {
    int64_t nblocks = (n + BLOCK - 1) / BLOCK;
    double acc = 0.0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+:acc) if (n >= PARALLEL_MIN)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t end = (b + 1) * BLOCK < n ? (b + 1) * BLOCK : n;
        float part = 0.0f;
        if (rounded) {
            #pragma omp simd reduction(+:part)
            for (int64_t i = b * BLOCK; i < end; i++) {
                float r = nearbyintf(x[i] / s + off);
                float gi = (r >= qmin && r <= qmax) ? g[i] : 0.0f;
                gx[i] = gi;
                part += g[i] * ((CLIP(r, qmin, qmax) - off) * s) - gi * x[i];
            }
        } else {
            #pragma omp simd reduction(+:part)
            for (int64_t i = b * BLOCK; i < end; i++) {
                float v = x[i] / s + off;
                float r = nearbyintf(v);
                float gi = (v >= qmin && v <= qmax) ? g[i] : 0.0f;
                gx[i] = gi;
                part += g[i] * ((CLIP(r, qmin, qmax) - off) * s) - gi * x[i];
            }
        }
        acc += part;
    }
    return acc;
}

/* AQD Eq. 6 on a contiguous NCHW tensor (`planes` = N * C planes of `hw` elements), as PyTorch's
   torch.mul(x, inv).round_().add_(s).mul_(a) computes it in float32: the same operations in the
   same order, each rounded to float (no contraction: -ffp-contract=off). Tasks: blocks of at
   most BLOCK elements within one plane, so both many small planes and few large ones spread. */
void hqod_int_bn_forward_f32(const float* restrict x, float* restrict out, int64_t planes,
                             int64_t channels, int64_t hw, float inv, const float* restrict s,
                             const float* restrict a, int nthreads) {
    int64_t nchunks = (hw + BLOCK - 1) / BLOCK;
    int64_t ntasks = planes * nchunks;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (planes * hw >= PARALLEL_MIN)
    for (int64_t t = 0; t < ntasks; t++) {
        int64_t p = t / nchunks;
        int64_t k = t - p * nchunks;
        int64_t c = p % channels;
        float sc = s[c], ac = a[c];
        int64_t begin = p * hw + k * BLOCK;
        int64_t end = p * hw + ((k + 1) * BLOCK < hw ? (k + 1) * BLOCK : hw);
        #pragma omp simd
        for (int64_t i = begin; i < end; i++) {
            float r = nearbyintf(x[i] * inv);
            out[i] = (r + sc) * ac;
        }
    }
}
"""
# -ffp-contract=off: no fused multiply-adds (GCC's default in -std=c11, not clang's), so that
# the kernels round as PyTorch's separate ops do.
_FLAGS = [
    "-O3", "-march=native", "-fno-math-errno", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-std=c11",
]

_lock = threading.Lock()
_lib = None
_tried = False


def _cache_dir() -> str:
    return os.environ.get("HQOD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hqod")


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compile(path: str):
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) found")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        src = os.path.join(tmp, "fake_quant.c")
        with open(src, "w") as f:
            f.write(_SOURCE)
        out = os.path.join(tmp, "fake_quant.so")
        subprocess.run([cc, *_FLAGS, src, "-o", out, "-lm"], check=True, capture_output=True, timeout=300)
        os.replace(out, path)  # atomic: concurrent processes see a complete file


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel library, or None if it cannot be built (logged once)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        # -march=native: the library belongs to this CPU as much as to the source
        key = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + _cpu_id()).encode()).hexdigest()[:16]
        path = os.path.join(_cache_dir(), f"fake_quant_{key}.so")
        try:
            if not os.path.isfile(path):
                _compile(path)
            lib = ctypes.CDLL(path)
            f32, i64, p, cint = ctypes.c_float, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
            lib.hqod_fq_forward_f32.argtypes = [p, p, i64, f32, f32, f32, f32, cint]
            lib.hqod_fq_forward_f32.restype = None
            lib.hqod_fq_backward_f32.argtypes = [p, p, p, i64, f32, f32, f32, f32, cint, cint]
            lib.hqod_fq_backward_f32.restype = ctypes.c_double
            lib.hqod_int_bn_forward_f32.argtypes = [p, p, i64, i64, i64, f32, p, p, cint]
            lib.hqod_int_bn_forward_f32.restype = None
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            logger.warning(
                f"Native fake-quant kernels unavailable ({type(e).__name__}: {e} "
                f"{detail.decode(errors='replace')[:500]}); using the other backends."
            )
            _lib = None
        _tried = True
    return _lib
