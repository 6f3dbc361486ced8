"""The documents against the code: every file, name and command READING.md cites exists, vfm.py's notation block
uses the guide's symbols, every relative link of the markdown files resolves (anchors included), and every example
line of experiments/study.py's --help is accepted by its parser and its checks."""

import ast
import glob
import importlib
import os
import re
import shlex

import pytest

from conftest import ROOT, one_line_error

GUIDE = os.path.join(ROOT, "READING.md")
MARKDOWN = ["README.md", "READING.md", *sorted(os.path.relpath(p, ROOT)
                                              for p in glob.glob(os.path.join(ROOT, "experiments", "*.md")))]
CITATION = re.compile(r"^(?P<path>[\w./-]+\.(?:py|md|json|png|gif|sh))(?::(?P<name>[\w.]+))?$")
OUTPUTS = ("runs/", "RUN/")  # what the cited commands write, not files of the repository
CODE_SPAN = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# the symbols of vfm.py's "Purrception in the paper's notation" block, which READING.md's symbol table lists too
NOTATION = ("c", "e_k", "z_t", "u_t(z_t)", "q_theta(c | z_t)", "pi_t^theta(z_t)", "mu_t(z_t)", "tau")


def spans(text):
    """The contents of the inline code spans of a markdown text, table escapes (`\\|`) undone."""
    return [s.replace("\\|", "|") for s in CODE_SPAN.findall(text)]


def citations(text):
    """(path, name or None) for every code span of the form `path` or `path:name`, outputs of commands left out."""
    found = [CITATION.match(s) for s in spans(text)]
    return [(m["path"], m["name"]) for m in found if m and not m["path"].startswith(OUTPUTS)]


def defines(path, dotted):
    """Whether the Python file defines `dotted`: a top-level function, class or assignment, or, as Class.name, a
    method, class attribute or `self.name = ...` of that class."""
    def assigned(node):  # the targets of an assignment, tuples unpacked
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        return [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]

    scope, parts = ast.parse(open(os.path.join(ROOT, path)).read()).body, dotted.split(".")
    for i, part in enumerate(parts):
        found = None
        for node in scope:
            if getattr(node, "name", None) == part or any(getattr(t, "id", None) == part for t in assigned(node)):
                found = node
            elif i > 0 and isinstance(node, ast.FunctionDef) and any(  # self.part = ... in a method
                    isinstance(a, ast.Attribute) and a.attr == part and getattr(a.value, "id", None) == "self"
                    for n in ast.walk(node) for a in assigned(n)):
                found = node
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


def test_the_guide_cites_only_files_and_names_that_exist():
    cited = citations(open(GUIDE).read())
    names = [(path, name) for path, name in cited if name]
    assert len(names) > 40 and ("vfm.py", "Purrception.posterior_mean") in names  # the parse found the tables
    missing = sorted({path for path, _ in cited if not os.path.exists(os.path.join(ROOT, path))})
    assert not missing, f"READING.md cites files that do not exist: {missing}"
    undefined = [f"{path}:{name}" for path, name in names if not defines(path, name)]
    assert not undefined, f"READING.md cites names that its files do not define: {undefined}"


def test_the_guides_commands_parse():
    """Each `python SCRIPT ARGS` of the guide: SCRIPT exists, and its parse_args accepts ARGS (a study subcommand
    also has its module in experiments/studies/)."""
    commands = [shlex.split(s)[1:] for s in spans(open(GUIDE).read()) if s.startswith("python ")]
    assert len(commands) >= 8
    for script, *argv in commands:
        assert os.path.exists(os.path.join(ROOT, script)), f"READING.md runs {script}, which does not exist"
        if script == "experiments/study.py":
            assert os.path.exists(os.path.join(ROOT, "experiments", "studies", argv[0] + ".py")), argv[0]
        importlib.import_module(script[:-3].replace("/", ".")).parse_args(argv)  # exits 2 on a bad flag


def test_vfm_notation_block_uses_the_guides_symbols():
    doc = importlib.import_module("vfm").__doc__
    block = doc[doc.index("Purrception in the paper's notation"):]
    symbols = {s for row in open(GUIDE).read().split("## Symbols", 1)[1].splitlines() if row.startswith("| `")
               for s in spans(row.split(" | ")[0])}
    for symbol in NOTATION:
        assert symbol in block, f"vfm.py's notation block does not write {symbol}"
        assert any(symbol in s for s in symbols), f"READING.md's symbol table has no {symbol}"


def slug(heading):
    """GitHub's anchor of a markdown heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
    seen, out = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


@pytest.mark.parametrize("doc", MARKDOWN)
def test_relative_links_resolve(doc):
    path = os.path.join(ROOT, doc)
    text = re.sub(r"```.*?```", "", open(path).read(), flags=re.S)
    text = CODE_SPAN.sub("", text)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(linked) or (anchor and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{doc}: links that do not resolve: {broken}"


def study_examples():
    from experiments import study
    lines = [line.strip() for line in study.__doc__.splitlines() if line.strip().startswith("python experiments/")]
    return [shlex.split(line.split("#")[0])[2:] for line in lines]


@pytest.mark.parametrize("argv", study_examples(), ids=" ".join)
def test_study_help_examples_are_accepted(argv, tmp_path, capsys):
    """Each example of `python experiments/study.py --help` parses; one that names files passes every check of its
    flags and stops only at the first of those files, here missing. The toy examples are run by test_study.py."""
    from experiments import study
    argv, files = list(argv), False
    for i, flag in enumerate(argv[:-1]):
        if flag in ("--ckpt", "--dfm-ckpt", "--codes", "--data-dir", "--classifier"):
            argv[i + 1] = ",".join(str(tmp_path / "missing" / p.replace("/", "_")) for p in argv[i + 1].split(","))
            files = True
    study.parse_args(argv)
    if not files:
        return
    line = one_line_error(capsys, study.main, argv + ["--budget", "tiny", "--out", tmp_path / "out"])
    assert f"error: {tmp_path / 'missing'}" in line, line


def test_markdown_cites_this_repos_code_by_name():
    """No document cites this repository's files by line number (the authors' files at a fixed commit may be), and
    a name cited beside one of its Python files, as `file.py` `name`, is defined there."""
    for doc in MARKDOWN:
        text = open(os.path.join(ROOT, doc)).read()
        by_line = [m[0] for m in re.finditer(r"`([\w./-]+)` l\.\d+|\b(?:preset|README) l\.\d+", text)
                   if m[1] is None or os.path.exists(os.path.join(ROOT, m[1]))]
        assert not by_line, f"{doc} cites this repository by line number: {by_line}"
        for path, name in re.findall(r"`([\w./-]+\.py)` `([\w.]+)`", text):
            if os.path.exists(os.path.join(ROOT, path)):
                assert defines(path, name), f"{doc} cites {path} {name}, which {path} does not define"
