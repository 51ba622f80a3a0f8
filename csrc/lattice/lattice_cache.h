// Lattices kept across op calls for features the caller declares constant (the dense CRF's
// Gaussian term over pixel positions: the same lattice for every image of a size, rebuilt by every
// call until this cache). An entry is keyed by the features tensor's identity -- its storage
// pointer, sizes, strides, dtype, device and version counter -- and holds a reference to the
// tensor, so its memory cannot be reused by another tensor while the entry lives and an in-place
// change of the tensor (a new version) misses. Also keyed by the executor and, on CUDA, the
// stream: an entry is only ever used on the stream that built it. Least recently used entries are
// dropped beyond the capacity (default 8; 0 disables the cache).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

namespace rrm {
namespace lattice {

// A batch of lattices, one per image, as plain tensors on the values' device.
//   entry_vertex  (B, E) int32    vertex of pixel i's r-th corner, E = N (d+1), e = i (d+1) + r
//   entry_weight  (B, E) scalar   its barycentric weight
//   num_vertices  (B,)   int32    M_b, the number of lattice points of image b
//   neighbors     (B, d+1, M, 2) int32, M = max_b M_b: blur neighbours along each axis (-1: none)
//   offsets       (B, M+1) int32  the splat list of vertex v is [offsets[b, v], offsets[b, v+1])
//   splat_pixel   (B, E) int32, splat_weight (B, E) scalar: pixel and weight of each list entry,
//                 grouped by vertex, in increasing entry order (splat as a deterministic gather);
//                 built for CUDA and its emulation only (the CPU splats by scatter)
//   chunk_offsets (B, M+1) int32, chunk_begin / chunk_end (B, K) int32: the splat lists cut into
//                 chunks of at most kSplatChunk entries (K bounds the chunks of any image), CUDA only;
//                 chunk_offsets number them vertex by vertex, chunk_begin / chunk_end list them in
//                 launch order (ChunkTileKeyFunctor), chunk_slot (B, K) int32 gives each launch
//                 slot's vertex-order number (undefined when the two orders are the same);
//                 chunk_vertex (B, K) int32: 1 + the vertex of each vertex-order chunk, 0 for an
//                 unused one (the splat's fused chunk sums)
struct Lattice {
  int64_t B = 0, N = 0, E = 0, M = 0, K = 0;
  int d = 0;
  at::Tensor entry_vertex, entry_weight, num_vertices, neighbors, offsets, splat_pixel, splat_weight;
  at::Tensor chunk_offsets, chunk_begin, chunk_end, chunk_slot, chunk_vertex;
  // A counted lattice (build(..., counted = true)): M and K are capacities (N (d+1) vertices, the
  // chunks they can have), the counts are num_vertices and num_chunks (B,) in device memory, never
  // read by the host; rows, neighbours and chunks beyond them are left unwritten, and every launch
  // over vertices or chunks is a counted one (exec.for_each_counted).
  bool counted = false;
  at::Tensor num_chunks;
  // build(..., tile = P > 0; CUDA and its emulation, not counted): the chunks are also cut where a
  // vertex's list crosses from one tile of P consecutive pixels to the next (so every chunk lies in
  // one tile), chunk_begin/end/slot are in launch order by tile, and tile_offsets (B, ntiles + 2)
  // int32 gives image b's chunks of tile j at launch slots [tile_offsets[b, j], tile_offsets[b, j+1]).
  int64_t chunk_tile = 0;
  at::Tensor tile_offsets;
  at::Tensor tile_entry_local;  // (B, E) int32: each entry's chunk's launch slot less its tile's first
};

// A cached term: its lattice and, per normalization mode 0..2, its normaliser once computed
// (read and set through cache_norm / cache_set_norm). Lattice tensors are never written after the
// build.
struct CachedLattice {
  Lattice lat;
  std::array<at::Tensor, 3> norm;
};

// The entry of `features` for executor `exec` (a name) on stream `stream` (0 off CUDA) built with
// images `chunk` at a time, or null. features must be the very tensor given to cache_put (or a
// tensor with the same storage, geometry and version).
std::shared_ptr<CachedLattice> cache_find(const at::Tensor& features, const char* exec, int64_t stream, int64_t chunk);
// Stores `entry` for `features` (no-op when the capacity is 0 or the tensor has no version
// counter: an inference tensor could change in place unseen).
void cache_put(const at::Tensor& features, const char* exec, int64_t stream, int64_t chunk,
               std::shared_ptr<CachedLattice> entry);
at::Tensor cache_norm(const CachedLattice& entry, int64_t norm);
void cache_set_norm(CachedLattice& entry, int64_t norm, const at::Tensor& n);

// Lattices handed from an autograd node's forward to its backward, outside the cache: the C++
// autograd of the filter and of dense_crf (lattice_autograd.cpp) opens a record scope around its
// forward op, which stores each lattice it used here (and the filter, when asked, its blurred rows
// B S in); the node keeps the Handoff (a capsule in its saved data) and opens a supply scope around
// its backward op, which takes a lattice from it instead of building one again when it was built
// for the same features (the cache's key: the tensor's storage, geometry and version, the executor,
// stream and images per build). A lattice's normalisers, once computed, go with it (CachedLattice).
// Scopes are per thread, nest (each restores what it replaced), and each op claims them once, at
// its start (handoff_claim), so a nested op never sees its caller's. Nothing is recorded or
// supplied while a CUDA graph is captured (cache_ok).
struct Handoff : torch::CustomClassHolder {
  struct Item {
    std::shared_ptr<const void> key;  // what it was built for (opaque)
    std::shared_ptr<CachedLattice> entry;
  };
  bool want_lattices = true;               // record the lattices (knob lattice_to_backward)
  std::vector<Item> items;                 // one per lattice recorded
  bool want_rows = false;                  // the filter: record the blurred rows too (the features' gradient)
  at::Tensor rows;                         // (B, M, Cs): B S in, blurred in the order `rows_reverse`
  std::shared_ptr<CachedLattice> rows_of;  // the lattice they were blurred on
  bool rows_reverse = false;
  bool want_trajectory = false;  // dense_crf: record every step's Q too
  at::Tensor trajectory;         // (S + 1, B, N, L): Q^0 .. Q^S of the forward
};

class HandoffScope {
 public:
  // record: the op records its lattice into h; else it takes h's lattice if it is for its features.
  HandoffScope(Handoff* h, bool record);
  ~HandoffScope();
  HandoffScope(const HandoffScope&) = delete;
  HandoffScope& operator=(const HandoffScope&) = delete;

 private:
  Handoff* prev_;
  bool record_;
};

struct HandoffClaim {
  Handoff* record = nullptr;  // where to record this op's lattice, or null
  Handoff* supply = nullptr;  // a lattice offered to this op, or null
};
// This thread's open scopes, cleared for anything the op calls.
HandoffClaim handoff_claim();
// The supplied lattice if it was recorded for `features` (built `chunk` images at a time by executor
// `exec` on `stream`), else null.
std::shared_ptr<CachedLattice> handoff_find(const Handoff& h, const at::Tensor& features, const char* exec,
                                            int64_t stream, int64_t chunk);
// Records `entry`, built for `features`, into h (replacing one recorded for the same key).
void handoff_put(Handoff& h, const at::Tensor& features, const char* exec, int64_t stream, int64_t chunk,
                 std::shared_ptr<CachedLattice> entry);

// dense_crf backwards that reran the forward's mean-field steps (no trajectory handed over).
void note_crf_rerun();
int64_t crf_reruns();
// Lattices built so far in this process (every build: tests count the builds a call makes).
void note_build();
int64_t builds();

struct CacheStats {
  int64_t entries = 0, capacity = 0, hits = 0, misses = 0, bytes = 0;
};
CacheStats cache_stats();
void cache_set_capacity(int64_t capacity);  // drops entries beyond it

// Counted lattices built so far in this process (Lattice::counted; tests check that a setting takes
// that path).
void note_counted_build();
int64_t counted_builds();
// Mean-field steps run by the tiled mean field's block kernels (knob mean_field_tile_kernel >= 1).
void note_tiled_steps(int64_t n);
int64_t tiled_steps();
// Hash tables of the launches' build (GPU, emulated, CPU passes) given up as too full and built anew
// larger (InsertFunctor; tests check when a table is outgrown).
void note_table_retry();
int64_t table_retries();
void cache_clear();  // drops every entry and zeroes the counters
// Drops the entries of the features whose data starts at `data` (an owner's tensor going away, e.g.
// a pydensecrf DenseCRF's copies of its features); returns how many.
int64_t cache_evict(const void* data);

}  // namespace lattice
}  // namespace rrm
