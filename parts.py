"""verl's get_seqlen_balanced_partitions / karmarkar_karp on small inputs, ties included."""
import json, random, sys
sys.argv = [sys.argv[0]]
import harness as H
from verl.utils.seqlen_balancing import get_seqlen_balanced_partitions, karmarkar_karp
rng = random.Random(0)
cases = [
    ([5, 5, 5, 5], 2, True), ([5, 5, 5, 5], 2, False), ([5, 5, 5, 5, 5, 5], 3, False), ([4] * 8, 4, True),
    ([1, 2, 3, 4, 5, 6], 2, True), ([1, 2, 3, 4, 5, 6], 3, False), ([7, 3, 3, 7, 3, 7], 2, False),
    ([10, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2, False), ([10, 1, 1, 1, 1, 1, 1, 1, 1, 1], 5, False),
    ([3, 3, 2, 2, 1, 1], 3, True), ([3, 3, 2, 2, 1, 1], 2, True), ([9], 1, False), ([2, 9], 2, False),
    ([6, 6, 6], 3, False), ([8, 1, 8, 1, 8, 1, 8, 1], 4, True), ([5, 4, 3, 3, 4, 5], 2, False),
]
for _ in range(60):
    k = rng.choice([1, 2, 3, 4, 8])
    eq = rng.random() < 0.5
    n = k * rng.randint(1, 6) if eq else rng.randint(k, 24)
    hi = rng.choice([3, 6, 40, 5000])
    cases.append(([rng.randint(1, hi) for _ in range(n)], k, eq))
for _ in range(4):  # recipe-sized: 1,024 sequences on 8 ranks, 2,048 on 32
    k, n = rng.choice([(8, 1024), (32, 2048)])
    cases.append(([rng.randint(200, 9216) for _ in range(n)], k, True))
out = []
for lens, k, eq in cases:
    out.append(dict(lengths=lens, k=k, equal_size=eq,
                    karmarkar_karp=karmarkar_karp(lens, k, eq),
                    balanced=get_seqlen_balanced_partitions(lens, k, eq)))
json.dump(out, open("partitions.json", "w"))
print(len(out), sum(len(json.dumps(o)) for o in out))
