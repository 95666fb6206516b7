// Launch geometry of the CUDA kernels that does not need CUDA: kept in a plain header so that the
// C++ tests (csrc/tests/test_cg.cpp, built without CUDA) check it.
#pragma once

#include <algorithm>
#include <cstdint>

namespace imaml_ext {

// Blocks per system for a persistent-grid kernel whose blocks stride over their system's `tiles`
// equal tiles (xtxv_tiles_kernel, xtxv_bulk_kernel), B systems, `resident` blocks of that kernel
// resident on the device at once (the occupancy calculator's blocks per SM times the SMs).
//
// All B x blocks fit in one wave: a block past the resident ones starts only when another has
// ended, and since every block holds about the same number of tiles, that second wave costs
// almost a whole block's time while a few SMs work. (Launching ceil(2 SMs / B) blocks per
// system with two resident per SM did exactly that at B = 32 on a 132-SM card: 288 blocks, 264
// resident.) Then the count is evened out: the fewest blocks that keep the largest number of
// tiles per block, so no block waits on a neighbour's extra tile and the end's atomics are fewer.
// At least one block per system (B > resident: one block per system, in waves) and at most one
// per tile.
inline int64_t persistent_blocks_per_system(int64_t resident, int64_t B, int64_t tiles) {
  if (tiles < 1) return 1;
  const int64_t fit = B > 0 ? std::max<int64_t>(resident, 1) / B : 1;
  const int64_t blocks = std::clamp<int64_t>(fit, 1, tiles);
  const int64_t per_block = (tiles + blocks - 1) / blocks;
  return (tiles + per_block - 1) / per_block;
}

}  // namespace imaml_ext
