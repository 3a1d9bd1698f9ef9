"""Run under torchrun by tests/test_distributed.py: which samples did each rank see in one epoch?

Labels are the sample indices, so the labels a rank receives name the samples it trained on.
Rank 0 writes {loader: {"train": [[...rank 0...], [...rank 1...]], "val": [...]}} to argv[1].
"""

import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from fasttrain import distributed
from fasttrain.data import build_loaders
from fasttrain.data.splits import ArraySplit, DataSet
from fasttrain.recipes import CNN_SEED

d = distributed.from_env()
distributed.init(d, torch.device("cpu"))
n_train, n_val = 53, 21
rng = np.random.default_rng(0)
data = DataSet("cifar", "probe", [str(i) for i in range(n_train)],
               ArraySplit(rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), np.arange(n_train)),
               ArraySplit(rng.integers(0, 256, (n_val, 32, 32, 3), dtype=np.uint8), np.arange(n_val)))
seen = {}
for variant, loader, cache, augment in (("torch", "torch", "none", "auto"), ("dali", "dali", "none", "auto"),
                                        ("dali-cache", "dali", "gpu", "dali"), ("device-cache", "dali", "gpu", "device")):
    # cache "gpu" is host memory on a CPU
    recipe = CNN_SEED.replace(loader=loader, batch_size=5, cache=cache, cache_augment=augment)
    loaders = build_loaders(data, recipe, torch.device("cpu"), 0 if loader == "torch" else 1, seed=0,
                            shard_id=d.rank, num_shards=d.world_size)
    mine = {"train": [int(y) for _, labels in loaders.train for y in labels],
            "val": [int(y) for _, labels in loaders.val for y in labels], "steps": len(loaders.train)}
    everyone = [None] * d.world_size
    dist.all_gather_object(everyone, mine)
    seen[variant] = everyone
if d.is_main:
    with open(sys.argv[1], "w") as f:
        json.dump(seen, f)
distributed.shutdown()
