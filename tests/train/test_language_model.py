"""The language-model workload: `dataset: text` + `model: gpt`, on every backend."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kavg_ray.config import RunConfig
from kavg_ray.train import train
from kavg_ray.train.data import generate_corpus, load_text
from kavg_ray.train.models import GPT
from kavg_ray.train.parameter_server import ParameterServer, initial_params
from kavg_ray.train.workload import cross_entropy, evaluate_sums

from ..distributed import run_distributed

# A small corpus and model: three epochs take seconds. ln(vocabulary) is about 3.9 nats; a
# model that has learned the words' spelling is below TARGET_LOSS.
TARGET_LOSS = 2.4
SMALL = {
    "dataset": "text", "model": "gpt", "epochs": 3, "batch_size": 16,
    "dataset_args": {"chars": 20_000, "seq_len": 32},
    "model_args": {"dim": 32, "layers": 1, "heads": 2},
    "lr": {"initial": 0.1}, "momentum": 0.9,
}  # fmt: skip


def _cfg(**changes) -> RunConfig:
    doc = {"name": "lm", "workload": SMALL, "algorithm": "kavg", "K": 4, "P": 2, "seed": 0}
    return RunConfig.model_validate({**doc, **changes})


def _run(cfg: RunConfig, **kwargs) -> list[dict]:
    reports: list[dict] = []
    train(cfg, lambda m, s: reports.append(m), **kwargs)
    return reports


def _assert_learns(reports: list[dict]) -> None:
    losses = [m["test_loss"] for m in reports]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == 3, losses
    assert losses[-1] < TARGET_LOSS, losses
    assert reports[-1]["test_acc"] > 0.3  # token accuracy; guessing the commonest is ~0.17


def test_the_corpus_is_seeded_and_structured() -> None:
    text = generate_corpus(5_000, seed=3)
    assert len(text) == 5_000 and text == generate_corpus(5_000, seed=3)
    assert text != generate_corpus(5_000, seed=4)
    words = text.lower().replace(".", "").split()[:-1]  # the last one may be cut short
    assert len(set(words)) <= 48 < len(words)  # a small vocabulary, often repeated
    data = load_text(chars=5_000, seq_len=16, seed=3)
    vocab = data.extras["vocab"]
    decoded = "".join(vocab[i] for i in data.train_x[0].tolist())
    assert decoded == text[:16]
    assert torch.equal(data.train_y[0, :-1], data.train_x[0, 1:])  # shifted by one
    assert data.input_shape == (16,) and data.num_classes == len(vocab)


def test_text_from_a_file(tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("abcab" * 100, encoding="utf-8")
    data = load_text(str(path), seq_len=4, test_fraction=0.2)
    assert data.extras["vocab"] == "abc"
    assert data.n_train == (400 - 1) // 4 and data.n_test == (100 - 1) // 4


def test_cross_entropy_and_token_accuracy_of_sequences() -> None:
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(3, 5, 7, generator=gen)
    y = torch.randint(7, (3, 5), generator=gen)
    per_token = -out.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert cross_entropy(out, y).item() == pytest.approx(per_token.mean().item(), rel=1e-6)
    flat = torch.randn(4, 7, generator=gen)
    assert torch.equal(cross_entropy(flat, y[0, :4]), F.cross_entropy(flat, y[0, :4]))

    class Rows:
        task = "classification"

        def test_batches(self, idx, chunk):
            yield torch.zeros(3, 1), y

    sums = evaluate_sums(lambda x: out, torch.nn.Identity(), Rows(), torch.arange(3))
    token_acc = (out.argmax(-1) == y).double().mean().item()
    assert sums.correct / sums.count == pytest.approx(token_acc)
    assert sums.loss_sum / sums.count == pytest.approx(per_token.mean().item(), rel=1e-6)


def test_gpt_is_causal_and_sized_by_its_options() -> None:
    torch.manual_seed(0)
    model = GPT(vocab=11, seq_len=8, dim=16, layers=2, heads=4).eval()
    x = torch.randint(11, (2, 8))
    changed = x.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 11
    a, b = model(x), model(changed)
    assert a.shape == (2, 8, 11)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)  # positions < 5 do not see 5..7
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    assert len(model.blocks) == 2 and model.tokens.weight.shape == (11, 16)


def _real(rank: int, world: int, out_dir: str, doc: dict) -> None:
    reports = _run(RunConfig.model_validate(doc), rank=rank, world_size=world)
    dist.barrier()
    torch.save(reports, os.path.join(out_dir, f"rank{rank}.pt"))


def test_real_and_simulated_learn_alike(tmp_path) -> None:
    run_distributed(_real, 2, str(tmp_path), _cfg().model_dump(mode="json"))
    real = torch.load(tmp_path / "rank0.pt", weights_only=False)
    _assert_learns(real)
    sim = _run(_cfg(backend="simulated"))
    _assert_learns(sim)
    for ours, theirs in zip(sim, real, strict=True):
        assert ours["test_loss"] == pytest.approx(theirs["test_loss"], abs=1e-3)


@pytest.mark.parametrize(
    "algorithm", [{"algorithm": "downpour", "fetch_period": 1, "push_period": 1},
                  {"algorithm": "eamsgd", "tau": 4, "beta": 0.5}],
)  # fmt: skip
def test_parameter_server_learns(algorithm: dict) -> None:
    cfg = _cfg(P=1, K=None, **algorithm)
    server = ParameterServer(initial_params(cfg))
    reports = _run(cfg, server=server)
    _assert_learns(reports)
    assert math.isfinite(reports[-1]["staleness_mean"])
