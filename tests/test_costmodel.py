"""Issue 5 (pure parts): cost fits, size rules, pruning, calibration, profile persistence."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from quanttree.costmodel import CostModel, CostProfile, convex_monotone_fit, violations
from quanttree.policy import (AcceptanceCalibrator, best_size, expected_gain, greedy_size, pop_order, prune,
                              throughput)
from quanttree.tree import build_tree

SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


def is_monotone_convex(x, y, tol=1e-6):
    slopes = np.diff(y) / np.diff(x)
    return (slopes >= -tol).all() and (np.diff(slopes) >= -tol).all()


@pytest.mark.parametrize("seed", range(5))
def test_fit_is_monotone_convex_and_close(seed):
    rng = np.random.default_rng(seed)
    truth = 30 + 0.8 * np.array(SIZES) + 0.01 * np.array(SIZES) ** 2
    noisy = truth * (1 + 0.08 * rng.standard_normal(len(SIZES)))
    fit = convex_monotone_fit(SIZES, list(noisy))
    assert is_monotone_convex(np.array(SIZES, float), np.array(fit))
    assert np.abs(np.array(fit) - truth).mean() < np.abs(noisy - truth).mean() * 1.2
    exact = convex_monotone_fit(SIZES, list(truth))  # already convex: the fit returns it
    np.testing.assert_allclose(exact, truth, rtol=1e-6)


def test_violations_name_the_jump():
    curve = [30, 80, 82, 84, 88, 92, 100, 108, 124, 140, 172, 204]  # bitsandbytes-like jump after n=1
    found = violations(SIZES, curve)
    assert any(v["kind"] == "concave" and v["at_size"] == 2 for v in found)
    assert violations(SIZES, list(30 + 2.0 * np.array(SIZES))) == []


@pytest.mark.parametrize("seed", range(10))
def test_greedy_equals_argmax_on_convex_inputs(seed):
    rng = np.random.default_rng(seed)
    probs = np.sort(rng.uniform(0, 1, 63))[::-1] ** 2  # pop order: non-increasing -> Phi concave
    phi = expected_gain(probs)
    n = np.arange(1, 65)
    verify = 20 + rng.uniform(0.1, 2) * n + rng.uniform(0, 0.05) * n ** 2  # convex, increasing
    fixed = rng.uniform(0, 30)
    rate = throughput(phi, verify, fixed).max()  # at a round's own best rate: its argmax of theta
    assert greedy_size(phi, verify, fixed) == best_size(phi, verify, rate)


def test_nonconvex_jump_greedy_stops_early_exact_finds_optimum():
    probs = np.array([0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4] + [0.05] * 56)
    phi = expected_gain(probs)
    n = np.arange(1, phi.size + 1)
    verify = np.where(n == 1, 30.0, 75.0 + 0.5 * n)  # a kernel switch makes 2 tokens cost 2.5x one
    assert greedy_size(phi, verify, 5.0) == 0
    theta = (1 + phi) / (5.0 + verify[: phi.size])
    best = best_size(phi, verify, theta.max())
    assert best == int(np.argmax(theta)) and best >= 6 and theta[best] > theta[0] * 1.5


def test_worthless_speculation_picks_zero():
    phi = expected_gain(np.full(32, 0.01))
    verify = 40 + 5.0 * np.arange(1, 34)
    assert best_size(phi, verify, 1.0 / verify[0]) == 0  # at plain decoding's rate


def test_rate_rule_maximises_tokens_per_second_over_rounds():
    """Tokens/s over rounds that differ (a confident one, a doubtful one) is a ratio of sums.
    Sizing each round by Phi - rate * C_v at the achieved rate, iterated from plain decoding's,
    reaches the brute-force best pair of sizes; each round's own argmax of theta does not (it
    verifies more nodes in the doubtful round, where its own rate is low)."""
    rounds = (expected_gain(np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.05])),
              expected_gain(np.array([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.04])))
    verify, fixed = 20.0 + np.arange(1, 10), 3.0

    def rate_of(sizes):
        return sum(1 + phi[n] for phi, n in zip(rounds, sizes)) / sum(fixed + verify[n] for n in sizes)

    brute = max(itertools.product(range(9), repeat=2), key=rate_of)
    rate = 1.0 / verify[0]
    for _ in range(5):
        sizes = tuple(best_size(phi, verify, rate) for phi in rounds)
        rate = rate_of(sizes)
    assert sizes == brute
    own = tuple(int(np.argmax(throughput(phi, verify, fixed))) for phi in rounds)
    assert own != brute and rate_of(own) < rate_of(brute)


@pytest.mark.parametrize("seed", range(4))
def test_prune_equals_smaller_budget(seed):
    gen = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(6, 7, generator=gen) * 2, -1)
    big = build_tree(lp, root=3, budget=40)
    for n in (0, 1, 5, 17, 40):
        small = prune(big, n)
        ref = build_tree(lp, root=3, budget=n) if n else None
        seqs = lambda t: {tuple(int(t.tokens[j]) for j in path(t, i)) for i in range(1, t.size + 1)}  # noqa: E731
        assert small.size == n
        if ref is not None:
            assert seqs(small) == seqs(ref)
        assert all(0 <= int(small.parents[i]) < i for i in range(1, small.size + 1))
    order = pop_order(big)
    assert (big.scores[order][:-1] >= big.scores[order][1:]).all()


def path(tree, i):
    out = []
    while i > 0:
        out.append(i)
        i = int(tree.parents[i])
    return out[::-1]


def test_calibrator_learns_overconfidence():
    lp = torch.log_softmax(torch.tensor([[4.0, 0, 0], [4.0, 0, 0], [4.0, 0, 0]]), -1)
    tree = build_tree(lp, root=0, budget=3)  # a chain of confident nodes, q ~ 0.96 each
    cal = AcceptanceCalibrator()
    np.testing.assert_allclose(cal.calibrate(tree), tree.scores.exp().numpy(), atol=0.05)  # identity at first
    for _ in range(300):
        cal.update(tree, torch.tensor([0, 1]))  # the target only ever accepts the first token
    calibrated = cal.calibrate(tree)
    assert calibrated[1] > 0.95 and calibrated[2] < 0.05 and calibrated[3] < 0.05


def test_calibrator_maps_each_confidence_level_separately():
    """Overconfident where q is high, right where it is low: one factor per depth cannot say both."""
    rng = np.random.default_rng(0)
    cal = AcceptanceCalibrator()
    for _ in range(2000):
        q_high = 0.92
        lp = torch.log(torch.tensor([[q_high, 0.05, 0.03], [0.2, 0.15, 0.65]]))
        tree = build_tree(lp, root=0, budget=6)
        # depth 1: the q = 0.92 token is accepted half of the time; depth 2: each token at its q
        first = 1 if rng.random() < 0.5 else None
        path = [0]
        if first is not None:
            path.append(first)
            kids = [i for i in range(1, tree.size + 1) if int(tree.parents[i]) == first]
            probs = np.exp((tree.scores[kids] - tree.scores[first]).numpy())
            pick = rng.random()
            for k, p in zip(kids, probs):
                if pick < p:
                    path.append(k)
                    break
                pick -= p
        cal.update(tree, torch.tensor(path))
    rates = cal.rates()
    at = AcceptanceCalibrator.bin
    assert abs(rates[0, at(0.92)] - 0.5) < 0.08  # q = 0.92 at depth 1: really 0.5
    assert abs(rates[1, at(0.65)] - 0.65) < 0.1 and abs(rates[1, at(0.2)] - 0.2) < 0.1  # depth 2: as drafted


def test_profile_round_trip_and_online_correction(tmp_path):
    profile = CostProfile(key={"model": "m", "quant": "nf4"}, sizes=SIZES, contexts=[128, 512],
                          verify_ms=[[30 + s for s in SIZES], [40 + 2 * s for s in SIZES]], draft_ms=[10.0, 12.0])
    model = CostModel(profile)
    assert model.verify_ms(8, 128) == pytest.approx(38)
    assert model.verify_ms(8, 320) == pytest.approx((38 + 56) / 2)
    assert model.verify_ms(5, 128) == pytest.approx(35)
    loaded = CostModel.load(model.save(tmp_path / "p.json"))
    assert loaded.profile == profile
    for _ in range(100):
        loaded.observe(8, 128, 2 * 38.0)  # the machine got twice as slow
        loaded.observe_draft(128, 20.0)
    assert loaded.verify_ms(8, 128) == pytest.approx(76, rel=0.01)
    assert loaded.verify_ms(64, 128) == pytest.approx(2 * 94, rel=0.01)  # never run: the drift ratio
    assert loaded.draft_ms(128) == pytest.approx(20, rel=0.01)


def test_in_situ_costs_correct_each_size_and_survive_a_new_process():
    profile = CostProfile(key={}, sizes=SIZES, contexts=[128], verify_ms=[[30 + s for s in SIZES]], draft_ms=[5.0])
    model = CostModel(profile)
    for _ in range(60):  # decoding measures 1 token as profiled but 5 tokens 20% cheaper
        model.observe(1, 128, 31.0)
        model.observe(5, 128, 0.8 * 35.0)
    assert model.verify_ms(1, 128) == pytest.approx(31.0, rel=0.03)
    assert model.verify_ms(5, 128) == pytest.approx(28.0, rel=0.03)
    assert model.verify_ms(48, 128) == pytest.approx(78.0 * model.ratio)  # unmeasured: drift only
    assert model.verify_ms(5, 128, smooth=True) == pytest.approx(model.ratio * model.profiled_ms(5, 128, True))
    fresh = CostModel(profile)
    fresh.load_state(json.loads(json.dumps(model.state())))
    assert fresh.verify_curve(16, 128) == pytest.approx(model.verify_curve(16, 128))
    one = CostModel(profile)
    one.observe(5, 128, 0.5 * 35.0)  # a single (maybe noisy) observation moves the estimate only partly
    assert 0.5 * 35.0 < one.verify_ms(5, 128) < 35.0


def test_auto_trusts_measured_rounds_over_the_surrogate_and_backs_off_probes():
    from quanttree.policy import TreeSizer

    profile = CostProfile(key={"model": "m"}, sizes=SIZES, contexts=[128], verify_ms=[[20 + s for s in SIZES]],
                          draft_ms=[2.0])
    sizer = TreeSizer("auto", CostModel(profile), cap=16, min_samples=4)
    sizer.expected_phi = np.array([0.0, 0.9, 1.7, 2.4, 3.0])  # the drafter promises a lot
    chain = build_tree(torch.log_softmax(torch.tensor([[6.0] + [0.0] * 7] * 4), -1), 1, 4)  # a confident chain

    def drafted_round(path, round_ms):
        sizer.choose(chain, 128)
        sizer.observe(chain, torch.tensor(path), 5, 128, 25.0, 1.0, round_ms=round_ms)

    for _ in range(5):  # predicted to pay, so it drafts, but each round takes 40 ms for one token
        assert sizer.should_draft(128)
        drafted_round([0], 40.0)
    mean, se = sizer.gate.measured_saving(128)  # measured: the surrogate's promise does not count
    assert mean < 21.3 - 40.0 + 0.5 and mean + se < 0  # lost: a plain round (21 ms + extras) takes 40
    pattern = [sizer.should_draft(128) for _ in range(26)]
    assert pattern[:9] == [False] * 8 + [True]  # measured to lose: a plain streak, then one probe
    assert pattern[9:26] == [False] * 16 + [True]  # still no: the next streak is twice as long
    assert sizer.gate.probe_every == 32
    for _ in range(12):  # probes that save time (4 tokens in 30 ms where plain takes 4 x 21.3)
        sizer.gate.skipped = sizer.gate.probe_every
        assert sizer.should_draft(128)
        drafted_round([0, 1, 2, 3], 30.0)
    assert sizer.gate.savings.mean_se()[0] > 0
    assert all(sizer.should_draft(128) for _ in range(5)) and sizer.gate.probe_every == 8
    sizer.gate.skipped, sizer.gate.probe_every = 1, 32  # inside a long plain streak
    assert not sizer.should_draft(128)
    sizer.start_sequence()  # a new prompt ends the streak: its first round probes
    assert sizer.should_draft(128)


def test_savings_mean_and_standard_error():
    from quanttree.policy import Savings

    rng = np.random.default_rng(0)
    savings = Savings(decay=0.98)
    for x in rng.normal(2.0, 15.0, 3000):
        savings.add(float(x))
    mean, se = savings.mean_se()
    assert savings.count() == pytest.approx((1 + 0.98) / (1 - 0.98))  # effective samples of the decayed sums
    assert abs(se - 15.0 / savings.count() ** 0.5) < 0.6 and abs(mean - 2.0) < 4 * se


def plain_round():
    from quanttree.tree import root_only

    return root_only(1)


# ---------------------------------------------------------------- adaptive methods in the decode loop

def test_adaptive_methods_are_lossless_and_auto_falls_back_to_ar(tiny_dirs, tmp_path, monkeypatch):
    import quanttree
    from quanttree.engine import measure_profile

    monkeypatch.setenv("QUANTTREE_CACHE", str(tmp_path / "cache"))
    engine = quanttree.load(str(tiny_dirs["qwen3"]), drafter=str(tiny_dirs["qwen3-drafter"]), quant="fp32",
                            device="cpu")
    profile = measure_profile(engine, sizes=(1, 2, 4, 8, 16), contexts=(16, 64), repeats=2, warmup=1,
                              progress=False)
    assert len(profile.verify_ms) == 2 and len(profile.verify_ms[0]) == 5 and all(d > 0 for d in profile.draft_ms)
    assert len(profile.roofline) == 4
    ar = engine.generate("the cat sat on", method="ar", max_new_tokens=30, chat=False)
    for method in ("caddtree", "bastion", "auto"):
        out = engine.generate("the cat sat on", method=method, budget=16, max_new_tokens=30, chat=False)
        assert out.token_ids == ar.token_ids, method
    assert any(p.name.endswith(".json") for p in (tmp_path / "cache" / "profiles").iterdir())
    # a cost model where every drafted node is ruinous: auto must decode exactly like AR
    worthless = CostProfile(key={}, sizes=[1, 2, 64], contexts=[1, 4096],
                            verify_ms=[[10.0, 1e4, 1e6], [10.0, 1e4, 1e6]], draft_ms=[1e3, 1e3])
    engine._cost = CostModel(worthless)
    engine._sizers.clear()
    out = engine.generate("the cat sat on", method="auto", budget=16, max_new_tokens=30, chat=False)
    assert out.token_ids == ar.token_ids
    assert out.stats.tree_nodes == 0 and out.stats.target_forwards == len(out.token_ids)
    sizer = engine.policy("auto", 16)
    assert set(sizer.chosen) == {0}


def test_cli_calibrate_prints_curve_and_plots(tiny_dirs, tmp_path, monkeypatch, capsys):
    from quanttree.cli import main

    monkeypatch.setenv("QUANTTREE_CACHE", str(tmp_path / "cache"))
    plot = tmp_path / "cv.png"
    code = main(["calibrate", "--target", str(tiny_dirs["llama"]), "--drafter", str(tiny_dirs["llama-drafter"]),
                 "--quant", "fp32,nf4", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert code == 0 and "[fp32]" in out and "[nf4]" in out and "fit:" in out
    assert plot.stat().st_size > 10_000


def test_first_use_warms_up_and_a_new_process_starts_from_what_was_learned(tiny_dirs, tmp_path, monkeypatch):
    import quanttree
    from quanttree.costmodel import learned_path, profile_key, profile_path
    from quanttree.engine import DEFAULT_CAP, Engine

    monkeypatch.setenv("QUANTTREE_CACHE", str(tmp_path / "cache"))
    engine = quanttree.load(str(tiny_dirs["qwen3"]), drafter=str(tiny_dirs["qwen3-drafter"]), quant="fp32",
                            device="cpu")
    assert profile_key(engine)["drafter"].startswith(tiny_dirs["qwen3-drafter"].name)
    cost = engine.cost_model(progress=False)  # measures, then the warm-up decodes every size in turn
    warmed = engine.sizer("auto", DEFAULT_CAP)
    assert warmed.expected_phi is not None and not warmed.schedule and warmed.chosen == []
    assert (cost.size_weight > 0).sum() >= 4  # in-situ verify costs at several sizes
    assert warmed.gate.savings.count() == 0  # exploring is not the policy
    engine.generate("the cat sat on", method="auto", max_new_tokens=12, chat=False)
    saved = json.loads(learned_path(profile_path(profile_key(engine))).read_text())
    assert f"auto/{DEFAULT_CAP}" in saved["sizers"]

    again = Engine(engine.loaded, engine.drafter, engine.drafter_quant)  # a new process, same cache
    sizer = again.sizer("auto", DEFAULT_CAP)
    np.testing.assert_allclose(sizer.calibrator.rates(), warmed.calibrator.rates())
    np.testing.assert_allclose(sizer.expected_phi, warmed.expected_phi)
    np.testing.assert_allclose(again.cost_model().size_ratio, cost.size_ratio)
    assert again.sizer("caddtree", 16).calibrator.hits.tolist() == warmed.calibrator.hits.tolist()


def test_auto_builds_only_what_it_may_choose_and_grows_when_choices_reach_it():
    from quanttree.policy import TreeSizer

    flat = CostProfile(key={}, sizes=SIZES, contexts=[128], verify_ms=[[20.0] * len(SIZES)], draft_ms=[1.0])
    sizer = TreeSizer("auto", CostModel(flat), cap=64)
    assert sizer.build_budget() == 8
    confident = torch.log_softmax(torch.tensor([[8.0] + [0.0] * 31] * 15), -1)  # every node worth verifying
    for expected in (16, 32, 64, 64):
        tree = build_tree(confident, 1, sizer.build_budget())
        assert sizer.choose(tree, 128).size == tree.size  # a flat curve: verify all built nodes
        assert sizer.build_budget() == expected
    sizer.explore([63])
    assert sizer.build_budget() == 64


def test_a_nan_never_sticks_in_what_auto_learns():
    """Session 23: a NaN net gain stuck in a DrafterWorth bin (NaN > 0 is False, and NaN decays to
    NaN) kept `auto` off the drafter for good, across processes (1.14x where `ddtree` made 1.83x).
    Non-finite observations are dropped, and states saved with one start fresh."""
    from quanttree.policy import DrafterWorth

    nan = float("nan")
    worth = DrafterWorth()
    for _ in range(5):
        worth.observe(0.6, nan)
    assert np.all(np.isfinite(worth.sum)) and worth.worth(0.6)  # nothing learned: the drafter runs
    for _ in range(5):
        worth.observe(0.6, -1.0)
    assert not worth.worth(0.6)  # learned: not worth it here (until a probe)
    stuck = DrafterWorth()
    stuck.load_state({"sum": [nan] * 6, "weight": [4.0] * 6})
    assert stuck.worth(0.6) and np.all(np.isfinite(stuck.sum))

    profile = CostProfile(key={}, sizes=SIZES, contexts=[128], verify_ms=[[30 + s for s in SIZES]], draft_ms=[5.0])
    model = CostModel(profile)
    model.observe(8, 128, 40.0)
    before = json.dumps(model.state())
    model.observe(8, 128, float("inf"))
    assert json.dumps(model.state()) == before
    model.load_state({"ratio": nan, "draft_ratio": 1.0, "size_ratio": [nan] * len(SIZES),
                      "size_weight": [1.0] * len(SIZES)})
    assert json.dumps(model.state()) == before
