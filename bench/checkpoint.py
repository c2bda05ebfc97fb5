"""
What checkpoint checksums cost against the save itself (checkpoint.py seals every checkpoint with one).

    python bench/checkpoint.py                       # CPU: ~57M parameters (model + AdamW state ~0.65 GB)
    python bench/checkpoint.py --hidden 2048 --layers 16 --vocab 151936   # on a GPU: ~1.1B parameters

One process: a random Qwen2 and a stepped AdamW (its two moments filled), saved with torch.distributed.checkpoint
to --dir the way save_checkpoint does. Times (median of --reps): the DCP save; the tensor checksums
checkpoint.py uses (element sums over the live tensors: no file is read again); for comparison, crc32 and
sha256 of the written files (what checksumming the files would cost); and the load with its checksum check.
"""
import argparse
import os
import shutil
import statistics
import sys
import time
import warnings
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint as C  # noqa: E402
import distributed as D  # noqa: E402
import model as M  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def file_hash(folder, algo):
    import hashlib
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            if algo == "crc32":
                crc = 0
                while chunk := f.read(2**24):
                    crc = zlib.crc32(chunk, crc)
            else:
                hashlib.file_digest(f, algo).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/nanoscaler_bench_ckpt")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device, ctx = torch.device(args.device), D.Dist(device=torch.device(args.device))
    cfg = M.Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                   num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=2,
                   head_dim=64)
    torch.manual_seed(0)
    model = M.Qwen2(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    payload = C.train_payload(model, opt, None, 0)
    nbytes = C.local_bytes(payload)
    from torch.distributed.checkpoint import load, save
    rows = {k: [] for k in ("DCP save (to --dir)", "tensor checksums (checkpoint.py)", "crc32 of the files",
                            "sha256 of the files", "DCP load", "tensor checksums after load")}
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    for _ in range(args.reps):
        shutil.rmtree(args.dir, ignore_errors=True)
        rows["DCP save (to --dir)"].append(timed(lambda: save(payload, checkpoint_id=args.dir), device)[0])
        t, sums = timed(lambda: C.tensor_sums(payload, ctx), device)
        rows["tensor checksums (checkpoint.py)"].append(t)
        rows["crc32 of the files"].append(timed(lambda: file_hash(args.dir, "crc32"), device)[0])
        rows["sha256 of the files"].append(timed(lambda: file_hash(args.dir, "sha256"), device)[0])
        rows["DCP load"].append(timed(lambda: load(payload, checkpoint_id=args.dir), device)[0])
        t, again = timed(lambda: C.tensor_sums(payload, ctx), device)
        rows["tensor checksums after load"].append(t)
        assert again == sums
    shutil.rmtree(args.dir, ignore_errors=True)
    params = sum(p.numel() for p in model.parameters())
    save_s = statistics.median(rows["DCP save (to --dir)"])
    print(f"{params / 1e6:.0f}M parameters, {nbytes / 2**30:.2f} GiB of model + AdamW state, device {device}, "
          f"torch {torch.__version__}, {args.reps} reps (median)")
    print(f"| step | seconds | GiB/s | vs the save |\n|---|---|---|---|")
    for name, ts in rows.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.3f} | {nbytes / 2**30 / t:.2f} | {100 * t / save_s:.1f}% |")


if __name__ == "__main__":
    main()
