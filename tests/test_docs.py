"""Rules for the project's own text, read from the files.

No file names an internal work-round ("issue 12", "session 19"): a reader
outside the team cannot look those up, and the text should say what it means
instead. References to other projects' trackers (`owner/repo#N`, URLs) are
fine. benchmarks/RESULTS.md opens with a table of contents, one entry per
topic (`##` heading), and every section with a table says when it was
measured.
"""

import os
import re

import pytest

from tests import test_layout

ROOT = test_layout.ROOT
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")

_TEXT = (".md", ".py", ".sh", ".sbatch", ".ipynb")
_INTERNAL = re.compile(
    r"\b(?:issues?|sessions?|rounds?)\s*#?\d+(?:\.\d+)*"
    r"|\b(?:this|last|previous|next) session\b", re.IGNORECASE)
# External references, removed from a line before it is checked: another
# project's tracker is a reference anyone can follow.
_EXTERNAL = (
    re.compile(r"\bhttps?://\S+"),                     # any URL
    re.compile(r"\b[\w.-]+/[\w.-]+#\d+"),              # owner/repo#N
    re.compile(r"\b[\w.-]+/[\w.-]+ issues? #?\d+", re.IGNORECASE),
)


def _internal_mentions(line: str) -> list[str]:
  for pattern in _EXTERNAL:
    line = pattern.sub("", line)
  return [m.group(0) for m in _INTERNAL.finditer(line)]


@pytest.mark.parametrize("line, found", [
    ("## Issue 12: does it fit?", ["Issue 12"]),
    ("measured in session 19, idle", ["session 19"]),
    ("laid out once (issue 17.8).", ["issue 17.8"]),
    ("Issues 13 and 14", ["Issues 13"]),
    ("With `Sampler.prepare` (this session's fix)", ["this session"]),
    ("see round #3", ["round #3"]),
    ("local files only (google/array_record#120)", []),
    ("[#120](https://github.com/google/array_record/issues/120)", []),
    ("google/array_record issue 120 says so", []),
    ("round(x, 2) and a JSON round trip", []),
    ("the issue's targets; an HTTP session", []),
])
def test_the_check_tells_internal_from_external(line, found):
  assert _internal_mentions(line) == found


def test_no_text_names_an_internal_work_round():
  here = os.path.abspath(__file__)
  bad = []
  for _, path, text in test_layout._project_files(_TEXT):  # pylint: disable=protected-access
    if path == here:
      continue
    for number, line in enumerate(text.splitlines(), 1):
      for mention in _internal_mentions(line):
        bad.append(f"{os.path.relpath(path, ROOT)}:{number}: {mention!r}")
  assert not bad, ("say what is meant instead of naming the work round:\n"
                   + "\n".join(bad))


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces
  to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.fixture(scope="module")
def results() -> str:
  with open(RESULTS, encoding="utf-8") as f:
    text = f.read()
  return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def test_results_open_with_a_contents_list_of_their_topics(results):
  preamble, _, _ = results.partition("\n## ")
  entries = re.findall(r"^- \[([^\]]+)\]\(#([^)\s]+)\)", preamble, re.M)
  topics = re.findall(r"^## (.+?)\s*$", results, re.M)
  assert topics, f"{RESULTS} has no ## topics"
  assert [title for title, _ in entries] == topics, (
      "the contents list before the first ## heading must name every ## "
      "topic, in order, one '- [Topic](#anchor): ...' line each")
  assert [anchor for _, anchor in entries] == [_slug(t) for t in topics]


def test_results_links_within_the_page_reach_a_heading(results):
  anchors = {_slug(h) for h in re.findall(r"^#{1,6} (.+?)\s*$", results, re.M)}
  broken = sorted(set(re.findall(r"\]\(#([^)\s]+)\)", results)) - anchors)
  assert not broken, broken


def test_results_sections_with_a_table_say_when(results):
  sections = re.split(r"^#{2,3} ", results, flags=re.M)[1:]
  undated = [s.splitlines()[0] for s in sections
             if re.search(r"^\|[-| ]+\|\s*$", s, re.M)
             and not re.search(r"\b20\d\d-\d\d-\d\d\b", s)]
  assert not undated, ("give each of these sections its measurement date "
                       f"(YYYY-MM-DD): {undated}")
