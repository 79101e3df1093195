"""Fast DPQ logits and row lookup from codes, for inference (decode sizes).

``logits[m, v] = sum_g hidden[m, g] . values[g, codes[v, g]]`` is computed as in product
quantisation search: per token one ``D x Kc`` table of partial dot products
(:func:`partial_dots`, ``M*Kc*d`` multiply-adds), then a gather-sum over the codes
(``M*V*D`` adds); the ``V x d`` table is never built.

The codes are kept unpacked in a "blocked" layout (:func:`block_codes`): ``[ceil(V/16),
D, 16]``, the codes of 16 neighbouring symbols side by side per group, in the narrowest
integer dtype that holds ``Kc`` (``uint8`` up to 256 codes). The gather-sum runs in a
small C kernel (``_codes_kernel.c``) compiled at first use with the system C compiler
(``gcc``, OpenMP, ``-march=native``) and called through ``ctypes``; where that cannot be
built (no compiler, ``COMPEMB_NATIVE=0``), or for dtypes other than float32, or inside
``torch.compile`` / ``torch.export``, a pure-PyTorch path (an embedding bag over the
table) gives the same numbers (:func:`logits_from_blocked` with ``impl="torch"``).

For many tokens at once and few dimensions per group, building the table and one GEMM is
cheaper than the gather-sum; :func:`logits_from_blocked` picks by a cost model. One token
with ``uint8`` codes (at most 256 codes per group; AVX-512) looks its codes up by
in-register permutes of the partial dot products rather than gathers (the products of a
few groups held in registers while a tile of symbols passes under them), with the same
additions in the same order.

The same library holds :func:`int8_row_dots` (``hidden @ rows.T`` for ``int8`` rows read as
they are), which the residual rows of a fitted table (:mod:`compemb.fit.residual`) use for
their logits.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["BLOCK", "codes_dtype", "check_codes_dtype", "block_codes", "unblock_codes",
           "blocked_rows", "partial_dots", "logits_from_blocked", "logits_from_codes",
           "native_available", "GATHER_COST", "BUILD_COST", "int8_row_dots"]

#: symbols per block of the blocked code layout
BLOCK = 16
#: Path choice of :func:`logits_from_blocked` (measured on a 2-core CPU at 49152 x 576,
#: D=144, Kc=256): a gathered add of the gather-sum costs about GATHER_COST multiply-adds
#: of a dense GEMM, and an element of the ``V x d`` table built for the GEMM about
#: BUILD_COST gathered adds (a fresh 113 MB table took ~150 ms). The table + GEMM is taken
#: when ``M * (D - d / GATHER_COST) > BUILD_COST * d``: never when a group has at least
#: GATHER_COST dimensions, from ~170 tokens on at 4 dimensions per group.
GATHER_COST = 10
BUILD_COST = 25
#: tokens per call of the native kernel
NATIVE_CHUNK = 8

_SOURCE = Path(__file__).with_name("_codes_kernel.c")
_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None
_lib_error: Optional[str] = None
_tried = False


# --------------------------------------------------------------------------- code layout

def codes_dtype(num_codes: int) -> torch.dtype:
    """Narrowest dtype the unpacked codes are kept in: ``uint8`` (``Kc <= 256``),
    ``int16`` (``<= 32768``), else ``int32``."""
    if num_codes <= 256:
        return torch.uint8
    if num_codes <= 32768:
        return torch.int16
    return torch.int32


def check_codes_dtype(dtype: torch.dtype, num_codes: int, name: str = "codes") -> None:
    """``ValueError`` when integer ``dtype`` cannot hold every code in ``[0, num_codes)``."""
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (torch.long), got {dtype}")
    top = torch.iinfo(dtype).max
    if num_codes - 1 > top:
        raise ValueError(f"{name} has dtype {dtype}, which holds codes up to {top}, but "
                         f"num_codes={num_codes} needs codes up to {num_codes - 1}; pass "
                         f"codes as torch.long (or {codes_dtype(num_codes)})")


def block_codes(codes: Tensor, num_codes: int) -> Tensor:
    """``codes [V, D]`` (integers in ``[0, num_codes)``) -> blocked ``[ceil(V/16), D, 16]``
    in :func:`codes_dtype`; symbols past ``V`` get code 0. ``ValueError`` for codes out of
    range (a corrupt or mismatched checkpoint would otherwise read past the values)."""
    check_codes_dtype(codes.dtype, num_codes)
    v, d = codes.shape
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= num_codes:
            raise ValueError(f"codes must lie in [0, num_codes={num_codes}), got range "
                             f"[{lo}, {hi}] (a checkpoint whose codes do not match its "
                             f"values?)")
    nblk = -(-v // BLOCK)
    out = torch.zeros(nblk * BLOCK, d, dtype=codes_dtype(num_codes), device=codes.device)
    out[:v] = codes
    return out.view(nblk, BLOCK, d).transpose(1, 2).contiguous()


def unblock_codes(blocked: Tensor, num_embeddings: int) -> Tensor:
    """Inverse of :func:`block_codes`: ``[V, D]`` in the blocked dtype."""
    nblk, d, _ = blocked.shape
    return blocked.transpose(1, 2).reshape(nblk * BLOCK, d)[:num_embeddings]


def blocked_rows(blocked: Tensor, ids: Tensor) -> Tensor:
    """Codes ``[..., D]`` (blocked dtype) of the symbols ``ids [...]``."""
    flat = ids.reshape(-1).long()
    rows = blocked[flat // BLOCK, :, flat % BLOCK]  # [N, D]
    return rows.view(*ids.shape, blocked.shape[1])


# --------------------------------------------------------------------------- logits

def partial_dots(hidden: Tensor, values: Tensor, num_groups: int) -> Tensor:
    """``hidden [M, d]``, ``values [G, Kc, s]`` (``G`` = 1: shared) -> ``[D*Kc, M]``:
    row ``g*Kc + k`` holds ``hidden[:, g*s:(g+1)*s] @ values[g or 0, k]`` for every token
    (``M*Kc*d`` multiply-adds)."""
    m = hidden.shape[0]
    num_codes, sub = values.shape[1], values.shape[2]
    h = hidden.reshape(m, num_groups, sub).permute(1, 2, 0)  # [D, s, M]
    return torch.matmul(values, h).reshape(num_groups * num_codes, m)  # [D, Kc, M]


def logits_from_blocked(hidden: Tensor, values: Tensor, blocked: Tensor, num_embeddings: int,
                        impl: str = "auto") -> Tensor:
    """``hidden [M, d] -> [M, V]`` for the table ``concat_g values[g, codes[v, g]]`` with
    the codes in the blocked layout (:func:`block_codes`).

    ``impl``: ``"native"`` (the C kernel; ``RuntimeError`` when it is not available),
    ``"torch"`` (pure PyTorch: an embedding bag over the partial dot products),
    ``"dense"`` (build the table, one GEMM), or ``"auto"``: ``"dense"`` for many tokens
    (see :data:`GATHER_COST`) or where a codebook has as many rows as the vocabulary
    (``Kc >= V``: the partial dots would cost the GEMM), else ``"native"`` where it
    applies (float32 on CPU, eager, kernel built, no gradient wanted: the kernel is not
    differentiable), else ``"torch"``. Computed in ``hidden``'s dtype (the caller
    promotes); the three give equal numbers up to float summation order."""
    if impl not in ("auto", "native", "torch", "dense"):
        raise ValueError(f"impl must be 'auto', 'native', 'torch' or 'dense', got {impl!r}")
    m, d = hidden.shape
    nblk, num_groups, _ = blocked.shape
    num_codes = values.shape[1]
    if impl == "auto":
        if (m * (num_groups - d / GATHER_COST) > BUILD_COST * d
                or num_codes >= num_embeddings):
            impl = "dense"
        elif _native_applies(hidden, values) and not (
                torch.is_grad_enabled() and (hidden.requires_grad or values.requires_grad)):
            impl = "native"
        else:
            impl = "torch"
    if impl == "dense":
        codes = unblock_codes(blocked, num_embeddings)
        index = _index(codes, num_codes, values.shape[0] == 1)
        table = F.embedding(index, values.reshape(-1, values.shape[-1])).reshape(
            num_embeddings, d)
        return F.linear(hidden, table.to(hidden.dtype))
    if impl == "native":
        lib = _load()
        if lib is None:
            raise RuntimeError(f"the native DPQ kernel is not available: {_lib_error}")
        if hidden.dtype != torch.float32 or hidden.device.type != "cpu":
            raise ValueError(f"impl='native' needs float32 CPU tensors, got {hidden.dtype} "
                             f"on {hidden.device}")
        codes = blocked.contiguous()
        vals = values.to(torch.float32)
        out = torch.empty(m, num_embeddings, dtype=torch.float32)
        fn = {torch.uint8: lib.compemb_dpq_logits_u8, torch.int16: lib.compemb_dpq_logits_u16,
              torch.int32: lib.compemb_dpq_logits_i32}[codes.dtype]
        threads = torch.get_num_threads()
        # NATIVE_CHUNK tokens at a time: their table (D*Kc*8 floats, ~1 MB at D=144,
        # Kc=256) stays in the L2 cache, which the random reads need
        for start in range(0, m, NATIVE_CHUNK):
            part = hidden[start:start + NATIVE_CHUNK]
            table = partial_dots(part, vals, num_groups).contiguous()  # [D*Kc, Mc]
            fn(ctypes.c_void_p(table.data_ptr()), ctypes.c_void_p(codes.data_ptr()),
               ctypes.c_void_p(out[start].data_ptr()), num_embeddings, num_groups,
               num_codes, part.shape[0], threads)
        return out
    table = partial_dots(hidden, values.to(hidden.dtype), num_groups)  # [D*Kc, M]
    codes = unblock_codes(blocked, num_embeddings)
    index = codes.to(torch.int32) + torch.arange(num_groups, dtype=torch.int32,
                                                 device=codes.device) * num_codes
    return F.embedding_bag(index, table, mode="sum").t().contiguous()


def logits_from_codes(hidden: Tensor, values: Tensor, codes: Tensor, impl: str = "auto"
                      ) -> Tensor:
    """:func:`logits_from_blocked` for codes ``[V, D]`` given row-major. The blocked layout
    is kept (weakly, keyed by the tensor and its version) between calls with the same
    ``codes`` tensor, so a caller that keeps its codes pays for the layout once."""
    if torch.compiler.is_compiling():
        blocked = block_codes_traceable(codes, values.shape[1])
    else:
        blocked = _blocked_cached(codes, values.shape[1])
    return logits_from_blocked(hidden, values, blocked, codes.shape[0], impl=impl)


def int8_row_dots(hidden: Tensor, rows: Tensor) -> Tensor:
    """``hidden [M, d]`` (float) and ``rows int8 [N, d]`` -> ``hidden @ rows.T  [M, N]``.

    With the native kernel (float32 on the CPU, eager, no gradient wanted for ``hidden``)
    the int8 rows are read as they are, never converted to a float ``[N, d]`` table (which
    a decode step would otherwise allocate, fill and read: four times the bytes, plus the
    page faults of a fresh allocation); otherwise ``hidden @ rows.T`` in ``hidden``'s dtype.
    The two agree up to float32 summation order."""
    if rows.dtype != torch.int8 or rows.dim() != 2 or hidden.dim() != 2 \
            or hidden.shape[1] != rows.shape[1]:
        raise ValueError(f"int8_row_dots needs hidden [M, d] and int8 rows [N, d], got "
                         f"{tuple(hidden.shape)} and {rows.dtype} {tuple(rows.shape)}")
    if (_native_applies(hidden, hidden) and rows.device.type == "cpu"
            and not (torch.is_grad_enabled() and hidden.requires_grad)):
        h = hidden.detach().contiguous()
        r = rows.contiguous()
        out = torch.empty(h.shape[0], r.shape[0], dtype=torch.float32)
        if r.shape[0] and h.shape[0]:
            _load().compemb_int8_row_dots(ctypes.c_void_p(h.data_ptr()),
                                          ctypes.c_void_p(r.data_ptr()),
                                          ctypes.c_void_p(out.data_ptr()), r.shape[0],
                                          r.shape[1], h.shape[0], torch.get_num_threads())
        return out
    return hidden @ rows.to(hidden.dtype).T


def block_codes_traceable(codes: Tensor, num_codes: int) -> Tensor:
    """:func:`block_codes` without the range check (which reads values on the host), for
    ``torch.compile`` / ``torch.export``."""
    v, d = codes.shape
    nblk = -(-v // BLOCK)
    padded = F.pad(codes.to(codes_dtype(num_codes)).t(), (0, nblk * BLOCK - v))  # [D, V']
    return padded.reshape(d, nblk, BLOCK).transpose(0, 1).contiguous()


#: codes tensor (by identity, weakly) -> (its version, num_codes, blocked layout)
_blocked_memo: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _blocked_cached(codes: Tensor, num_codes: int) -> Tensor:
    key = (codes._version, num_codes)
    hit = _blocked_memo.get(codes)
    if hit is not None and hit[:2] == key:
        return hit[2]
    blocked = block_codes(codes, num_codes)
    if not codes.is_inference():
        _blocked_memo[codes] = (*key, blocked)
    return blocked


def _index(codes: Tensor, num_codes: int, shared: bool) -> Tensor:
    """Rows of the flattened ``[G*Kc, s]`` values for codes ``[..., D]`` (int64)."""
    idx = codes.long()
    if shared:
        return idx
    return idx + torch.arange(codes.shape[-1], device=codes.device) * num_codes


# --------------------------------------------------------------------------- native build

def native_available() -> bool:
    """Whether the C kernel is built and loaded (building it on first call)."""
    return _load() is not None


def _native_applies(hidden: Tensor, values: Tensor) -> bool:
    return (hidden.device.type == "cpu" and hidden.dtype == torch.float32
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and _load() is not None)  # a tracer would not see a ctypes call


def _cache_dir() -> Path:
    root = os.environ.get("COMPEMB_KERNEL_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compemb" / "kernels"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _load() -> Optional[ctypes.CDLL]:
    """Build (once per source, compiler flags and CPU) and load the kernel; ``None`` (with
    one warning) when that fails."""
    global _lib, _lib_error, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            if os.environ.get("COMPEMB_NATIVE", "1") == "0":
                raise RuntimeError("disabled by COMPEMB_NATIVE=0")
            if sys.platform != "linux":
                raise RuntimeError(f"built on Linux only, this is {sys.platform}")
            _lib = _build_and_load()
        except Exception as err:  # noqa: BLE001 - any failure means: use the fallback
            _lib_error = f"{type(err).__name__}: {err}"
            if os.environ.get("COMPEMB_NATIVE", "1") != "0":
                warnings.warn(f"compemb: the native DPQ kernel could not be built "
                              f"({_lib_error}); using the pure-PyTorch path", RuntimeWarning)
        _tried = True
    return _lib


_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def _build_and_load() -> ctypes.CDLL:
    compiler = os.environ.get("CC", "gcc")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler] + _FLAGS).encode()
                         + _cpu_id().encode()).hexdigest()[:16]
    folder = _cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"compemb_dpq_{key}.so"
    if not target.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
        os.close(fd)
        try:
            proc = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
            os.replace(tmp, target)  # atomic: concurrent builders do not see half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    if lib.compemb_dpq_kernel_version() != 9:
        raise RuntimeError(f"{target} is a different kernel version")
    for name in ("compemb_dpq_logits_u8", "compemb_dpq_logits_u16", "compemb_dpq_logits_i32"):
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                       ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int]
        fn.restype = None
    fn = lib.compemb_int8_row_dots
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                   ctypes.c_long, ctypes.c_long, ctypes.c_int]
    fn.restype = None
    return lib
