#pragma once
// The fused kq_pre kernel (flash_mta.h) feeds its tensor-core convolution with fp16 operands: the
// scaled logits S0 = q . k / sqrt(D) and the kq_pre weights. fp16 ends at 65504, so larger logits would
// become infinities (a NaN output where the reference is finite), and a head whose weights all lie below
// 2^-14 (fp16's smallest normal number) would keep only a few bits of them. Callers that hold their
// inputs on the host (`mta attn`) check them here and run the float32 materialized op where they fall
// outside; the model's layers cannot check without a device reduction and a synchronization per layer,
// and rely on the trainer's non-finite-loss stop (see docs/flash-mta.md, "Precision").
#include <string>

#include "attention/attention_op.h"
#include "attention/spec.h"

namespace mta {

// The largest |S0| the range check accepts: below fp16's 65504 by more than the bf16 rounding of q and
// k (2^-8 relative on each) can add.
inline constexpr double kFusedMaxLogit = 60000.0;

// Empty when the fused kernels may run on these inputs, else one line saying which input is out of
// range. q, k: [B, H, T, D] float; kq_pre: [H, cq, ck] (read only when spec.kq_pre is set). Only specs
// with kq_pre have fp16 operands (head mixing carries its values as two bf16 terms), so for the others
// the answer is always empty. The logit bound is per head: max_i |q_i| * max_j |k_j| / sqrt(D)
// (Cauchy-Schwarz; O(B H T D) work, not O(T^2)), so inputs near the limit may be sent to the
// materialized op although their actual logits would fit.
std::string fused_fp16_range_problem(const AttentionSpec& spec, const AttnDims& dims, const float* q, const float* k,
                                     const float* kq_pre);

}  // namespace mta
