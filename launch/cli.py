"""``shardsoftmax`` console command. Heavy imports (torch, ray, pyarrow) happen only inside the
subcommand, so ``shardsoftmax --help`` is instant.

    shardsoftmax score --head HEAD --input IN --output OUT [--tp G] [--replicas R] [--k 20]
    shardsoftmax score --demo            # small deterministic job on a local Ray instance

See ``shardsoftmax.launch.job`` for the formats and the exactly-once guarantee, and
``shardsoftmax.launch.ray_scorer`` for running on a multi-node Ray cluster (``RAY_ADDRESS``).
"""

from __future__ import annotations

import argparse
import sys

DEMO_OUTPUT = "shardsoftmax_demo_out"


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardsoftmax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "score",
        help="score hidden states against a vocabulary-sharded head on Ray",
        description=(
            "Per token: log-sum-exp, log p(target), entropy and the top-k over the whole vocabulary, "
            "computed by tensor-parallel groups of Ray workers that each hold one vocabulary shard of "
            "the head. Inputs: safetensors files with 'hidden' [T, H] and optional 'targets' [T]. "
            "Outputs: OUT/<shard>.parquet, one row per token, plus OUT/_manifest.json; a rerun "
            "skips finished shards."
        ),
    )
    p.add_argument("--demo", action="store_true", help="make a small head and dataset and score them locally")
    p.add_argument(
        "--head", help="safetensors (or torch .pt) file with 'weight' [V, H] and optional 'bias' [V]"
    )
    p.add_argument("--input", help="directory of *.safetensors shards, a glob pattern, or one file")
    p.add_argument("--output", help=f"output directory (demo default: ./{DEMO_OUTPUT})")
    p.add_argument("--tp", type=_positive, default=2, help="workers per tensor-parallel group (default 2)")
    p.add_argument("--replicas", type=_positive, default=1, help="data-parallel groups (default 1)")
    p.add_argument("--k", type=int, default=20, help="top-k size (default 20)")
    p.add_argument("--batch-tokens", type=_positive, default=8192, help="tokens per batch (default 8192)")
    p.add_argument(
        "--vocab-size", type=_positive, help="true vocab size (default: from the head file, else V)"
    )
    p.add_argument("--max-retries", type=int, default=3, help="retries per batch after a worker failure")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default: GPUs if any")
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16", "float64", "auto"), default="float32",
        help="dtype of the logits matmul (auto: the head's dtype; default float32)",
    )  # fmt: skip
    p.add_argument(
        "--head-impl", choices=("unfused", "chunked", "fused"), default="unfused",  # data.HEAD_IMPLS
        help="unfused (default, the fastest): each worker stores its [batch, V_shard] logits; chunked or "
        "fused: never all of them (bounded memory, see ShardedScorer)",
    )  # fmt: skip
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--softcap", type=float, default=None)
    p.add_argument("--ignore-index", type=int, default=-100, help="target id without a target (default -100)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, else a local instance)")
    p.add_argument("--num-cpus", type=_positive, help="logical CPUs of a local Ray instance")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--read-in-driver", action="store_true",
        help="the driver reads each batch and ships it through Ray's object store (for a cluster "
        "without a shared file system; by default the workers read their batches from the input files, "
        "which must then be readable at the same path on every node)",
    )  # fmt: skip
    return parser


def _score(args, parser) -> int:
    if not args.demo and not (args.head and args.input and args.output):
        parser.error("score needs --head, --input and --output (or --demo)")
    from .data import InputError
    from .job import JobConfig, run_demo, run_job

    cfg = JobConfig(
        head=args.head or "", input=args.input or "", output=args.output or DEMO_OUTPUT, tp=args.tp,
        replicas=args.replicas, k=args.k, batch_tokens=args.batch_tokens, vocab_size=args.vocab_size,
        max_retries=args.max_retries, device=args.device, dtype=args.dtype, temperature=args.temperature,
        softcap=args.softcap, ignore_index=args.ignore_index, ray_address=args.ray_address,
        num_cpus=args.num_cpus, progress=not args.no_progress, read_in_driver=args.read_in_driver,
        head_impl=args.head_impl,
    )  # fmt: skip
    try:
        if args.demo:
            run_demo(cfg)
        else:
            run_job(cfg)
    except InputError as err:
        print(f"shardsoftmax score: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "score":
        return _score(args, parser)
    parser.error(f"unknown command {args.command}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
