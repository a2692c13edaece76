"""The one place that maps the environment to paths and settings.

Nothing else in the package reads ``os.environ`` for configuration (API keys are read by name, at call
time, inside the LLM client, so they never enter a config object).
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG_DIR = PACKAGE_DIR / "config"
PROMPTS_DIR = PACKAGE_DIR / "prompts"
SQL_DIR = PACKAGE_DIR / "sql"  # package data: a non-editable install has the views too
CATALOG_FILE = "boostqa.duckdb"  # under BOOSTQA_HOME: DuckDB views over the committed Parquet (inspect.py)
# Every variable ``get_settings`` reads (a test keeps this list and the code below in step).
SETTINGS_ENV: tuple[str, ...] = (
    "BOOSTQA_HOME",
    "BOOSTQA_DATA_ROOT",
    "BOOSTQA_CONFIG_DIR",
    "BOOSTQA_EMBEDDED_BASE_URL",
    "BOOSTQA_REPLAY_ONLY",
    "BOOSTQA_S3_ENDPOINT_URL",
)


class SettingsError(ValueError):
    """A setting that cannot be used as it is (a path that cannot be created or written); the message is one line
    naming the setting, the path, what is wrong and the fix."""


@dataclass(frozen=True)
class Settings:
    """Paths and switches resolved from the environment at the moment they are asked for."""

    home: Path
    data_root: str
    config_dir: Path
    models_dir: Path
    storage_options: dict[str, str]
    embedded_base_url: str | None = None
    replay_only: bool = False

    @property
    def is_s3(self) -> bool:
        return self.data_root.startswith("s3://")

    @property
    def catalog_path(self) -> Path:
        """The DuckDB catalog file (views over the data root), machine-local like the rest of the home."""
        return self.home / CATALOG_FILE


def get_settings(env: dict[str, str] | None = None) -> Settings:
    """Resolve settings from ``env`` (default: the process environment).

    - ``BOOSTQA_HOME``: working folder for local data, models and the Dagster instance (default ``./.boostqa``).
    - ``BOOSTQA_DATA_ROOT``: where assets are written: a local path or ``s3://bucket/prefix``
      (default ``$BOOSTQA_HOME/data``).
    - ``BOOSTQA_CONFIG_DIR``: folder with taxonomy/sources/llm/pipeline/recipes YAML (default: the package's).
    - ``BOOSTQA_EMBEDDED_BASE_URL``: an already running embedded server to share (the demo sets it).
    - ``BOOSTQA_REPLAY_ONLY=1``: answer every LLM request from the cache; a miss fails the run.
    - ``BOOSTQA_S3_ENDPOINT_URL``: an S3-compatible endpoint (MinIO, moto); credentials come from the usual
      AWS variables or instance roles, read by s3fs/botocore, never by us.
    """
    env = dict(os.environ) if env is None else env
    home = Path(env.get("BOOSTQA_HOME") or Path.cwd() / ".boostqa").expanduser().resolve()
    data_root = env.get("BOOSTQA_DATA_ROOT") or str(home / "data")
    config_dir = Path(env.get("BOOSTQA_CONFIG_DIR") or DEFAULT_CONFIG_DIR).expanduser().resolve()
    storage_options: dict[str, str] = {}
    if env.get("BOOSTQA_S3_ENDPOINT_URL"):
        storage_options["endpoint_url"] = env["BOOSTQA_S3_ENDPOINT_URL"]
    return Settings(
        home=home,
        data_root=data_root.rstrip("/"),
        config_dir=config_dir,
        models_dir=home / "models",
        storage_options=storage_options,
        embedded_base_url=env.get("BOOSTQA_EMBEDDED_BASE_URL") or None,
        replay_only=env.get("BOOSTQA_REPLAY_ONLY", "").lower() in ("1", "true", "yes"),
    )


def known_env_names() -> set[str]:
    """Every ``BOOSTQA_*`` variable the package reads: the settings above and the LLM role overrides
    (``configs.env_override_names``: ``BOOSTQA_LLM_<FIELD>`` and ``BOOSTQA_<ROLE>_<FIELD>``)."""
    from boostqa_assets.configs import env_override_names

    return set(SETTINGS_ENV) | set(env_override_names())


def unknown_env_vars(env: dict[str, str] | None = None, also_known: set[str] | None = None) -> list[str]:
    """One warning per ``BOOSTQA_*`` variable that nothing reads (a typo is otherwise silently ignored), with the
    closest known name. ``also_known``: names the configuration itself refers to (a role's ``api_key_env``)."""
    env = dict(os.environ) if env is None else env
    known = known_env_names() | (also_known or set())
    warnings = []
    for name in sorted(k for k in env if k.startswith("BOOSTQA_") and k not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        hint = f"did you mean {close[0]}?" if close else "no BoostQA setting has a similar name"
        warnings.append(f"{name} is set but not a BoostQA setting, so it is ignored ({hint})")
    return warnings
