// AVX2 + FMA build of the fused kernels (8 fp32 lanes), picked at run time by dispatch.cpp.
//
// The instruction set is raised with a target pragma rather than a per-file -mavx2 flag, so
// setup.py and CMake compile every source with one flag set (and no second source list).
// isa_prelude.h has already parsed every non-vector header at the baseline ISA.
#include "isa_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DATTA_HAVE_AVX2_BUILD 1
#pragma GCC target("avx2,fma,f16c")
// GCC's target pragma does not define the ISA macros; Sleef's headers (pulled in by at::vec)
// declare their vector functions only under them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY datta_avx2
#define CPU_CAPABILITY_AVX2
#include "kernels_impl.h"
#endif

namespace datta::cpu {
const KernelTable* kernels_avx2() {
#ifdef DATTA_HAVE_AVX2_BUILD
  static const KernelTable table = make_kernel_table("avx2");
  return &table;
#else
  return nullptr;
#endif
}
}  // namespace datta::cpu
