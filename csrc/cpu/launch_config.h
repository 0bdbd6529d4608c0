// Every tuning constant of the fused CPU kernels, with the reason for its value.
#pragma once

#include <cstdint>

namespace datta::cpu::config {

// Statistics are computed per chunk: the chunk is summed while it streams in from memory, its
// mean is formed, and the centred sum of squares re-reads the chunk from L1 (never raw sum of
// squares).  16 KiB leaves room in a 32-48 KiB L1d for the prefetched next chunk and outputs.
constexpr int64_t kL1ChunkBytes = 16 * 1024;

// Forward without batch statistics (w_b = 0, NCHW): planes are normalised in blocks of about
// this many bytes of x right after their moments, while the block is still in L2 (a few
// hundred KiB to 2 MiB per core on current x86; 256 KiB of x plus 256 KiB of y fits the
// 512 KiB+ ones; smaller blocks restart the hardware prefetchers too often).
constexpr int64_t kCacheBlockBytes = 256 * 1024;

// Smallest amount of work (elements of x) handed to one thread: below ~32K elements the
// OpenMP fork/join (a few microseconds) costs more than streaming the data.
constexpr int64_t kMinTaskElems = 32 * 1024;

// channels_last: channels are processed in blocks of kBlockVecs vectors so the per-channel
// accumulators (sum and centred sum, or sdy and sdyxc) stay in registers (2 x 4 vectors).
constexpr int kBlockVecs = 4;

// channels_last reductions split the pixels of each sample into segments so N=1 (or few
// channel blocks) still feeds every core.  The segment count depends only on the shape, never
// on the thread count, and partials are merged in a fixed order: results are bitwise
// reproducible.  kTargetTasks is "enough tasks for any realistic core count".
constexpr int64_t kTargetTasks = 64;
// ... but a segment is never smaller than this many elements (merge overhead, vector tails).
constexpr int64_t kMinSegmentElems = 8 * 1024;

// Diversity angles on NCHW: a block of kAngleBlockVecs vectors of pixels is held in registers
// while the channel loop walks the planes; 3 accumulators (<a,b>, |a|^2, |b|^2) x 4 vectors =
// 12 registers, within the 16 of AVX2.  Also the unit of the per-block partial sums.
constexpr int kAngleBlockVecs = 4;

// SPEC §2: norms of a and b are clamped at this floor before dividing.
constexpr double kNormFloor = 1e-10;

}  // namespace datta::cpu::config
