// The training-mode zoneout masks of one seed (lstmlab.nn.cell.zoneout_masks), for the variants' loops.
//
// Element k of the flat (2, T, B, H) mask is 1 iff the high 32 bits of SplitMix64's k-th output from `seed` (Steele
// et al. 2014; a pure function of seed + (k + 1) * gamma, so any thread draws any element) are below the plane's
// threshold round(z * 2^32). lstmlab.nn.masks.zoneout_mask_torch computes the same bits in torch.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "lstm_blocks.h"

#include <algorithm>
#include <cstdint>

namespace lstmlab {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T_>
void fill_zoneout(T_* out, uint64_t seed, int64_t plane, const uint64_t (&threshold)[2]) {
  at::parallel_for(0, 2 * plane, kParallelElems, [&](int64_t k0, int64_t k1) {
    for (int64_t p = 0; p < 2; ++p) {
      const int64_t lo = std::max(k0, p * plane), hi = std::min(k1, (p + 1) * plane);
      const uint64_t thr = threshold[p];
      for (int64_t k = lo; k < hi; ++k) {
        const uint64_t bits = splitmix64(seed + static_cast<uint64_t>(k + 1) * kGolden) >> 32;
        out[k] = bits < thr ? T_(1) : T_(0);
      }
    }
  });
}

void zoneout_mask(int64_t seed, int64_t threshold_c, int64_t threshold_h, at::Tensor out) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous(), "lstmlab_native: out must be a contiguous CPU tensor");
  TORCH_CHECK(out.dim() >= 1 && out.size(0) == 2, "lstmlab_native: out must have 2 planes (c, h)");
  TORCH_CHECK(0 <= threshold_c && threshold_c <= (int64_t{1} << 32) && 0 <= threshold_h &&
                  threshold_h <= (int64_t{1} << 32),
              "lstmlab_native: zoneout thresholds must lie in [0, 2^32]");
  const uint64_t threshold[2] = {static_cast<uint64_t>(threshold_c), static_cast<uint64_t>(threshold_h)};
  const int64_t plane = out.numel() / 2;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "lstmlab_zoneout_mask", [&] {
    fill_zoneout<scalar_t>(out.data_ptr<scalar_t>(), static_cast<uint64_t>(seed), plane, threshold);
  });
}

}  // namespace
}  // namespace lstmlab
