"""Shared fixtures: a fake OpenAI-compatible server on 127.0.0.1 that answers the pipeline's prompts, a
temporary project (config folder, small heterogeneous sources, data root), and moto's S3 server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from boostqa_assets.settings import DEFAULT_CONFIG_DIR
from boostqa_assets.testing.fake_server import FakeOpenAIServer, FaultConfig, ResponderReply, prompt_text

warnings.filterwarnings("ignore", message=".*is currently in preview.*")


def pytest_configure(config: pytest.Config) -> None:
    """Give the test process Python's usual SIGINT handler when it was started with SIGINT ignored, as a shell
    starts background jobs (`make test &`, nohup, CI runners without a terminal).

    Dagster's in-process execution in the main thread maps SIGTERM to whatever SIGINT does when it ends
    (``dagster._utils.interrupts.setup_interrupt_handlers``): after the first such run the process ignored
    SIGTERM, and so did every child it started afterwards. Dagster's compute-log ``tail -F`` helpers then
    ignored the ``terminate()`` that ends a run's log capture, and each later run waited 2 x 30 s for them
    (measured in a fresh clone: ~62 s per run), while ``dagster dev`` ignored the SIGTERM that stops it. The
    product's runner executes in a worker thread, where Dagster leaves signals alone, so only tests that
    execute in the main thread met this."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


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
    ("光合", "biology"),
    ("细胞", "biology"),
    ("加速度", "physics"),
    ("三角形", "mathematics"),
    ("朝代", "history"),
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
# The same leads in Chinese, for prompts that ask for Chinese QA (`Language: Chinese`).
LEVEL_LEADS_ZH = {
    "primary": "用小朋友听得懂的日常话语解释",
    "middle": "举一个例题并定义每个基本术语，说明",
    "high": "用标准的中学符号和几个严谨的步骤推导",
    "undergraduate": "运用大学的形式化方法和严格的推导分析",
    "graduate": "在研究水平上给出证明并作多方面的批判性分析，评价",
}
HARDER_ZH = {
    "undergraduate": "综合两种高等大学技巧，用较长的多步论证推广",
    "graduate": "在研究水平上构造反例或完整证明，并讨论边界情形，推广",
}


def _last(pattern: str, text: str) -> str:
    found = re.findall(pattern, text)
    return found[-1].strip() if found else ""


def _chinese(seed: str, n: int) -> str:
    """The seed's Chinese characters (Latin letters dropped), or a Chinese stand-in when it has none."""
    kept = re.sub(r"[A-Za-z]", "", seed).strip()
    return kept[:n] if re.search(r"[\u4e00-\u9fff]", kept) else "这条事实" + str(zlib.crc32(seed.encode()) % 10_000)


def pipeline_responder(body: dict[str, Any], follow_language: bool = True) -> ResponderReply:
    """Answers the annotate / synthesize / refine prompts the way a good model would, deterministically.

    Planted behaviour: an item containing ``UNLABELLABLE`` gets a label outside the taxonomy; a draft
    answer containing ``REFUSE`` gets a refusal from the refiner. QA comes back in the language the prompt names
    after ``Language:`` (Chinese or English); ``follow_language=False`` answers in English whatever it asks
    (``english_only_responder``: a model that ignores the language).
    """
    text = prompt_text(body)
    chinese = follow_language and _last(r"\nLanguage: (\w+)", text) == "Chinese"
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
        if chinese:
            lead = (HARDER_ZH if "harder variant" in text else LEVEL_LEADS_ZH)[level]
            return ResponderReply(
                json.dumps(
                    {"question": f"{lead}：{_chinese(seed, 30)}？", "answer": f"由此可知，{_chinese(seed, 120)}"},
                    ensure_ascii=False,
                ),
                reasoning=f"thinking about {level}",
            )
        lead = (HARDER if "harder variant" in text else LEVEL_LEADS)[level]
        if re.search(r"[\u4e00-\u9fff]", seed):  # an English-only model: English QA whatever the seed
            seed = f"fact number {zlib.crc32(seed.encode()) % 10_000} of the seed"
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
        if chinese:
            return ResponderReply(json.dumps({"answer": "改进后的答案：" + draft}, ensure_ascii=False))
        if re.search(r"[\u4e00-\u9fff]", draft):
            return ResponderReply(json.dumps({"answer": "Refined: the answer to this question, in English."}))
        return ResponderReply(json.dumps({"answer": "Refined: " + draft}))
    if "Answer each question correctly and briefly" in text:  # the probe: this target knows nothing
        return ResponderReply("I am not sure.")
    if "Decide whether the reply answers the question" in text:  # the judge
        return ResponderReply(json.dumps({"verdict": "incorrect"}))
    return ResponderReply("unrecognised prompt")


def english_only_responder(body: dict[str, Any]) -> ResponderReply:
    """``pipeline_responder`` for a model that writes English whatever language the prompt asks for."""
    return pipeline_responder(body, follow_language=False)


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


def keep_answered_disciplines(config_dir: Path) -> int:
    """Cut the project's taxonomy to the disciplines the fake annotator can answer (``KEYWORDS``), 9 of 22, so
    45 QA partitions instead of 110, for tests whose subject is not the taxonomy: every partition costs Dagster
    events, a check and files whether or not it holds rows. Returns how many disciplines are left."""
    taxonomy_yaml = config_dir / "taxonomy.yaml"
    taxonomy = yaml.safe_load(taxonomy_yaml.read_text())
    answered = {d for _, d in KEYWORDS} | {"general_knowledge"}
    taxonomy["disciplines"] = [d for d in taxonomy["disciplines"] if d["name"] in answered]
    taxonomy_yaml.write_text(yaml.safe_dump(taxonomy))
    return len(taxonomy["disciplines"])


def write_project(
    root: Path, llm_base_url: str | None = None, data_root: str | None = None, *, all_disciplines: bool = True
) -> dict[str, str]:
    """A config folder with three small sources (JSONL, CSV, Parquet) and env vars pointing at it.

    The shipped configuration, except that the recipes have no ``qa_budget``: the synthesis plan then gives
    every candidate seed ``qa_per_seed`` variants, so row counts follow from the sources alone (plan budgets
    have their own tests in test_synthesis_plan.py). ``all_disciplines=False``: only the 9 the fake annotator
    answers (``keep_answered_disciplines``); the test seeds land in the same partitions, 65 empty ones fewer."""
    config = root / "config"
    config.mkdir(parents=True)
    for name in ("taxonomy.yaml", "pipeline.yaml", "recipes.yaml", "llm.yaml"):
        shutil.copy(DEFAULT_CONFIG_DIR / name, config / name)
    recipes = yaml.safe_load((config / "recipes.yaml").read_text())
    for recipe in recipes["recipes"]:
        recipe.pop("qa_budget", None)
    (config / "recipes.yaml").write_text(yaml.safe_dump(recipes))
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
    if not all_disciplines:
        keep_answered_disciplines(config)
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
def project_env(
    request: pytest.FixtureRequest, tmp_path: Path, fake_llm: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """A temporary project wired to the fake LLM server, applied to os.environ for the test. Tests marked
    ``small_taxonomy`` (their subject is not the taxonomy) get the 9 disciplines the fake annotator answers: 45
    QA partitions instead of 110, the same rows."""
    small = request.node.get_closest_marker("small_taxonomy") is not None
    env = write_project(tmp_path, fake_llm.base_url, all_disciplines=not small)
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


# --- deficiency probe: a fake target model and a source of questions with reference answers -------------

PROBE_PROMPT_CUE = "Answer each question correctly and briefly"
JUDGE_PROMPT_CUE = "Decide whether the reply answers the question"
PROBE_WRONG_ANSWER = "I am not sure."


def _probe_rows() -> list[dict[str, str]]:
    """Questions the pipeline_responder labels into known cells (keywords and grade words above).

    physics|primary: 8 short answers; biology|high: 6; history|high: 6 (one ``SILENT``: the target replies
    nothing); chemistry|high: 3 (too few for an accuracy); economics|undergraduate: 6 free-form answers of
    more than 6 words (graded by the judge; one ``UNJUDGEABLE``: the judge's verdict is invalid)."""
    rows = [
        {
            "id": f"pp{n}",
            "q": f"For a young child: a toy cart is pushed with a force of {n} newtons. How many newtons is the push?",
            "a": f"{n} newtons",
        }
        for n in range(2, 10)
    ]
    rows += [
        {"id": f"bh{i}", "q": f"In cell biology, what is fact number {i} about the cell membrane?", "a": f"fact {i}"}
        for i in range(1, 7)
    ]
    rows += [
        {
            "id": f"hh{i}",
            "q": f"In which century did empire number {i} of the textbook fall?" + (" SILENT" if i == 6 else ""),
            "a": f"century {i}",
        }
        for i in range(1, 7)
    ]
    rows += [{"id": f"ch{i}", "q": f"What is the pH of acid sample {i}?", "a": str(i)} for i in range(1, 4)]
    rows += [
        {
            "id": f"eu{i}",
            "q": f"At university level, explain market scenario {i}." + (" UNJUDGEABLE" if i == 6 else ""),
            "a": f"In scenario {i} the market clears where supply equals demand at a higher price.",
        }
        for i in range(1, 7)
    ]
    return rows


PROBE_QA_ROWS: list[dict[str, str]] = _probe_rows()
# The code_problems source of write_project (kind problem: graded by the judge in auto mode).
CODE_PROBLEM_ANSWERS = {
    "def add(a, b): return the sum of two integers": "return a + b",
    "Write a function that checks whether a triangle is right-angled": "return a*a + b*b == c*c",
}


def probe_answers() -> dict[str, str]:
    """question -> reference answer for every seed of ``write_project`` + ``add_probe_source`` with one."""
    answers = {r["q"]: r["a"] for r in PROBE_QA_ROWS}
    answers.update({r["q"]: r["a"] for r in SOURCE_ROWS["physics_qa"] if r["q"]})
    answers.update(CODE_PROBLEM_ANSWERS)
    return answers


def add_probe_source(config_dir: Path, probe_settings: dict[str, Any] | None = None) -> None:
    """Add the ``probe_qa`` source (``PROBE_QA_ROWS``) to a ``write_project`` config folder, and set
    ``pipeline.yaml`` ``probe:`` (default here: 6 samples per cell, 5 graded replies for an accuracy)."""
    path = config_dir.parent / "sources" / "probe_qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PROBE_QA_ROWS), encoding="utf-8")
    sources = yaml.safe_load((config_dir / "sources.yaml").read_text())
    sources["sources"].append(
        {"name": "probe_qa", "path": str(path), "kind": "qa", "fields": {"id": "id", "question": "q", "answer": "a"}}
    )
    (config_dir / "sources.yaml").write_text(yaml.safe_dump(sources))
    pipeline = yaml.safe_load((config_dir / "pipeline.yaml").read_text())
    pipeline["probe"] = {"samples_per_cell": 6, "min_samples": 5, **(probe_settings or {})}
    (config_dir / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _loose(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def probe_target_responder(
    answers: dict[str, str],
    perfect: Callable[[str], bool],
    fallback: Callable[[dict[str, Any]], str | ResponderReply] = pipeline_responder,
) -> Callable[[dict[str, Any]], str | ResponderReply]:
    """A fake target model (``probe`` role) and judge, for ``FakeOpenAIServer(responder=...)`` or
    ``fake_llm.responder = ...``.

    Probe prompt: the reference answer from ``answers`` (question -> answer) when ``perfect(question)``,
    else ``PROBE_WRONG_ANSWER``; nothing for a question containing ``SILENT``. Judge prompt: ``correct``
    when the reply contains the reference (case and punctuation aside); an invalid verdict for a question
    containing ``UNJUDGEABLE``. Any other prompt goes to ``fallback`` (the annotate/synthesize/refine
    responder by default).
    """
    by_line = {_one_line(q): (q, a) for q, a in answers.items()}

    def respond(body: dict[str, Any]) -> str | ResponderReply:
        text = prompt_text(body)
        if PROBE_PROMPT_CUE in text:
            question = _last(r"\nQuestion: (.*)", text)
            if "SILENT" in question:
                return ResponderReply("")
            original, answer = by_line.get(question, (question, None))
            if answer is not None and perfect(original):
                return ResponderReply(_one_line(answer))
            return ResponderReply(PROBE_WRONG_ANSWER)
        if JUDGE_PROMPT_CUE in text:
            question = _last(r"\nQuestion: (.*)", text)
            if "UNJUDGEABLE" in question:
                return ResponderReply(json.dumps({"verdict": "maybe"}))
            reference = _loose(_last(r"\nReference: (.*)", text))
            reply = _loose(_last(r"\nReply: (.*)", text))
            correct = bool(reference) and reference in reply
            return ResponderReply(json.dumps({"verdict": "correct" if correct else "incorrect"}))
        return fallback(body)

    return respond
