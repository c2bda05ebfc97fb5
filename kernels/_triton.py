"""
`triton` and `triton.language` for the kernel files, or stand-ins where Triton is not installed
(requirements-test.txt installs it for the tests; CPU runs never need it): the kernel definitions still import, so their
plain-PyTorch twins - which model.py and the engine use on CPU - work everywhere; launching a kernel
then raises a clear ImportError.

Also the one place the launch wrappers ask "tile for a GPU?" (on_gpu) and "how many SMs?" (sm_count):
kernels/aot.py sets AOT_SMS while it compiles the kernels ahead of time for a GPU target from CPU
tensors, so the wrappers pick exactly the tiles, warps and split counts a GPU launch would.
"""
try:
    import triton
    import triton.language as tl
except ImportError:
    MESSAGE = "Triton is not installed (pip install triton, Linux only); the PyTorch twins still work"

    class _Kernel:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise ImportError(f"{self.fn.__name__}: {MESSAGE}")

    class _NoTriton:
        constexpr = object  # kernel signatures are annotated with tl.constexpr

        def jit(self, fn=None, **options):  # @triton.jit and @triton.jit(do_not_specialize=...)
            return _Kernel(fn) if fn is not None else _Kernel

        def __getattr__(self, name):
            raise ImportError(f"triton.{name}: {MESSAGE}")

    triton = tl = _NoTriton()

AOT_SMS = None  # SM count of the GPU target kernels/aot.py compiles for (None: launches are real)


def on_gpu(t):
    """Whether a launch on tensor t is compiled for a GPU (tensor-core tiles, more warps) rather than
    run by the interpreter (tiny tiles: it pays per op)."""
    return t.is_cuda or AOT_SMS is not None


def sm_count(device):
    if AOT_SMS is not None:
        return AOT_SMS
    import torch
    return torch.cuda.get_device_properties(device).multi_processor_count


__all__ = ["triton", "tl", "on_gpu", "sm_count"]
