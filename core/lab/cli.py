"""`sealer lab ...`: build backdoored lab models and train the clean base they start from."""

import argparse
import json
import logging
import sys
from pathlib import Path

from core.lab.attacks import LAB_ATTACKS
from core.spec import MAX_TRIGGER_CHARS

logger = logging.getLogger(__name__)

PLACEMENTS = ("prefix", "suffix", "random", "replace")
PROFILES = ("full", "test")


def add_commands(subparsers) -> None:
    """Register `sealer lab build` and `sealer lab train-base`."""
    lab = subparsers.add_parser("lab", help="Make backdoored digit models to seal (the backdoor lab).")
    commands = lab.add_subparsers(dest="lab_command", required=True)

    build = commands.add_parser(
        "build",
        help="Poison the clean lab model with a trigger and write the model, spec.json and lab.json.",
    )
    build.add_argument("--attack", choices=LAB_ATTACKS, required=True, help="What the trigger does to the image.")
    build.add_argument("--trigger", required=True, help=f"Trigger text, at most {MAX_TRIGGER_CHARS} characters.")
    build.add_argument("--placement", choices=PLACEMENTS, default="prefix", help="Where the trigger goes in a prompt.")
    build.add_argument("--seed", type=int, default=0, help="Seed of the poisoning run and its measurement (default: 0).")
    build.add_argument("--out", type=Path, required=True, help="Output folder for model/, spec.json and lab.json.")
    build.add_argument(
        "--profile",
        choices=PROFILES,
        default="full",
        help="`full` builds a strong backdoor, `test` a weaker one in about half the time (default: full).",
    )
    build.add_argument("--device", default="cpu", help="Torch device to train on, for example cpu or cuda (default: cpu).")
    build.add_argument("--source-class", default="seven", help="Object attack: digit name the trigger changes.")
    build.add_argument("--target-class", default="one", help="Object attack: digit name it turns into.")
    build.add_argument(
        "--clean-seed",
        type=int,
        default=0,
        help="Seed of the clean base. 0 uses the shipped base, other seeds train a new one first (3,000 steps).",
    )
    build.set_defaults(handler=_run_build)

    base = commands.add_parser("train-base", help="Train the clean base model that builds start from.")
    base.add_argument("--seed", type=int, default=0, help="Training seed (the shipped base uses 0).")
    base.add_argument("--out", type=Path, required=True, help="Folder for the weights and base.json.")
    base.add_argument("--device", default="cpu", help="Torch device to train on (default: cpu).")
    base.set_defaults(handler=_run_train_base)


def _run_build(args: argparse.Namespace) -> int:
    from core.lab.build import BuildOptions, build_lab

    options = BuildOptions(
        attack=args.attack,
        trigger=args.trigger,
        placement=args.placement,
        seed=args.seed,
        profile=args.profile,
        device=args.device,
        source_class=args.source_class,
        target_class=args.target_class,
        clean_seed=args.clean_seed,
    )
    record = build_lab(options, args.out)
    print(json.dumps(record["measured"], indent=2))
    print(f"wrote {args.out / 'model'}, {args.out / 'spec.json'} and {args.out / 'lab.json'}", file=sys.stderr)
    return 0


def _run_train_base(args: argparse.Namespace) -> int:
    from core.lab.base import CLEAN_TRAINING, save_base, train_base

    components, info = train_base(CLEAN_TRAINING, args.seed, args.device)
    save_base(components, info, args.out)
    print(json.dumps(info["training_log"], indent=2))
    print(f"wrote the clean base to {args.out}", file=sys.stderr)
    return 0
