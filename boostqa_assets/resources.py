"""Dagster resources: ``store`` (Parquet over fsspec) and ``llm`` (one client per role).

Both are thin: they resolve settings and configuration, then hand out plain objects (``Store``,
``LLMClient``) that the logic modules and tests use without Dagster.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import dagster as dg
import fsspec
from pydantic import PrivateAttr

from boostqa_assets.configs import ProjectConfig, load_project_config
from boostqa_assets.llm.cache import ResponseCache
from boostqa_assets.llm.client import LLMClient
from boostqa_assets.llm.embedded import EmbeddedServer
from boostqa_assets.settings import get_settings
from boostqa_assets.storage import Store

logger = logging.getLogger(__name__)


@lru_cache(maxsize=8)
def _project_config(config_dir: str, env_key: tuple[tuple[str, str], ...]) -> ProjectConfig:
    return load_project_config(Path(config_dir), dict(env_key))


def project_config(config_dir: str | None = None) -> ProjectConfig:
    """The validated configuration (cached per folder and per set of BOOSTQA_ environment overrides)."""
    import os

    settings = get_settings()
    env_key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("BOOSTQA_")))
    return _project_config(str(config_dir or settings.config_dir), env_key)


class StoreResource(dg.ConfigurableResource):
    """Where every asset's Parquet lives: ``root`` (local path or s3://), default ``BOOSTQA_DATA_ROOT``."""

    root: str | None = None

    def get(self) -> Store:
        settings = get_settings()
        return Store(self.root or settings.data_root, settings.storage_options)


class LLMResource(dg.ConfigurableResource):
    """One OpenAI-compatible client per role (annotator, synthesizer, refiner), configured in ``llm.yaml``
    and overridable per role from the environment. Roles on ``base_url: embedded`` share one local llama.cpp
    server, started on first use and stopped when the run's step ends.
    """

    config_dir: str | None = None
    cache_root: str | None = None
    use_cache: bool = True
    replay_only: bool | None = None

    _server: EmbeddedServer | None = PrivateAttr(default=None)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def _embedded_url(self, project: ProjectConfig) -> str:
        settings = get_settings()
        if settings.embedded_base_url:
            return settings.embedded_base_url
        if self._server is None:
            self._server = EmbeddedServer(settings.models_dir, project.llm.embedded, settings.home / "logs").start()
        return self._server.base_url

    def cache(self) -> ResponseCache | None:
        if not self.use_cache:
            return None
        settings = get_settings()
        root = self.cache_root or f"{settings.data_root}/_llm_cache"
        if root.startswith("s3://"):
            return ResponseCache(root, Store(root, settings.storage_options).fs)
        return ResponseCache(root, fsspec.filesystem("file"))

    def client(self, role: str) -> LLMClient:
        project = project_config(self.config_dir)
        cfg = project.llm.roles[role]  # type: ignore[index]
        base_url = self._embedded_url(project) if cfg.is_embedded else cfg.base_url
        replay = get_settings().replay_only if self.replay_only is None else self.replay_only
        settings = get_settings()
        # Limits, pauses and batch ids are shared by every process of this machine through these folders.
        return LLMClient(
            role,
            cfg,
            base_url,
            cache=self.cache(),
            replay_only=replay,
            limits_dir=settings.home / "limits",
            batch_state_dir=settings.home / "batches",
        )
