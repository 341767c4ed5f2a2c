"""The documentation tells the truth: links and anchors resolve, named files exist, `ditf` commands
parse, and the code blocks marked as tests run.

Which text is checked:

* Markdown: `README.md`, every page under `docs/`, and the area docs (`stores/README.md`,
  `docker/README.md`, `benchmarks/results/README.md`): relative links and their anchors, file
  paths in backticks, `ditf` command lines (in fences and in backticks: the subcommand and every
  `--option` must exist), and sections named as `README "Title"`.
* Python (`ditf_pipeline/`, `cli/`, `benchmarks/`): file paths and `README "Title"` sections named
  in comments and string literals (docstrings and messages).

A code block runs as a test when an HTML comment stands right before its fence (invisible on
GitHub and in MkDocs)::

    <!-- test -->                       runs in the fast suite
    <!-- test: slow setup=spair-demo --> a slow test, in a folder prepared by that setup
    <!-- no-test: needs the real weights -->   a Python block that deliberately does not run

Python blocks run with `exec` in a fresh namespace, bash blocks with `bash -euo pipefail`, both in
a temporary folder (the venv's `ditf` first on PATH). Every Python block must carry one of the two
markers, so an example cannot silently stop being run.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
import tokenize
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
AREA_DOCS = ("stores/README.md", "docker/README.md", "benchmarks/results/README.md")
PYTHON_TREES = ("ditf_pipeline", "cli", "benchmarks")
#: top-level folders of the repository whose paths, named in backticks, must exist
SOURCE_DIRS = ("ditf_pipeline", "cli", "benchmarks", "tests", "docs", "docker", ".ci")
ROOT_FILES = ("README.md", "LICENSE", "CITATION.cff", "pyproject.toml", "mkdocs.yml", "constraints.txt",
              "constraints-min.txt")
#: files of other projects that docs and docstrings name on purpose (what ditf follows, by project)
EXTERNAL_FILES = {
    "eval_spair.py", "eval_davis.py",  # DiTF (ganchaofan0000/DiTF); DIFT has an eval_spair.py too
    "src/models/dift_sd.py", "extract_dift.py", "eval_hpatches.py", "eval_homography.py",  # DIFT
    "utils/utils_dataset.py", "pck_train.py",  # GeoAware-SC
    "pck_spair_pascal.py",  # sd-dino
    "eval_video_segmentation.py",  # DINO
    "evaluation_method.py", "davis2017/metrics.py", "davis2017/evaluation.py", "davis2017/utils.py",  # davis2017-evaluation
}

_MD = MarkdownIt("commonmark").enable("table")
_PATH_IN_CODE = re.compile(
    rf"^(?:(?:{'|'.join(re.escape(d) for d in SOURCE_DIRS)})/[\w./-]*"  # a path under a source folder
    r"|[\w./-]*[\w-]\.(?:py|md))$"  # any .py / .md file, bare or with folders
)
_PATH_IN_PROSE = re.compile(
    rf"(?<![\w/.{{<-])((?:{'|'.join(re.escape(d) for d in SOURCE_DIRS)})/[\w./-]*[\w/]"
    r"|(?:[\w-]+/)*[\w-]+\.(?:py|md))(?![\w{<>*-])"
)
_SECTION_REF = re.compile(r"((?:[\w./-]+/)?README(?:\.md)?|[\w./-]+\.md)[\s,]*(?:section\s+)?"
                          r"(?:\"([^\"\n]{2,60})\"|“([^”\n]{2,60})”|'([^'\n]{2,60})')")
_MARKER = re.compile(r"^<!--\s*(test|no-test)\b:?\s*(.*?)\s*-->\s*$", re.S)


# ---- reading Markdown ----------------------------------------------------------------------------


@dataclass
class Block:
    """One fenced code block and the marker comment right before it (if any)."""

    path: Path
    line: int
    lang: str
    code: str
    marker: str | None = None  # "test" | "no-test"
    options: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclass
class Page:
    """What the checks need from one Markdown file."""

    path: Path
    links: list[str]
    code_spans: list[str]
    blocks: list[Block]
    headings: list[str]
    bold: list[str]
    prose: str


def _inline_text(token) -> str:
    return "".join(child.content for child in token.children or () if child.type in ("text", "code_inline"))


def read_page(path: Path) -> Page:
    text = path.read_text(encoding="utf-8")
    tokens = _MD.parse(text)
    page = Page(path, [], [], [], [], [], "")
    prose: list[str] = []
    for index, token in enumerate(tokens):
        if token.type == "fence":
            previous = tokens[index - 1] if index else None
            block = Block(path, token.map[0] + 1, token.info.strip().split(" ")[0], token.content)
            if previous is not None and previous.type == "html_block" and previous.map[1] == token.map[0]:
                found = _MARKER.match(previous.content.strip())
                if found:
                    block.marker, block.options = found.group(1), found.group(2).split()
            page.blocks.append(block)
        elif token.type == "heading_open":
            page.headings.append(_inline_text(tokens[index + 1]))
        elif token.type == "inline":
            prose.append(token.content)
            children = token.children or []
            for position, child in enumerate(children):
                if child.type == "link_open":
                    page.links.append(child.attrs["href"])
                elif child.type == "image":
                    page.links.append(child.attrs["src"])
                elif child.type == "code_inline":
                    page.code_spans.append(child.content)
                elif child.type == "strong_open" and position + 1 < len(children):
                    page.bold.append(children[position + 1].content.rstrip(".:"))
    page.prose = "\n".join(prose)
    return page


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading (README.md and the area docs render there)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def mkdocs_slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading on a docs page."""
    value = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def anchors(path: Path) -> set[str]:
    page = read_page(path)
    slug = mkdocs_slug if _is_docs_page(path) else github_slug
    found: set[str] = set()
    for heading in page.headings:
        base = slug(heading)
        name, n = base, 0
        while name in found:  # a repeated heading gets a numbered anchor
            n += 1
            name = f"{base}_{n}" if _is_docs_page(path) else f"{base}-{n}"
        found.add(name)
    return found


def _is_docs_page(path: Path) -> bool:
    return DOCS in path.resolve().parents


@functools.cache
def tracked_files() -> tuple[str, ...]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split()
    return tuple(name for name in listed if (ROOT / name).exists())


def repository_path_exists(name: str) -> bool:
    """Whether a path named in text exists: from the repository root, or as the tail of a tracked path."""
    name = name.removeprefix("./").rstrip("/")
    if (ROOT / name).exists() or name in EXTERNAL_FILES:
        return True
    return any(f.endswith("/" + name) or f"/{name}/" in f"/{f}" for f in tracked_files())


# ---- the checks ----------------------------------------------------------------------------------


def check_links(page: Page) -> list[str]:
    """Relative links and images that do not resolve, and anchors that name no heading."""
    problems = []
    for href in page.links:
        if re.match(r"^[a-z][a-z0-9+.-]*:", href):  # http:, https:, mailto: ... are not checked offline
            continue
        target, _, anchor = href.partition("#")
        resolved = (page.path.parent / target).resolve() if target else page.path
        if not resolved.exists():
            problems.append(f"{page.path.relative_to(ROOT)}: link {href!r}: no such file")
            continue
        if _is_docs_page(page.path) and DOCS not in resolved.parents and resolved != DOCS:
            problems.append(f"{page.path.relative_to(ROOT)}: link {href!r} leaves docs/ (MkDocs cannot serve it; "
                            "name the file in backticks instead)")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            problems.append(f"{page.path.relative_to(ROOT)}: link {href!r}: no heading with that anchor")
    return problems


def _is_placeholder(text: str) -> bool:
    return any(mark in text for mark in ("<", ">", "{", "*", "...", " ", "$"))


def check_named_files(page: Page) -> list[str]:
    """File paths in backticks that do not exist in the repository."""
    problems = []
    for span in page.code_spans:
        name = span.strip()
        if _is_placeholder(name) or not (_PATH_IN_CODE.match(name) or name in ROOT_FILES):
            continue
        if not repository_path_exists(name):
            problems.append(f"{page.path.relative_to(ROOT)}: `{name}` names no file of the repository")
    return problems


def _headings_and_bold(path: Path) -> set[str]:
    page = read_page(path)
    return {text.strip().lower() for text in page.headings + page.bold}


def check_sections(text: str, where: str) -> list[str]:
    """`README "Title"` / `docs/x.md "Title"`: the file must have that heading (or bold lead-in)."""
    problems = []
    for file, *quoted in _SECTION_REF.findall(text):
        title = next(part for part in quoted if part)
        path = ROOT / (file if file.endswith(".md") else file + ".md")
        if not path.exists():
            found = [ROOT / f for f in tracked_files() if f.endswith("/" + file) or f == file]
            path = found[0] if found else path
        if not path.exists():
            problems.append(f"{where}: names {file} {title!r}, and {file} does not exist")
        elif title.strip().lower() not in _headings_and_bold(path):
            problems.append(f"{where}: names {file} {title!r}, which is no section of {path.relative_to(ROOT)}")
    return problems


@functools.cache
def cli_options() -> dict[str, set[str]]:
    """Subcommand -> every option spelling it accepts (from the typer app itself)."""
    import typer.main

    from ditf_cli.main import app

    group = typer.main.get_command(app)
    options = {}
    for name, command in group.commands.items():
        spelled = {"--help"}
        for param in command.params:
            spelled.update(param.opts)
            spelled.update(param.secondary_opts)
        options[name] = spelled
    options[""] = {"--help", "--version"}
    return options


def _ditf_commands(text: str) -> list[str]:
    """`ditf ...` command lines in a shell snippet (continuations joined, comments dropped)."""
    text = text.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line)
        for part in re.split(r"&&|;|\s\|\s|\$\(", line):
            words = part.strip().split()
            for start, word in enumerate(words):
                if word == "ditf" or word.endswith("/bin/ditf"):
                    found.append(" ".join(["ditf", *words[start + 1:]]))
                    break
    return found


def check_command(command: str, where: str) -> list[str]:
    """A `ditf` command line whose subcommand or options do not exist."""
    try:
        words = shlex.split(command.replace("[", " ").replace("]", " "))
    except ValueError:
        words = command.replace("[", " ").replace("]", " ").split()
    words = [w.rstrip(")`") for w in words[1:]]
    sub = next((w for w in words if not w.startswith("-")), "")
    known = cli_options()
    if sub and (sub.isupper() or sub == "..."):  # `ditf COMMAND --help`
        return []
    if sub and sub not in known:
        return [f"{where}: `ditf {sub}`: no such command"]
    if sub and words.index(sub) > 0:  # options before the subcommand belong to ditf itself
        sub_index = words.index(sub)
        before, after = words[:sub_index], words[sub_index + 1:]
    else:
        before, after = [], words[1:] if sub else words
    problems = []
    for group, names in ((before, known[""]), (after, known[sub])):
        for word in group:
            option = word.split("=", 1)[0].split("|", 1)[0]
            if option.startswith("-") and option not in names and re.match(r"^--?[a-zA-Z]", option):
                problems.append(f"{where}: `ditf {sub}` has no option {option}")
    return problems


def check_commands(page: Page) -> list[str]:
    problems = []
    where = str(page.path.relative_to(ROOT))
    for block in page.blocks:
        if block.lang in ("bash", "sh", "shell", "console", ""):
            for command in _ditf_commands(block.code):
                problems += check_command(command, f"{where}:{block.line}")
    for span in page.code_spans:
        if span.startswith("ditf "):
            problems += check_command(span, where)
    return problems


def check_page(path: Path) -> list[str]:
    page = read_page(path)
    where = str(path.relative_to(ROOT))
    return (check_links(page) + check_named_files(page) + check_commands(page)
            + check_sections(re.sub(r"`[^`]*`", "", page.prose), where))


def _comments_and_strings(path: Path) -> list[tuple[int, str]]:
    with path.open("rb") as handle:
        return [(token.start[0], token.string) for token in tokenize.tokenize(handle.readline)
                if token.type in (tokenize.COMMENT, tokenize.STRING)
                or token.type == getattr(tokenize, "FSTRING_MIDDLE", -1)]


def check_python_file(path: Path) -> list[str]:
    """Files and README sections named in a module's comments and strings."""
    problems = []
    for line, text in _comments_and_strings(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        for name in _PATH_IN_PROSE.findall(text):
            if not repository_path_exists(name):
                problems.append(f"{where}: names {name}, which does not exist")
        problems += check_sections(text, where)
    return problems


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md")), *(ROOT / name for name in AREA_DOCS if (ROOT / name).exists())]


def python_files() -> list[Path]:
    return [path for tree in PYTHON_TREES for path in sorted((ROOT / tree).rglob("*.py"))]


# ---- the reference tests -------------------------------------------------------------------------


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_references_resolve(path):
    assert check_page(path) == []


def test_python_comments_and_docstrings_name_existing_files():
    problems = [problem for path in python_files() for problem in check_python_file(path)]
    assert problems == []


BROKEN_DOC = """# Title

## A section

[fine](#a-section) [missing anchor](#no-such-section) [missing file](no-such-page.md)
[missing anchor in another file](good.md#nowhere) [fine too](good.md#its-heading)

See `docs/no-such-file.md`, `relayout.py` and `ditf_pipeline/no_such_module.py`; `pyproject.toml` exists.
As README "No Such Section" says.

```bash
ditf extract --model flux --no-such-option 3
ditf no-such-command --help
```
"""


def test_checker_fails_on_broken_references(tmp_path, monkeypatch):
    """Each kind of false reference is reported; the true ones are not."""
    pages = tmp_path / "docs"
    pages.mkdir()
    (pages / "good.md").write_text("# Its heading\n", encoding="utf-8")
    doc = pages / "broken.md"
    doc.write_text(BROKEN_DOC, encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "DOCS", pages)
    monkeypatch.setattr(sys.modules[__name__], "tracked_files", lambda: ("pyproject.toml", "docs/good.md"))
    (tmp_path / "pyproject.toml").write_text("", encoding="utf-8")
    (tmp_path / "README.md").write_text("# ditf\n\n## Install\n", encoding="utf-8")
    problems = "\n".join(check_page(doc))
    for expected in ("'#no-such-section': no heading", "'no-such-page.md': no such file",
                     "'good.md#nowhere': no heading", "`docs/no-such-file.md` names no file", "`relayout.py` names no file",
                     "`ditf_pipeline/no_such_module.py` names no file", "'No Such Section'",
                     "has no option --no-such-option", "`ditf no-such-command`: no such command"):
        assert expected in problems, expected
    assert "#a-section" not in problems and "its-heading" not in problems and "pyproject" not in problems
    assert len(problems.splitlines()) == 9

    module = tmp_path / "module.py"
    module.write_text('"""Laid out as docs/protocols.md says (README "Install" too)."""\n'
                      '# generated by relayout.py; see README "Scale"\n', encoding="utf-8")
    problems = "\n".join(check_python_file(module))
    assert "names docs/protocols.md" in problems and "names relayout.py" in problems
    assert "'Scale'" in problems and "'Install'" not in problems


def test_docs_links_leave_no_page_outside_docs(tmp_path, monkeypatch):
    pages = tmp_path / "docs"
    pages.mkdir()
    (tmp_path / "other.md").write_text("# Other\n", encoding="utf-8")
    doc = pages / "page.md"
    doc.write_text("[out](../other.md)\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "DOCS", pages)
    assert "leaves docs/" in "\n".join(check_links(read_page(doc)))


# ---- code blocks as tests ------------------------------------------------------------------------


def _smooth_image(seed: int, size: tuple[int, int]):
    import numpy as np
    from PIL import Image

    small = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def _two_images(monkeypatch) -> None:
    _smooth_image(2, (96, 64)).save("cat.png")
    _smooth_image(3, (80, 80)).save("dog.png")


def _spair_demo(monkeypatch) -> None:
    """A generated SPair-71k at data/SPair-71k; blocks of one pair, so worker processes match too."""
    from ditf_pipeline.demo import make_spair_demo
    from ditf_pipeline.match import predict as predict_module

    make_spair_demo(Path("data/SPair-71k"), categories=("cat",), pairs_per_category=2)
    monkeypatch.setattr(predict_module, "BLOCK", 1)
    monkeypatch.setattr(predict_module, "POOL_MIN_PAIRS", 1)


def _cache_written(namespace: dict) -> None:
    assert Path("cache.zarr").is_dir()


def _scores_of_both_variants(namespace: dict) -> None:
    assert [r["variant"] for r in namespace["scores"]] == ["raw", "adaln+cd"]


@dataclass(frozen=True)
class Setup:
    """What a marked block needs before it runs, and what must hold after it ran."""

    prepare: Callable | None = None
    check: Callable[[dict], None] | None = None


SETUPS = {
    "none": Setup(),
    "images": Setup(_two_images, _cache_written),
    "spair-demo": Setup(_spair_demo, _scores_of_both_variants),
}


def marked_blocks() -> list:
    params = []
    for path in markdown_files():
        for block in read_page(path).blocks:
            if block.marker == "test":
                marks = [pytest.mark.slow] if "slow" in block.options else []
                params.append(pytest.param(block, id=block.name, marks=marks))
    return params


def _setup_of(block: Block) -> Setup:
    names = [option.split("=", 1)[1] for option in block.options if option.startswith("setup=")]
    unknown = [option for option in block.options if option != "slow" and not option.startswith("setup=")]
    assert not unknown, f"{block.name}: unknown marker options {unknown}"
    assert len(names) <= 1 and all(name in SETUPS for name in names), f"{block.name}: setup must be one of {sorted(SETUPS)}"
    return SETUPS[names[0] if names else "none"]


@pytest.mark.parametrize("block", marked_blocks())
def test_marked_code_block_runs(block, tmp_path, monkeypatch):
    setup = _setup_of(block)
    monkeypatch.chdir(tmp_path)
    if setup.prepare:
        setup.prepare(monkeypatch)
    namespace: dict = {}
    if block.lang == "python":
        exec(compile(block.code, block.name, "exec"), namespace)
    elif block.lang in ("bash", "sh"):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    else:
        pytest.fail(f"{block.name}: a `{block.lang}` block cannot run as a test")
    if setup.check:
        setup.check(namespace)


def test_every_python_example_is_marked():
    """A Python block either runs as a test or says why not: no example silently stops running."""
    unmarked = [block.name for path in markdown_files() for block in read_page(path).blocks
                if block.lang == "python" and block.marker is None and path.parent != ROOT / "stores"]
    assert unmarked == []


def test_the_readme_examples_are_tested():
    """The README's Python calls are among the tests (the quick start promises they work)."""
    readme = [block for block in read_page(ROOT / "README.md").blocks if block.lang == "python"]
    assert readme and all(block.marker == "test" for block in readme)
