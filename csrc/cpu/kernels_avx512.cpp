// AVX-512 (F/BW/VL/DQ) build of the fused kernels (16 fp32 lanes), picked at run time by
// dispatch.cpp.  Same scheme as kernels_avx2.cpp: a target pragma after the baseline prelude.
#include "isa_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DATTA_HAVE_AVX512_BUILD 1
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
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
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif
#define CPU_CAPABILITY datta_avx512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
#endif

namespace datta::cpu {
const KernelTable* kernels_avx512() {
#ifdef DATTA_HAVE_AVX512_BUILD
  static const KernelTable table = make_kernel_table("avx512");
  return &table;
#else
  return nullptr;
#endif
}
}  // namespace datta::cpu
