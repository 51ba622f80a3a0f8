#include "common/tuning.h"

#include <atomic>

namespace rrm {
namespace tuning {
namespace {

std::atomic<int64_t> g_values[kNumKnobs] = {0, 1, 1, 1, 1, 1, 1, 0, 0, 2, 0, 0, 0, 1, 32, 32768, 1, 1, 0, 1, 1, 0, 1};
const char* const g_names[kNumKnobs] = {"splat_tile",
                                        "energy_rows4",
                                        "energy_pair_splat",
                                        "slice_group4",
                                        "energy_slice4",
                                        "splat_fused_reduce",
                                        "blur_pairs",
                                        "counted_lattice",
                                        "mean_field_tile",
                                        "mean_field_tile_kernel",
                                        "insert_corner_major",
                                        "emulate_capture",
                                        "cpu_build_passes",
                                        "cpu_crf_pairs",
                                        "insert_shards",
                                        "flat_scan_min",
                                        "energy_backward_blocks",
                                        "energy_pack_blocks",
                                        "emulate_order",
                                        "lattice_to_backward",
                                        "crf_trajectory_to_backward",
                                        "item_min_blocks",
                                        "filter_rows4"};

}  // namespace

int64_t get(Knob k) { return g_values[k].load(std::memory_order_relaxed); }
void set(Knob k, int64_t value) { g_values[k].store(value < 0 ? 0 : value, std::memory_order_relaxed); }
const char* name(Knob k) { return g_names[k]; }

}  // namespace tuning
}  // namespace rrm
