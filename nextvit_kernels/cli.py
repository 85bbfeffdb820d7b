"""What every command-line tool of the project shares: variant names, comma-list
arguments with one-line errors, and help that shows defaults.

Variants are named ``s``, ``b``, ``l`` everywhere; ``small``/``base``/``large`` and the
model function names (``nextvit_small`` ...) are accepted too, so that a name copied
from one tool works in every other.
"""
import argparse

from .config import SHORT_NAMES as VARIANTS

_ALIASES = {**{k: k for k in VARIANTS},
            **{v: k for k, v in VARIANTS.items()},
            **{v.split("_", 1)[1]: k for k, v in VARIANTS.items()}}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (none for unset options and flags); keeps the description's
    line breaks."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser(prog_doc: str, **kwargs) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=prog_doc, formatter_class=HelpFormatter, **kwargs)


def variant(name: str) -> str:
    """``s``/``small``/``nextvit_small`` -> ``s``; a one-line error for anything else."""
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}; choose from s, b, l")
    return key


def csv(kind: str, choices=None, conv=str):
    """argparse ``type=`` for a comma list: each item converted by ``conv`` and, with
    ``choices``, checked against them."""
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        out = []
        for t in items:
            try:
                v = conv(t)
            except ValueError as err:
                raise argparse.ArgumentTypeError(f"bad {kind} {t!r}: {err}")
            if choices is not None and v not in choices:
                raise argparse.ArgumentTypeError(f"unknown {kind} {t!r}; choose from {','.join(map(str, choices))}")
            out.append(v)
        return out
    return parse


def positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise ValueError("must be >= 1")
    return v


variants = csv("variant", conv=variant)
DTYPES = ("fp16", "bf16", "fp32")
dtypes = csv("dtype", choices=DTYPES)
batches = csv("batch size", conv=positive_int)


def given(p: argparse.ArgumentParser, argv=None) -> set:
    """The ``dest`` names of the options actually on the command line (not defaulted), so that
    a tool can say which of them it will not use on this machine instead of ignoring them."""
    saved = [(a, a.default) for a in p._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        return set(vars(p.parse_known_args(argv)[0]))
    finally:
        for a, d in saved:
            a.default = d


def not_used(p: argparse.ArgumentParser, argv, dests, why: str) -> None:
    """Prints one line naming the options among ``dests`` given on the command line that this
    run will not use, and why."""
    unused = [d for d in dests if d in given(p, argv)]
    if unused:
        print(f"note: not used {why}: " + ", ".join("--" + d.replace("_", "-") for d in unused), flush=True)
