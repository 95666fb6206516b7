// The function multi-versioning macros of the CPU kernel definitions (simd.cpp, hvp_simd.cpp),
// kept in one place so every kernel picks its clone by the same rule.
//
// IMAML_SIMD: an AVX-512 clone, an AVX2+FMA clone and a baseline clone, chosen at load time by
// cpuid. The clones are named by micro-architecture level ("arch=x86-64-v4" / "-v3"), which GCC's
// resolver tests by feature; "arch=haswell" would be taken only on a CPU that *is* a Haswell
// (__builtin_cpu_is), i.e. almost never.
// IMAML_INLINE: the bodies must be inlined into each clone; a shared out-of-line body would be
// compiled for the baseline target only.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(IMAML_NO_CLONES)
#define IMAML_SIMD __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define IMAML_SIMD
#endif
#define IMAML_INLINE inline __attribute__((always_inline))
