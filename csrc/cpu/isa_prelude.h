// Included by each per-ISA kernel file BEFORE it raises the target instruction set.
//
// Every header outside at::vec is parsed here, at the baseline ISA, so the inline functions it
// defines (c10::Half conversions, std::, at::parallel_for) are never emitted with AVX2/AVX-512
// instructions: the linker may keep any one copy of an inline function, and an AVX-512 copy
// must not be the one a baseline caller runs.  Only at::vec (whose inline namespace is named
// after CPU_CAPABILITY) and the kernels themselves (anonymous namespace) see the raised target.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>
#include <c10/macros/Macros.h>

#include "kernels.h"
#include "launch_config.h"
