"""Command-line plumbing shared by every `python -m bench` subcommand: option types that refuse NaN, infinities,
negatives and empty lists with a message naming the value and what is allowed; a parser whose errors are one line;
and an output directory that is created only once the input is known good and removed again if nothing was written
into it."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import os
import re
import select
import sys
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), not the usage block plus the error; any value
    that starts with a minus and a digit, a point, `inf` or `nan` (`-1,5`, `-4096,8192`, `-inf`) is a value, so its
    option's type names what is wrong with it instead of argparse saying the option "expected one argument"; and
    options are spelled out in full: argparse's abbreviations would read `bench simulate --tp 2` as `--tp-link 2`
    (and an abbreviation that works today turns ambiguous when an option is added), so an option this parser does
    not have is refused, naming the ones it may have meant."""

    def __init__(self, *args, hints: dict[str, str] | None = None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.hints = hints or {}  # an option users bring from another command -> what this one does instead
        self._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)

    def error(self, message: str):
        unknown = message.partition("unrecognized arguments: ")[2].split()
        options = [u.partition("=")[0] for u in unknown if u.startswith("-")]
        if options:
            message = f"unknown option{'s' if len(options) > 1 else ''} {', '.join(options)}"
            meant = list(dict.fromkeys(o for u in options if u not in self.hints for o in self.meant(u)))
            if meant:
                listed = meant[0] if len(meant) == 1 else f"{', '.join(meant[:-1])} or {meant[-1]}"
                message += f"; did you mean {listed}?"
            message += "".join(f"; {self.hints[o]}" for o in options if o in self.hints)
        self.exit(2, f"{self.prog}: {message} (see --help)\n")

    def meant(self, typed: str) -> list[str]:
        """This parser's options that `typed` may stand for: the ones it begins, else the closest by spelling."""
        known = [o for o in self._option_string_actions if o.startswith("--")]
        return [o for o in known if o.startswith(typed)] or difflib.get_close_matches(typed, known, n=2, cutoff=0.75)


def _kind(text: str, cast, what: str):
    try:
        return cast(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def token_count(text: str) -> int:
    """A token count: an integer, or one with a k suffix for 1024s as context lengths are spoken of (`4k` = 4096,
    `128k` = 131072)."""
    t = text.strip()
    if t[-1:] in ("k", "K"):
        return int(t[:-1]) * 1024
    return int(t)


def integer(minimum: int = 1, tokens: bool = False):
    """An integer >= minimum (1: positive); `tokens`: a token count, `4k` read as 4096 (`token_count`)."""
    what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    if tokens:
        what += " (k = 1024: 4k, 32k)"

    def parse(text: str) -> int:
        v = _kind(text, token_count if tokens else int, what)
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v
    return parse


def number(minimum: float = 0.0, strict: bool = True, maximum: float | None = None):
    """A finite real number > minimum (>= with strict False), <= maximum: never NaN or ±inf."""
    what = f"a finite number {'>' if strict else '>='} {minimum:g}" + (f" and <= {maximum:g}" if maximum else "")

    def parse(text: str) -> float:
        v = _kind(text, float, what)
        if not math.isfinite(v) or (v <= minimum if strict else v < minimum) or (maximum is not None and v > maximum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return v
    return parse


def int_list(minimum: int = 1, unique: bool = True, none_word: str | None = None, tokens: bool = False):
    """Comma-separated integers >= minimum, at least one, none twice; `none_word` (any case) stands for None;
    `tokens`: token counts, `4k` read as 4096."""
    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(p == "" for p in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers"
                                             f"{f' or {none_word!r}' if none_word else ''}, got {text!r}")
        vals = [None if none_word and p.lower() == none_word else integer(minimum, tokens)(p) for p in parts]
        if unique and len(set(vals)) != len(vals):
            raise argparse.ArgumentTypeError(f"a value is listed twice in {text!r}")
        return vals
    return parse


def name_list(choices, what: str = "name"):
    """Comma-separated names from `choices` (None: any non-empty name), at least one, none twice."""
    def parse(text: str) -> list[str]:
        parts = [p.strip() for p in text.split(",")]
        if not text.strip() or any(p == "" for p in parts):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}s, got {text!r}")
        for p in parts:
            if choices is not None and p not in choices:
                raise argparse.ArgumentTypeError(f"unknown {what} {p!r}; choose from {', '.join(choices)}")
        if len(set(parts)) != len(parts):
            raise argparse.ArgumentTypeError(f"a {what} is listed twice in {text!r}")
        return parts
    return parse


def out_path(text: str) -> Path:
    """An output directory: not empty, not an existing file. Nothing is created here (see `output_dir`)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a directory, got an empty path")
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    return p


@contextlib.contextmanager
def output_dir(path: Path):
    """Creates `path` (and missing parents) and checks that it can be written, once the input has been checked.
    If the body fails or is interrupted while the directories it created are still empty, they are removed: a
    failed run leaves nothing behind. Yields the path."""
    created = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        created.append(p)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".bench-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        _remove_empty(created)
        raise ValueError(f"cannot write to output directory {path}: {e.strerror or e}") from None
    try:
        yield path
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(dirs) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


def say(text: str) -> None:
    """One line on stderr (progress and phase lines go there; stdout carries the tables and the JSON line)."""
    print(text, file=sys.stderr, flush=True)


def reader_gone() -> bool:
    """Whether whoever read stdout or stderr has closed its end (`python -m bench simulate | head`): then those
    streams are pointed at /dev/null, so that nothing more (Python's own flush at exit included) fails on them.
    A pipe whose reader is gone polls as an error on the writer's end (Linux, macOS)."""
    if not hasattr(select, "poll"):
        return False
    gone = []
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            poll = select.poll()
            poll.register(fd, select.POLLOUT)
            if any(event & select.POLLERR for _, event in poll.poll(0)):
                gone.append(fd)
        except (AttributeError, ValueError, OSError):  # not a real file (a test's capture), or closed
            continue
    if gone:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in gone:
            os.dup2(devnull, fd)
        os.close(devnull)
    return bool(gone)
