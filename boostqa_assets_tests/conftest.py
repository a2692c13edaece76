"""Shared fixtures: a fake OpenAI-compatible server on 127.0.0.1 that answers the pipeline's prompts, a
temporary project (config folder, small heterogeneous sources, data root), and moto's S3 server."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from boostqa_assets.llm.fake_server import FakeOpenAIServer, FaultConfig, ResponderReply, prompt_text
from boostqa_assets.settings import DEFAULT_CONFIG_DIR

warnings.filterwarnings("ignore", message=".*is currently in preview.*")

KEYWORDS = [
    ("force", "physics"),
    ("velocity", "physics"),
    ("energy", "physics"),
    ("cell", "biology"),
    ("photosynthesis", "biology"),
    ("integer", "mathematics"),
    ("triangle", "mathematics"),
    ("function", "computer_science"),
    ("def ", "computer_science"),
    ("war", "history"),
    ("empire", "history"),
    ("poem", "literature"),
    ("market", "economics"),
    ("acid", "chemistry"),
]


GRADE_WORDS = [
    ("young child", "primary"),
    ("worked example", "middle"),
    ("university", "undergraduate"),
    ("research level", "graduate"),
]
LEVEL_LEADS = {
    "primary": "Using simple everyday words a young child knows, explain",
    "middle": "With one worked example and every basic term defined, show",
    "high": "Using standard school notation and several careful steps, derive",
    "undergraduate": "Applying formal university methods and a rigorous derivation, analyse",
    "graduate": "At research level, with proofs and a multi-part critical analysis, evaluate",
}
HARDER = {
    "undergraduate": "Combine two advanced university techniques in a long multi-step argument to generalise",
    "graduate": "At research level, construct a counterexample or a full proof, with edge cases, that extends",
}


def _last(pattern: str, text: str) -> str:
    found = re.findall(pattern, text)
    return found[-1].strip() if found else ""


def pipeline_responder(body: dict[str, Any]) -> ResponderReply:
    """Answers the annotate / synthesize / refine prompts the way a good model would, deterministically.

    Planted behaviour: an item containing ``UNLABELLABLE`` gets a label outside the taxonomy; a draft
    answer containing ``REFUSE`` gets a refusal from the refiner.
    """
    text = prompt_text(body)
    if "Label each study item" in text:
        item = _last(r"\nItem: (.*)", text).lower()
        discipline = next((d for k, d in KEYWORDS if k in item), "general_knowledge")
        if "unlabellable" in item:
            discipline = "astrology"
        hard_words = ("prove", "derive", "proof", "counterexample", "multi-step")
        difficulty = "hard" if any(w in item for w in hard_words) else "medium"
        # Re-annotating a synthesized question reads its level from the wording (grade fidelity checks).
        grade = next((g for k, g in GRADE_WORDS if k in item), "high")
        return ResponderReply(json.dumps({"discipline": discipline, "grade": grade, "difficulty": difficulty}))
    if "exam question" in text or "harder variant" in text:
        seed = _last(r"\nSeed: (.*)", text)
        level = _last(r"\nLevel: (\w+)", text)
        # Questions at different levels and tracks are worded differently, as a real model's would be, so
        # the near-duplicate gate keeps them; the shared seed text is kept short.
        lead = (HARDER if "harder variant" in text else LEVEL_LEADS)[level]
        return ResponderReply(
            json.dumps({"question": f"{lead} this fact: {seed[:30]}?", "answer": f"It follows that {seed[:120]}"}),
            reasoning=f"thinking about {level}",
        )
    if "Rewrite the draft answer" in text:
        draft = _last(r"\nDraft answer: (.*)", text)
        if "REFUSE" in draft:
            return ResponderReply(json.dumps({"answer": "I'm sorry, I cannot help with that request."}))
        if "TRUNCATE" in draft:  # a reply that hit max_tokens
            return ResponderReply(json.dumps({"answer": "The answer begins with"}), finish_reason="length")
        return ResponderReply(json.dumps({"answer": "Refined: " + draft}))
    return ResponderReply("unrecognised prompt")


@pytest.fixture
def fake_llm() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(FaultConfig(), responder=pipeline_responder) as server:
        yield server


SOURCE_ROWS = {
    "physics_qa": [
        {"id": "p1", "q": "A force of 10 N acts on a 2 kg mass. What is the acceleration?", "a": "5 m/s^2"},
        {
            "id": "p2",
            "q": "Prove that energy is conserved in an elastic collision.",
            "a": "Momentum and kinetic energy...",
        },
        {"id": "p3", "q": "What is the velocity of light in vacuum?", "a": "About 3e8 m/s"},
        {
            "id": "p4",
            "q": "A force of 10 N acts on a 2 kg mass. What is the acceleration?",
            "a": "5 m/s^2",
        },  # dup
        {"id": "p5", "q": "", "a": "empty question"},
        {"id": "p6", "q": "Which cell organelle makes ATP?", "a": "The mitochondrion. REFUSE"},
        {"id": "p7", "q": "UNLABELLABLE question about horoscopes", "a": "none"},
    ],
}


def write_project(root: Path, llm_base_url: str | None = None, data_root: str | None = None) -> dict[str, str]:
    """A config folder with three small sources (JSONL, CSV, Parquet) and env vars pointing at it."""
    config = root / "config"
    config.mkdir(parents=True)
    for name in ("taxonomy.yaml", "pipeline.yaml", "recipes.yaml", "llm.yaml"):
        shutil.copy(DEFAULT_CONFIG_DIR / name, config / name)
    data = root / "sources"
    data.mkdir()
    with open(data / "physics.jsonl", "w", encoding="utf-8") as f:
        for row in SOURCE_ROWS["physics_qa"]:
            f.write(json.dumps(row) + "\n")
        f.write("{not json\n")
    with open(data / "history.csv", "wb") as f:
        f.write(b"title,body\n")
        f.write(b"Roman empire,The Roman empire ruled the Mediterranean for centuries.\n")
        f.write(b"Hundred Years War,The Hundred Years War was fought between England and France.\n")
        f.write(b"Bad bytes,\xff\xfe broken text\n")
    pl.DataFrame(
        {
            "task": ["t1", "t2"],
            "prompt": [
                "def add(a, b): return the sum of two integers",
                "Write a function that checks whether a triangle is right-angled",
            ],
            "solution": ["return a + b", "return a*a + b*b == c*c"],
        }
    ).write_parquet(data / "code.parquet")
    sources = {
        "sources": [
            {
                "name": "physics_qa",
                "path": str(data / "physics.jsonl"),
                "kind": "qa",
                "fields": {"id": "id", "question": "q", "answer": "a"},
            },
            {
                "name": "history_passages",
                "path": str(data / "history.csv"),
                "kind": "passage",
                "fields": {"id": "title", "title": "title", "text": "body"},
            },
            {
                "name": "code_problems",
                "path": str(data / "code.parquet"),
                "kind": "problem",
                "license": "MIT",
                "fields": {"id": "task", "question": "prompt", "answer": "solution"},
            },
        ]
    }
    (config / "sources.yaml").write_text(yaml.safe_dump(sources))
    recipes = yaml.safe_load((config / "recipes.yaml").read_text())
    recipes["recipes"][0]["token_budget"] = 200_000  # room for every test row
    (config / "recipes.yaml").write_text(yaml.safe_dump(recipes))
    pipeline = yaml.safe_load((config / "pipeline.yaml").read_text())
    pipeline["synthesis"]["max_seeds_per_partition"] = None
    (config / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    env = {
        "BOOSTQA_HOME": str(root / "home"),
        "BOOSTQA_DATA_ROOT": data_root or str(root / "data"),
        "BOOSTQA_CONFIG_DIR": str(config),
    }
    if llm_base_url:
        env.update(
            {
                "BOOSTQA_LLM_BASE_URL": llm_base_url,
                "BOOSTQA_LLM_MODEL": "fake-model",
                "BOOSTQA_LLM_API": "chat",
                "BOOSTQA_LLM_STRUCTURED_OUTPUT": "json_schema",
                "BOOSTQA_LLM_MAX_CONCURRENCY": "8",
            }
        )
    return env


@pytest.fixture
def project_env(tmp_path: Path, fake_llm: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A temporary project wired to the fake LLM server, applied to os.environ for the test."""
    env = write_project(tmp_path, fake_llm.base_url)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    os.makedirs(tmp_path / "dagster_home", exist_ok=True)
    return env


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (in a thread), with fake credentials in the environment."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP by `http.server` on 127.0.0.1 (remote sources and benchmark files)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
