"""Command line: `quanttree generate`, `quanttree info`. Only this module knows argparse."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import QuanttreeError
from .models import DEFAULT_TARGET, QUANT_MODES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_TARGET, help="model name, local dir, .gguf file or hub id")
    p.add_argument("--quant", default="auto", choices=QUANT_MODES, help="target weights (default: auto)")
    p.add_argument("--drafter", default="auto", help="DFlash drafter dir or hub id; 'auto' = the one shipped for "
                   "the embedded target; 'none' = no drafter")
    p.add_argument("--drafter-quant", default=None, choices=QUANT_MODES, help="drafter weights (default: follow target)")
    p.add_argument("--vp-drafter", default="auto", help="D2SD variable-prefix drafter dir ('auto' = shipped, 'none')")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present)")
    _add_exact_arg(p)


def _add_exact_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-exact", dest="exact", action="store_const", const=False, default=None,
                   help="turn exact mode off (on by default wherever it can run: greedy speculation then "
                        "returns plain decoding's tokens bit for bit)")


def build_parser() -> argparse.ArgumentParser:
    from .decode import METHODS

    parser = argparse.ArgumentParser(prog="quanttree", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a generation and print its stats")
    gen.add_argument("prompt", help="the user message (chat template applied when the model has one)")
    _add_model_args(gen)
    gen.add_argument("--method", default=None, choices=METHODS, help="decoding method (default: auto with a "
                     "drafter, else ar)")
    gen.add_argument("--budget", type=int, default=None,
                     help="tree nodes: ddtree's budget (default 8), the cap of adaptive methods (default 64), "
                          "d2sd's trim (default: the whole merged tree)")
    gen.add_argument("--branches", type=int, default=4, help="d2sd: rejection points re-drafted per round")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    gen.add_argument("--compare", action="store_true", help="also run plain autoregressive decoding, print speedup")
    sub.add_parser("info", help="device, library versions, quant modes and bitsandbytes kernel paths")
    cal = sub.add_parser("calibrate", help="measure verify/draft cost per quant mode, fit it, plot it")
    cal.add_argument("--target", default=DEFAULT_TARGET)
    cal.add_argument("--quant", default="auto", help="comma list of quant modes, e.g. fp32,bf16,int8,nf4")
    cal.add_argument("--drafter", default="auto")
    cal.add_argument("--drafter-quant", default=None, choices=QUANT_MODES)
    cal.add_argument("--device", default=None)
    cal.add_argument("--plot", default="verify_cost.png", help="PNG of C_v(n) per quant mode ('' = none)")
    _add_exact_arg(cal)
    bench = sub.add_parser("bench", help="every method x quant mode side by side, with peers; table + plots")
    bench.add_argument("--suite", default="humaneval", choices=("humaneval", "chat", "all"))
    bench.add_argument("--quant", default="fp32,bf16,int8,nf4")
    bench.add_argument("--methods", default=None, help="comma list (default: all ours and all peers)")
    bench.add_argument("--budgets", default="4,8,16,32,64", help="ddtree budgets swept")
    bench.add_argument("--prompts", type=int, default=10)
    bench.add_argument("--max-new-tokens", type=int, default=128)
    bench.add_argument("--repeats", type=int, default=1,
                       help="run each prompt's rows this many times back to back (ratios get a 95%% interval)")
    bench.add_argument("--target", default=DEFAULT_TARGET)
    bench.add_argument("--out", default="bench-results")
    bench.add_argument("--quick", action="store_true", help="2 prompts, 2 modes, 48 tokens: a few minutes")
    _add_exact_arg(bench)
    app = sub.add_parser("app", help="web app: plain decoding vs tree speculation side by side")
    app.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--target", default=DEFAULT_TARGET)
    app.add_argument("--drafter", default="auto")
    app.add_argument("--device", default=None)
    train = sub.add_parser("train-drafter", help="train a DFlash drafter for a target (resumable)")
    train.add_argument("--target", default=DEFAULT_TARGET)
    train.add_argument("--quant", default="auto", choices=QUANT_MODES, help="target mode for data and features")
    train.add_argument("--out", required=True, help="directory for the exported drafter")
    train.add_argument("--work", default=None, help="data, checkpoints and logs (default: under the cache dir)")
    train.add_argument("--stage", default="all", choices=("prompts", "data", "text", "features", "train", "all"),
                       help="prompts: the target writes user requests itself (added to the data stage's pool); "
                            "data: target responses; text: scored Python source (documented standard-library "
                            "functions; train it with --distill 1.0); features: cache target features + soft "
                            "labels; train")
    train.add_argument("--prompt-goal", type=int, default=3000, help="prompts: self-written prompts to keep")
    train.add_argument("--tokens", type=int, default=2_000_000,
                       help="data: response tokens to generate; text: answer tokens of scored text")
    train.add_argument("--batch-size", type=int, default=64, help="generation batch size")
    train.add_argument("--max-new-tokens", type=int, default=256, help="response length cap for data")
    train.add_argument("--round", type=int, default=0,
                       help="data: 0 = the target's greedy responses; R >= 1 = one more sampled response per "
                            "training prompt (round R, its own shards)")
    train.add_argument("--temperature", type=float, default=0.8, help="data, sampled rounds: temperature")
    train.add_argument("--top-p", type=float, default=0.95, help="data, sampled rounds: nucleus")
    train.add_argument("--prompt-range", type=prompt_range, default=None,
                       help="data: only pool prompts START:END (e.g. 3968:6982, the chat-style section)")
    train.add_argument("--shards", default=None,
                       help="features/train: the data shards the feature cache is built from, comma-separated "
                            "NAME or NAME[START:STOP:STEP]; NAME = answers (the target's responses), text (scored "
                            "text) or a file-name glob; the slice counts in name order, e.g. "
                            "'answers[1::3],text[154:176]' (default: every shard; a cache remembers its selection)")
    train.add_argument("--steps", type=int, default=2000, help="optimizer steps in total")
    train.add_argument("--minutes", type=float, default=None, help="stop (resumably) after this long")
    train.add_argument("--layers", type=int, default=2, help="drafter layers")
    train.add_argument("--grow-layers", type=int, default=0,
                       help="with --init-from: append this many layers (they start as the identity)")
    train.add_argument("--block-size", type=int, default=16)
    train.add_argument("--draft-vocab", type=int, default=8192, help="frequency-ranked draft vocabulary (0 = full)")
    train.add_argument("--anchors", type=int, default=64, help="blocks per sequence")
    train.add_argument("--round-start-share", type=float, default=0.0,
                       help="share of each sequence's anchors drawn where greedy decoding's rounds start "
                            "(replayed with the drafter, DDTree of --round-start-budget nodes), the rest uniform; "
                            "decoding anchors every round right after a rejection")
    train.add_argument("--round-start-budget", type=int, default=16, help="tree nodes of that replay (1: the chain)")
    train.add_argument("--seqs-per-step", type=int, default=4)
    train.add_argument("--lr", type=float, default=6e-4)
    train.add_argument("--gamma", type=float, default=7.0, help="slot weight decay exp(-(k-1)/gamma)")
    train.add_argument("--feature-layers", default=None, type=layer_ids,
                       help="comma-separated target layer ids feeding the drafter (default: DFlash's spread rule)")
    train.add_argument("--no-scored-text", dest="scored_text", action="store_false",
                       help="train on the target's own answers only, even where the cache holds scored text")
    train.add_argument("--distill", type=float, default=0.0,
                       help="weight of the distillation loss to the target's top-k distribution (0 = hard labels)")
    train.add_argument("--mask-token-id", type=int, default=None,
                       help="a target vocabulary token as the mask (default: a learned mask embedding, which "
                            "other engines cannot load)")
    train.add_argument("--for-engines", action="store_true",
                       help="export a drafter vLLM / SGLang / llama.cpp load (needs --mask-token-id)")
    train.add_argument("--fc-init", default="normal", choices=("normal", "scaled"),
                       help="scaled: fc columns divided by each feature dim's spread (tames massive activations)")
    train.add_argument("--eval-every", type=int, default=200, help="held-out evaluation every N steps")
    train.add_argument("--seed", type=int, default=0,
                       help="train: data order (and a random init); give a new one when continuing a drafter "
                            "with --init-from, or it redraws the sequences it was trained on")
    train.add_argument("--init", default="target", choices=("target", "random"),
                       help="drafter layers start as copies of the target's last layers, or random")
    train.add_argument("--variable-prefix", action="store_true", help="train D2SD's variable-prefix drafter")
    train.add_argument("--init-from", default=None,
                       help="start from this drafter dir (e.g. the DFlash drafter when training a VP one); "
                            "its layers and draft vocabulary replace --layers and --draft-vocab")
    train.add_argument("--checkpoints", default=None,
                       help="checkpoint folder name inside --work, one per training run (default: checkpoints, "
                            "or checkpoints-vp with --variable-prefix)")
    train.add_argument("--refresh-vocab", action="store_true",
                       help="with --init-from: choose the draft vocabulary (--draft-vocab tokens) from this data "
                            "instead of keeping the drafter's (its weights do not depend on it)")
    train.add_argument("--device", default=None)
    return parser


def check_model_args(args) -> None:
    """Names and paths checked before anything loads or converts (a bad one is one line, fast)."""
    from .models import check_target

    check_target(args.target)
    for flag, value in (("--drafter", args.drafter), ("--vp-drafter", getattr(args, "vp_drafter", "auto"))):
        if value in ("auto", "none") or value is None:
            continue
        if not Path(value).expanduser().exists() and ("/" not in value or value.startswith((".", "/", "~"))):
            raise QuanttreeError(f"{flag} {value}: no such directory (pass a drafter directory, a hub id "
                                 "'org/name', 'auto' or 'none')")


def cmd_generate(args) -> int:
    from .engine import check_prompt, load, request_config

    check_prompt(args.prompt)
    request_config(args.method, args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed,
                   args.budget, args.branches, has_drafter=False if args.drafter == "none" else None)
    check_model_args(args)
    drafter = None if args.drafter == "none" else args.drafter
    engine = load(target=args.target, drafter=drafter, quant=args.quant, drafter_quant=args.drafter_quant,
                  device=args.device, vp_drafter=None if args.vp_drafter == "none" else args.vp_drafter,
                  exact=args.exact, log=lambda msg: print(msg, file=sys.stderr))
    method = args.method or engine.default_method
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop=args.stop, budget=args.budget,
                   chat=False if args.raw else None, branches=args.branches)
    event = None
    for event in engine.stream(args.prompt, method=method, **options):
        print(event.delta, end="", flush=True)
    print()
    result = event
    print(f"[{engine.quant}] {result.stats.summary()}", file=sys.stderr)
    if args.compare:
        base = engine.generate(args.prompt, method="ar", **options)
        print(f"[{engine.quant}] {base.stats.summary()}", file=sys.stderr)
        speedup = result.stats.decode_tokens_per_s / max(base.stats.decode_tokens_per_s, 1e-9)
        same = "identical" if base.token_ids == result.token_ids else "different"
        note = ""
        if args.temperature > 0:
            note = " (sampling: outputs differ by design)"
        elif same == "different":
            where = engine.divergence(args.prompt, base.token_ids, result.token_ids, chat=False if args.raw else None)
            if engine.exact:
                note = " in exact mode: a bug, please report the prompt"
            elif where is not None:
                note = (f" from token {where[0]}, where plain decoding's top-2 logits differ by only {where[1]:.3f}: "
                        f"a {engine.quant} rounding near-tie (exact mode is off: a many-token forward rounds "
                        f"differently from a one-token one)")
        print(f"speedup {method} vs ar: {speedup:.2f}x, outputs {same}{note}", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    import torch

    from .models import BNB_MODES, bnb_kernel_paths, library_versions, pick_device

    device = pick_device(None)
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                 f" ({torch.get_num_threads()} threads)"))
    for name, version in library_versions().items():
        print(f"{name}: {version}")
    bnb = library_versions().get("bitsandbytes")
    modes = [m for m in QUANT_MODES if m not in BNB_MODES or bnb]
    print(f"quant modes: {', '.join(modes)}")
    for name, path in bnb_kernel_paths().items():
        print(f"bitsandbytes {name}: {path}")
    return 0


def prompt_range(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END pool indices like 3968:6982, got {text!r}") from None
    return start, end


def cmd_train_drafter(args) -> int:
    from .engine import load
    from .train.datagen import GenConfig
    from .train.pipeline import TrainPaths, default_work_dir, run_data_stage, run_prompts_stage
    from .train.self_prompts import SelfPromptConfig

    # values checked before the model loads
    prompts_cfg = SelfPromptConfig(goal=args.prompt_goal, batch_size=args.batch_size)
    gen = GenConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, round=args.round,
                    temperature=args.temperature, top_p=args.top_p, prompts=args.prompt_range)
    engine = load(target=args.target, drafter=None, quant=args.quant, device=args.device,
                  log=lambda msg: print(msg, file=sys.stderr))
    paths = TrainPaths(Path(args.work) if args.work else default_work_dir(args.target, engine.quant))
    if args.stage == "prompts":
        prompts = run_prompts_stage(engine, paths, prompts_cfg)
        print(f"{len(prompts)} self-written prompts in {paths.self_prompts}; the data stage adds them to its pool "
              "and prints their indices (for --prompt-range)", file=sys.stderr)
        return 0
    if args.stage in ("data", "all"):
        run_data_stage(engine, paths, args.tokens, gen)
    if args.stage == "text":
        from .train.pipeline import run_text_stage

        run_text_stage(engine, paths, args.tokens)
        return 0
    if args.stage in ("features", "train", "all"):
        from .drafter import resolve_drafter_dir
        from .train.pipeline import run_features_stage, run_train_stage, training_layers
        from .train.trainer import TrainConfig

        cfg = TrainConfig(num_layers=args.layers, block_size=args.block_size, draft_vocab=args.draft_vocab,
                          anchors=args.anchors, seqs_per_step=args.seqs_per_step, steps=args.steps, lr=args.lr,
                          gamma=args.gamma, variable_prefix=args.variable_prefix, distill=args.distill,
                          init=args.init, feature_layers=args.feature_layers, mask_token_id=args.mask_token_id,
                          fc_init=args.fc_init, eval_every=args.eval_every, refresh_vocab=args.refresh_vocab,
                          grow_layers=args.grow_layers, scored_text=args.scored_text, seed=args.seed,
                          round_start_share=args.round_start_share, round_start_budget=args.round_start_budget,
                          init_from=str(resolve_drafter_dir(args.init_from)) if args.init_from else None)
        if args.stage == "features":
            run_features_stage(engine, paths, training_layers(engine.target, cfg), shards=args.shards)
        else:
            name = args.checkpoints or ("checkpoints-vp" if args.variable_prefix else "checkpoints")
            run_train_stage(engine, paths, cfg, Path(args.out), args.minutes, name, for_engines=args.for_engines,
                            shards=args.shards)
    return 0


def cmd_calibrate(args) -> int:
    from .costmodel import violations
    from .engine import load

    measured = {}
    bad = [q for q in args.quant.split(",") if q not in QUANT_MODES]
    if bad:
        raise QuanttreeError(f"unknown quant modes {bad}: choose from {', '.join(QUANT_MODES)}")
    check_model_args(args)
    for quant in args.quant.split(","):
        drafter = None if args.drafter == "none" else args.drafter
        engine = load(target=args.target, drafter=drafter, quant=quant, drafter_quant=args.drafter_quant,
                      device=args.device, exact=args.exact, log=lambda msg: print(msg, file=sys.stderr))
        profile = engine.cost_model(progress=True, remeasure=True).profile
        measured[engine.quant] = profile
        print(f"\n[{engine.quant}] verify ms by tokens (context {profile.contexts[0]}), draft "
              f"{profile.draft_ms[0]:.1f} ms")
        print("  tokens: " + " ".join(f"{n:>6}" for n in profile.sizes))
        print("  raw:    " + " ".join(f"{v:6.1f}" for v in profile.verify_ms[0]))
        print("  fit:    " + " ".join(f"{v:6.1f}" for v in profile.fitted_ms[0]))
        for v in violations(profile.sizes, profile.verify_ms[0]):
            print(f"  not convex/monotone: {v}")
    if args.plot:
        from .plots import plot_verify_costs

        print(f"plot: {plot_verify_costs(measured, args.plot)}")
    return 0


def cmd_bench(args) -> int:

    from .bench import OUR_METHODS, PEERS, VARIANTS, BenchConfig, bench, quick

    methods = tuple(args.methods.split(",")) if args.methods else OUR_METHODS + tuple(VARIANTS) + PEERS
    unknown = [m for m in methods if m not in OUR_METHODS + tuple(VARIANTS) + PEERS]
    if unknown:
        raise QuanttreeError(f"unknown methods {unknown}: choose from {', '.join(OUR_METHODS + tuple(VARIANTS) + PEERS)}")
    if args.repeats < 1:
        raise QuanttreeError(f"--repeats must be at least 1, got {args.repeats}")
    quants = tuple(args.quant.split(","))
    bad = [q for q in quants if q not in QUANT_MODES]
    if bad:
        raise QuanttreeError(f"unknown quant modes {bad}: choose from {', '.join(QUANT_MODES)}")
    cfg = BenchConfig(suite=args.suite, quants=quants, methods=methods,
                      budgets=tuple(int(b) for b in args.budgets.split(",")), prompts=args.prompts,
                      max_new_tokens=args.max_new_tokens, repeats=args.repeats, target=args.target,
                      out=Path(args.out), exact=args.exact)
    bench(quick(cfg) if args.quick else cfg, log=lambda msg: print(msg, file=sys.stderr))
    print((cfg.out / "summary.md").read_text())
    return 0


def cmd_app(args) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise QuanttreeError("the app needs gradio: pip install 'quanttree[app]' (or bash scripts/install.sh)")
    from .app import main as app_main

    app_main(host=args.host, port=args.port, target=args.target,
             drafter=None if args.drafter == "none" else args.drafter, device=args.device)
    return 0


COMMANDS = {"app": cmd_app, "bench": cmd_bench, "generate": cmd_generate, "info": cmd_info, "train-drafter": cmd_train_drafter,
            "calibrate": cmd_calibrate}


def layer_ids(text: str) -> tuple[int, ...]:
    """argparse type for --feature-layers: "1,10,18,29" -> (1, 10, 18, 29)."""
    import argparse

    try:
        ids = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer ids like 1,10,18,29, got {text!r}")
    if not ids or min(ids) < 0:
        raise argparse.ArgumentTypeError(f"layer ids must be >= 0, got {text!r}")
    return ids


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except QuanttreeError as exc:
        print(f"quanttree: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nquanttree: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
