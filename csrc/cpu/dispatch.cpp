// Run-time choice of the kernel table: the widest instruction set that both this CPU and the
// build support, optionally capped by DATTA_CPU_CAPABILITY (like ATen's ATEN_CPU_CAPABILITY).
#include <cstdlib>
#include <cstring>
#include <string>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include "kernels.h"

namespace datta::cpu {
namespace {

enum Level { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

/// What the CPU (and OS: libgcc checks XCR0 for the YMM/ZMM state) supports.
Level cpu_level() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const Level level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
    return kDefault;
  }();
  return level;
#else
  return kDefault;
#endif
}

Level env_cap() {
  const char* env = std::getenv("DATTA_CPU_CAPABILITY");
  if (env == nullptr || *env == '\0') return kAvx512;
  if (std::strcmp(env, "default") == 0) return kDefault;
  if (std::strcmp(env, "avx2") == 0) return kAvx2;
  if (std::strcmp(env, "avx512") == 0) return kAvx512;
  TORCH_CHECK(false, "DATTA_CPU_CAPABILITY must be one of default, avx2, avx512; got '", env, "'");
}

}  // namespace

const KernelTable& kernels() {
  const Level level = std::min(cpu_level(), env_cap());
  if (level >= kAvx512 && kernels_avx512() != nullptr) return *kernels_avx512();
  if (level >= kAvx2 && kernels_avx2() != nullptr) return *kernels_avx2();
  return *kernels_default();
}

std::string cpu_build_info() {
  const KernelTable& k = kernels();
  std::string variants = "default";
  if (kernels_avx2() != nullptr) variants += ",avx2";
  if (kernels_avx512() != nullptr) variants += ",avx512";
  static const char* const kCpu[] = {"default", "avx2", "avx512"};
#ifdef _OPENMP
  const char* openmp = "1";
#else
  const char* openmp = "0";
#endif
  return std::string("openmp=") + openmp + ";vec=" + k.isa + ";cpu_capability=" + k.isa +
         ";vec_width_f32=" + std::to_string(k.vec_width_f32) +
         ";vec_width_f64=" + std::to_string(k.vec_width_f64) + ";vec_variants=" + variants +
         ";cpu_supports=" + kCpu[cpu_level()] + ";omp_threads=" + std::to_string(at::get_num_threads());
}

}  // namespace datta::cpu
