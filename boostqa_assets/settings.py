"""The one place that maps the environment to paths and settings.

Nothing else in the package reads ``os.environ`` for configuration (API keys are read by name, at call
time, inside the LLM client, so they never enter a config object).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG_DIR = PACKAGE_DIR / "config"
PROMPTS_DIR = PACKAGE_DIR / "prompts"
SQL_DIR = PACKAGE_DIR.parent / "sql"


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
