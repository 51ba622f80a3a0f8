// The lattice cache (lattice_cache.h): a small LRU list under one mutex.
#include "lattice/lattice_cache.h"

#include <atomic>
#include <list>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace rrm {
namespace lattice {
namespace {

struct Key {
  const void* data = nullptr;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
  uint32_t version = 0;
  std::string exec;
  int64_t stream = 0, chunk = 0;
  bool operator==(const Key& o) const {
    return data == o.data && sizes == o.sizes && strides == o.strides && dtype == o.dtype && device == o.device &&
           version == o.version && exec == o.exec && stream == o.stream && chunk == o.chunk;
  }
};

Key make_key(const at::Tensor& f, const char* exec, int64_t stream, int64_t chunk) {
  Key k;
  k.data = f.data_ptr();
  k.sizes = f.sizes().vec();
  k.strides = f.strides().vec();
  k.dtype = f.scalar_type();
  k.device = f.device();
  k.version = f.unsafeGetTensorImpl()->version_counter().current_version();
  k.exec = exec;
  k.stream = stream;
  k.chunk = chunk;
  return k;
}

struct Item {
  Key key;
  at::Tensor features;  // keeps the storage (and so the key's pointer) alive
  // the features' own version counter (shared, not a copy: a detach below the autograd keys would
  // start a fresh one), to see writes made after the entry through any view of the features
  c10::VariableVersion version;
  std::shared_ptr<CachedLattice> entry;
};

struct Store {
  std::mutex mu;
  std::list<Item> items;  // most recently used first
  int64_t capacity = 8, hits = 0, misses = 0;
  void trim() {
    while (static_cast<int64_t>(items.size()) > capacity) items.pop_back();
  }
};

// Never destroyed: entries may hold CUDA memory, which must not be freed after the CUDA runtime
// and the caching allocator have shut down at exit.
Store& store() {
  static Store* s = new Store();
  return *s;
}

bool cacheable(const at::Tensor& f) { return f.defined() && !f.is_inference() && f.numel() > 0; }

int64_t nbytes(const at::Tensor& t) { return t.defined() ? static_cast<int64_t>(t.nbytes()) : 0; }

}  // namespace

std::shared_ptr<CachedLattice> cache_find(const at::Tensor& features, const char* exec, int64_t stream, int64_t chunk) {
  if (!cacheable(features)) return nullptr;
  const Key key = make_key(features, exec, stream, chunk);
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mu);
  for (auto it = s.items.begin(); it != s.items.end();) {
    // An entry whose own tensor was written in place since (its version counter, shared with every
    // view and detached alias of the features, moved) is stale for good, even for a key that matches:
    // a new alias of the same memory (torch.from_numpy(f.numpy()), .data) starts a counter of its own.
    if (it->version.current_version() != it->key.version) {
      it = s.items.erase(it);
      continue;
    }
    if (it->key == key) {
      s.items.splice(s.items.begin(), s.items, it);
      ++s.hits;
      return s.items.front().entry;
    }
    ++it;
  }
  ++s.misses;
  return nullptr;
}

void cache_put(const at::Tensor& features, const char* exec, int64_t stream, int64_t chunk,
               std::shared_ptr<CachedLattice> entry) {
  if (!cacheable(features)) return;
  Key key = make_key(features, exec, stream, chunk);
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.capacity <= 0) return;
  for (auto it = s.items.begin(); it != s.items.end(); ++it) {
    if (it->key == key) {  // built concurrently by another thread: keep one
      s.items.erase(it);
      break;
    }
  }
  // detached: the entry keeps the storage (and version counter), not an autograd graph
  s.items.push_front(
      Item{std::move(key), features.detach(), features.unsafeGetTensorImpl()->version_counter(), std::move(entry)});
  s.trim();
}

namespace {
thread_local Handoff* t_record = nullptr;
thread_local Handoff* t_supply = nullptr;
}  // namespace

HandoffScope::HandoffScope(Handoff* h, bool record) : record_(record) {
  Handoff*& slot = record ? t_record : t_supply;
  prev_ = slot;
  slot = h;
}

HandoffScope::~HandoffScope() { (record_ ? t_record : t_supply) = prev_; }

HandoffClaim handoff_claim() {
  HandoffClaim c{t_record, t_supply};
  t_record = t_supply = nullptr;
  return c;
}

std::shared_ptr<CachedLattice> handoff_find(const Handoff& h, const at::Tensor& features, const char* exec,
                                            int64_t stream, int64_t chunk) {
  if (h.items.empty() || !cacheable(features)) return nullptr;
  const Key key = make_key(features, exec, stream, chunk);
  for (const auto& it : h.items)
    if (*static_cast<const Key*>(it.key.get()) == key) return it.entry;
  return nullptr;
}

void handoff_put(Handoff& h, const at::Tensor& features, const char* exec, int64_t stream, int64_t chunk,
                 std::shared_ptr<CachedLattice> entry) {
  if (!cacheable(features)) return;
  auto key = std::make_shared<const Key>(make_key(features, exec, stream, chunk));
  for (auto& it : h.items) {
    if (*static_cast<const Key*>(it.key.get()) == *key) {
      it.entry = std::move(entry);
      return;
    }
  }
  h.items.push_back({std::move(key), std::move(entry)});
}

at::Tensor cache_norm(const CachedLattice& entry, int64_t norm) {
  std::lock_guard<std::mutex> lock(store().mu);
  return entry.norm.at(norm);
}

void cache_set_norm(CachedLattice& entry, int64_t norm, const at::Tensor& n) {
  std::lock_guard<std::mutex> lock(store().mu);
  entry.norm.at(norm) = n;
}

CacheStats cache_stats() {
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mu);
  CacheStats st;
  st.entries = static_cast<int64_t>(s.items.size());
  st.capacity = s.capacity;
  st.hits = s.hits;
  st.misses = s.misses;
  for (const auto& it : s.items) {
    const Lattice& l = it.entry->lat;
    for (const at::Tensor* t : {&l.entry_vertex, &l.entry_weight, &l.num_vertices, &l.neighbors, &l.offsets,
                                &l.splat_pixel, &l.splat_weight, &l.chunk_offsets, &l.chunk_begin, &l.chunk_end,
                                &l.chunk_slot, &l.chunk_vertex, &l.num_chunks, &l.tile_offsets, &l.tile_entry_local})
      st.bytes += nbytes(*t);
    for (const auto& n : it.entry->norm) st.bytes += nbytes(n);
  }
  return st;
}

void cache_set_capacity(int64_t capacity) {
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mu);
  s.capacity = capacity < 0 ? 0 : capacity;
  s.trim();
}

namespace {
std::atomic<int64_t> g_builds{0};
std::atomic<int64_t> g_crf_reruns{0};
std::atomic<int64_t> g_counted_builds{0};
std::atomic<int64_t> g_tiled_steps{0};
std::atomic<int64_t> g_table_retries{0};
}  // namespace

void note_crf_rerun() { g_crf_reruns.fetch_add(1, std::memory_order_relaxed); }
int64_t crf_reruns() { return g_crf_reruns.load(std::memory_order_relaxed); }
void note_build() { g_builds.fetch_add(1, std::memory_order_relaxed); }
int64_t builds() { return g_builds.load(std::memory_order_relaxed); }
void note_counted_build() { g_counted_builds.fetch_add(1, std::memory_order_relaxed); }
int64_t counted_builds() { return g_counted_builds.load(std::memory_order_relaxed); }
void note_tiled_steps(int64_t n) { g_tiled_steps.fetch_add(n, std::memory_order_relaxed); }
int64_t tiled_steps() { return g_tiled_steps.load(std::memory_order_relaxed); }
void note_table_retry() { g_table_retries.fetch_add(1, std::memory_order_relaxed); }
int64_t table_retries() { return g_table_retries.load(std::memory_order_relaxed); }

int64_t cache_evict(const void* data) {
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mu);
  const auto before = s.items.size();
  s.items.remove_if([data](const Item& it) { return it.key.data == data; });
  return static_cast<int64_t>(before - s.items.size());
}

void cache_clear() {
  Store& s = store();
  std::lock_guard<std::mutex> lock(s.mu);
  s.items.clear();
  s.hits = s.misses = 0;
}

}  // namespace lattice
}  // namespace rrm
