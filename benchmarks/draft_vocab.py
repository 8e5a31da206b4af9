"""How much the draft vocabulary costs in decoding: rounds a token outside it ends, replayed.

A drafter over a draft vocabulary (the N most frequent response tokens) can never propose a
token outside it, so every such token in the target's answer ends a round there. This replays
greedy decoding offline, on held-out pool prompts of the committed training pack (never the
chat suite or HumanEval, which stay for measuring): the target answers each prompt (greedy),
one target forward gives the features of every position, the drafter runs once per position,
and its final states go through the target's lm_head rows of several vocabularies: the
drafter's own, the N most frequent tokens of the pack's training answers for each --sizes
entry (0 = the whole vocabulary). Rounds are then replayed per vocabulary (each starts right
after the last rejection, as in decoding; the drafter's context is the teacher-forced one, so
figures can differ from real decoding by rounding).

Per vocabulary: response tokens outside it, the share of DDTree rounds that end at a token
outside the drafter's own vocabulary, teacher-forced slot 1, chain tau, DDTree@budget tau, and
the drafter pass's time (its block pass plus that vocabulary's head, timed side by side per
position: pause other torch work while it runs).

    python benchmarks/draft_vocab.py --drafter quanttree/drafters/smollm2-135m --prompts 48
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write_results  # noqa: E402


def held_out_prompts(packed: Path, count: int, seed: int = 0) -> tuple[list[list[int]], list[np.ndarray]]:
    """(prompt ids of `count` held-out first-round answers, every training answer's response ids)."""
    from quanttree.train.datagen import is_held_out

    with np.load(packed) as z:
        tokens, offsets = z["tokens"].astype(np.int64), z["offsets"]
        plens, pidx = z["prompt_lens"], z["pool_index"]
        rounds = z["rounds"] if "rounds" in z.files else np.zeros(len(pidx), dtype=np.int64)
    held = [i for i in range(len(pidx)) if is_held_out(pidx[i]) and rounds[i] == 0]
    pick = np.random.default_rng(seed).choice(len(held), min(count, len(held)), replace=False)
    prompts = [tokens[offsets[held[i]]:offsets[held[i]] + plens[held[i]]].tolist() for i in pick]
    train = [tokens[offsets[i] + plens[i]:offsets[i + 1]] for i in range(len(pidx)) if not is_held_out(pidx[i])]
    return prompts, train


def drafted_tops(engine, sequence: list[int], start: int, heads: dict, k: int, clock: dict) -> dict:
    """Per vocabulary, the drafter's top-k (log-probs, token ids) at every position from
    `start` on: {name: ([P, D, k], [P, D, k])}, one drafter pass per position, its states
    scored through each vocabulary's head rows (heads: {name: (vocab ids or None, rows)}).
    Adds seconds to clock["states"] and clock[name] (the head, softmax and top-k), side by side."""
    from quanttree.decode import DraftContext

    ids = torch.tensor(sequence)[None]
    layers = tuple(engine.drafter.config.target_layer_ids)
    with torch.inference_mode():
        _, feats = engine.target.hidden_and_logits(ids, layers)
    feats = feats[0]
    ctx = DraftContext(engine.drafter, engine.target)
    ctx.commit(feats[:start], torch.arange(start))
    out = {name: ([], []) for name in heads}
    for pos in range(start, len(sequence) - 1):
        with torch.inference_mode():
            t0 = time.perf_counter()
            states = ctx.states(sequence[pos], pos)
            clock["states"] += time.perf_counter() - t0
            for name, (vocab, rows) in heads.items():
                t0 = time.perf_counter()
                lp = torch.log_softmax((states.to(rows.dtype) @ rows.T).float(), -1)  # [D, N]
                top = lp.topk(k, dim=-1)
                clock[name] += time.perf_counter() - t0
                out[name][0].append(top.values)
                out[name][1].append(top.indices if vocab is None else vocab[top.indices])
        ctx.commit(feats[pos:pos + 1], torch.tensor([pos]))
    return {name: (torch.stack(lp), torch.stack(tok)) for name, (lp, tok) in out.items()}


def replay(sequence: list[int], start: int, log_probs: torch.Tensor, tokens: torch.Tensor, budget: int,
           outside: set[int]) -> tuple[int, int, int]:
    """Greedy rounds from `start` with trees of `budget` nodes (1: the chain) built from the
    stored top-k marginals. -> (rounds, tokens produced, rounds ended at a token in `outside`)."""
    from quanttree.tree import Tree, build_chain, build_tree, walk

    truth = torch.tensor(sequence)
    rounds = produced = ended_outside = 0
    pos = start
    while pos < len(sequence) - 1:
        lp, tok = log_probs[pos - start], tokens[pos - start]
        tree = build_chain(lp, sequence[pos]) if budget == 1 else build_tree(lp, sequence[pos], budget)
        depth_of = (tree.depths[1:] - 1).clamp(min=0)
        nodes = torch.cat([tree.tokens[:1], tok[depth_of, tree.tokens[1:]]])  # top-k columns -> token ids
        tree = Tree(nodes, tree.parents, tree.depths, tree.scores)
        targets = truth[(pos + tree.depths + 1).clamp(max=len(sequence) - 1)]
        accepted = min(len(walk(tree, targets).path) - 1, len(sequence) - 2 - pos)
        rounds += 1
        produced += accepted + 1
        nxt = pos + accepted + 1
        ended_outside += int(nxt < len(sequence) and accepted < lp.shape[0] and sequence[nxt] in outside)
        pos = nxt
    return rounds, produced, ended_outside


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drafter", default="quanttree/drafters/smollm2-135m")
    ap.add_argument("--quant", default="auto", help="the target's mode (auto: fp32 where bf16 is not native)")
    ap.add_argument("--prompts", type=int, default=48, help="held-out pool prompts")
    ap.add_argument("--sizes", default="16384,32768,0", help="vocabulary sizes beside the drafter's own (0 = all)")
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--name", default="draft_vocab")
    args = ap.parse_args()

    from tqdm import tqdm

    import quanttree
    from quanttree.train.datagen import generate_batch
    from quanttree.train.pipeline import packed_data_file
    from quanttree.train.trainer import draft_vocabulary

    engine = quanttree.load("smollm2-135m", drafter=args.drafter, quant=args.quant, log=lambda *_: None)
    prompts, train = held_out_prompts(packed_data_file("smollm2-135m", "bf16"), args.prompts)
    size = engine.target.vocab_size
    vocabs = {"drafter's own": engine.drafter.draft_vocab}
    for n in (int(s) for s in args.sizes.split(",")):
        vocabs["all" if n == 0 else f"top {n}"] = None if n == 0 else draft_vocabulary(train, n, size, engine.eos_token_ids)
    weight = engine.target.model.get_output_embeddings().weight.detach()
    heads = {name: (vocab, weight if vocab is None else weight[vocab]) for name, vocab in vocabs.items()}
    clock = dict.fromkeys(["states", *vocabs], 0.0)
    own = vocabs["drafter's own"]
    outside_own = set(range(size)) - set(own.tolist()) if own is not None else set()
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else min(engine.eos_token_ids)
    answers = []
    for b in tqdm(range(0, len(prompts), 8), desc="target answers", unit="batch"):
        answers += generate_batch(engine.target, prompts[b:b + 8], args.max_new_tokens, engine.eos_token_ids, pad)
    totals = {name: np.zeros(7) for name in vocabs}  # rounds, produced, ended, chain rounds, chain produced, hits, n
    for prompt, answer in tqdm(list(zip(prompts, answers)), desc="drafter passes", unit="answer"):
        sequence, start = prompt + list(answer), len(prompt)
        if len(sequence) - start < 2:
            continue
        tops = drafted_tops(engine, sequence, start, heads, args.budget, clock)
        for name, (lp, tok) in tops.items():
            tree = replay(sequence, start, lp, tok, args.budget, outside_own)
            chain = replay(sequence, start, lp, tok, 1, outside_own)
            hits = (tok[:, 0, 0] == torch.tensor(sequence[start + 1:])).sum().item()
            totals[name] += [*tree, chain[0], chain[1], hits, len(sequence) - start - 1]
    response = [t for a in answers for t in a]
    rows, lines = [], ["| vocabulary | tokens | answer tokens outside | DDTree rounds ended at a token outside "
                       "the drafter's own | teacher-forced slot 1 | chain tau | "
                       f"DDTree@{args.budget} tau | drafter pass ms |", "|---|---|---|---|---|---|---|---|"]
    passes = totals["drafter's own"][6]  # one drafter pass per scored position
    for name, vocab in vocabs.items():
        t = totals[name]
        inside = set(range(size)) if vocab is None else set(vocab.tolist())
        row = {"vocabulary": name, "size": size if vocab is None else len(vocab),
               "outside": sum(x not in inside for x in response) / max(len(response), 1),
               "rounds_ended_outside_own": t[2] / t[0], "slot1": t[5] / t[6], "chain_tau": t[4] / t[3],
               "tree_tau": t[1] / t[0], "pass_ms": 1000 * (clock["states"] + clock[name]) / max(passes, 1)}
        rows.append(row)
        lines.append(f"| {name} | {row['size']} | {row['outside']:.3f} | {row['rounds_ended_outside_own']:.3f} | "
                     f"{row['slot1']:.3f} | {row['chain_tau']:.3f} | {row['tree_tau']:.3f} | {row['pass_ms']:.2f} |")
    note = (f"\n\n{len(prompts)} held-out pool prompts, {engine.quant} target, greedy, {args.max_new_tokens} new "
            f"tokens; one drafter ({Path(args.drafter).name}), its states scored through each vocabulary's "
            "rows of the target's lm_head; decoding rounds replayed on teacher-forced features. Drafter pass: "
            f"the drafter's block pass plus that vocabulary's head, softmax and top-k, timed side by side "
            f"({torch.get_num_threads()} threads; meaningful only on an otherwise idle CPU).\n")
    print(write_results(args.name, "python benchmarks/draft_vocab.py " + " ".join(sys.argv[1:]),
                        "\n".join(lines) + note, rows))


if __name__ == "__main__":
    main()
