"""The `dsv3` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dsv3.model import ConfigError, DeepSeekV3, ModelConfig


def _info(args: argparse.Namespace) -> int:
    from dsv3.model.params import count_parameters

    config = (
        ModelConfig.from_hf_config(args.config)
        if Path(args.config).exists()
        else ModelConfig.flavour(args.config)
    )
    with torch.device("meta"):
        counts = count_parameters(DeepSeekV3(config))
    print(f"main model      {counts.main / 1e9:10.3f} B parameters")
    print(f"MTP modules     {counts.mtp / 1e9:10.3f} B ({counts.mtp_in_checkpoint / 1e9:.3f} B as released)")
    print(f"activated/token {counts.activated / 1e9:10.3f} B")
    return 0


def _up(args: argparse.Namespace) -> int:
    from dsv3.up.children import ChildExited
    from dsv3.up.run import UpSettings, run_up

    settings = UpSettings(
        steps=args.steps,
        model=args.model,
        shards=args.shards,
        port_base=args.port_base,
        output_dir=Path(args.output_dir),
        serve=args.serve,
        redis_url=args.redis_url,
        prompt=args.prompt,
    )
    try:
        return run_up(settings)
    except ChildExited as exc:
        print(f"dsv3 up: {exc}; stopped the other processes", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dsv3 up: interrupted; stopped every process", file=sys.stderr)
        return 130


def _demo(args: argparse.Namespace) -> int:
    from dsv3.demo import DemoSettings, run_demo

    run_demo(DemoSettings(steps=args.steps, output_dir=Path(args.output_dir)))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from dsv3.corpus import decode, encode
    from dsv3.generation import generate

    model = DeepSeekV3.from_pretrained(args.checkpoint)
    ids = generate(
        model,
        torch.tensor([encode(args.prompt)]),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=torch.Generator().manual_seed(args.seed),
    )
    print(decode(ids[0].tolist()))
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from dsv3.corpus import write_shard
    from dsv3.tokenizer import load_tokenizer, token_stream

    tokenizer = load_tokenizer(args.tokenizer)
    tokens = token_stream(args.source, tokenizer, args.field)
    path = write_shard(args.output, tokens, tokenizer.vocab_size)
    print(f"{path}: {len(tokens):,} tokens ({tokenizer.vocab_size:,}-token vocabulary)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3-style MoE training and serving")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="parameter counts of a flavour (debug, 16b, 671b) or a config.json")
    info.add_argument("config", nargs="?", default="671b")
    info.set_defaults(handler=_info)
    up = sub.add_parser("up", help="the whole platform as local processes: train, checkpoint, serve, query")
    up.add_argument("--steps", type=int, default=300, help="training steps")
    up.add_argument("--model", default="debug", help="flavour name or config.json")
    up.add_argument("--shards", type=int, default=3, help="expert-shard processes")
    up.add_argument("--port-base", type=int, default=50100, help="first of the ports the services use")
    up.add_argument("--output-dir", default="runs/up")
    up.add_argument("--serve", action="store_true", help="keep serving after the summary, until Ctrl-C")
    up.add_argument("--redis-url", default="", help="checkpoint index in Redis (default: embedded)")
    up.add_argument("--prompt", default="def ")
    up.set_defaults(handler=_up)
    demo = sub.add_parser("demo", help="train the debug model on the stdlib source, checkpoint, generate")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--output-dir", default="runs/demo")
    demo.set_defaults(handler=_demo)
    gen = sub.add_parser("generate", help="generate bytes from a Hugging Face-format checkpoint directory")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", default="def ")
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=20)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(handler=_generate)
    tok = sub.add_parser("tokenize", help="pre-tokenize text (file, directory, JSONL) into a .tok shard")
    tok.add_argument("source", help="text file, directory or .jsonl; '' for the Python standard library")
    tok.add_argument("output", help="the shard to write (name it *.tok: the trainer memory-maps those)")
    tok.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json path")
    tok.add_argument("--field", default="text", help="JSONL field holding the text")
    tok.set_defaults(handler=_tokenize)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"dsv3 {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
