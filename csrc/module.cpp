// The Python module pyeff._C. Importing it runs the static op registrations in every source.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(pyeff, m) {
  m.def("_built_with_cuda() -> bool", []() {
#ifdef PYEFF_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pyeff's compiled kernels",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
