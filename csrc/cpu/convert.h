// Branch-free fp16/bf16 <-> fp32 conversions (round to nearest even on store), written so that the
// compiler can vectorise them. They give the same bits as torch's CPU conversions (c10::Half and
// c10::BFloat16), so an element stored here equals the one the eager oracle stores.
#pragma once

#include <cstdint>
#include <cstring>

// Forced inlining: the kernels are built with LTO, whose module-wide growth limits otherwise leave
// small helpers as calls inside the hot loops, and a call keeps a loop scalar.
#define PECKER_INLINE inline __attribute__((always_inline))

namespace pecker {
namespace cpu {

PECKER_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

PECKER_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

PECKER_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; every NaN becomes the canonical quiet NaN 0x7FC0, as in c10::BFloat16.
PECKER_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

// IEEE half -> float, exact for normals, subnormals, infinities and NaN. Normals are rebiased by a
// float multiply; subnormals are rebuilt as (magic + mantissa) - magic.
PECKER_INLINE float fp16_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? float_to_bits(denormalized) : float_to_bits(normalized);
  return bits_to_float(sign | magnitude);
}

// float -> IEEE half with round to nearest even (overflow to inf, NaN to 0x7E00). The float adds
// below do the rounding in hardware: scaling moves the half's last mantissa bit to the float's.
PECKER_INLINE uint16_t float_to_fp16(float f) {
  const float scaled = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  const float base = bits_to_float((bias >> 1) + 0x07800000u) + scaled;
  const uint32_t bits = float_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

}  // namespace cpu
}  // namespace pecker
