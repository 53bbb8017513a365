"""Triton kernels of pyeff (installed as pyeff.kernels). Each module holds the kernels of one op
and thin wrappers with the same signature as the op's compiled kernels. They run on CUDA devices,
and on the CPU under TRITON_INTERPRET=1 (slowly, for tests)."""
