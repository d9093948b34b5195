"""Factories that cannot work are refused through the real `kavg` command line, before
anything launches: exit 2, one line naming the factory and what is wrong, nothing written.

Each case runs ``python -m kavg_ray.cli`` in a folder holding ``mywl.py`` (the factories
below) and ``bad.yaml``; the folder is the current directory, so ``mywl`` imports as it
would for a user. Unlike the cases of test_cli_input.py these import torch: trying the
factories is the point.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

FACTORIES = '''
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

WIDTH = 4


def _pairs(n):
    return TensorDataset(torch.randn(n, 8), torch.randint(4, (n,)))


def good(n=64):
    return _pairs(n), _pairs(16)


def one_set():
    return _pairs(8)


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(8), 0


def iterable():
    return Stream(), _pairs(4)


class Singles(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.zeros(8)


def singles():
    return Singles(), Singles()


def empty_test():
    return _pairs(8), _pairs(0)


def broken(root="/nonexistent"):
    raise RuntimeError("disk on fire at " + root)


def model(width=16):
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))


def wrong_input():
    return nn.Linear(5, 4)


def not_a_model():
    return {"weights": 1}


def bad_loss(out, y):
    raise ValueError("labels must be one-hot")


def constant_loss(out, y):
    return torch.tensor(1.0)
'''

BASE = {
    "name": "t",
    "workload": {"dataset": "mywl:good", "model": "mywl:model", "epochs": 1, "batch_size": 4},
    "algorithm": "kavg", "K": 2, "P": 2,
}  # fmt: skip


def doc(**workload) -> str:
    out = {**BASE, "workload": {**BASE["workload"], **workload}}
    return yaml.safe_dump(out, sort_keys=False)


def sweep_doc(**workload) -> str:
    out = {**BASE, "workload": {**BASE["workload"], **workload}, "grid": {"K": [1, 2]}}
    del out["K"]
    return yaml.safe_dump(out, sort_keys=False)


# An address nobody answers: should a check wrongly pass, the command stops there (exit 1)
# instead of starting a local Ray.
NOWHERE = ("--address", "127.0.0.1:9")
TRAIN = ("train", "bad.yaml", *NOWHERE)
SWEEP = ("sweep", "run", "bad.yaml", *NOWHERE)
# (id, argv, bad.yaml, the whole error line after "error: ")
CASES = [
    ("no-module", TRAIN, doc(dataset="nosuch_mod:load"),
     "workload.dataset 'nosuch_mod:load': cannot import nosuch_mod: "
     "ModuleNotFoundError: No module named 'nosuch_mod'"),
    ("no-attribute", TRAIN, doc(model="mywl:nothere"),
     "workload.model 'mywl:nothere': mywl has no attribute 'nothere'"),
    ("not-callable", TRAIN, doc(model="mywl:WIDTH"),
     "workload.model 'mywl:WIDTH': mywl.WIDTH is not callable (a int)"),
    ("one-data-set", TRAIN, doc(dataset="mywl:one_set"),
     "workload.dataset 'mywl:one_set': returned a TensorDataset, expected (train, test): "
     "two map-style torch Datasets"),
    ("iterable", TRAIN, doc(dataset="mywl:iterable"),
     "workload.dataset 'mywl:iterable': train is a Stream, not a map-style torch Dataset "
     "(one with __getitem__ and __len__)"),
    ("not-pairs", TRAIN, doc(dataset="mywl:singles"),
     "workload.dataset 'mywl:singles': train[0] is a Tensor, expected an (x, y) pair"),
    ("empty-test", TRAIN, doc(dataset="mywl:empty_test"),
     "workload.dataset 'mywl:empty_test': test is empty"),
    ("factory-raises", TRAIN, doc(dataset="mywl:broken", dataset_args={"root": "/data/x"}),
     "workload.dataset 'mywl:broken': the factory raised RuntimeError: disk on fire at /data/x"),
    ("bad-dataset-args", TRAIN, doc(dataset_args={"size": 3}),
     "workload.dataset 'mywl:good': the factory raised TypeError: good() got an unexpected "
     "keyword argument 'size'"),
    ("not-a-module", TRAIN, doc(model="mywl:not_a_model"),
     "workload.model 'mywl:not_a_model': returned a dict, expected a torch.nn.Module"),
    ("forward-fails", TRAIN, doc(model="mywl:wrong_input"),
     "workload.model 'mywl:wrong_input': forward pass on one sample failed: RuntimeError: "
     "mat1 and mat2 shapes cannot be multiplied (1x8 and 5x4)"),
    ("loss-fails", TRAIN, doc(loss="mywl:bad_loss"),
     "workload.loss 'mywl:bad_loss': failed on the model's output: ValueError: labels must "
     "be one-hot"),
    ("loss-without-gradient", TRAIN, doc(loss="mywl:constant_loss"),
     "workload.loss 'mywl:constant_loss': its result does not depend on the model "
     "(no gradient)"),
    ("simulated-too-large", TRAIN,
     doc(in_memory_mb=0.001).replace("P: 2", "P: 2\nbackend: simulated"),
     "workload.dataset 'mywl:good': the simulated backend holds the data set in memory, and it "
     "is about 0 MB, over workload.in_memory_mb (0.001): raise in_memory_mb or use backend ray"),
    ("sweep-run", SWEEP, sweep_doc(model="mywl:wrong_input"),
     "workload.model 'mywl:wrong_input': forward pass on one sample failed: RuntimeError: "
     "mat1 and mat2 shapes cannot be multiplied (1x8 and 5x4)"),
    ("sweep-grid-arg", SWEEP,
     sweep_doc().replace("grid:\n  K:", "grid:\n  model_args.width: [8, -1]\n  K:"),
     "workload.model 'mywl:model': the factory raised RuntimeError: Trying to create tensor "
     "with negative dimension -1: [-1, 8]"),
    ("sweep-submit", ("sweep", "submit", "bad.yaml", "--address", "http://127.0.0.1:1"),
     sweep_doc(dataset="mywl:nothere"),
     "workload.dataset 'mywl:nothere': mywl has no attribute 'nothere'"),
    ("theory-estimate", ("theory", "estimate", "bad.yaml"), doc(dataset="mywl:one_set"),
     "workload.dataset 'mywl:one_set': returned a TensorDataset, expected (train, test): "
     "two map-style torch Datasets"),
]  # fmt: skip


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.mark.parametrize(("args", "content", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_a_factory_that_cannot_work_is_refused(tmp_path, args, content, expected):
    (tmp_path / "mywl.py").write_text(FACTORIES)
    (tmp_path / "bad.yaml").write_text(content)
    before = _listing(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAVG_", "RAY_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "kavg_ray.cli", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines == [f"error: {expected}"]
    assert _listing(tmp_path) == before  # nothing written, no kavg_results/
