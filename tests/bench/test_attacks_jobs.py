"""bench/attacks.py's job runner: forked workers give the inline run's figures and models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from adaloc.attacks import SearchSpace, attacker_split, fresh_fn, scratch
from adaloc.data import ImageSet
from adaloc.evaluate import accuracy
from tests.adaloc.conftest import quadrant_images, tiny_net

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from attacks_jobs import Job, run_jobs  # noqa: E402

SPACE = SearchSpace(grid=(("adam", 3e-3),), steps=30, checkpoints=2)


@pytest.fixture(scope="module")
def quadrants() -> ImageSet:
    return quadrant_images(320)


def _jobs(quadrants):
    data = attacker_split(quadrants, 160, seed=0)

    def train(done):
        ref = scratch(fresh_fn(tiny_net, 3), data, SPACE)
        return {"val": ref.val_acc}, {"model": ref.model}

    def score(done):  # depends on the model handed back by "train"
        return {"acc": accuracy(done["train"][1]["model"], data.val)}, {}

    return [Job("score", score, ("train",)), Job("train", train)]


def test_forked_jobs_match_inline_jobs(quadrants):
    inline = run_jobs(_jobs(quadrants), tiny_net, 1)
    forked = run_jobs(_jobs(quadrants), tiny_net, 2)
    assert forked["train"][0] == inline["train"][0]
    assert forked["score"][0] == inline["score"][0] == {"acc": inline["train"][0]["val"]}
    a, b = inline["train"][1]["model"].state_dict(), forked["train"][1]["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_job_fails_the_run(quadrants):
    def boom(done):
        raise ValueError("boom")

    with pytest.raises(RuntimeError, match="job bad failed"):
        run_jobs([Job("bad", boom), *_jobs(quadrants)], tiny_net, 2)
    with pytest.raises(RuntimeError, match="unmet dependencies"):
        run_jobs([Job("orphan", boom, ("missing",))], tiny_net, 2)
