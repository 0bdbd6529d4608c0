// Pixel-mode diversity angles on CUDA (SPEC §2), one read of x:
//
//   a = mu_s - x[n, :, p],  b = mu_B - x[n, :, p]          (direct differences, acc type)
//   cos[n, p] = <a, b> / (max(|a|, 1e-10) max(|b|, 1e-10))
//   theta[n]  = arccos(clamp(mean_p cos[n, p], -1, 1))
//
// Stage 1 gives each CTA one pixel block of one sample and writes the sum of its cos values
// to its own partial slot (fixed-order tree inside the CTA); stage 2 (one thread per sample)
// adds the partials in block order, divides by M and takes the arccos.  No atomics.
//
// NCHW: a thread owns V consecutive pixels (one 16-byte pack) and walks the C planes, so
// every load is a coalesced row of a plane.  channels_last: a group of `lanes` threads owns a
// pixel and walks its C contiguous channels in packs, then the group reduces by shuffles.
#include "common.cuh"

namespace datta::cuda {
namespace {

template <typename T>
struct AngleArgs {
  using A = acc_t<T>;
  const T* x;
  const A* smean;  // (C,) mu_s
  const A* bmean;  // (C,) mu_B
  int64_t n, c, m;
  int64_t blocks_per_sample;
  A* partials;  // (N, blocks_per_sample) sums of cos
};

template <typename A>
__device__ __forceinline__ A cosine(A dot, A na2, A nb2) {
  const A floor = A(cfg::kNormFloor);
  return dot / (max_(sqrt_(na2), floor) * max_(sqrt_(nb2), floor));
}

/// a = ms - x, b = mb - x folded into <a, b>, |a|^2, |b|^2.
template <typename A>
__device__ __forceinline__ void accumulate(A x, A ms, A mb, A& dot, A& na2, A& nb2) {
  const A da = ms - x, db = mb - x;
  dot += da * db;
  na2 += da * da;
  nb2 += db * db;
}

template <typename T, int V>
__global__ void __launch_bounds__(cfg::kThreads) angles_planes_kernel(AngleArgs<T> a) {
  using A = acc_t<T>;
  constexpr int U = cfg::kUnroll;
  const int64_t ni = blockIdx.x / a.blocks_per_sample, pb = blockIdx.x % a.blocks_per_sample;
  const int64_t p0 = (pb * cfg::kThreads + threadIdx.x) * V;
  A cos_sum = A(0);
  if (p0 < a.m) {  // V > 1 only when M % V == 0: the whole pack is in range
    A dot[V] = {}, na2[V] = {}, nb2[V] = {};
    const T* xp = a.x + ni * a.c * a.m + p0;
    for (int64_t ch = 0; ch < a.c; ch += U) {
      Pack<T, V> px[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (ch + u < a.c) px[u] = load_pack<T, V>(xp + (ch + u) * a.m);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (ch + u < a.c) {
          const A ms = a.smean[ch + u], mb = a.bmean[ch + u];
#pragma unroll
          for (int v = 0; v < V; ++v) accumulate(Elem<T>::load(px[u].v[v]), ms, mb, dot[v], na2[v], nb2[v]);
        }
    }
#pragma unroll
    for (int v = 0; v < V; ++v) cos_sum += cosine(dot[v], na2[v], nb2[v]);
  }
  cos_sum = block_reduce<SumOp<A>>(cos_sum);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = cos_sum;
}

/// Pixels handled by one CTA in channels_last: whole rounds of (groups x kUnroll) pixels,
/// about cfg::kAngleVecsPerCta pack loads in all.
struct RowTiling {
  int lanes;  // threads per pixel (power of two <= 32)
  int64_t pixels_per_block;
};

RowTiling row_tiling(int64_t c, int v) {
  const int64_t vecs = ceil_div(c, v);
  int lanes = 1;
  while (lanes < cfg::kWarp && lanes < vecs) lanes *= 2;
  const int64_t round = int64_t(cfg::kThreads / lanes) * cfg::kUnroll;
  return {lanes, imax(1, ceil_div(ceil_div(cfg::kAngleVecsPerCta, vecs), round)) * round};
}

template <typename T, int V>
__global__ void __launch_bounds__(cfg::kThreads) angles_rows_kernel(AngleArgs<T> a, int lanes, int64_t pixels_per_block) {
  using A = acc_t<T>;
  constexpr int U = cfg::kUnroll;
  const int64_t ni = blockIdx.x / a.blocks_per_sample, pb = blockIdx.x % a.blocks_per_sample;
  const int lane = threadIdx.x % lanes, group = threadIdx.x / lanes, groups = cfg::kThreads / lanes;
  const int64_t lo = pb * pixels_per_block, hi = imin(a.m, lo + pixels_per_block);
  const T* xs = a.x + ni * a.m * a.c;
  A cos_sum = A(0);
  // The round loop is uniform over the CTA, so every lane reaches the shuffles.
  for (int64_t base = lo; base < hi; base += int64_t(groups) * U) {
    A dot[U] = {}, na2[U] = {}, nb2[U] = {};
    for (int64_t cv = int64_t(lane) * V; cv < a.c; cv += int64_t(lanes) * V) {
      Pack<T, V> px[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t p = base + group + int64_t(u) * groups;
        if (p < hi) px[u] = load_pack<T, V>(xs + p * a.c + cv);
      }
      A ms[V], mb[V];
#pragma unroll
      for (int v = 0; v < V; ++v) {
        ms[v] = a.smean[cv + v];
        mb[v] = a.bmean[cv + v];
      }
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (base + group + int64_t(u) * groups < hi) {
#pragma unroll
          for (int v = 0; v < V; ++v) accumulate(Elem<T>::load(px[u].v[v]), ms[v], mb[v], dot[u], na2[u], nb2[u]);
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      for (int off = lanes / 2; off > 0; off /= 2) {
        dot[u] += __shfl_down_sync(cfg::kFullMask, dot[u], off, lanes);
        na2[u] += __shfl_down_sync(cfg::kFullMask, na2[u], off, lanes);
        nb2[u] += __shfl_down_sync(cfg::kFullMask, nb2[u], off, lanes);
      }
      if (lane == 0 && base + group + int64_t(u) * groups < hi) cos_sum += cosine(dot[u], na2[u], nb2[u]);
    }
  }
  cos_sum = block_reduce<SumOp<A>>(cos_sum);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = cos_sum;
}

/// One thread per sample: partials in block order, mean over M, clamp, arccos, all in double
/// (a float total of 2^31 cosines of 1 stops at 2^30, giving pi/3 for 0; and near 0 the
/// arccos turns a rounding of the mean into sqrt(2 * rounding)).
template <typename A>
__global__ void __launch_bounds__(cfg::kTinyThreads)
angles_finalize_kernel(const A* partials, int64_t n, int64_t blocks_per_sample, int64_t m, A* angles) {
  const int64_t ni = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ni >= n) return;
  double sum = 0.0;
  for (int64_t k = 0; k < blocks_per_sample; ++k) sum += double(partials[ni * blocks_per_sample + k]);
  angles[ni] = A(acos_(min_(max_(sum / double(m), -1.0), 1.0)));
}

/// Vector width: NCHW packs run along pixels (M a whole number of packs), channels_last
/// packs along channels (C a whole number of packs); x must be 16-byte aligned.
template <typename T>
int angle_vec(const Params& p) {
  const int64_t run = p.channels_last ? p.c : p.m;
  return aligned16(p.x) && run % kVec<T> == 0 ? kVec<T> : 1;
}

int64_t blocks_per_sample(const Params& p, int v) {
  if (!p.channels_last) return ceil_div(p.m, int64_t(cfg::kThreads) * v);
  return ceil_div(p.m, row_tiling(p.c, v).pixels_per_block);
}

template <typename T, int V>
void launch_angles_v(AngleArgs<T> a, bool channels_last, cudaStream_t stream) {
  const unsigned grid = unsigned(a.n * a.blocks_per_sample);
  if (!channels_last) {
    angles_planes_kernel<T, V><<<grid, cfg::kThreads, 0, stream>>>(a);
  } else {
    const RowTiling t = row_tiling(a.c, V);
    angles_rows_kernel<T, V><<<grid, cfg::kThreads, 0, stream>>>(a, t.lanes, t.pixels_per_block);
  }
}

}  // namespace

size_t angles_workspace_bytes(const Params& p) {
  // Sized for whichever vector width the launch picks (the pointer decides, not the shape).
  const int vec = cfg::kVecBytes / elem_bytes(p.dtype);
  const int64_t bps = imax(blocks_per_sample(p, 1), blocks_per_sample(p, vec));
  const size_t acc_bytes = p.dtype == ElemType::kFloat64 ? sizeof(double) : sizeof(float);
  return size_t(p.n * bps) * acc_bytes;
}

cudaError_t diversity_angles(const Params& p, cudaStream_t stream) {
  if (p.n == 0 || p.c == 0 || p.m == 0) return cudaSuccess;
  return dispatch_elem(p.dtype, cudaErrorInvalidValue, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const int v = angle_vec<T>(p);
    AngleArgs<T> a{static_cast<const T*>(p.x), static_cast<const A*>(p.source_mean),
                   static_cast<const A*>(p.batch_mean), p.n, p.c, p.m, blocks_per_sample(p, v),
                   static_cast<A*>(p.workspace)};
    if (v > 1) {
      launch_angles_v<T, kVec<T>>(a, p.channels_last, stream);
    } else {
      launch_angles_v<T, 1>(a, p.channels_last, stream);
    }
    angles_finalize_kernel<A><<<unsigned(ceil_div(p.n, cfg::kTinyThreads)), cfg::kTinyThreads, 0, stream>>>(
        a.partials, p.n, a.blocks_per_sample, p.m, static_cast<A*>(p.angles));
    return cudaGetLastError();
  });
}

}  // namespace datta::cuda
