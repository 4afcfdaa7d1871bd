"""
Shared test setup: where the Triton kernels run.

Triton decides at `@triton.jit` time, when a kernel module is imported, whether kernels are compiled or
interpreted, from the environment variable TRITON_INTERPRET. So the variable is set here, for the whole
test process, before pytest imports any test module: without CUDA, TRITON_INTERPRET=1 (the kernels run
in Triton's interpreter, on CPU tensors, with small blocks). With CUDA it is left as it is: unset, the
kernel tests run compiled on the GPU; set to 1 by hand, they run interpreted on the CPU as without one.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
