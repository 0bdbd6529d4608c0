"""Launch configuration for the Triton kernels: every block size lives here, with its reason.

Two kinds of choice are made in this file:

* the *decomposition* (tile shape, how many pixel tiles one program walks, how many programs
  split one ``(n, c)`` row) is a pure function of the shape, the layout and the device's SM
  count.  It fixes the order of every floating-point reduction, so the same input on the same
  device gives the same bits on every run and in every process;
* the *launch knobs* are left to ``triton.autotune``, keyed on the shape and layout, only
  where they cannot change a result.  ``num_stages`` (software pipelining of the loads) never
  does.  ``num_warps`` changes how Triton lays a tile over threads, and so the order of a
  ``tl.sum`` over the tile: the kernels that reduce (statistics, backward sums, angles) run
  with one pinned ``num_warps`` (``LaunchConfig.reduce_num_warps``) and autotune only
  ``num_stages``; the element-wise kernels (normalize, dx) autotune both.  Whichever config
  wins the timing race, the output bits are the same.

Under ``TRITON_INTERPRET=1``, or with ``DATTA_TRITON_AUTOTUNE=0`` in the environment at
import, the autotuner gets a single config, so it never benchmarks (each new shape then costs
one compile per kernel, not one per config: ``scripts/gpu_check.sh`` sets it for its
correctness steps).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

__all__ = ["LaunchConfig", "LAUNCH", "Tiling", "reduce_tiling", "angles_tiling", "finalize_blocks",
           "autotune_configs", "next_pow2", "cdiv", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: DATTA_TRITON_AUTOTUNE=0: one launch config per kernel, no timing race
AUTOTUNE = os.environ.get("DATTA_TRITON_AUTOTUNE", "1") != "0"


@dataclass(frozen=True)
class LaunchConfig:
    """Every tunable number of the Triton backend, in one place."""

    #: bytes of ``x`` per tile (4096 fp32 / 8192 fp16 elements): with 4-8 warps that is 4-8
    #: independent 16-byte vector loads per thread in flight, enough memory-level parallelism
    #: to keep HBM busy without spilling the fp32 copy of the tile out of registers.
    tile_bytes: int = 16384
    #: channels per tile in channels_last.  Channels are the contiguous dim there: 64 channels
    #: are 256 B of fp32 / 128 B of bf16 per pixel row (whole cache lines), and keep the
    #: per-channel accumulators (mean, M2 per channel) small; the remaining tile goes to pixels.
    cl_block_c: int = 64
    #: NCHW pixel blocks once ``M > 256``: the candidate that wastes the fewest masked lanes in
    #: the last tile wins (56*56 = 3136 -> 256: 13 tiles, 6% padding instead of 23% for 4096).
    nchw_block_p: tuple[int, ...] = (256, 512, 1024, 2048)
    #: programs wanted per SM before a row is split across programs (8 programs of 4-8 warps
    #: fill an SM's 64 warp slots); splitting costs only a tiny (N, splits, C) partial buffer.
    programs_per_sm: int = 8
    #: SM count assumed when no CUDA device answers (CPU interpreter): an H100 SXM.
    default_sms: int = 132
    #: elements per tile of the tiny (N, C) finalize kernels (tile ``[block_n, block_c]``).
    finalize_elems: int = 1024
    #: largest batch block of a finalize tile; bigger batches loop over blocks of this size.
    finalize_block_n: int = 64
    #: partial sums reduced per step by the angles' second stage.
    angles_reduce_block: int = 1024
    #: num_warps of every kernel that reduces over a tile (pinned: it sets the tl.sum order, so
    #: the bits).  4 warps: 32 fp32 values per thread for a 16 KiB tile, the layout Triton's
    #: default gives; the element-wise kernels autotune between 4 and 8.
    reduce_num_warps: int = 4


#: The configuration the backend uses (tests may swap in a smaller one to force splits).
LAUNCH = LaunchConfig()


@dataclass(frozen=True)
class Tiling:
    """How ``x`` of shape ``(N, C, M)`` is cut: tile ``[block_c, block_p]``, each program walks
    ``iters`` consecutive pixel tiles, ``splits`` programs share one ``(n, channel block)``."""

    block_c: int
    block_p: int
    iters: int
    splits: int
    c_blocks: int

    @property
    def chunk(self) -> int:
        """Pixels covered by one program (the last one may cover fewer)."""
        return self.block_p * self.iters

    def grid(self, n: int) -> tuple[int, int]:
        return (n * self.c_blocks, self.splits)


# Host-side integer helpers in plain Python: Triton's ``cdiv`` / ``next_power_of_2`` are
# constexpr functions whose calls cost microseconds each (they unwrap constexpr arguments),
# and a launch computes a dozen of them.
def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def next_pow2(v: int) -> int:
    return 1 << (max(int(v), 1) - 1).bit_length()


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device, cfg: LaunchConfig) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return cfg.default_sms


def tile_shape(c: int, m: int, channels_last: bool, itemsize: int, cfg: LaunchConfig) -> tuple[int, int]:
    """``(block_c, block_p)`` for a streaming pass over ``x``; both powers of two."""
    tile_elems = max(1, cfg.tile_bytes // itemsize)
    if channels_last:
        block_c = min(next_pow2(c), cfg.cl_block_c)
        block_p = min(next_pow2(m), max(1, tile_elems // block_c))
        return block_c, block_p
    if next_pow2(m) <= min(cfg.nchw_block_p[0], tile_elems):
        block_p = next_pow2(m)
    else:
        cands = [b for b in cfg.nchw_block_p if b <= tile_elems] or [tile_elems]
        # fewest padded lanes; ties go to the larger block (fewer loop trips)
        block_p = min(cands, key=lambda b: (cdiv(m, b) * b, -b))
    block_c = min(next_pow2(c), max(1, tile_elems // block_p))
    return block_c, block_p


def reduce_tiling(n: int, c: int, m: int, channels_last: bool, itemsize: int, device: torch.device,
                  cfg: LaunchConfig | None = None) -> Tiling:
    """Decomposition shared by the statistics pass, the normalize pass and both backward
    passes.  A row ``(n, channel block)`` is split over several programs only when there are
    too few rows to fill the device; the partials are then merged in a fixed order.
    Memoised per shape (every launch of a layer asks for the same one)."""
    cfg = cfg or LAUNCH
    return _reduce_tiling(n, c, m, channels_last, itemsize, sm_count(device, cfg), cfg)


@functools.lru_cache(maxsize=4096)
def _reduce_tiling(n: int, c: int, m: int, channels_last: bool, itemsize: int, sms: int,
                   cfg: LaunchConfig) -> Tiling:
    block_c, block_p = tile_shape(c, m, channels_last, itemsize, cfg)
    c_blocks = cdiv(c, block_c)
    tiles_p = cdiv(m, block_p)
    rows = n * c_blocks
    target = cfg.programs_per_sm * sms
    want = 1 if rows >= target else min(tiles_p, cdiv(target, rows))
    iters = cdiv(tiles_p, want)
    splits = cdiv(tiles_p, iters)
    return Tiling(block_c, block_p, iters, splits, c_blocks)


def angles_tiling(c: int, m: int, channels_last: bool, itemsize: int, cfg: LaunchConfig | None = None
                  ) -> tuple[int, int, int]:
    """``(block_c, block_p, p_tiles)`` for the diversity-angle pass: one program per
    ``(pixel tile, n)`` loops over all channel blocks (the cosine needs the whole vector)."""
    cfg = cfg or LAUNCH
    block_c, block_p = tile_shape(c, m, channels_last, itemsize, cfg)
    return block_c, block_p, cdiv(m, block_p)


def finalize_blocks(n: int, c: int, cfg: LaunchConfig | None = None) -> tuple[int, int]:
    """``(block_n, block_c)`` of the tiny per-(n, c) kernels: the whole batch (up to
    ``finalize_block_n``) in one tile so the batch reduction is one vector sum, channels
    filling the rest; one program per channel block."""
    cfg = cfg or LAUNCH
    block_n = min(next_pow2(n), cfg.finalize_block_n)
    block_c = min(next_pow2(c), max(1, cfg.finalize_elems // block_n))
    return block_n, block_c


def autotune_configs(reduces: bool, interpret: bool | None = None) -> list[triton.Config]:
    """Launch knobs that never change a result: ``num_stages``, and ``num_warps`` only for a
    kernel that does not reduce over its tile (``reduces=False``; see the module notes).  The
    interpreter gets one config (the autotuner then skips benchmarking)."""
    if INTERPRET if interpret is None else interpret:
        return [triton.Config({}, num_warps=LAUNCH.reduce_num_warps, num_stages=1)]
    if not AUTOTUNE:
        return [triton.Config({}, num_warps=LAUNCH.reduce_num_warps, num_stages=2)]
    warps = (LAUNCH.reduce_num_warps,) if reduces else (4, 8)
    return [triton.Config({}, num_warps=w, num_stages=s) for w in warps for s in (2, 3)]


#: autotune key of the streaming kernels: shape and layout (dtypes are added by Triton).
AUTOTUNE_KEY = ["N", "C", "M", "CHANNELS_LAST"]
