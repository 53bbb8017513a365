"""Build of pyeff and its extension pyeff._C.

C++ CPU kernels are always compiled. CUDA sources are compiled when a CUDA toolkit and a CUDA
build of torch are both present. Switches (environment variables):

  PYEFF_FORCE_CUDA=1      compile the CUDA sources even when torch reports no CUDA build
  PYEFF_NO_CUDA=1         never compile CUDA sources
  TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0")
  MAX_JOBS                parallel compile jobs (ninja)
  CUDA_HOME               the toolkit; guessed from nvcc otherwise
  PYEFF_EXTRA_CXXFLAGS    extra C++ compile flags, appended (e.g. the sanitizers of `make sanitize`)
  PYEFF_EXTRA_LDFLAGS     extra link flags, appended

Build against the torch you already have: `pip install --no-build-isolation -e .`
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _guess_cuda_home():
    """torch guesses CUDA_HOME from the first `nvcc` on PATH, which can be a wrapper script
    outside the toolkit (then -lcudart fails to link). Prefer a folder that holds the runtime."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and glob.glob(
            os.path.join(home, "lib*", "libcudart*")
        ) + glob.glob(os.path.join(home, "targets", "*", "lib", "libcudart*")):
            return home
    return None


cuda_home = _guess_cuda_home()
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # must be set before torch.utils.cpp_extension loads
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

no_cuda = _flag("PYEFF_NO_CUDA")
force_cuda = _flag("PYEFF_FORCE_CUDA")
torch_has_cuda = torch.version.cuda is not None
with_cuda = (not no_cuda) and CUDA_HOME is not None and (torch_has_cuda or force_cuda)

cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))

# -ffp-contract=off: no fused multiply-add, so kernels round exactly like the PyTorch reference;
# -fno-trapping-math lets GCC vectorise floor/min/max (results are unchanged, only FP traps go)
cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
define_macros = [("PYEFF_WITH_CUDA", "1")] if with_cuda else []
link_flags = ["-fopenmp"]
# extra flags from the environment, appended (unset: the normal build is unchanged); `make sanitize`
# builds an AddressSanitizer + UBSan variant out of tree this way
cxx_flags += os.environ.get("PYEFF_EXTRA_CXXFLAGS", "").split()
link_flags += os.environ.get("PYEFF_EXTRA_LDFLAGS", "").split()



def _pip_cuda_include_dirs():
    """torch's CUDA headers include cuSPARSE/cuBLAS headers that a minimal toolkit may lack; the
    nvidia-* wheels that come with a CUDA build of torch carry them."""
    if CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for base in nvidia.__path__:
        dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d))
    return dirs


if with_cuda:
    ext = CUDAExtension(
        "pyeff._C",
        cpp_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        include_dirs=_pip_cuda_include_dirs(),
        extra_link_args=link_flags,
        define_macros=define_macros,
    )
else:
    ext = CppExtension(
        "pyeff._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
        define_macros=define_macros,
    )

if any(cmd in sys.argv for cmd in ("build_ext", "build", "bdist_wheel", "develop", "install", "editable_wheel")):
    print(
        "pyeff build configuration:\n"
        f"  torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})\n"
        f"  CUDA_HOME: {CUDA_HOME or 'not found'}\n"
        f"  CUDA sources: {'compiled' if with_cuda else 'skipped'}"
        f" (PYEFF_FORCE_CUDA={int(force_cuda)}, PYEFF_NO_CUDA={int(no_cuda)})\n"
        f"  TORCH_CUDA_ARCH_LIST: {os.environ.get('TORCH_CUDA_ARCH_LIST')}\n"
        f"  MAX_JOBS: {os.environ.get('MAX_JOBS', 'auto')}\n"
        f"  C++ sources: {len(cpp_sources)}, CUDA sources: {len(cuda_sources) if with_cuda else 0}"
        + (f"\n  extra flags: cxx {os.environ.get('PYEFF_EXTRA_CXXFLAGS', '')!r}, "
           f"link {os.environ.get('PYEFF_EXTRA_LDFLAGS', '')!r}"
           if os.environ.get("PYEFF_EXTRA_CXXFLAGS") or os.environ.get("PYEFF_EXTRA_LDFLAGS") else ""),
        flush=True,
    )

packages = find_packages(include=["pyeff", "pyeff.*"])
packages += ["pyeff.kernels", "pyeff.hw", "pyeff.bench"]

setup(
    packages=packages,
    package_dir={"pyeff.kernels": "kernels", "pyeff.hw": "hw", "pyeff.bench": "bench"},
    package_data={"pyeff": ["py.typed"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
