"""``linear-moe``: the command line. Each verb maps to one module; errors are one line and exit 2.

    linear-moe train [--config FILE] [--preset NAME] [--resume [PATH]] [--dry-run] [--section.field VALUE ...]
    linear-moe generate --checkpoint DIR [--prompt TEXT ...] [--prompt-file FILE] [--max-new-tokens N] [--temperature T]
    linear-moe prepare-data --input FILES --tokenizer DIR --output PREFIX [--text-field F] [--workers N]
    linear-moe convert from-hf --input HF_DIR --output DIR [--mixer gdn] [--layer-pattern LLLN...]
    linear-moe convert to-hf --input CHECKPOINT --output DIR
    linear-moe eval --checkpoint DIR --data FILE
    linear-moe lm-eval --model linear_moe --model_args pretrained=DIR --tasks TASKS   (lm-evaluation-harness)
    linear-moe presets | mixers | config [--preset NAME] [--section.field VALUE ...]
"""
from __future__ import annotations

import argparse
import sys
import time

USAGE_OVERRIDES = "overrides: --section.field VALUE, e.g. --model.hidden_size 512 --train.max_steps 100"


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate ``--a.b value`` / ``--a.b=value`` config overrides from ordinary flags."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise SystemExit(_fail(f"config override {arg} needs a value ({USAGE_OVERRIDES})"))
                value = argv[i + 1]
                i += 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _fail(message: str) -> int:
    print(f"linear-moe: error: {message}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linear-moe", description="Model, train and run Linear-MoE language models.",
                                epilog=USAGE_OVERRIDES)
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    t = sub.add_parser("train", help="train a model (no arguments: the tiny preset on the bundled corpus)", epilog=USAGE_OVERRIDES)
    t.add_argument("--config", help="TOML file with [model], [train], [parallel], [data] tables")
    t.add_argument("--preset", help="named model preset (see `linear-moe presets`)")
    t.add_argument("--resume", nargs="?", const="latest", help="resume a run directory or checkpoint (no value: the newest run)")
    t.add_argument("--dry-run", action="store_true", help="print the configuration and model size, then exit")
    t.add_argument("--quiet", action="store_true", help="no progress bar or config print")
    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory")
    g.add_argument("--prompt", action="append", help="text to continue (repeat for several prompts, batched together)")
    g.add_argument("--prompt-file", help="a text file with one prompt per line (blank lines skipped)")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto")
    d = sub.add_parser("prepare-data", help="tokenize text / JSONL / Parquet files into an indexed dataset (.bin + .idx)")
    d.add_argument("--input", nargs="+", required=True, help="files, directories or globs (.txt, .jsonl, .json, .parquet, .gz)")
    d.add_argument("--tokenizer", required=True, help="directory or tokenizer.json of a Hugging Face tokenizer")
    d.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx (and PREFIX_val.*)")
    d.add_argument("--text-field", default="text", help="JSONL / Parquet field holding the document text")
    d.add_argument("--workers", type=int, default=1)
    d.add_argument("--val-fraction", type=float, default=0.0, help="share of documents held out into PREFIX_val")
    conv = sub.add_parser("convert", help="import a Hugging Face checkpoint, or export one").add_subparsers(dest="direction", metavar="DIRECTION")
    fh = conv.add_parser("from-hf", help="build a Linear-MoE checkpoint from a local HF directory (Qwen2-MoE, Mixtral, DeepSeek-V2, Llama3)")
    fh.add_argument("--input", required=True, help="HF checkpoint directory (config.json + safetensors)")
    fh.add_argument("--output", required=True, help="new checkpoint directory (must not exist unless --overwrite)")
    fh.add_argument("--mixer", default="attention", help="token mixer of the L layers (e.g. gated_deltanet, gdn, gla)")
    fh.add_argument("--layer-pattern", default="", help="one letter per layer: L linear mixer, N attention kept from the source")
    fh.add_argument("--upcycle-experts", type=int, default=0, help="turn a dense MLP into N identical experts")
    fh.add_argument("--upcycle-top-k", type=int, default=2)
    fh.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    fh.add_argument("--overwrite", action="store_true")
    th = conv.add_parser("to-hf", help="export a checkpoint (or run directory) as an HF-style directory")
    th.add_argument("--input", "--checkpoint", dest="input", required=True, help="checkpoint or run directory")
    th.add_argument("--output", required=True)
    th.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    th.add_argument("--max-shard-size", default="2GB")
    th.add_argument("--overwrite", action="store_true")
    ev = sub.add_parser("eval", help="perplexity and bits-per-byte of a checkpoint on held-out text")
    ev.add_argument("--checkpoint", required=True, help="checkpoint, run or exported directory")
    ev.add_argument("--data", required=True, help="UTF-8 text file")
    ev.add_argument("--context-len", type=int, default=0, help="0: one stream, state carried through; n: independent n-token windows")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-bytes", type=int, default=0, help="read only the first N bytes (0: all)")
    ev.add_argument("--device", default=None)
    c = sub.add_parser("config", help="print the resolved configuration as TOML", epilog=USAGE_OVERRIDES)
    c.add_argument("--config")
    c.add_argument("--preset")
    sub.add_parser("lm-eval", help="lm-evaluation-harness with the linear_moe model registered (all lm_eval options, e.g. "
                   "--model linear_moe --model_args pretrained=DIR --tasks linear_moe_tiny)", add_help=False)
    sub.add_parser("presets", help="list model presets with their parameter counts")
    sub.add_parser("mixers", help="list the token mixers")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # lm-evaluation-harness's own CLI with our model and tasks registered
        from .interop.lm_eval_cli import main as lm_eval_main

        lm_eval_main(argv[1:])
        return 0
    rest, overrides = split_overrides(argv)
    args = _parser().parse_args(rest)
    verb = args.verb or "train"
    if args.verb is None:
        args = _parser().parse_args(["train", *rest])
    from .config import ConfigError
    from .data import DataError
    from .train.checkpoint import CheckpointError

    try:
        return _VERBS[verb](args, overrides)
    except (ConfigError, CheckpointError, DataError) as e:
        return _fail(str(e))
    except ValueError as e:  # the interop verbs report bad input (paths, shapes, configs) as ValueError
        if verb not in ("convert", "eval"):
            raise
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail("interrupted")


def _train(args, overrides) -> int:
    from .config import build_job_config
    from .train.checkpoint import resolve_checkpoint
    from .train.trainer import latest_run, train

    resume = args.resume
    config_file = args.config
    if resume is not None:
        if resume == "latest":
            job0 = build_job_config(args.preset, config_file, overrides)
            resume = latest_run(job0.train.output_dir)
        ckpt = resolve_checkpoint(resume)
        config_file = config_file or ckpt / "config.toml"
    import os

    job = build_job_config(args.preset, config_file, overrides).validate(world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if args.dry_run:
        return _dry_run(job)
    train(job, resume=resume, quiet=args.quiet)
    return 0


def _dry_run(job) -> int:
    """Print the configuration, model size, memory estimate and parallel layout; build nothing real."""
    import os

    import torch

    from .model.causal_lm import LinearMoEForCausalLM
    from .train.memory import estimate_memory


    world = int(os.environ.get("WORLD_SIZE", "1"))
    job.validate(world_size=world)
    print(job.to_toml())
    with torch.device("meta"):
        model = LinearMoEForCausalLM(job.model)
    total = model.num_parameters()
    print(f"# {total / 1e6:.2f}M parameters, {model.num_active_parameters() / 1e6:.2f}M active per token")
    print(f"# layers: {job.model.resolved_layer_pattern()} (token mixers: L/M = {job.model.mixer}, N/* = attention), "
          f"{job.model.resolved_ffn_pattern()} (E = MoE, D = dense)")
    p = job.parallel
    dp_shard = world // (p.dp_replicate * p.tp * p.pp * p.sp) if p.dp_shard == -1 else p.dp_shard
    print(f"# parallel layout over {world} rank(s): pp={p.pp} dp_replicate={p.dp_replicate} dp_shard={dp_shard} "
          f"sp={p.sp} tp={p.tp} ep={p.ep}")
    for line in estimate_memory(job, total, world).lines():
        print(line)
    return 0


def _generate(args, overrides) -> int:
    import torch

    from .config import build_job_config
    from .data import load_tokenizer
    from .model.causal_lm import LinearMoEForCausalLM
    from .train.checkpoint import load_checkpoint, resolve_checkpoint
    from .train.trainer import pick_device

    texts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                texts += [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            return _fail(f"--prompt-file {args.prompt_file!r} cannot be read: {e.strerror}")
    texts = texts or ["The "]
    if args.num_samples < 1:
        return _fail(f"--num-samples={args.num_samples} must be >= 1")
    ckpt = resolve_checkpoint(args.checkpoint)
    job = build_job_config(config_file=ckpt / "config.toml", overrides=overrides)
    device = pick_device(args.device)
    model = LinearMoEForCausalLM(job.model)
    load_checkpoint(ckpt, model)
    model.to(device).eval()
    tok = load_tokenizer(ckpt / "tokenizer.json")
    prompts = []
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        if not ids:
            return _fail(f"prompt {i + 1} ({text!r}) encodes to no tokens; give non-empty prompts")
        prompts += [ids] * args.num_samples
    gen = torch.Generator(device=device).manual_seed(args.seed)
    t0 = time.perf_counter()
    # prompts of different lengths are batched: each is prefilled alone, then all decode together
    rows = model.generate(prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, eos_id=tok.eos_id, generator=gen)
    dt = time.perf_counter() - t0
    new = sum(len(row) - len(ids) for row, ids in zip(rows, prompts))
    for row in rows:
        print(tok.decode(row.tolist()))
        print("---")
    print(f"# {len(rows)} sequences, {new} new tokens in {dt:.2f}s ({new / max(dt, 1e-9):.1f} tokens/s)",
          file=sys.stderr)
    return 0


def _prepare_data(args, overrides) -> int:
    from .data import prepare_data

    if args.workers < 1:
        return _fail(f"--workers {args.workers} must be >= 1")
    out = prepare_data(args.input, args.tokenizer, args.output, text_field=args.text_field, workers=args.workers,
                       val_fraction=args.val_fraction)
    print(f"wrote {out.prefix}.bin/.idx: {out.documents} documents, {out.tokens} tokens ({out.dtype})"
          + (f"; held out {out.val_prefix}: {out.val_documents} documents, {out.val_tokens} tokens" if out.val_prefix else ""))
    return 0


def _convert(args, overrides) -> int:
    from .layers.registry import canonical_mixer_name

    if args.direction == "from-hf":
        from .interop.hf_import import convert_from_hf

        out = convert_from_hf(args.input, args.output, mixer=canonical_mixer_name(args.mixer), layer_pattern=args.layer_pattern,
                              upcycle_experts=args.upcycle_experts, upcycle_top_k=args.upcycle_top_k, dtype=args.dtype,
                              overwrite=args.overwrite)
        print(f"wrote {out['output_dir']}")
        for note in out.get("notes", []):
            print(f"  note: {note}")
    elif args.direction == "to-hf":
        from .interop.hf import convert_to_hf

        out = convert_to_hf(args.input, args.output, max_shard_size=args.max_shard_size, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote {out['output_dir']} ({out['parameters'] / 1e6:.2f}M parameters): {', '.join(out['files'])}")
    else:
        return _fail("convert needs a direction: from-hf or to-hf")
    return 0


def _eval(args, overrides) -> int:
    from .interop.perplexity import evaluate_perplexity

    r = evaluate_perplexity(args.checkpoint, args.data, context_len=args.context_len, batch_size=args.batch_size,
                            device=args.device, max_bytes=args.max_bytes)
    print(f"loss {r['loss']:.4f} nats/token  perplexity {r['perplexity']:.2f}  bits/byte {r['bits_per_byte']:.4f}  "
          f"({r['tokens']} tokens, {r['bytes']} bytes)")
    return 0


def _config(args, overrides) -> int:
    from .config import build_job_config

    print(build_job_config(args.preset, args.config, overrides).validate().to_toml())
    return 0


def _presets(args, overrides) -> int:
    import torch

    from .model.causal_lm import LinearMoEForCausalLM
    from .model.presets import PRESETS

    for name, make in PRESETS.items():
        with torch.device("meta"):
            model = LinearMoEForCausalLM(make())
        print(f"{name:10s} {model.num_parameters() / 1e6:10.1f}M total {model.num_active_parameters() / 1e6:10.1f}M active")
    return 0


def _mixers(args, overrides) -> int:
    from .layers.registry import available_mixers

    print("\n".join(available_mixers()))
    return 0


_VERBS = {"train": _train, "generate": _generate, "prepare-data": _prepare_data, "convert": _convert, "eval": _eval, "config": _config, "presets": _presets, "mixers": _mixers}

if __name__ == "__main__":
    raise SystemExit(main())
