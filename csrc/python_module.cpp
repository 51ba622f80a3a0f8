// The Python module rrm_cuda._C: importing it loads the library, which registers the ops
// (csrc/rrm.cpp and the TORCH_LIBRARY_IMPL blocks); it also reports how the extension was built.
// Not part of the CMake library (which is loaded with torch.ops.load_library or linked from C++).
#include <ATen/Parallel.h>
#include <Python.h>

#include <mutex>
#include <set>
#include <string>

#include "common/exec.h"
#include "common/tuning.h"
#include "lattice/lattice_cache.h"

namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef RRM_WITH_CUDA
  const bool cuda = true;
#else
  const bool cuda = false;
#endif
#ifdef _OPENMP
  const bool openmp = true;
  const long omp_version = _OPENMP;
#else
  const bool openmp = false;
  const long omp_version = 0;
#endif
  return Py_BuildValue("{s:O,s:O,s:l,s:s}", "with_cuda", cuda ? Py_True : Py_False, "with_openmp",
                       openmp ? Py_True : Py_False, "openmp_version", omp_version, "compiler",
#if defined(__clang__)
                       "clang " __clang_version__
#elif defined(__GNUC__)
                       "gcc " __VERSION__
#else
                       "unknown"
#endif
  );
}

// Number of distinct threads that ran the bodies of one at::parallel_for over n items: proves the
// extension's own parallel loops are really multi-threaded (not silently serial).
PyObject* parallel_threads_used(PyObject*, PyObject* arg) {
  const long n = PyLong_AsLong(arg);
  if (n < 0 && PyErr_Occurred()) return nullptr;
  std::mutex mu;
  std::set<int> ids;
  Py_BEGIN_ALLOW_THREADS;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    volatile double sink = 0;
    for (int64_t i = b; i < e; ++i)
      for (int k = 0; k < 200000; ++k) sink = sink + k;
    std::lock_guard<std::mutex> lock(mu);
    ids.insert(at::get_thread_num());
  });
  Py_END_ALLOW_THREADS;
  return PyLong_FromLong(static_cast<long>(ids.size()));
}

// The lattice cache of constant features (csrc/lattice/lattice_cache.h).
PyObject* lattice_cache_info(PyObject*, PyObject*) {
  const auto st = rrm::lattice::cache_stats();
  return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L}", "entries", static_cast<long long>(st.entries), "capacity",
                       static_cast<long long>(st.capacity), "hits", static_cast<long long>(st.hits), "misses",
                       static_cast<long long>(st.misses), "bytes", static_cast<long long>(st.bytes));
}

PyObject* tiled_mean_field_steps(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(rrm::lattice::tiled_steps()));
}

PyObject* lattice_counted_builds(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(rrm::lattice::counted_builds()));
}

PyObject* lattice_builds(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(rrm::lattice::builds()));
}

PyObject* crf_backward_reruns(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(rrm::lattice::crf_reruns()));
}

PyObject* lattice_table_retries(PyObject*, PyObject*) {
  return PyLong_FromLongLong(static_cast<long long>(rrm::lattice::table_retries()));
}

PyObject* emulated_launches(PyObject*, PyObject*) {
  const auto& c = rrm::emulated_counts();
  return Py_BuildValue("(LL)", static_cast<long long>(c.launches.load()), static_cast<long long>(c.memsets.load()));
}

PyObject* set_lattice_cache_capacity(PyObject*, PyObject* arg) {
  const long long n = PyLong_AsLongLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  if (n < 0) {
    PyErr_SetString(PyExc_ValueError, "capacity must be >= 0");
    return nullptr;
  }
  rrm::lattice::cache_set_capacity(n);
  Py_RETURN_NONE;
}

PyObject* clear_lattice_cache(PyObject*, PyObject*) {
  rrm::lattice::cache_clear();
  Py_RETURN_NONE;
}

PyObject* evict_lattice_cache(PyObject*, PyObject* arg) {
  void* data = PyLong_AsVoidPtr(arg);
  if (!data && PyErr_Occurred()) return nullptr;
  return PyLong_FromLongLong(static_cast<long long>(rrm::lattice::cache_evict(data)));
}

PyObject* tuning(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  if (!d) return nullptr;
  for (int k = 0; k < rrm::tuning::kNumKnobs; ++k) {
    const auto knob = static_cast<rrm::tuning::Knob>(k);
    PyObject* v = PyLong_FromLongLong(rrm::tuning::get(knob));
    if (!v || PyDict_SetItemString(d, rrm::tuning::name(knob), v) < 0) {
      Py_XDECREF(v);
      Py_DECREF(d);
      return nullptr;
    }
    Py_DECREF(v);
  }
  return d;
}

PyObject* set_tuning(PyObject*, PyObject* args) {
  const char* key = nullptr;
  long long value = 0;
  if (!PyArg_ParseTuple(args, "sL", &key, &value)) return nullptr;
  if (value < 0) {
    PyErr_Format(PyExc_ValueError, "tuning value must be >= 0; got %lld for %s", value, key);
    return nullptr;
  }
  for (int k = 0; k < rrm::tuning::kNumKnobs; ++k) {
    const auto knob = static_cast<rrm::tuning::Knob>(k);
    if (std::string(key) == rrm::tuning::name(knob)) {
      rrm::tuning::set(knob, value);
      Py_RETURN_NONE;
    }
  }
  std::string names;
  for (int k = 0; k < rrm::tuning::kNumKnobs; ++k)
    names += std::string(k ? ", " : "") + rrm::tuning::name(static_cast<rrm::tuning::Knob>(k));
  PyErr_Format(PyExc_ValueError, "unknown tuning knob %s (known: %s)", key, names.c_str());
  return nullptr;
}

PyMethodDef methods[] = {
    {"lattice_cache_info", lattice_cache_info, METH_NOARGS,
     "Entries, capacity, hits, misses and bytes of the lattice cache of constant features."},
    {"set_lattice_cache_capacity", set_lattice_cache_capacity, METH_O,
     "Keep at most n lattices of constant features (0 disables the cache); drops the rest."},
    {"lattice_counted_builds", lattice_counted_builds, METH_NOARGS,
     "Counted lattices (built without a host read of their size; knob counted_lattice) built so far."},
    {"lattice_builds", lattice_builds, METH_NOARGS,
     "Permutohedral lattices built so far in this process (every build; the cache's hits build none)."},
    {"crf_backward_reruns", crf_backward_reruns, METH_NOARGS,
     "dense_crf backwards so far that reran the forward's mean-field steps (no trajectory handed over)."},
    {"lattice_table_retries", lattice_table_retries, METH_NOARGS,
     "Hash tables of the GPU-style lattice build given up as too full and rebuilt larger so far."},
    {"emulated_launches", emulated_launches, METH_NOARGS,
     "(launches, memsets) the emulated CUDA launch has run so far: what the same calls launch on a GPU besides "
     "ATen's own kernels."},
    {"tiled_mean_field_steps", tiled_mean_field_steps, METH_NOARGS,
     "Mean-field steps run so far by the tiled mean field's block kernels (knob mean_field_tile)."},
    {"clear_lattice_cache", clear_lattice_cache, METH_NOARGS,
     "Drop every cached lattice and zero the hit/miss counters."},
    {"evict_lattice_cache", evict_lattice_cache, METH_O,
     "evict_lattice_cache(data_ptr): drop the cached lattices of the features whose data starts there; "
     "returns how many."},
    {"tuning", tuning, METH_NOARGS,
     "The CUDA launch-configuration knobs (common/tuning.h) and their values. Results do not depend on them, "
     "except mean_field_tile's rounding."},
    {"set_tuning", set_tuning, METH_VARARGS,
     "set_tuning(name, value): set a CUDA launch-configuration knob (a benchmark A/B switch; value >= 0)."},
    {"build_info", build_info, METH_NOARGS, "Build configuration of the extension (CUDA, OpenMP, compiler)."},
    {"parallel_threads_used", parallel_threads_used, METH_O,
     "Distinct threads used by at::parallel_for over n items inside the extension."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "rrm_cuda native ops (registered under torch.ops.rrm_cuda)", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
