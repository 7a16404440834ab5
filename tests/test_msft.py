"""train/msft.py: the decision rule on scripted curves, DynamixSFT's bandit update and look-ahead, and the driver
end to end on a small mixture."""

import itertools
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import posttrain.train.msft.method as method
from posttrain.core.ring import CheckpointRing
from posttrain.train.msft.baselines import dynamix_update, temperature_weights
from posttrain.train.msft.method import MSFTSection, decide, peak_index, peaked_at
from posttrain.train.msft.study import format_shape, mixture_shape, sft_shape

P = [0.0, 0.25, 0.5, 0.75, 1.0]


def test_earliest_peak_is_excluded_and_rolled_back_to():
    scores = {"a": [0.1, 0.5, 0.4, 0.3, 0.2],   # peaks at 0.25
              "b": [0.1, 0.2, 0.6, 0.5, 0.5],   # peaks at 0.5
              "c": [0.0, 0.1, 0.2, 0.3, 0.4]}   # still improving
    assert decide(P, scores, ["a", "b", "c"]) == ("a", 0.25)
    assert decide(P, scores, ["b", "c"]) == ("b", 0.5)
    assert decide(P, scores, ["c"]) == (None, 1.0)  # no active task peaked before C: continue from θ_C


def test_exclusion_order_over_stages_follows_each_stages_curves():
    """A driver-like loop: stage curves are scripted per stage; the order of exclusion is by earliest peak."""
    stages = [
        {"a": [0.2, 0.6, 0.5, 0.5, 0.4], "b": [0.1, 0.3, 0.5, 0.7, 0.6], "c": [0.0, 0.1, 0.2, 0.3, 0.4]},
        {"a": [0.6, 0.6, 0.6, 0.6, 0.6], "b": [0.5, 0.6, 0.8, 0.7, 0.7], "c": [0.2, 0.3, 0.4, 0.5, 0.6]},
        {"a": [0.6] * 5, "b": [0.8] * 5, "c": [0.4, 0.5, 0.6, 0.7, 0.8]},
        {"a": [0.6] * 5, "b": [0.8] * 5, "c": [0.8, 0.9, 0.85, 0.8, 0.8]},
    ]
    active, order = ["a", "b", "c"], []
    for curves in stages:
        j, c = decide(P, curves, active)
        order.append((j, c))
        if j is not None:
            active.remove(j)
    assert order == [("a", 0.25), ("b", 0.5), (None, 1.0), ("c", 0.25)] and active == []


def test_ties_by_name_and_first_argmax():
    scores = {"b": [0.1, 0.5, 0.5, 0.2, 0.2], "a": [0.3, 0.4, 0.5, 0.5, 0.1], "c": [0.1, 0.5, 0.1, 0.1, 0.1]}
    # b and c both peak first at 0.25 (b's 0.5 at 0.5 is not a strict improvement); b < c by name
    assert decide(P, scores, ["a", "b", "c"]) == ("b", 0.25)
    assert peak_index([0.5, 0.5, 0.5]) == 0


def test_ties_are_broken_by_name_in_any_order_of_active():
    """The earliest peak shared by several tasks goes to the first by name, however `active` is ordered (the driver
    keeps the loader's order, which need not be sorted)."""
    scores = {"b": [0.1, 0.5, 0.2, 0.2, 0.2], "a": [0.2, 0.6, 0.3, 0.3, 0.3], "c": [0.1, 0.2, 0.1, 0.1, 0.1],
              "d": [0.1, 0.2, 0.4, 0.3, 0.3]}
    for active in itertools.permutations(["a", "b", "c", "d"]):  # a, b, c peak at 0.25, d at 0.5
        assert decide(P, scores, list(active)) == ("a", 0.25), active
    for active in itertools.permutations(["b", "c", "d"]):
        assert decide(P, scores, list(active)) == ("b", 0.25), active
    # a tie of the peak's score within one curve: the first argmax (b's 0.5 at 0.25, again at 0.5) counts
    tied = {"z": [0.1, 0.5, 0.5, 0.2, 0.2], "y": [0.1, 0.2, 0.6, 0.6, 0.3]}
    assert decide(P, tied, ["z", "y"]) == ("z", 0.25) and decide(P, tied, ["y"]) == ("y", 0.5)


def _stub_tracker(monkeypatch, tasks):
    """A Tracker on a stub runtime and a real ring, and `evaluate(k, results)`, which gives evaluation point k its own
    weights (all k + 1), step (10 k), tokens and data position (P[k]) before the tracker sees it."""
    model = torch.nn.Linear(2, 1, bias=False)
    monkeypatch.setattr(method, "weights_digest", lambda rt: float(model.weight.detach().double().pow(2).sum()))

    class Loader:
        progress = 0.0

        def state_dict(self):
            return {"position": self.progress}

    rt = SimpleNamespace(counters=SimpleNamespace(tokens=0, flops=0.0, step=0), model=model,
                         cfg=SimpleNamespace(msft=SimpleNamespace(signal="accuracy"),
                                             eval=SimpleNamespace(max_examples=0)),
                         data=SimpleNamespace(heldout_rows={t: [None] * 8 for t in tasks}),
                         record_eval=lambda *a, **k: None)
    loader, ring = Loader(), CheckpointRing(1 << 20)
    tracker = method.Tracker(rt, ring, loader, "msft")

    def evaluate(k, results, active):
        with torch.no_grad():
            model.weight.fill_(k + 1.0)
        rt.counters.step, rt.counters.tokens, loader.progress = 10 * k, 100 * k, P[k]
        return tracker.evaluate(stage=1, c=P[k], active=active, results=results)

    return tracker, ring, model, evaluate


def _restores_point(ring, key, model, k):
    meta = ring.restore(key, model)
    return ((meta["point"]["c"], meta["point"]["step"], meta["data"], meta["point"]["weights"]) ==
            (P[k], 10 * k, {"position": P[k]}, 2 * (k + 1.0) ** 2) and bool(model.weight.detach().eq(k + 1.0).all()))


def test_the_tracker_keeps_each_tasks_first_peak_so_a_roll_back_restores_the_point_decide_names(monkeypatch):
    """Scripted held-out curves with ties at the peaks. The snapshot the tracker holds for each task is the one at
    the point `decide` names (step, weights, data position), the first of tied points, and the best-overall
    snapshot is the first of tied best points too."""
    curves = {"a": [0.2, 0.5, 0.5, 0.3, 0.5], "b": [0.1, 0.1, 0.4, 0.4, 0.4]}  # a peaks at 0.25, b at 0.5
    overall = [(x + y) / 2 for x, y in zip(curves["a"], curves["b"])]  # best 0.45 at 0.5, tied at 1.0
    tracker, ring, model, evaluate = _stub_tracker(monkeypatch, curves)
    for k in range(len(P)):
        point = evaluate(k, {t: {"accuracy": curves[t][k]} for t in curves}, ["b", "a"])
        assert point["overall"] == overall[k]
    assert decide(P, curves, ["b", "a"]) == ("a", 0.25)
    for task, k in (("a", 1), ("b", 2)):
        assert _restores_point(ring, tracker.task_best[task][1], model, k), task
    assert tracker.best_overall[0] == 0.45 and _restores_point(ring, tracker.best_overall[1], model, 2)
    assert len(ring.keys()) == 2  # a's and b's (also the best overall): nothing else is kept


def test_a_tasks_peak_is_kept_where_the_mixture_as_a_whole_got_worse(monkeypatch):
    """a peaks at 0.25, where b falls so far that the overall accuracy drops: the tracker must still snapshot that
    point (a task's best is kept whether or not the mixture improved), and says which points it kept."""
    curves = {"a": [0.2, 0.6, 0.3, 0.3, 0.3], "b": [0.6, 0.1, 0.6, 0.7, 0.5]}
    tracker, ring, model, evaluate = _stub_tracker(monkeypatch, curves)
    points = [evaluate(k, {t: {"accuracy": curves[t][k]} for t in curves}, ["a", "b"]) for k in range(len(P))]
    assert [p["overall"] for p in points] == pytest.approx([0.4, 0.35, 0.45, 0.5, 0.4])
    # k = 0 first; 1 a improved (overall fell); 2 overall improved (no task did); 3 b and overall; 4 neither.
    assert [bool(p["snapshot"]) for p in points] == [True, True, True, True, False]
    assert decide(P, curves, ["a", "b"]) == ("a", 0.25)
    assert _restores_point(ring, tracker.task_best["a"][1], model, 1)
    assert _restores_point(ring, tracker.task_best["b"][1], model, 3)
    assert tracker.best_overall[1] == tracker.task_best["b"][1] and len(ring.keys()) == 2


def test_a_peak_at_the_start_rolls_back_to_the_start():
    scores = {"a": [0.9, 0.8, 0.7, 0.6, 0.5], "b": [0.1, 0.2, 0.3, 0.4, 0.5]}
    assert decide(P, scores, ["a", "b"]) == ("a", 0.0)


def test_a_task_that_never_learns():
    scores = {"flat": [0.0] * 5, "b": [0.1, 0.4, 0.6, 0.5, 0.4], "c": [0.1, 0.2, 0.3, 0.4, 0.5]}
    # The reference rule: the first argmax of a flat curve is c = 0, so it goes first, rolling back everything.
    assert decide(P, scores, ["flat", "b", "c"]) == ("flat", 0.0)
    # skip_flat: a task that has not moved is not a candidate; b peaked at 0.5.
    assert decide(P, scores, ["flat", "b", "c"], skip_flat=True) == ("b", 0.5)
    assert decide(P, {"flat": [0.0] * 5}, ["flat"], skip_flat=True) == (None, 1.0)
    # A task that only goes down is not flat: its peak at 0 is real.
    assert decide(P, {"down": [0.5, 0.4, 0.4, 0.4, 0.4], "c": [0.1] * 4 + [0.2]}, ["down", "c"],
                  skip_flat=True) == ("down", 0.0)


def test_margin_ignores_small_later_gains():
    scores = {"a": [0.50, 0.60, 0.62, 0.64, 0.61], "b": [0.1, 0.2, 0.3, 0.4, 0.5]}
    assert decide(P, scores, ["a", "b"]) == ("a", 0.75)
    # With a 0.05 margin the gains after 0.25 are noise: a peaked at 0.25.
    assert decide(P, scores, ["a", "b"], margin=0.05) == ("a", 0.25)
    # ... and a later gain beyond the margin over the current peak is a new peak.
    assert peak_index([0.5, 0.52, 0.56], margin=0.05) == 2


def test_min_fall_needs_a_fall_larger_than_noise():
    scores = {"saturated": [1.00, 0.99, 1.00, 0.99, 0.99],  # the reference: a first argmax at c = 0
              "fell": [0.40, 0.70, 0.80, 0.72, 0.70],        # peaked at 0.5, 10 points down at C
              "rising": [0.1, 0.2, 0.3, 0.4, 0.5]}
    assert decide(P, scores, list(scores)) == ("saturated", 0.0)
    assert decide(P, scores, list(scores), min_fall=0.05) == ("fell", 0.5)
    assert peaked_at(scores["fell"], min_fall=0.05) == 2 and peaked_at(scores["saturated"], min_fall=0.05) is None
    # the fall must exceed min_fall (0.80 -> 0.70 is not more than 0.12; exactly min_fall is not more), and it is
    # measured at C, not at the lowest point after the peak
    assert decide(P, scores, list(scores), min_fall=0.12) == (None, 1.0)
    assert peaked_at([0.5, 0.75, 0.5], min_fall=0.25) is None and peaked_at([0.5, 0.75, 0.5], min_fall=0.125) == 1
    assert peaked_at([0.5, 0.9, 0.6, 0.9], min_fall=0.05) is None
    # with a margin, a later point within the margin is no new peak, and its score is still no fall
    assert peaked_at([0.5, 0.6, 0.62], margin=0.05) == 1 and peaked_at([0.5, 0.6, 0.62], margin=0.05, min_fall=0.01) \
        is None
    # skip_flat and min_fall together; on held-out loss (signal -loss) the fall is a rise in loss
    assert peaked_at([0.0] * 4, skip_flat=True, min_fall=0.05) is None
    assert peaked_at([-0.9, -0.5, -0.7], min_fall=0.1) == 1
    assert decide(P, {"a": [0.3] * 5}, ["a"], min_fall=0.05) == (None, 1.0)


def test_errors():
    with pytest.raises(ValueError, match="no active task"):
        decide(P, {}, [])
    with pytest.raises(ValueError, match="task 'a' has 2 scores for 5 points"):
        decide(P, {"a": [0.1, 0.2]}, ["a"])
    with pytest.raises(ValueError, match=r"msft.min_fall \(-0.1\) must be >= 0"):
        MSFTSection(min_fall=-0.1)


def test_mixture_shape_counts_lasting_falls_at_staggered_times():
    """The mSFT mixture criterion read off a plain-SFT curve: overfit = at least min_after evaluations follow the
    first argmax and they average at least min_fall below it; staggered = pairwise >= min_gap apart (evaluation
    points are a little past kΔ)."""
    points = [0.0, 0.25, 0.51, 0.76, 1.01, 1.26, 1.51, 1.76, 2.01]
    scores = {"a": [1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7],      # peaks at 0, then 26 points down on average
              "b": [0.0, 0.5, 0.9, 0.7, 0.8, 0.7, 0.75, 0.8, 0.75],    # 0.9 at 0.51, then 15 down
              "c": [0.0, 0.2, 0.4, 0.6, 0.9, 0.85, 0.9, 0.7, 0.6],     # 0.9 at 1.01 (first argmax), then 14 down
              "d": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],      # still improving at the end: no peak yet
              "dip": [0.9, 0.9, 0.6, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9],    # one dip is no fall (4 points on average)
              "flat": [1.0] * 9}                                       # saturated: peaks at 0, falls 0
    shape = mixture_shape(points, scores)
    t = shape["tasks"]
    assert {k for k in t if t[k]["overfit"]} == {"a", "b", "c"}
    assert t["c"]["peak_epoch"] == 1.01 and t["c"]["peak"] == 0.9 and t["c"]["mean_after"] == pytest.approx(0.7625)
    assert t["d"]["mean_after"] is None and t["d"]["last"] == 0.8 and t["dip"]["peak_epoch"] == 0.0
    assert shape["staggered"] == ["a", "b", "c"]  # 0.51 -> 1.01 is 0.50 apart: within the slack
    assert shape["improving"] == ["b", "c", "d"] and shape["meets"]
    # a fall exactly min_fall counts; one a little less does not
    assert mixture_shape([0, 1, 2, 3], {"x": [0.5, 0.9, 0.8, 0.8]})["tasks"]["x"]["overfit"]
    assert not mixture_shape([0, 1, 2, 3], {"x": [0.5, 0.9, 0.81, 0.81]})["tasks"]["x"]["overfit"]
    # a drop at the last evaluation may be a dip: one evaluation after the peak is not enough unless asked
    late = {"x": [0.5, 0.7, 0.9, 0.6]}
    assert not mixture_shape([0, 1, 2, 3], late)["tasks"]["x"]["overfit"]
    assert mixture_shape([0, 1, 2, 3], late, min_after=1)["tasks"]["x"]["overfit"]
    with pytest.raises(ValueError, match="min_after=0"):
        mixture_shape([0, 1, 2, 3], late, min_after=0)
    # peaks closer than min_gap count once (the earliest is kept, which keeps the most)
    close = dict(scores, b=[0.0, 0.5, 0.6, 0.9, 0.7, 0.7, 0.7, 0.7, 0.7])  # b now at 0.76: too close to c at 1.01
    assert mixture_shape(points, close)["staggered"] == ["a", "b"] and not mixture_shape(points, close)["meets"]
    assert mixture_shape(points, close, min_gap=0.25)["staggered"] == ["a", "b", "c"]
    # a stricter fall leaves b and c out; with no overfit task there is no "first peak" to be improving after
    assert mixture_shape(points, scores, min_fall=0.2)["staggered"] == ["a"]
    alone = {"d": {"peak_epoch": 2.01, "peak": 0.8, "mean_after": None, "last": 0.8, "overfit": False}}
    assert mixture_shape(points, {"d": scores["d"]}) == {"epochs": 2.01, "min_fall": 0.1, "min_gap": 0.5,
                                                        "min_after": 2, "tasks": alone, "staggered": [],
                                                        "improving": [], "meets": False}
    text = format_shape(shape)
    assert text.startswith("  plain SFT of the whole mixture for 2.01 epochs\n")
    assert "a 1.00@0.00 -> 0.74 overfit" in text and "d 0.80@2.01\n" in text  # d: nothing after its peak
    assert ("overfit (>= 2 evaluations after the peak, averaging >= 0.10 below it) at times >= 0.5 epoch apart: "
            "a@0.00, b@0.51, c@1.01; still improving then: 3; meets") in text
    with pytest.raises(ValueError, match="task 'a' has 2 scores for 9 points"):
        mixture_shape(points, {"a": [0.1, 0.2]})
    curve = [{"epoch": e, "eval": {k: {"accuracy": v[i]} for k, v in scores.items()}} for i, e in enumerate(points)]
    assert sft_shape({"sft": {"curve": curve}}) == shape and sft_shape({"msft": {"curve": curve}}) is None


def test_temperature_weights_flatten_the_mixture():
    w = temperature_weights({"big": 1000, "small": 10}, tau=2.0)
    assert w == {"big": 1000 ** 0.5, "small": 10 ** 0.5}
    assert temperature_weights({"big": 1000, "small": 10}, tau=1.0) == {"big": 1000, "small": 10}


def test_dynamix_update_against_hand_computed_values():
    prior = {"a": 1.0, "b": 3.0, "z": 0.0}  # relative weights; z is outside the mixture
    acc, p = dynamix_update(prior, {}, {"a": 0.1, "b": 0.1, "z": 5.0}, eta=5.0)
    assert acc == {"a": 0.1, "b": 0.1}  # z gets no reward
    assert p == pytest.approx({"a": 0.25, "b": 0.75, "z": 0.0}) and p["z"] == 0.0  # equal rewards: the prior
    # a's accumulated reward now leads by 0.2: its odds against b are prior odds (1/3) times exp(5 * 0.2) = e / 3
    acc, p = dynamix_update(prior, acc, {"a": 0.2, "b": 0.0}, eta=5.0)
    assert acc == pytest.approx({"a": 0.3, "b": 0.1})
    assert p["a"] == pytest.approx(math.e / (math.e + 3)) and p["b"] == pytest.approx(3 / (math.e + 3))
    assert p["a"] > 0.25 and sum(p.values()) == pytest.approx(1.0)  # the better arm gained probability
    # discount 0.5: R = 0.5 * (0.3, 0.1) + (0, 0.4) = (0.15, 0.45); b leads by 0.3
    acc, p = dynamix_update(prior, acc, {"a": 0.0, "b": 0.4}, eta=2.0, discount=0.5)
    assert acc == pytest.approx({"a": 0.15, "b": 0.45})
    assert p["a"] / p["b"] == pytest.approx(math.exp(2.0 * -0.3) / 3)
    assert dynamix_update(prior, acc, {}, eta=0.0)[1] == pytest.approx({"a": 0.25, "b": 0.75, "z": 0.0})
    _, p = dynamix_update(prior, {}, {"a": -1e6}, eta=10.0)  # a crushed arm keeps a probability above 0
    assert 0 < p["a"] < 1e-300 and p["b"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="every prior weight is 0"):
        dynamix_update({"a": 0.0}, {}, {}, eta=1.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        dynamix_update({"a": -1.0, "b": 1.0}, {}, {}, eta=1.0)


def test_set_weights_is_deterministic_resumable_and_discards_the_prefetched_batch():
    """MixtureLoader.set_weights (DynamixSFT's re-weighting): with and without the background packer the stream is
    the same; a state saved after it resumes with the new weights; the weights take effect at the next batch."""
    from posttrain.train.data import DataError, SFTData, synthetic_rows
    from posttrain.train.synthetic import tiny_tokenizer

    sizes = {t: 12 + 3 * i for i, t in enumerate(("copy", "reverse", "sort", "add", "mod", "majority"))}
    data = SFTData(*synthetic_rows(0, sizes, {t: 3 for t in sizes}), tiny_tokenizer(), seq_len=64)
    same = lambda x, y: all((getattr(x, k) == getattr(y, k)).all() for k in ("input_ids", "task_ids"))  # noqa
    fast, plain = (data.loader(max_tokens=256, seed=3, prefetch=p) for p in (True, False))
    for _ in range(3):
        assert same(fast.next_batch(), plain.next_batch())
    reverse = data.tasks.index("reverse")
    for loader in (fast, plain):  # the prefetched batch was drawn with the old weights: it must go
        loader.set_weights({t: 1.0 if t == "reverse" else 1e-12 for t in data.tasks})
    state = json.loads(json.dumps(plain.state_dict()))
    after = [plain.next_batch() for _ in range(4)]
    assert all(same(fast.next_batch(), b) for b in after)
    assert all(((b.task_ids == reverse) | (b.task_ids < 0)).all() for b in after)
    resumed = data.loader(max_tokens=256, seed=3)
    resumed.load_state_dict(state)
    assert all(same(resumed.next_batch(), b) for b in after)
    assert state["sampler"]["weights"] == [float(sizes[t]) for t in data.tasks]  # a resume checks the configured
    with pytest.raises(DataError, match=r"gives active sub-datasets \['sort'\] weight 0; exclude them instead"):
        plain.set_weights({t: 1.0 for t in data.tasks if t != "sort"})
    with pytest.raises(DataError, match=r"unknown sub-datasets \['nope'\]"):
        plain.set_weights({"nope": 1.0})
    fast.close()


# ------------------------------------------------------------------------------------------- end to end

from tests.test_sft import REPO, SMALL  # noqa: E402

TASKS = ("copy", "reverse", "sort", "add", "mod", "majority")


def _run_msft(out, data, *flags, nproc=1):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    small = [f for f in SMALL if not f.startswith("--eval.")]
    cmd = launcher + ["-m", "posttrain.train.msft", "--config", str(REPO / "configs/tiny_msft.toml"), f"--out_dir={out}",
                      *small, f"--data.path={data}", f"--data.cache_dir={out}/cache", "--optim.lr=1e-2",
                      "--msft.budget_epochs=0.5", "--msft.eval_every=0.125", "--msft.max_stages=4",
                      "--msft.dynamix_every=4", "--msft.dynamix_val_rows=4",
                      "--eval.max_new_tokens=8", *flags]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def test_dynamix_lookahead_restores_weights_optimizer_and_counters_bit_exactly(tmp_path):
    """A look-ahead probes every arm with a real training step and puts everything back: parameters, AdamW state,
    param groups, counters, schedule position and the training loader's position are bit-identical afterwards
    (only the mixture weights change); the same with a fresh optimizer (no state yet: none is left behind). And
    mSFT's roll-back refuses a snapshot whose weights are not the ones evaluated at its point."""
    code = f"""
import copy, torch
from dataclasses import asdict
from posttrain.core.config import parse_args
from posttrain.train.msft.baselines import Dynamix
from posttrain.train.msft.method import MSFTConfig
from posttrain.train.runtime import Runtime
from posttrain.train.sft import make_loader, train_step
import torch.distributed as dist
small = [f for f in {SMALL!r} if not f.startswith("--eval.")]
cfg = parse_args(MSFTConfig, ["--config", "configs/tiny_msft.toml", "--out_dir={tmp_path}", *small,
                              "--msft.dynamix_val_rows=3", "--checkpoint.export_hf=false"])
rt = Runtime(cfg)
loader = make_loader(rt)
rt.resume(loader)
for _ in range(3):
    train_step(rt, [loader.next_batch()], rt.lr(0.0))

def state():
    params = [p.detach().to_local().clone() for p in rt.model.parameters()]
    opt = copy.deepcopy(rt.optimizer.state_dict())
    data = loader.state_dict()["sampler"]
    return params, opt, asdict(rt.counters), rt.sched_step, {{k: v for k, v in data.items() if k != "current_weights"}}

def same(a, b):
    pa, oa, *ra = a
    pb, ob, *rb = b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb)) and ra == rb, (ra, rb)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        assert all(torch.equal(oa["state"][k][n], ob["state"][k][n]) for n in oa["state"][k])

bandit = Dynamix(rt, loader)
before = state()
bandit.update(rt.lr(0.0))
same(before, state())
point = bandit.trajectory[-1]
assert len(bandit.trajectory) == 2 and set(point["rewards"]) == set(rt.data.tasks), point
assert all(r != 0 for r in point["rewards"].values()) and abs(sum(point["weights"].values()) - 1) < 1e-12
assert point["weights"] != bandit.prior and loader.sampler.weights != loader.sampler.initial_weights
assert bandit.compute["updates"] == 1 and bandit.compute["probe_tokens"] > 0 and bandit.compute["eval_tokens"] > 0
rt.new_optimizer()  # fresh: AdamW has no state until its first step
before = state()
bandit.update(rt.lr(0.0))
same(before, state())
assert not rt.optimizer.state
bandit.close()

# A roll-back checks that the snapshot holds the weights evaluated at its point, and refuses one that does not.
from posttrain.train.msft.method import Tracker, new_ring, restore_evaluated
ring = new_ring(rt)
tracker = Tracker(rt, ring, loader, "t")
tracker.evaluate(results={{t: {{"accuracy": 0.5}} for t in rt.data.tasks}})
key = tracker.best_overall[1]
train_step(rt, [loader.next_batch()], rt.lr(0.0))
meta, digest = restore_evaluated(rt, ring, key)
assert digest == meta["point"]["weights"]
ring._slots[key].buffers[0].add_(1.0)  # as if the copy had raced a later write
try:
    restore_evaluated(rt, ring, key)
    raise AssertionError("restored weights that were never evaluated")
except RuntimeError as e:
    assert "does not hold the evaluated weights" in str(e), e
ring.clear()
rt.finish(loader, finished=False)
loader.close()
from posttrain.core.distributed import close_distributed
close_distributed()
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    from posttrain.train.synthetic import write_jsonl

    root = tmp_path_factory.mktemp("mix")
    write_jsonl(root, seed=0, train_sizes={t: 48 for t in TASKS}, heldout_sizes={t: 8 for t in TASKS})
    return root


def _assert_decisions_follow_the_curves(report, **rule):
    """Each recorded stage decision is `decide` (with `rule`: skip_flat, min_fall) on the stage's own curve."""
    r = report["runs"]["msft"]
    assert r["stages"]
    for s in r["stages"]:
        curve = [p for p in r["curve"] if p["stage"] == s["stage"]]
        assert [p["c"] for p in curve] == s["points"]
        scores = {t: [p["eval"][t]["accuracy"] for p in curve] for t in s["active"]}
        assert decide(s["points"], scores, s["active"], **rule) == (s["excluded"], s["rollback_to"]), s


@pytest.mark.slow
def test_report_is_consistent_and_two_ranks_decide_like_one(tmp_path, mixture):
    """mSFT and every baseline on a small mixture: each roll-back restored exactly the snapshot it names (weights
    digests), compute adds up (tokens per stage, the discarded part, equal budgets), and 2 gloo ranks make the
    same decisions and select the same weights as 1 process with the same global batch."""
    methods = '--msft.methods=["msft", "sft", "early_stop", "sro", "temperature", "dynamix"]'
    one = _run_msft(tmp_path / "one", mixture, methods, "--optim.grad_accum=2", "--msft.skip_flat=true")
    r = one["runs"]["msft"]
    stages = r["stages"]
    _assert_decisions_follow_the_curves(one, skip_flat=True)
    assert stages and all(s["restored_weights"] == s["point_weights"] for s in stages if s["excluded"])
    for s in (s for s in stages if s["excluded"]):  # the restored point is the one the decision names, exactly
        at = next(p for p in r["curve"] if p["stage"] == s["stage"] and p["c"] == s["rollback_to"])
        assert (s["rollback_step"], s["restored_weights"], s["restored_epoch"]) == (at["step"], at["weights"],
                                                                                     at["epoch"]), (s, at)
    # Each exclusion and its roll-back are events in the method's metrics (and W&B), at the step of the decision.
    lines = (tmp_path / "one" / "msft" / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(x) for x in lines if '"event"' in x]
    excluded = [s for s in stages if s["excluded"]]
    assert excluded and [(e["event"], e["stage"]) for e in events] == [
        (name, s["stage"]) for s in excluded for name in ("msft/exclude", "msft/rollback")]
    for s, ex, rb in zip(excluded, events[::2], events[1::2]):
        assert (ex["task"], ex["peak_c"]) == (s["excluded"], s["rollback_to"]) and ex["step"] == rb["step"]
        assert (rb["to_c"], rb["to_step"], rb["discarded_tokens"]) == (s["rollback_to"], s["rollback_step"],
                                                                       s["discarded_tokens"])
        assert rb["step"] > rb["to_step"]
    assert r["selected"]["restored_weights"] == r["selected"]["weights"]
    for s in stages:
        if s["excluded"]:
            assert s["discarded_tokens"] >= 0 and s["rollback_to"] <= s["points"][-1]
            assert s["excluded"] not in sum((t["active"] for t in stages[stages.index(s) + 1:]), [])
    assert r["curve"][-1]["tokens"] == r["tokens"] and r["tokens"] > 0
    for s, nxt in zip(stages, stages[1:]):  # a stage starts where the previous one left off: θ_C or the roll-back
        last = [p for p in r["curve"] if p["stage"] == s["stage"]][-1]
        first = [p for p in r["curve"] if p["stage"] == nxt["stage"]][0]
        start = last if s["excluded"] is None else next(
            p for p in r["curve"] if p["stage"] == s["stage"] and p["step"] == s["rollback_step"])
        assert (first["eval"], first["weights"]) == (start["eval"], start["weights"]), (s, nxt)
    budget = r["tokens"]
    for method in ("sft", "sro", "temperature", "dynamix"):
        run = one["runs"][method]
        assert budget <= run["tokens"] < budget * 1.2, (method, run["tokens"], budget)  # equal tokens, one step over
        assert run["selected"]["restored_weights"] == run["selected"]["weights"]
    sro = one["runs"]["sro"]  # a task still at its best at the roll-out's end did not peak: never excluded
    assert all(at < one["config"]["budget_epochs"] for at in sro["recorded_peaks"].values()), sro["recorded_peaks"]
    (tmp_path / "one" / "report.json").unlink()  # an interrupted comparison resumes: every method's result is kept
    saved = {m: (tmp_path / "one" / m / "result.json").stat().st_mtime_ns
             for m in ("msft", "sft", "sro", "temperature", "dynamix")}
    again = _run_msft(tmp_path / "one", mixture, methods, "--optim.grad_accum=2", "--msft.skip_flat=true")
    assert again["summary"] == one["summary"]
    assert saved == {m: (tmp_path / "one" / m / "result.json").stat().st_mtime_ns for m in saved}  # nothing re-ran
    assert one["sft_shape"] == sft_shape(one["runs"]) and set(one["sft_shape"]["tasks"]) == set(TASKS)
    es = one["summary"]["early_stop"]["accuracy"]
    sft_curve = one["runs"]["sft"]["curve"]
    assert all(es[t] == max(p["eval"][t]["accuracy"] for p in sft_curve) for t in TASKS)
    assert (tmp_path / "one" / "msft.png").stat().st_size > 10_000  # the plot (matplotlib is in the test extra)

    dyn = one["runs"]["dynamix"]  # the bandit: its trajectory, and its look-ahead compute beside the budget
    points = dyn["bandit"]["trajectory"]
    every = dyn["bandit"]["every"]
    assert len(points) == dyn["optimizer_steps"] // every + (dyn["optimizer_steps"] % every > 0) >= 3
    assert [p["step"] for p in points] == [every * k for k in range(len(points))]
    assert points[0]["weights"] == dyn["bandit"]["prior"] and points[0]["rewards"] == {}
    for p in points[1:]:
        assert set(p["rewards"]) == set(TASKS) and sum(p["weights"].values()) == pytest.approx(1.0)
        shift = [math.log(p["weights"][t] / points[0]["weights"][t]) - dyn["bandit"]["eta"] * p["reward_sum"][t]
                 for t in TASKS]  # p_i ∝ prior_i exp(η R_i): the same shift for every arm
        assert max(shift) - min(shift) < 1e-9, shift
    assert points[-1]["weights"] != points[0]["weights"]
    la = one["summary"]["dynamix"]["lookahead"]
    n_probes = (len(points) - 1) * len(TASKS)  # one probe step per arm per update, each about one training step
    assert 0.5 < la["tokens"] / (n_probes * dyn["tokens"] / dyn["optimizer_steps"]) < 3, la
    assert la["flops_vs_training"] == pytest.approx(la["flops"] / dyn["flops"]) and "lookahead" not in \
        one["summary"]["sft"]

    two = _run_msft(tmp_path / "two", mixture, '--msft.methods=["msft", "dynamix"]', "--msft.skip_flat=true",
                    "--eval.loss=false", nproc=2)  # no held-out loss: accuracy alone decides (msft.signal)
    assert all(set(p["eval"][t]) == {"accuracy"} for p in two["runs"]["msft"]["curve"] for t in TASKS)
    decisions = lambda rep: [(s["excluded"], s["rollback_to"]) for s in rep["runs"]["msft"]["stages"]]  # noqa
    assert decisions(two) == decisions(one)
    a, b = one["runs"]["msft"]["selected"], two["runs"]["msft"]["selected"]
    assert (a["step"], a["accuracy"]) == (b["step"], b["accuracy"])
    assert abs(a["weights"] - b["weights"]) < 1e-6 * a["weights"]
    mix = lambda rep: [(p["step"], p["weights"]) for p in rep["runs"]["dynamix"]["bandit"]["trajectory"]]  # noqa
    for (step_a, wa), (step_b, wb) in zip(mix(one), mix(two), strict=True):  # the bandit decides alike
        assert step_a == step_b and wa == pytest.approx(wb, rel=1e-4)  # rewards: differences of close losses
    assert one["runs"]["dynamix"]["tokens"] == two["runs"]["dynamix"]["tokens"]


@pytest.mark.slow
def test_mSFT_from_a_pretrained_base_trains_it_once_and_starts_every_method_from_it(tmp_path, mixture):
    """msft.base_config: the base is trained into <out_dir>/base with the run's seeds, every method starts from
    <out_dir>/base/hf (the first evaluation's weights are the exported base's), and a second run reuses it."""
    from safetensors.torch import load_file

    base = [*[f for f in SMALL if not f.startswith("--eval.")], f"--data.path={mixture}",
            f"--data.cache_dir={tmp_path}/cache", "--train.max_steps=3", "--eval.every_epochs=0",
            "--eval.at_start=false"]
    flags = ['--msft.methods=["msft", "sft"]', "--msft.base_config=configs/tiny_sft.toml",
             "--msft.base_overrides=[" + ", ".join(f'"{f}"' for f in base) + "]", "--msft.max_stages=1",
             "--train.seed=5", "--msft.min_fall=0.1"]
    report = _run_msft(tmp_path / "run", mixture, *flags)
    _assert_decisions_follow_the_curves(report, min_fall=0.1)  # the fall test reaches the driver's decision
    assert report["config"]["min_fall"] == 0.1
    hf = tmp_path / "run" / "base" / "hf"
    assert report["config"]["init"] == str(hf)
    assert json.loads((tmp_path / "run" / "base" / "summary.json").read_text())["steps"] == 3
    weights = load_file(hf / "model.safetensors")
    digest = sum(float(t.double().pow(2).sum()) for t in weights.values())
    for method in ("msft", "sft"):
        assert report["runs"][method]["curve"][0]["weights"] == pytest.approx(digest, rel=1e-9)
    made = (hf / "model.safetensors").stat().st_mtime_ns
    (tmp_path / "run" / "report.json").unlink()
    again = _run_msft(tmp_path / "run", mixture, *flags)
    assert (hf / "model.safetensors").stat().st_mtime_ns == made and again["summary"] == report["summary"]


def test_a_methods_result_is_keyed_by_what_it_depends_on():
    """Adding a method, running other seeds or changing another method's parameter keeps a result reusable; a
    change the method depends on does not."""
    from dataclasses import replace

    from posttrain.core.config import load_config
    from posttrain.train.msft.method import MSFTConfig
    from posttrain.train.msft.study import study_key, with_base

    cfg = load_config(MSFTConfig, REPO / "configs/tiny_msft.toml")
    more = replace(cfg, msft=replace(cfg.msft, methods=["msft", "sft", "temperature", "dynamix"], seeds=[0, 1],
                                     temperature=5.0))
    for method in ("msft", "sft", "sro"):
        assert study_key(more, method) == study_key(cfg, method)
    assert study_key(more, "temperature") != study_key(cfg, "temperature")
    assert study_key(replace(cfg, msft=replace(cfg.msft, dynamix_eta=1.0)), "dynamix") != study_key(cfg, "dynamix")
    assert study_key(replace(cfg, optim=replace(cfg.optim, lr=1e-4)), "sft") != study_key(cfg, "sft")
    assert study_key(more) != study_key(cfg)  # a report: which methods it holds matters
    assert with_base(cfg) is cfg  # no base_config: nothing to do
    pre = load_config(MSFTConfig, REPO / "configs/tiny_msft_pretrained.toml", ["--out_dir=/x/seed3"])
    assert with_base(pre, train=False).init.hf_checkpoint == "/x/seed3/base/hf"
    assert study_key(pre) == study_key(replace(pre, out_dir="/y"))  # the derived base path is not the experiment
    with pytest.raises(ValueError, match="give one of them"):
        with_base(replace(pre, init=replace(pre.init, hf_checkpoint="/elsewhere/hf")), train=False)


def test_a_result_is_keyed_by_the_data_it_read_not_only_the_config(tmp_path, monkeypatch):
    """A saved result must not be reused after the data changed under the same config: a JSONL file rewritten in
    place, or the built-in task set's rows (train/synthetic.py edited)."""
    import os
    from dataclasses import replace

    from posttrain.core.config import load_config
    from posttrain.train import data, synthetic
    from posttrain.train.msft.method import MSFTConfig
    from posttrain.train.msft.study import study_key

    cfg = load_config(MSFTConfig, REPO / "configs/tiny_msft.toml")
    assert study_key(cfg)["data.digest"] == study_key(cfg, "sft")["data.digest"]
    before = study_key(cfg)
    sets = dict(synthetic.TASK_SETS)  # the same config, other rows: vote's label noise edited
    sets["msft"] = replace(sets["msft"], noise={**sets["msft"].noise, "vote": 0.3})
    monkeypatch.setattr(synthetic, "TASK_SETS", sets)
    data._data_digest.cache_clear()  # read once per process: code does not change under a running process
    assert study_key(cfg) != before
    monkeypatch.undo()
    data._data_digest.cache_clear()
    assert study_key(cfg) == before
    (tmp_path / "train").mkdir()
    f = tmp_path / "train" / "a.jsonl"
    f.write_text('{"prompt": "p", "response": "r"}\n')
    on_disk = replace(cfg, data=replace(cfg.data, path=str(tmp_path)))
    before = study_key(on_disk)
    f.write_text('{"prompt": "p", "response": "R"}\n')  # same size, new content
    os.utime(f, ns=(1, 1))
    assert study_key(on_disk) != before and study_key(on_disk)["data.digest"] == study_key(on_disk)["data.digest"]


@pytest.mark.parametrize("name", ["tiny_msft.toml", "tiny_msft_pretrained.toml", "qwen2.5-0.5b_msft.toml",
                                  "qwen2.5-1.5b_msft.toml"])
def test_repo_configs_parse(name):
    from posttrain.core.config import load_config
    from posttrain.train.msft.method import MSFTConfig

    cfg = load_config(MSFTConfig, REPO / "configs" / name)
    assert cfg.msft.methods[0] == "msft" and cfg.optim.schedule == "constant"


def test_bad_msft_settings_are_refused():
    from posttrain.core.config import ConfigError, load_config
    from posttrain.train.msft.method import MSFTConfig
    from posttrain.train.msft.study import run_one

    with pytest.raises(ConfigError, match=r"msft.methods: unknown \['dynamics'\]"):
        load_config(MSFTConfig, None, ['--msft.methods=["msft", "dynamics"]'])
    with pytest.raises(ConfigError, match=r"dynamix_every \(0\) and msft.dynamix_val_rows \(8\) must be >= 1"):
        load_config(MSFTConfig, None, ["--msft.dynamix_every=0"])
    with pytest.raises(ConfigError, match=r"0 <= dynamix_discount <= 1 \(1.5\)"):
        load_config(MSFTConfig, None, ["--msft.dynamix_discount=1.5"])
    with pytest.raises(ConfigError, match=r"need 0 < eval_every \(2.0\) <= budget_epochs \(1.0\)"):
        load_config(MSFTConfig, None, ["--msft.eval_every=2.0"])
    with pytest.raises(ValueError, match=r"msft.signal = 'loss' reads held-out loss: set eval.loss = true"):
        run_one(load_config(MSFTConfig, None, ["--msft.signal=loss", "--eval.loss=false"]))


def test_study_aggregates_mean_and_std_over_seeds():
    from posttrain.train.msft.study import aggregate, format_study

    r = {s: {"msft": {"accuracy": {"a": acc}, "average": acc, "tokens": tokens},
             "dynamix": {"accuracy": {"a": acc}, "average": acc, "tokens": tokens, "lookahead": {"tokens": extra}}}
         for s, acc, tokens, extra in ((0, 0.5, 100.0, 30.0), (1, 0.7, 120.0, 50.0))}
    study = aggregate(r)
    assert study["msft"]["a"][0] == pytest.approx(0.6) and study["msft"]["a"][1] == pytest.approx(0.1414213562)
    assert study["msft"]["tokens"] == (110.0, pytest.approx(14.1421356237)) and "lookahead_tokens" not in study["msft"]
    assert study["dynamix"]["lookahead_tokens"] == (40.0, pytest.approx(14.1421356237))
    assert "dynamix: + 40 look-ahead tokens (mean), not in its tokens" in format_study(study, [0, 1])


def test_a_study_reuses_the_seeds_already_run_with_the_same_config(tmp_path):
    """Seeds can run as separate processes (or a study can be interrupted): `run` with msft.seeds reuses
    <out_dir>/seed<s>/report.json when its config is this one, and only then."""
    from dataclasses import replace

    from posttrain.core.config import load_config
    from posttrain.train.msft.method import MSFTConfig
    from posttrain.train.msft.study import finished_report, run, study_key

    cfg = load_config(MSFTConfig, REPO / "configs/tiny_msft.toml", [f"--out_dir={tmp_path}", "--msft.seeds=[3, 4]"])
    for seed, acc in ((3, 0.5), (4, 0.7)):
        sub = replace(cfg, out_dir=str(tmp_path / f"seed{seed}"), train=replace(cfg.train, seed=seed),
                      data=replace(cfg.data, seed=seed), msft=replace(cfg.msft, seeds=[]))
        (tmp_path / f"seed{seed}").mkdir()
        summary = {"msft": {"accuracy": {"a": acc}, "average": acc, "tokens": 10.0}}
        (tmp_path / f"seed{seed}" / "report.json").write_text(json.dumps({"key": study_key(sub), "summary": summary}))
        assert finished_report(sub)["summary"] == summary
        assert finished_report(replace(sub, optim=replace(sub.optim, lr=1e-4))) is None  # another experiment
    study = run(cfg)  # nothing to train: both seeds are reused
    assert study["msft"]["a"][0] == pytest.approx(0.6)
    assert json.loads((tmp_path / "study.json").read_text())["mean_std"]["msft"]["average"][0] == pytest.approx(0.6)
