"""Where nlbfab keeps its files, read from ``.env`` when a command asks (never at import).

Real environment variables override ``.env``. Relative paths in ``.env`` (and the defaults) are
taken from the directory that holds ``.env``, so they work from any working directory; relative
paths in the environment are taken from the working directory, as a shell user expects.
"""
from __future__ import annotations

import os
from pathlib import Path

from dotenv import dotenv_values, find_dotenv

from nlbfab.errors import UserError
from nlbfab.layout import PREP_MARKER, TRAIN_WINDOW_TARGET, Homes

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = {
    "DATA_HOME": "./data/dandi",
    "PREP_HOME": "./data/prep",
    "RUNS_HOME": "./runs",
    "TRAIN_INPUT_FILE": "train_input.h5",
    "EVAL_INPUT_FILE": "eval_input.h5",
    "EVAL_TARGET_FILE": "eval_target.h5",
}
PATH_VARIABLES = ("DATA_HOME", "PREP_HOME", "RUNS_HOME")


def _env_file() -> Path | None:
    """The ``.env`` in use: ``$NLBFAB_ENV_FILE``, else the repository's, else one found upward."""
    if "NLBFAB_ENV_FILE" in os.environ:  # a file that does not exist: no .env at all
        path = Path(os.environ["NLBFAB_ENV_FILE"])
        # a folder: its settings would be ignored, and the default homes put beside it; empty (Path("")
        # is "."): no .env, as before
        if os.environ["NLBFAB_ENV_FILE"] and path.is_dir():
            raise UserError(f"NLBFAB_ENV_FILE={path} is a folder: name the .env file itself, e.g. {path / '.env'}")
        return path
    if (REPO_ROOT / ".env").is_file():
        return REPO_ROOT / ".env"
    found = find_dotenv(usecwd=True)
    return Path(found) if found else None


def setting(name: str) -> str:
    """One setting: the environment, else ``.env``, else nlbfab's default.

    A variable that ``.env`` sets to nothing (``PREP_HOME=``) fails with how to fix it.
    """
    env_file = _env_file()
    from_file = dotenv_values(env_file) if env_file and env_file.is_file() else {}
    value = os.environ.get(name, from_file.get(name, DEFAULTS.get(name)))
    if not value and name in os.environ:  # the environment overrides .env: fixing .env would not help
        raise UserError(f"{name} is set to nothing in the environment: export {name}=... or unset {name} "
                        f"(then .env's value or the default {DEFAULTS.get(name, 'none')} applies)")
    if not value:
        where = env_file or REPO_ROOT / ".env"
        raise UserError(f"{name} is not set: add '{name}=...' to {where} or export {name} "
                        f"(default: {DEFAULTS.get(name, 'none')})")
    if name in PATH_VARIABLES:
        from_environment = name in os.environ
        base = env_file.parent if env_file and not from_environment else Path.cwd()
        return str((base / Path(value).expanduser()).resolve())
    return value


def origin(name: str) -> str:
    """Where a setting's value comes from, for error messages: the environment, ``.env`` or the default."""
    if name in os.environ:
        return "the environment"
    env_file = _env_file()
    if env_file and env_file.is_file() and name in dotenv_values(env_file):
        return str(env_file)
    return f"nlbfab's default {DEFAULTS[name]}"


def writable_home(name: str) -> Path:
    """The folder a path setting names, created if missing; one line naming the variable, its
    origin and the reason if it cannot be created or written to."""
    path = Path(setting(name))
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".nlbfab-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise UserError(f"{name}={path} (set in {origin(name)}) cannot be written: {error.strerror or error}; "
                        f"point {name} at a writable folder") from None
    return path


def existing_home(name: str, fix: str) -> Path:
    """The folder a path setting names, which must exist; else one line naming the variable,
    its origin and ``fix`` (what makes the folder)."""
    path = Path(setting(name))
    if not path.is_dir():
        raise UserError(f"{name}={path} (set in {origin(name)}) is not a folder: {fix}, or point {name} elsewhere")
    return path


def data_home() -> Path:
    """Where the NWB files live, in DANDI's layout: ``DATA_HOME/000128/sub-Jenkins/*.nwb``."""
    return Path(setting("DATA_HOME"))


def prep_home() -> Path:
    """Where preprocessed splits live: ``PREP_HOME/{split}/{train_input,eval_input,eval_target}.h5``."""
    return Path(setting("PREP_HOME"))


def runs_home() -> Path:
    return Path(setting("RUNS_HOME"))


def split_file_names() -> dict[str, str]:
    """The three per-split file names, keyed ``train_input``, ``eval_input``, ``eval_target``:
    three different names of files in the split's folder, or one line saying which is not."""
    names = {kind: setting(f"{kind.upper()}_FILE") for kind in ("train_input", "eval_input", "eval_target")}
    for kind, name in names.items():
        if Path(name).name != name or name in (".", "..", TRAIN_WINDOW_TARGET, PREP_MARKER):
            raise UserError(f"{kind.upper()}_FILE={name}: must be a file name (no folders) other than "
                            f"{TRAIN_WINDOW_TARGET} and {PREP_MARKER}")
    if len(set(names.values())) < len(names):
        raise UserError(f"TRAIN_INPUT_FILE, EVAL_INPUT_FILE and EVAL_TARGET_FILE must differ (they are "
                        f"{', '.join(names.values())})")
    return names


def homes(writable: tuple[str, ...] = (), existing: dict[str, str] | None = None) -> Homes:
    """The three homes and the split file names as one value, checked first: the homes named in
    ``writable`` are created if missing and must be writable, those in ``existing`` must be
    folders already (the value is what makes one, for the error line)."""
    for name, fix in (existing or {}).items():  # first: a failed check leaves nothing behind
        existing_home(name, fix)
    for name in writable:
        writable_home(name)
    return Homes(data_home(), prep_home(), runs_home(), **split_file_names())
