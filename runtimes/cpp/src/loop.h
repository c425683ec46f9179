// The host's one decode loop over the StepExecutor interface (runtimes/loop.py generate_tokens
// and generate_images): prefill, every decode step with CFG and the draw, tokens to pixels.
#pragma once

#include <vector>

#include "executor.h"
#include "hita/host.h"

namespace hita::detail {

// Generates one image per class id with `executor`. Requests larger than the executor's row limit
// run in chunks; image r always draws noise row o.row_offset + r, so chunking never changes an
// image. Throws HostError for bad options or class ids.
Generation generate(StepExecutor& executor, const ModelInfo& info, const std::vector<int64_t>& class_ids,
                    const SamplingOptions& o, bool decode_images);

}  // namespace hita::detail
