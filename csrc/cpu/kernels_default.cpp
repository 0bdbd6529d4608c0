// Baseline build of the fused kernels (SSE2 on x86-64, NEON on arm64): runs on any CPU.
#include "isa_prelude.h"

#define CPU_CAPABILITY datta_default
#define CPU_CAPABILITY_DEFAULT
#include "kernels_impl.h"

namespace datta::cpu {
const KernelTable* kernels_default() {
  static const KernelTable table = make_kernel_table("default");
  return &table;
}
}  // namespace datta::cpu
