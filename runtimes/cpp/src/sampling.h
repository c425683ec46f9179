// The host's copy of runtimes/sampling.py (and guided_logits of runtimes/loop.py): CFG mixing,
// temperature, top-k, top-p and the inverse-CDF draw with the counter-based noise, written with
// the same ATen operators in the same order and dtypes, so equal logits give equal tokens.
#pragma once

#include <ATen/core/Tensor.h>

#include "hita/host.h"

namespace hita::detail {

// The logits sampled from at one step (loop.py guided_logits), float32 on the CPU.
//   raw: [B, V] executor logits, B = 2n with CFG (cond rows first); step = pos - 1, -1 = prefill.
//   returns: [n, V].
at::Tensor guided_logits(const at::Tensor& raw, const SamplingOptions& o, int64_t step);

// NoiseStream(seed).uniform(step, rows, row_offset): float64 [rows] on the CPU.
at::Tensor uniforms(const SamplingOptions& o, int64_t step, int64_t rows, uint64_t row_offset);

// sample(logits, opts, u): greedy, or inverse CDF at one uniform per row.
//   logits: float32 [n, V] on the CPU; u: float64 [n]. returns: int64 [n].
at::Tensor sample(at::Tensor logits, const SamplingOptions& o, const at::Tensor& u);

}  // namespace hita::detail
