"""The code blocks of README.md and docs/*.md that claim to run, run; the README's first screen
holds what a newcomer needs; links between the pages resolve (issue 24).

Convention: a fenced block whose opening line comes right after a line ``<!-- runs -->`` (text may
follow ``runs``: ``<!-- runs: why -->``) runs; other blocks are illustrations (``...train...``,
a data path, a GPU). The marked ``python`` blocks of one file run in file order in one namespace,
as a reader pasting them one after another would run them, here in the test process: the
suite's modelled timer (``conftest.py``) stands in for the backend's measurements, so what a
block asserts does not hang on how busy the machine is. Blocks run as written: the examples
themselves are CPU-sized, nothing here shrinks them.

The README's first screen (at most 60 lines before its first link into ``docs/``) holds the two
set-up commands, the runnable example and the measured result; its test command is the one CI
runs (``.ci/run``).
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
FIRST_SCREEN_LINES = 60
MARK = re.compile(r"^<!--\s*runs\b.*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")


def runnable_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line number of the code's first line, language, code)`` of every marked block."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if not MARK.match(line.strip()):
            continue
        opening = FENCE.match(lines[i + 1].strip()) if i + 1 < len(lines) else None
        if opening is None:
            raise ValueError(f"line {i + 1}: '<!-- runs -->' must be followed directly by a fenced code block")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"line {i + 2}: the marked code block is never closed")
        blocks.append((i + 3, opening.group(1), "\n".join(lines[i + 2:end]) + "\n"))
    return blocks


def test_marked_blocks_are_found_and_others_left_alone():
    text = "\n".join([
        "<!-- runs -->", "```python", "a = 1", "```",
        "```python", "not run", "```",
        "<!-- runs: needs a -->", "```python", "assert a == 1", "```",
    ])
    assert runnable_blocks(text) == [(3, "python", "a = 1\n"), (10, "python", "assert a == 1\n")]
    with pytest.raises(ValueError, match="must be followed directly"):
        runnable_blocks("<!-- runs -->\n\n```python\nx\n```")


def test_the_readme_first_example_is_marked():
    blocks = runnable_blocks((ROOT / "README.md").read_text())
    assert blocks and 'torch.compile(model, backend="sparse")' in blocks[0][2]


# Only the pages that mark a block (a page of prose alone has nothing to run, and no skipped test).
WITH_EXAMPLES = [path for path in DOCS if runnable_blocks(path.read_text())]


def test_the_readme_and_the_usage_pages_have_running_examples():
    assert {"README.md", "inference.md", "training.md"} <= {path.name for path in WITH_EXAMPLES}


@pytest.mark.parametrize("path", WITH_EXAMPLES, ids=lambda path: str(path.relative_to(ROOT)))
def test_marked_examples_run(path, fresh_compiler, capsys):
    blocks = runnable_blocks(path.read_text())
    namespace = {"__name__": "__main__"}
    for line, language, code in blocks:
        assert language == "python", f"{path.name}:{line}: only python blocks can run, not {language!r}"
        # Tracebacks name the file and its line: compile() with the line offset.
        exec(compile("\n" * (line - 1) + code, str(path), "exec"), namespace)  # noqa: S102 - our own docs
    assert "linear layers run as BSR" in capsys.readouterr().out or path.name != "README.md"


def _first_docs_link(lines: list[str]) -> int:
    """Index of the first README line that links into docs/."""
    return next(i for i, line in enumerate(lines) if re.search(r"\]\(docs/", line))


def test_the_readme_first_screen_holds_the_commands_the_example_and_the_result():
    lines = (ROOT / "README.md").read_text().splitlines()
    first_link = _first_docs_link(lines)
    assert first_link <= FIRST_SCREEN_LINES, f"{first_link} lines before the first link to docs/"
    screen = lines[:first_link]
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command.endswith("-m pytest") and ci_command in screen  # CI runs the README's test command
    assert ci_command.replace("-m pytest", "-m benchmarks.vit") in screen  # the main job, same set-up
    example = runnable_blocks("\n".join(lines))[0]
    assert example[0] <= first_link
    # The measured result on the CPU machine kind: a headline speedup of the committed results file.
    results = (ROOT / "benchmarks" / "results" / "cpu-issue21-targets.md").read_text()
    verdicts = re.findall(r"^verdict: .*?: (\d+\.\d+x) dense torch.compile", results, re.MULTILINE)
    assert verdicts, "the results file holds no verdict line"
    assert "benchmarks/results/cpu-issue21-targets.md" in "\n".join(screen)
    assert any(speedup in "\n".join(screen) for speedup in verdicts), verdicts


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    in_code, anchors = False, set()
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.parametrize("path", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve(path):
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: link to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{path.name}: link to {target}, no such heading"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, f"docs/{page.name} is not linked from the README"
