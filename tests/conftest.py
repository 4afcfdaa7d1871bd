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


import pytest  # noqa: E402


def pytest_configure(config):
    """The interpreters of Triton 3.5 and 3.6 take int() of 1-element arrays for the bounds of a loop,
    which recent NumPy (2.4 here) refuses: every kernel test would fail with a TypeError. Say so once."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton
    try:
        int(np.ones(1))
    except TypeError:
        if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
            pytest.exit(f"the kernel tests run in Triton's interpreter, and that of Triton {triton.__version__} "
                        f"fails with NumPy {np.__version__}: pip install 'triton>=3.7'", returncode=4)


TINY_MODEL = dict(n_layer=1, n_head=2, n_embd=32, block_size=64)


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory):
    """A tiny base, SFT and reward model (a few seconds), shared by the robustness, resume and
    data-parallel tests: {"base": path, "sft": path, "rm": path}."""
    import pretrain
    import reward
    import sft
    root = tmp_path_factory.mktemp("chain")
    pretrain.main(pretrain.Config(out_dir=str(root / "base"), max_steps=40, n_docs=300, batch_size=8, warmup_steps=5,
                                  log_every=20, eval_every=40, eval_batches=1, device="cpu", **TINY_MODEL))
    sft.main(sft.Config(init=str(root / "base"), out_dir=str(root / "sft"), n_demos=200, epochs=1, batch_size=16,
                        log_every=5, n_samples=1, device="cpu"))
    reward.main(reward.Config(init=str(root / "sft"), out_dir=str(root / "rm"), n_prompts=40, pairs_per_prompt=2,
                              sft_samples=1, norm_prompts=16, batch_size=8, log_every=2, device="cpu"))
    return {name: str(root / name) for name in ("base", "sft", "rm")}
