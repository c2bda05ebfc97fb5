"""
`triton` and `triton.language` for the kernel files, or stand-ins where Triton is not installed
(requirements-test.txt installs it for the tests; CPU runs never need it): the kernel definitions still import, so their
plain-PyTorch twins - which model.py and the engine use on CPU - work everywhere; launching a kernel
then raises a clear ImportError.
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

        def jit(self, fn):
            return _Kernel(fn)

        def __getattr__(self, name):
            raise ImportError(f"triton.{name}: {MESSAGE}")

    triton = tl = _NoTriton()

__all__ = ["triton", "tl"]
