// The Python module rrm_cuda._C: importing it loads the library, which registers the ops
// (csrc/rrm.cpp and the TORCH_LIBRARY_IMPL blocks); it also reports how the extension was built.
// Not part of the CMake library (which is loaded with torch.ops.load_library or linked from C++).
#include <ATen/Parallel.h>
#include <Python.h>

#include <mutex>
#include <set>

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

PyObject* splat_tile(PyObject*, PyObject*) { return PyLong_FromLongLong(rrm::lattice::splat_tile()); }

PyObject* set_splat_tile(PyObject*, PyObject* arg) {
  const long long n = PyLong_AsLongLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  if (n < 0) {
    PyErr_SetString(PyExc_ValueError, "pixels must be >= 0 (0: vertex order)");
    return nullptr;
  }
  rrm::lattice::set_splat_tile(n);
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"lattice_cache_info", lattice_cache_info, METH_NOARGS,
     "Entries, capacity, hits, misses and bytes of the lattice cache of constant features."},
    {"set_lattice_cache_capacity", set_lattice_cache_capacity, METH_O,
     "Keep at most n lattices of constant features (0 disables the cache); drops the rest."},
    {"clear_lattice_cache", clear_lattice_cache, METH_NOARGS,
     "Drop every cached lattice and zero the hit/miss counters."},
    {"splat_tile", splat_tile, METH_NOARGS,
     "Pixels per tile by which the CUDA splat orders its launch (0: vertex order). Results do not depend on it."},
    {"set_splat_tile", set_splat_tile, METH_O,
     "Set the CUDA splat's launch-order tile for lattices built from now on (a benchmark knob; 0: vertex order)."},
    {"build_info", build_info, METH_NOARGS, "Build configuration of the extension (CUDA, OpenMP, compiler)."},
    {"parallel_threads_used", parallel_threads_used, METH_O,
     "Distinct threads used by at::parallel_for over n items inside the extension."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "rrm_cuda native ops (registered under torch.ops.rrm_cuda)", -1,
                      methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
