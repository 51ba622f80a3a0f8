// Run-time knobs of the CUDA launch configuration, so that a GPU session can time the alternatives
// in one process (rrm_cuda._C.tuning() / rrm_cuda._C.set_tuning(name, value);
// benchmarks/cuda_profile.py). Results never depend on them: every setting gives the same bits, on
// CUDA and in the emulated launch (tests/test_permutohedral_filter.py, tests/test_energy.py), except
// kMeanFieldTile, which regroups sums (see there). The CPU
// kernels ignore them, but for kCpuBuildPasses and kCpuCrfPairs.
#pragma once

#include <cstdint>

namespace rrm {
namespace tuning {

enum Knob : int {
  kSplatTile,                // pixels per tile by which the splat's chunks are launched (0: vertex order); 0
                             // (H100, session 13: vertex order 4-8 % faster than tile 64 in two A/B runs).
                             // Read by each lattice build.
  kEnergyRows4,              // energy loss: lattice rows padded to a multiple of 4 channels, splat and blurs
                             // four channels per thread (1), or one channel per thread (0); 1
  kEnergyPairSplat,          // energy loss, exact gradient: its two splats in one pass (1) or two (0); 1
  kSliceGroup4,              // fused mean field's slice: vertex rows summed four channels at a time (1) or
                             // whole (0); 1
  kEnergySlice4,             // energy loss's slice with rows of 4: four channels per load (1) or one (0); 1
  kSplatFusedReduce,         // splats: each vertex's chunk sums added up in the chunk launch by its last chunk
                             // (1) or by a second launch (0); 1
  kBlurPairs,                // blurs: two lattice axes per launch (1, BlurPairFunctor) or one (0); 1
  kCountedLattice,           // dense_energy, permutohedral_filter, dense_crf on the GPU: lattices built without
                             // reading its vertex count back (1: buffers for N (d+1) vertices, launches over
                             // the counts in device memory, no host wait; while the workspace stays within
                             // 1 GiB) or with the read (0); 0. Inside a CUDA graph capture always counted.
  kMeanFieldTile,            // dense_crf's fused GPU mean field: pixels per tile (0: off; default 0). With
                             // P > 0 the lattices' splat chunks are also cut where a vertex's list crosses
                             // from one tile of P consecutive pixels to the next, and a step's splat runs
                             // one block per tile (kMeanFieldTileKernel). The cut regroups the splat sums:
                             // results differ from P = 0 by rounding (the one knob whose bits differ);
                             // every kMeanFieldTileKernel value gives the same bits for a given P.
  kMeanFieldTileKernel,      // with kMeanFieldTile > 0: 0 the chunk splat over the cut chunks (rows of Q
                             // gathered from global memory), 1 one block per tile summing its chunks
                             // from the tile's rows of Q staged in shared memory, 2 the same block also
                             // computing those rows (the slice and softmax of the tile's pixels) so that
                             // Q never goes to global memory between steps, 3 the same with the tile's
                             // vertex rows (one per chunk) staged in shared memory for its slice first
                             // (tiles with more than 2P chunks read them from global memory); 2
  kInsertCornerMajor,        // lattice build, GPU: the hash insert's threads corner-major (1: a warp takes
                             // one corner of 32 pixels) or entry-major (0: all corners of 5 pixels); 0
  kEmulateCapture,           // tests: the emulated launch acts as inside a CUDA graph capture (exec.capturing():
                             // counted lattices, no lattice cache), so that CPU CI runs a capture's host
                             // logic; 0. Not read by CUDA (a real capture is asked of the stream).
  kCpuBuildPasses,           // CPU lattice build of fewer images than threads: 0 one pass per image, its pixels
                             // cut into a range per thread (build_image_cpu), or 1 the launches' passes
                             // (embed, insert, assign, resolve, neighbours) with every thread on each; 0.
                             // The same lattice either way but for the vertex numbering (the passes number
                             // vertices by the entries that won the slots' races), so the same filter
                             // results (tests compare both).
  kCpuCrfPairs,              // dense_crf's CPU mean field: images that share every lattice in pairs, one pass
                             // over the lattice entries for both (1), or one at a time (0); 1. The same bits.
  kInsertShards,             // lattice build: the hash insert's count of claimed slots per image split over up
                             // to this many counters, each on its own 128-byte line (a slot's claim counts on
                             // counter slot mod S), so that the claims of an image do not all serialise on
                             // one word, and no counter at all on a table of 2E slots (it holds every
                             // entry: counted lattices, last retries); 32. 0: one counter per image on every
                             // table (the insert before session 25). The same lattice for every value
                             // (lattice_common.h, InsertFunctor).
  kFlatScanMin,              // GPU lattice build: rows of per-image sums (chunk offsets) of at least this many
                             // elements, in batches of two or more images, are scanned as one flat row by
                             // cub and then rebased per row (row_cumsum), not by ATen's row kernel; 32768.
                             // The same sums either way.
  kEnergyBwdBlocks,          // energy loss inputs' backward on the GPU: one thread per gradient pixel writing its
                             // stride x stride input block of every class (1), or one per input column pair
                             // and class (0, before session 25); 1. The same values. Name energy_backward_blocks.
  kEnergyPackBlocks,         // energy loss on the GPU: its (B, K, N) probabilities packed into lattice rows by a
                             // transpose through shared memory (1) or one thread per (pixel, channel) (0,
                             // before session 25); 1. The same values. Name energy_pack_blocks.
  kEmulateOrder,             // tests: the order in which the emulated launch visits a launch's threads (and a
                             // block's threads in each phase): 0 in reverse, 1 in order, s >= 2 a permutation
                             // seeded by s; 0. Results must not depend on it (a launch whose threads read what
                             // other threads of it write would show). Not read by CUDA.
  kLatticeToBackward,        // the C++ autograd of permutohedral_filter and dense_crf: the forward hands its
                             // lattices to the backward (the filter, with the features' gradient, its
                             // blurred rows too; dense_crf its normalisers), which then builds none (1), or
                             // the backward builds them again (0, before session 29); 1. The same bits.
                             // Read by each forward that records a graph. Name lattice_to_backward.
  kCrfTrajectoryToBackward,  // dense_crf's autograd: the forward also hands every step's Q ((iterations + 1)
                             // B N L values) to the backward, which then does not rerun the steps (1), or
                             // the backward reruns them (0, before session 29); 1. The gradients differ in
                             // the last bits (the fused forward's Q against the rerun's generic loop).
                             // Name crf_trajectory_to_backward.
  kItemMinBlocks,            // GPU, float: the mean field's splat and slice kernels (the two that the H200's
                             // profile found latency-bound at 50 % occupancy, capped by their 56 and 64
                             // registers; also the filter's and energy loss's float4 splats) compiled for at
                             // least this many resident blocks of 256 threads per SM (__launch_bounds__: 5
                             // allows 48 registers, 6 allows 40: more warps in flight, at the price of
                             // spills: ptxas, sm_90a, 5: the mean field's splat and slice spill 84 and 72
                             // bytes per thread, 6: 172 and 136; benchmarks/ptxas_table.py), or as the
                             // compiler likes (0); 0. Other values act as 0. The same bits: registers do not
                             // change the arithmetic. Item launches only (not counted ones: a graph's).
                             // Name item_min_blocks. An experiment for a GPU session (cuda_profile.py's
                             // "register cap" group).
  kFilterRows4,              // GPU: the generic filter's lattice rows (permutohedral_filter and its gradients,
                             // dense_crf's backward and per-term loop) padded to a multiple of 4 channels,
                             // its splat and blurs four channels per thread (1, for C >= 4), as the energy
                             // loss's and the fused mean field's are, or one channel per thread (0, before
                             // session 30); 1. The same bits. Name filter_rows4.
  kNumKnobs
};

int64_t get(Knob k);
void set(Knob k, int64_t value);  // value >= 0
const char* name(Knob k);

}  // namespace tuning
}  // namespace rrm
