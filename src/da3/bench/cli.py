"""``da3 bench``: the comparison report from one command."""

from __future__ import annotations

from pathlib import Path

from da3.errors import Da3Error

RUN_SETTINGS = ("frozen_bits",)  # what --set takes besides METHOD.key


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(commands) -> None:
    p = commands.add_parser(
        "bench",
        help="run every method on the benchmark domains and write the report",
        description=(
            "Train every registered method on every benchmark domain under one protocol, "
            "profile a training step (ResNet-50 224 px batch 8 and the benchmark's own "
            "settings), measure DA3's gating curve and the peak memory of whole `da3 train` "
            "processes (CPU), and write benchmarks/results/*.json, "
            "docs/benchmark.md and its plots. Resumable: what is already done under the same "
            "protocol is not redone."
        ),
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        dest="preset",
        action="store_const",
        const="quick",
        help="efficientnet_lite0, 64 px, 3 epochs, 1 seed: under an hour on a 2-core CPU "
        "(the default)",
    )
    size.add_argument(
        "--full",
        dest="preset",
        action="store_const",
        const="full",
        help="128 px, 10 epochs, 3 seeds, more profiles: for a GPU",
    )
    p.set_defaults(preset="quick")
    p.add_argument("--methods", default="", help="comma-separated (default: every method)")
    p.add_argument("--domains", default="", help="comma-separated (default: the five)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--stages",
        default="accuracy,profile,gating,memory,report",
        help="which stages to run (report alone rewrites the report from the results)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.key=value",
        help="method config override, or frozen_bits=32|16|8 (the frozen backbone's weights "
        "for every lean method); changes the protocol: results go under the tag 'custom'",
    )
    p.add_argument(
        "--profiles",
        default="",
        help="comma-separated profile settings to run, as BACKBONE-SIZEpx-bBATCH "
        "(e.g. efficientnet_lite0-128px-b32; default: every one of the preset)",
    )
    p.add_argument(
        "--seeds",
        default="",
        help="seeds to train, as A-B or a comma list (default: the preset's; quick 0, full 0-2)",
    )
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--report", type=Path, default=Path("docs/benchmark.md"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.set_defaults(run=_run)


def _run(args) -> int:
    import torch

    from da3.bench.common import parse_seeds
    from da3.bench.run import PRESETS, STAGES, profile_key, run_bench
    from da3.data import BENCHMARK_DOMAINS
    from da3.methods import get_method, parse_config

    methods, domains, stages = _csv(args.methods), _csv(args.domains), _csv(args.stages)
    for m in methods:
        get_method(m)  # unknown names fail before any work
    for d in domains:
        if d not in BENCHMARK_DOMAINS:
            raise Da3Error(
                f"unknown benchmark domain {d!r}; choose from {', '.join(BENCHMARK_DOMAINS)}"
            )
    for s in stages:
        if s not in STAGES:
            raise Da3Error(f"unknown stage {s!r}; choose from {', '.join(STAGES)}")
    overrides: dict[str, dict] = {}
    run_settings: dict = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if key.strip().replace("-", "_") in RUN_SETTINGS and eq:
            from da3.precision import frozen_bits_value

            run_settings["frozen_bits"] = frozen_bits_value(value)
            continue
        method, dot, name = key.partition(".")
        if not (eq and dot and name):
            raise Da3Error(f"--set {item!r}: expected METHOD.key=value or frozen_bits=N")
        overrides.setdefault(method, {})[name] = value
    for method, values in overrides.items():
        parse_config(method, values)  # bad keys and values fail now, not an hour later
    preset = PRESETS[args.preset]
    if args.profiles:
        names = {profile_key(p): p for p in preset["profiles"]}
        wanted = _csv(args.profiles)
        for name in wanted:
            if name not in names:
                raise Da3Error(
                    f"--profiles: unknown setting {name!r}; the {args.preset} preset has "
                    + ", ".join(names)
                )
        preset = {**preset, "profiles": [names[n] for n in wanted]}
    if args.seeds:
        preset = {**preset, "seeds": parse_seeds(args.seeds)}
    if args.threads:
        torch.set_num_threads(args.threads)
    if run_settings.get("frozen_bits", 32) != 32:  # 32 is the protocol as it was
        preset = {**preset, "accuracy": {**preset["accuracy"], **run_settings}}
    tag = "custom" if (overrides or "frozen_bits" in preset["accuracy"]) else args.preset
    run_bench(
        tag,
        preset,
        methods=methods or None,
        domains=domains or None,
        stages=tuple(stages),
        device=args.device,
        overrides=overrides,
        results=args.results,
        report=args.report,
    )
    return 0
