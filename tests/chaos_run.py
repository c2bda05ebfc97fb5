"""
train.py's command line, killed with SIGKILL at a chosen moment (tests/test_resume_chaos.py runs it):

    python tests/chaos_run.py KIND N [train.py arguments...]

KIND picks the moment: "torch_save" dies at the N-th torch.save (DCP writes every tensor of a checkpoint
with one, the trainer state is one more), "rename" just before the N-th os.rename (DCP's .metadata, the
checkpoint's seal, the two renames that swap a new export into OUT/hf), "save_file" half-way through the
N-th safetensors file of an export, "none" never (a timer in the parent may still kill it).
Only the moment is chosen here; the files are left exactly as a kill leaves them.
"""
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def nth(n, real, before):
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == n:
            before(*args)
            die()
        return real(*args, **kwargs)
    return wrapper


def half_written(tensors, filename, *rest, **kw):
    """The first half of the file that would have been written (a write cut short)."""
    import safetensors.torch
    data = safetensors.torch.save(tensors)
    with open(filename, "wb") as f:
        f.write(data[:len(data) // 2])


if __name__ == "__main__":
    kind, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    import safetensors.torch
    import torch

    import train
    if kind == "torch_save":
        torch.save = nth(n, torch.save, lambda *a: None)
    elif kind == "rename":
        os.rename = nth(n, os.rename, lambda *a: None)
    elif kind == "save_file":
        safetensors.torch.save_file = nth(n, safetensors.torch.save_file, half_written)
    train.main(argv)
