// The two streaming passes every DATTA op is built from, for both memory layouts:
//
//   reduce: per-(n, c) fold of x (and dy) with an Op from common.cuh   (stats, backward pass 1)
//   apply:  out = a dy + b (x - mu) + c0 with per-(n, c) coefficients   (normalize, backward
//           pass 2; SPEC D3's y and D5's dx, coefficients from dabn.cu)
//
// NCHW: an (n, c) plane is M contiguous elements; a "group" (one warp for small planes, else
// the whole CTA) walks one piece of a plane with 16-byte vectors (scalar head until aligned,
// scalar tail).  channels_last: x is an (N*M) x C row-major matrix; a CTA tile is tx threads
// across channel vectors (coalesced rows) by ty threads down the rows of one piece of one n.
//
// Determinism: a piece is folded by its threads in a fixed order, merged by a fixed tree,
// written as a partial to its own slot, and partials are merged in split order by a second
// kernel.  No atomics anywhere.
#pragma once

#include "common.cuh"

namespace datta::cuda {

template <typename T, typename Op>
struct ReduceArgs {
  using A = acc_t<T>;
  const T* x;
  const T* dy;        // Op::kHasDy only
  const A* center;    // (N, C) value subtracted from x (mu_i), or nullptr
  int64_t n, c, m;
  Plan plan;
  typename Op::State* partials;  // (N, C, splits) or (N, splits, C) when plan.splits > 1
  A* out0;                       // (N, C) results of Op::finalize
  A* out1;
};

template <typename T>
struct ApplyArgs {
  using A = acc_t<T>;
  const T* x;
  const T* dy;  // kHasDy only
  T* out;
  const A* mu;  // (N, C) each
  const A* a;   // kHasDy only
  const A* b;
  const A* c0;
  int64_t n, c, m;
  Plan plan;
};

template <typename T, int V>
__device__ __forceinline__ void unpack(const Pack<T, V>& p, acc_t<T>* out) {
#pragma unroll
  for (int v = 0; v < V; ++v) out[v] = Elem<T>::load(p.v[v]);
}

// ------------------------------------------------------------------ NCHW kernels
/// One group of G threads per (plane, piece) task; kThreads / G tasks per CTA.
template <typename T, typename Op, int V, int G>
__global__ void __launch_bounds__(cfg::kThreads) reduce_planes_kernel(ReduceArgs<T, Op> a) {
  using A = acc_t<T>;
  constexpr int U = cfg::kUnroll;
  const int lane = threadIdx.x % G;
  const int64_t task = int64_t(blockIdx.x) * (cfg::kThreads / G) + threadIdx.x / G;
  const int64_t splits = a.plan.splits, tasks = a.n * a.c * splits;
  typename Op::State s = Op::identity();
  if (task < tasks) {
    const int64_t plane = task / splits;
    const int64_t lo = (task % splits) * a.plan.split_len, hi = imin(a.m, lo + a.plan.split_len);
    const T* xp = a.x + plane * a.m;
    const T* dp = Op::kHasDy ? a.dy + plane * a.m : nullptr;
    // the value subtracted from x: the given mu_i, or the plane's first value (MomentsOp's
    // shift, the same for every piece and lane of the plane)
    const A center = a.center ? a.center[plane] : Op::kShiftByFirst ? Elem<T>::load(xp[0]) : A(0);
    s = Op::start(center);
    const Span sp = vector_span<T, V>(xp, lo, hi);
    auto add_scalar = [&](int64_t i) {
      const A fx[1] = {Elem<T>::load(xp[i])};
      const A fd[1] = {Op::kHasDy ? Elem<T>::load(dp[i]) : A(0)};
      Op::template add<1>(s, fx, fd, 1, center);
    };
    for (int64_t i = lo + lane; i < sp.body; i += G) add_scalar(i);
    // U vectors per thread per step, all loads issued before any use.  The valid vectors of a
    // step form a prefix; they are folded K values at a time: one pack, or all U scalars when
    // V == 1 (a chunk's totals are added in double, so chunks should not be single values).
    constexpr int kPacks = V == 1 ? U : 1, K = kPacks * V;
    for (int64_t j = sp.body + int64_t(lane) * V; j < sp.tail; j += int64_t(G) * V * U) {
      Pack<T, V> px[U], pd[U];
      int cnt = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t k = j + int64_t(u) * G * V;
        if (k < sp.tail) {
          px[u] = load_pack<T, V>(xp + k);
          if constexpr (Op::kHasDy) pd[u] = load_pack<T, V>(dp + k);
          cnt = u + 1;
        }
      }
#pragma unroll
      for (int u0 = 0; u0 < U; u0 += kPacks) {
        if (u0 >= cnt) break;
        A fx[K], fd[K] = {};
#pragma unroll
        for (int u = u0; u < u0 + kPacks; ++u)
          if (u < cnt) {
            unpack<T, V>(px[u], fx + (u - u0) * V);
            if constexpr (Op::kHasDy) unpack<T, V>(pd[u], fd + (u - u0) * V);
          }
        Op::template add<K>(s, fx, fd, int(imin(cnt - u0, kPacks)) * V, center);
      }
    }
    for (int64_t i = sp.tail + lane; i < hi; i += G) add_scalar(i);
  }
  if constexpr (G == cfg::kThreads) {
    s = block_reduce<Op>(s);
  } else {
    s = warp_reduce<Op, G>(s);
  }
  if (lane == 0 && task < tasks) {
    if (splits == 1) {
      Op::finalize(s, a.out0, a.out1, task, a.m);
    } else {
      a.partials[task] = s;  // slot (plane, piece): (N, C, splits)
    }
  }
}

template <typename T, int V, int G, bool kHasDy>
__global__ void __launch_bounds__(cfg::kThreads) apply_planes_kernel(ApplyArgs<T> a) {
  using A = acc_t<T>;
  constexpr int U = cfg::kUnroll;
  const int lane = threadIdx.x % G;
  const int64_t task = int64_t(blockIdx.x) * (cfg::kThreads / G) + threadIdx.x / G;
  const int64_t splits = a.plan.splits;
  if (task >= a.n * a.c * splits) return;
  const int64_t plane = task / splits;
  const int64_t lo = (task % splits) * a.plan.split_len, hi = imin(a.m, lo + a.plan.split_len);
  const T* xp = a.x + plane * a.m;
  const T* dp = kHasDy ? a.dy + plane * a.m : nullptr;
  T* op = a.out + plane * a.m;
  const A mu = a.mu[plane], cb = a.b[plane], c0 = a.c0[plane];
  const A ca = kHasDy ? a.a[plane] : A(0);
  auto f = [&](A x, A dy) {
    // backward: the cb term only where cb != 0 (x - mu is inf/NaN on a plane with an inf/NaN
    // pixel, and a cb of 0 means no statistic of that plane is used)
    const A r = (kHasDy && cb == A(0) ? A(0) : cb * (x - mu)) + c0;
    return kHasDy ? ca * dy + r : r;
  };
  auto apply_scalar = [&](int64_t i) {
    op[i] = Elem<T>::store(f(Elem<T>::load(xp[i]), kHasDy ? Elem<T>::load(dp[i]) : A(0)));
  };
  const Span sp = vector_span<T, V>(xp, lo, hi);
  for (int64_t i = lo + lane; i < sp.body; i += G) apply_scalar(i);
  for (int64_t j = sp.body + int64_t(lane) * V; j < sp.tail; j += int64_t(G) * V * U) {
    Pack<T, V> px[U], pd[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = j + int64_t(u) * G * V;
      if (k < sp.tail) {
        px[u] = load_pack<T, V>(xp + k);
        if constexpr (kHasDy) pd[u] = load_pack<T, V>(dp + k);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = j + int64_t(u) * G * V;
      if (k < sp.tail) {
        Pack<T, V> py;
#pragma unroll
        for (int v = 0; v < V; ++v)
          py.v[v] = Elem<T>::store(f(Elem<T>::load(px[u].v[v]), kHasDy ? Elem<T>::load(pd[u].v[v]) : A(0)));
        store_pack<T, V>(op + k, py);
      }
    }
  }
  for (int64_t i = sp.tail + lane; i < hi; i += G) apply_scalar(i);
}

// ------------------------------------------------------------------ channels_last kernels
/// CTA (tx, ty) = (blockDim.x, blockDim.y); blockIdx.x = (n * splits + piece) * col_tiles + tile.
struct ColumnTask {
  int64_t n, piece, c0, lo, hi;
  bool active;  // this thread's V channels exist
};

template <int V>
__device__ __forceinline__ ColumnTask column_task(int64_t c, int64_t m, const Plan& plan, int64_t col_tiles) {
  ColumnTask t;
  const int64_t tile = blockIdx.x % col_tiles, rest = blockIdx.x / col_tiles;
  t.piece = rest % plan.splits;
  t.n = rest / plan.splits;
  t.c0 = (tile * blockDim.x + threadIdx.x) * V;
  t.active = t.c0 < c;
  t.lo = t.piece * plan.split_len;
  t.hi = imin(m, t.lo + plan.split_len);
  return t;
}

template <typename T, typename Op, int V>
__global__ void __launch_bounds__(cfg::kThreads) reduce_columns_kernel(ReduceArgs<T, Op> a, int64_t col_tiles) {
  using A = acc_t<T>;
  using State = typename Op::State;
  constexpr int U = cfg::kUnroll;
  __shared__ State tile_states[cfg::kThreads * V];
  const ColumnTask t = column_task<V>(a.c, a.m, a.plan, col_tiles);
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  State s[V];
  A center[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {  // the given mu_i, or the first row of sample n (MomentsOp)
    center[v] = !t.active         ? A(0)
                : a.center        ? a.center[t.n * a.c + t.c0 + v]
                : Op::kShiftByFirst ? Elem<T>::load(a.x[t.n * a.m * a.c + t.c0 + v])
                                    : A(0);
    s[v] = Op::start(center[v]);
  }
  if (t.active) {
    const T* xr = a.x + t.n * a.m * a.c + t.c0;  // row r of sample n starts at xr + r * C
    const T* dr = Op::kHasDy ? a.dy + t.n * a.m * a.c + t.c0 : nullptr;
    for (int64_t r = t.lo + ty; r < t.hi; r += int64_t(TY) * U) {
      Pack<T, V> px[U], pd[U];
      int cnt = 0;  // valid rows form a prefix of the U
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t row = r + int64_t(u) * TY;
        if (row < t.hi) {
          px[u] = load_pack<T, V>(xr + row * a.c);
          if constexpr (Op::kHasDy) pd[u] = load_pack<T, V>(dr + row * a.c);
          cnt = u + 1;
        }
      }
#pragma unroll
      for (int v = 0; v < V; ++v) {
        A fx[U], fd[U] = {};
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (u < cnt) {
            fx[u] = Elem<T>::load(px[u].v[v]);
            if constexpr (Op::kHasDy) fd[u] = Elem<T>::load(pd[u].v[v]);
          }
        Op::template add<U>(s[v], fx, fd, cnt, center[v]);
      }
    }
  }
  // Fixed tree over the ty rows of the tile (TY is a power of two).
  auto slot = [&](int y, int v) -> State& { return tile_states[(y * TX + tx) * V + v]; };
#pragma unroll
  for (int v = 0; v < V; ++v) slot(ty, v) = s[v];
  __syncthreads();
  for (int step = TY / 2; step > 0; step /= 2) {
    if (ty < step) {
#pragma unroll
      for (int v = 0; v < V; ++v) Op::merge(slot(ty, v), slot(ty + step, v));
    }
    __syncthreads();
  }
  if (ty == 0 && t.active) {
#pragma unroll
    for (int v = 0; v < V; ++v) {
      if (a.plan.splits == 1) {
        Op::finalize(slot(0, v), a.out0, a.out1, t.n * a.c + t.c0 + v, a.m);
      } else {
        a.partials[(t.n * a.plan.splits + t.piece) * a.c + t.c0 + v] = slot(0, v);  // (N, splits, C)
      }
    }
  }
}

template <typename T, int V, bool kHasDy>
__global__ void __launch_bounds__(cfg::kThreads) apply_columns_kernel(ApplyArgs<T> a, int64_t col_tiles) {
  using A = acc_t<T>;
  constexpr int U = cfg::kUnroll;
  const ColumnTask t = column_task<V>(a.c, a.m, a.plan, col_tiles);
  if (!t.active) return;
  A mu[V], ca[V], cb[V], c0[V];
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int64_t i = t.n * a.c + t.c0 + v;
    mu[v] = a.mu[i];
    cb[v] = a.b[i];
    c0[v] = a.c0[i];
    ca[v] = kHasDy ? a.a[i] : A(0);
  }
  const int64_t base = t.n * a.m * a.c + t.c0;
  const int TY = blockDim.y;
  for (int64_t r = t.lo + threadIdx.y; r < t.hi; r += int64_t(TY) * U) {
    Pack<T, V> px[U], pd[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = r + int64_t(u) * TY;
      if (row < t.hi) {
        px[u] = load_pack<T, V>(a.x + base + row * a.c);
        if constexpr (kHasDy) pd[u] = load_pack<T, V>(a.dy + base + row * a.c);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t row = r + int64_t(u) * TY;
      if (row < t.hi) {
        Pack<T, V> py;
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const A xc = Elem<T>::load(px[u].v[v]) - mu[v];  // cb term as in apply_planes_kernel
          const A val = (kHasDy && cb[v] == A(0) ? A(0) : cb[v] * xc) + c0[v];
          py.v[v] = Elem<T>::store(kHasDy ? ca[v] * Elem<T>::load(pd[u].v[v]) + val : val);
        }
        store_pack<T, V>(a.out + base + row * a.c, py);
      }
    }
  }
}

// ------------------------------------------------------------------ partial merge
/// One thread per (n, c): merge its pieces in split order (from the first: it carries the
/// plane's shift), then finalize over the plane's m values.
template <typename A, typename Op>
__global__ void __launch_bounds__(cfg::kTinyThreads)
merge_partials_kernel(const typename Op::State* partials, int64_t n, int64_t c, int64_t m, int64_t splits,
                      bool channels_last, A* out0, A* out1) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * c) return;
  const int64_t base = channels_last ? (i / c) * splits * c + i % c : i * splits;
  const int64_t stride = channels_last ? c : 1;
  typename Op::State s = partials[base];
  for (int64_t k = 1; k < splits; ++k) Op::merge(s, partials[base + k * stride]);
  Op::finalize(s, out0, out1, i, m);
}

// ------------------------------------------------------------------ host launchers
/// Vector width for a launch: 16-byte packs when every pointer can be walked in them.
/// NCHW: the pointers share their offset within 16 bytes (heads align together);
/// channels_last: C is a whole number of packs and every pointer is 16-byte aligned.
template <typename T>
bool can_vectorize(const Params& p, const void* p0, const void* p1, const void* p2) {
  const void* ptrs[3] = {p0, p1, p2};
  for (const void* q : ptrs) {
    if (q == nullptr) continue;
    if (p.channels_last ? (!aligned16(q) || p.c % kVec<T> != 0) : residue16(q) != residue16(p0))
      return false;
  }
  return true;
}

template <typename T, typename Op, int V>
void launch_reduce_v(const ReduceArgs<T, Op>& a, bool channels_last, cudaStream_t stream) {
  if (!channels_last) {
    const int64_t tasks = a.n * a.c * a.plan.splits;
    if (a.plan.warp_per_plane) {
      constexpr int kGroups = cfg::kThreads / cfg::kWarp;
      reduce_planes_kernel<T, Op, V, cfg::kWarp>
          <<<unsigned(ceil_div(tasks, kGroups)), cfg::kThreads, 0, stream>>>(a);
    } else {
      reduce_planes_kernel<T, Op, V, cfg::kThreads><<<unsigned(tasks), cfg::kThreads, 0, stream>>>(a);
    }
  } else {
    const ColumnTile t = column_tile(a.c, V);
    reduce_columns_kernel<T, Op, V><<<unsigned(a.n * a.plan.splits * t.col_tiles), dim3(t.tx, t.ty), 0, stream>>>(
        a, t.col_tiles);
  }
}

/// Reduce pass: results in a.out0 / a.out1 (through a.partials when plan.splits > 1).
template <typename T, typename Op>
void launch_reduce(const Params& p, const ReduceArgs<T, Op>& a, cudaStream_t stream) {
  if (can_vectorize<T>(p, a.x, a.dy, nullptr)) {
    launch_reduce_v<T, Op, kVec<T>>(a, p.channels_last, stream);
  } else {
    launch_reduce_v<T, Op, 1>(a, p.channels_last, stream);
  }
  if (a.plan.splits > 1) {
    merge_partials_kernel<acc_t<T>, Op><<<unsigned(ceil_div(a.n * a.c, cfg::kTinyThreads)), cfg::kTinyThreads, 0,
                                          stream>>>(a.partials, a.n, a.c, a.m, a.plan.splits, p.channels_last,
                                                    a.out0, a.out1);
  }
}

template <typename T, int V, bool kHasDy>
void launch_apply_v(const ApplyArgs<T>& a, bool channels_last, cudaStream_t stream) {
  if (!channels_last) {
    const int64_t tasks = a.n * a.c * a.plan.splits;
    if (a.plan.warp_per_plane) {
      constexpr int kGroups = cfg::kThreads / cfg::kWarp;
      apply_planes_kernel<T, V, cfg::kWarp, kHasDy>
          <<<unsigned(ceil_div(tasks, kGroups)), cfg::kThreads, 0, stream>>>(a);
    } else {
      apply_planes_kernel<T, V, cfg::kThreads, kHasDy><<<unsigned(tasks), cfg::kThreads, 0, stream>>>(a);
    }
  } else {
    const ColumnTile t = column_tile(a.c, V);
    apply_columns_kernel<T, V, kHasDy>
        <<<unsigned(a.n * a.plan.splits * t.col_tiles), dim3(t.tx, t.ty), 0, stream>>>(a, t.col_tiles);
  }
}

/// Apply pass: out = a dy + b (x - mu) + c0 (the dy term only when kHasDy).
template <typename T, bool kHasDy>
void launch_apply(const Params& p, const ApplyArgs<T>& a, cudaStream_t stream) {
  if (can_vectorize<T>(p, a.x, kHasDy ? a.dy : nullptr, a.out)) {
    launch_apply_v<T, kVec<T>, kHasDy>(a, p.channels_last, stream);
  } else {
    launch_apply_v<T, 1, kHasDy>(a, p.channels_last, stream);
  }
}

}  // namespace datta::cuda
