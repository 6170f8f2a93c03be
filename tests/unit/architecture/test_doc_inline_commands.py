"""Every command README.md and docs/*.md write inline in prose names what vmgrid ships, as written.

Command blocks are run by tests (test_doc_commands_marked.py checks each names its test); this checks the commands
written inline, in a code span of the prose. The rule: an inline command is a code span (`...`; it may wrap across
the lines of one paragraph; `\\|` in a table cell reads `|`) outside fenced blocks, indented blocks and HTML
comments whose text, after an optional `sudo ` or `$ ` and environment assignments (`VMGRID_NODE=URL `), starts with

- `vmgrid WORD`, `.venv/bin/vmgrid WORD` or `python3 -m client.cli WORD` (WORD begins with a letter or `-`: the
  bare name `vmgrid`, a message `vmgrid: ...`, names such as `vmgrid.context=` or `vmgrid-user` are not commands):
  parsed by vmgrid's own parser (client.cli.build_parser, as client.cli.main builds it), so a renamed or missing
  subcommand, a renamed option (written in full: the parser's abbreviations are not taken) or a wrong choice fails
  here; `vmgrid serve`'s SERVICE words, which the parser takes as any word, must be services it builds;
- `./run.sh WORD` or `run.sh WORD`: WORD must be an arm of run.sh's `case`; `demo`'s words are parsed as `vmgrid demo`
  (run.sh execs it with them), `test`'s paths under tests/ must exist;
- `bench/NAME.py` (a bench script's path, bare or with options), or a span that runs it with a Python
  (`.venv/bin/python`, `python3`, another tree's `.../.venv/bin/python`, after a wrapper such as `cd DIR && `): the
  whole span goes to tests/integration/test_doc_bench_commands.py's checker (the script exists, its --help names
  every option written, no `sudo`); the bare path alone, named in prose, must exist;
- `.venv/bin/python -m MODULE` or `python3 -m MODULE`: MODULE is a module of this checkout runnable with -m, and
  its --help names every option written (for pytest: every path under tests/ it is given exists).

What a command may leave to the reader, and how it is read:
- placeholders: a word in capitals (FILE, DIR, NAME, SERVICE…), `<key>`, a shell variable: accepted as any value;
  where the parser wants a choice or a number there, any choice (or 1) stands for it;
- `...` or `…` (before any `--`) elides the rest: the words before it must name subcommands, and every option
  written must be one of the subcommand's;
- `a|b`: each alternative is checked; `[...]` is an optional part, checked as if written; a pipe or redirection
  ends the command (`| head`); after `;`, `&&` or `||` a command starting with vmgrid is checked too;
- a command named without its required arguments (`vmgrid repo register`, `vmgrid vm migrate`) names the command:
  its subcommands and options are checked, the missing arguments are not an error.

tests/integration/test_doc_bench_commands.py reads the docs line by line: a bench command wrapped across two lines is
checked whole only here.

Not checked: a code span holding only options (`--overwrite`, `-o results`): it belongs to a command the prose names
around it; commands of other programs (`python -c pass`, `globus-url-copy`).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import itertools
import re
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

from client.cli import ALONE, build_parser

ROOT = Path(__file__).resolve().parents[3]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BENCH_CHECKER = ROOT / "tests/integration/test_doc_bench_commands.py"
PREFIX = r"(?:sudo |\$ )?(?:[A-Z_][A-Z0-9_]*=\S* )*"          # then environment assignments
KINDS = [
    ("vmgrid", re.compile(PREFIX + r"(?:vmgrid|\.venv/bin/vmgrid|python3? -m client\.cli) (?=[A-Za-z-])(?P<args>.*)$")),
    ("run.sh", re.compile(PREFIX + r"(?:\./)?run\.sh (?P<args>.+)$")),
    ("bench", re.compile(r"^(?:.*?(?<!\S)(?:\S*\.venv/bin/python|python3?) )?(?P<args>bench/[\w-]+\.py\b.*)$")),
    ("python -m", re.compile(PREFIX + r"(?:\.venv/bin/python|python3?) -m (?P<args>[\w.]+.*)$")),
]
PLACEHOLDER = re.compile(r"^(?:[A-Z][A-Z0-9_]*(?:=\S*)?(?:\.\.\.)?|<[^>]+>|\$\{?\w+\}?|\.\.\.)$")


# -- finding the inline commands ---------------------------------------------------------------------------------

def prose(doc_text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each paragraph of prose: fenced blocks, indented blocks, comments left out."""
    paragraphs, current, start, fence, comment = [], [], 0, None, False
    lines = doc_text.splitlines()

    def flush():
        if current:
            paragraphs.append((start, "\n".join(current)))
        current.clear()

    for n, line in enumerate(lines, 1):
        if fence:
            if line.lstrip().startswith(fence):
                fence = None
            continue
        m = re.match(r"^\s*(```+|~~~+)", line)
        if m:
            flush()
            fence = m.group(1)
            continue
        if comment or line.lstrip().startswith("<!--"):
            comment = "-->" not in line
            flush()
            continue
        if not line.strip() or (line.startswith("    ") and not current):
            flush()
            continue
        if not current:
            start = n
        current.append(line)
    flush()
    return paragraphs


def code_spans(doc_text: str) -> list[tuple[int, str]]:
    """(line number, text) of each inline code span of the prose, a wrapped one's lines joined by a space."""
    spans = []
    for start, text in prose(doc_text):
        for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, re.S):
            body = re.sub(r"\s*\n\s*", " ", m.group(2)).strip().replace("\\|", "|")
            spans.append((start + text.count("\n", 0, m.start()), body))
    return spans


def inline_commands(doc: Path) -> list[tuple[str, str, str]]:
    """(where: "docs/x.md:12", kind, the command as written) for each inline command of ``doc``."""
    name = doc.relative_to(ROOT).as_posix() if doc.is_relative_to(ROOT) else doc.name
    found = []
    for line, text in code_spans(doc.read_text()):
        for kind, pattern in KINDS:
            if pattern.match(text):
                found.append((f"{name}:{line}", kind, text))
                break
    return found


def all_inline_commands() -> list[tuple[str, str, str]]:
    return [c for doc in DOCS for c in inline_commands(doc)]


# -- checking a `vmgrid ...` command with vmgrid's own parser ----------------------------------------------------

@lru_cache(maxsize=None)
def parser_for(first: str) -> argparse.ArgumentParser:
    return build_parser(first if first in ALONE else None)


def subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


LIST_OPERATORS = {";", "&&", "||"}                      # the next command starts after these
END_OPERATORS = {"|", ">", ">>", "2>", "2>&1", "<"}     # the words after these are not vmgrid's


def words_of(args: str) -> list[list[str]]:
    """The words of each vmgrid command in ``args`` (the first, and one after `;`, `&&`, `||` that starts with
    vmgrid), each up to a pipe or redirection, once per combination of its `a|b` alternatives; `[`, `]` dropped,
    `…` read `...`. Raises ValueError for quotes that do not close."""
    words = shlex.split(args.replace("…", "...").replace("[", " ").replace("]", " "))
    commands, current = [], ["vmgrid"]
    for word in words + [";"]:
        if word in LIST_OPERATORS:
            if current and current[0] == "vmgrid":
                commands.append(list(itertools.takewhile(lambda w: w not in END_OPERATORS, current[1:])))
            current = []
        else:
            current.append(word)
    return [list(combination) for command in commands for combination in itertools.product(*[
        w.split("|") if "|" in w and not w.startswith("-") or re.fullmatch(r"-[\w-]+\|[\w|-]+", w) else [w]
        for w in command])]


def parse(words: list[str]) -> str | None:
    """None when vmgrid's parser takes ``words`` (placeholders as above), else what it says, without exiting."""
    if not words:
        return "no words"
    elided = "..." in words[:words.index("--")] if "--" in words else "..." in words
    problem = walk(words, elided)
    if problem or elided:
        return problem
    return full_parse(words, depth=0)


def walk(words: list[str], elided: bool) -> str | None:
    """The leading words name subcommands, and every option written is one of the last subcommand's."""
    parser, i = parser_for(words[0]), 0
    while i < len(words) and (subs := subparsers_of(parser)):
        word = words[i]
        if word == "..." or word.startswith("-"):
            break
        if word in subs:
            parser = subs[word]
        elif PLACEHOLDER.match(word):          # COMMAND: any subcommand; its options are not known here
            return None
        else:
            return f"{parser.prog}: no subcommand {word!r} (it has: {', '.join(subs)})"
        i += 1
    rest = words[i:words.index("--")] if "--" in words else words[i:]
    positionals, takes_value = [], False
    for word in rest:
        option = word.split("=")[0]
        if takes_value:
            takes_value = False
        elif option.startswith("-") and option not in ("-", "--") and not re.fullmatch(r"-\d+(\.\d+)?", option):
            action = parser._option_string_actions.get(option)
            if action is None:
                known = sorted(o for o in parser._option_string_actions if o not in ("-h", "--help"))
                return f"{parser.prog}: no option {option} (it has: {', '.join(known) or 'none'})"
            takes_value = action.nargs != 0 and "=" not in word
        else:
            positionals.append(word)
    names = NAMED_BY_VALUE.get(parser.prog)
    unknown = [w for w in positionals if names and w not in names() and not PLACEHOLDER.match(w)]
    return f"{parser.prog}: no {unknown[0]!r} (one of: {', '.join(names())})" if unknown else None


def service_names() -> tuple[str, ...]:
    """What `vmgrid serve` builds (its parser takes any word; services.container.assemble refuses the rest)."""
    from services.container.assemble import SERVICE_NAMES
    return SERVICE_NAMES


# subcommands whose positional words name things the parser does not list as choices, and what they may name
NAMED_BY_VALUE = {"vmgrid serve": service_names}


def full_parse(words: list[str], depth: int) -> str | None:
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            parser_for(words[0]).parse_args(words)
        return None
    except SystemExit as exc:
        if exc.code in (0, None):               # --help
            return None
        message = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exc.code}"
    if "the following arguments are required" in message:
        return None                             # a command named without its arguments
    bad = re.search(r"invalid (?:choice|(\w+) value): '(.*?)'(?: \(choose from (.*)\))?", message)
    if bad and depth < 8 and PLACEHOLDER.match(bad.group(2)) and bad.group(2) in words:
        k = words.index(bad.group(2))
        stand_ins = ast.literal_eval(f"[{bad.group(3)}]") if bad.group(3) else ["1"]
        if any(full_parse(words[:k] + [str(s)] + words[k + 1:], depth + 1) is None for s in stand_ins):
            return None
    return message


def check_vmgrid(args: str) -> str | None:
    for words in words_of(args):
        problem = parse(words)
        if problem:
            return problem
    return None


# -- run.sh, python -m, bench -----------------------------------------------------------------------------------

def run_sh_arms() -> set[str]:
    """The words run.sh's `case "$cmd" in` accepts (its catch-all `*` prints the usage and exits 2)."""
    text = (ROOT / "run.sh").read_text()
    case = text[text.index('case "$cmd" in'):text.index("esac")]
    return {w for arm in re.findall(r"^\s*([\w|]+)\)", case, re.M) for w in arm.split("|")}


def missing_test_paths(words: list[str]) -> list[str]:
    return [w for w in words if w.startswith("tests/") and not (ROOT / w.split("::")[0]).exists()]


def check_run_sh(args: str) -> str | None:
    words = shlex.split(args)
    arms = run_sh_arms()
    if words[0] not in arms:
        return f"run.sh has no subcommand {words[0]!r} (its case accepts: {', '.join(sorted(arms))})"
    if words[0] == "demo":
        assert 'vmgrid" demo "$@"' in (ROOT / "run.sh").read_text(), "run.sh demo no longer execs `vmgrid demo`"
        return check_vmgrid(shlex.join(["demo", *words[1:]]))
    missing = missing_test_paths(words[1:])
    return f"no such test path: {', '.join(missing)}" if missing else None


def check_python_m(args: str) -> str | None:
    module, *rest = shlex.split(args.replace("[", " ").replace("]", " "))
    if module == "pytest":
        missing = missing_test_paths(rest)
        return f"no such test path: {', '.join(missing)}" if missing else None
    if module == "client.cli":
        return check_vmgrid(shlex.join(rest))
    path = ROOT / module.replace(".", "/")
    source = path / "__main__.py" if (path / "__main__.py").is_file() else path.with_suffix(".py")
    if not source.is_file():
        return f"no module {module} runnable with -m in this checkout (no {path.relative_to(ROOT)}.py or __main__.py)"
    options = [w.split("=")[0] for w in rest if w.startswith("-")]
    if options:                                   # its own argparse --help names them (as the bench checker reads)
        assert "argparse" in source.read_text(), f"{module} has options written but no argparse to ask"
        usage = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", module, "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=120)
        unknown = [o for o in options if o not in usage.stdout]
        if usage.returncode or unknown:
            return f"python -m {module} --help: {'no option ' + ', '.join(unknown) if unknown else usage.stderr[-500:]}"
    return None


@lru_cache(maxsize=None)
def bench_checker():
    """tests/integration/test_doc_bench_commands.py, loaded by its path (the tests are not a package)."""
    spec = importlib.util.spec_from_file_location("doc_bench_commands_checker", BENCH_CHECKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_bench(where: str, command: str) -> str | None:
    if re.fullmatch(r"bench/[\w-]+\.py", command):           # a path named in prose, not run: it exists
        return None if (ROOT / command).is_file() else f"{command} does not exist"
    checker = bench_checker()
    try:
        checker.test_a_documented_bench_command_names_a_script_and_options_that_exist(where, command)
    except AssertionError as exc:
        return str(exc).splitlines()[0]
    return None


def problems_of(commands: list[tuple[str, str, str]]) -> list[str]:
    """"file:line: `command`: what is wrong" for each command found wrong."""
    scripts = {dict(KINDS)["bench"].match(text).group("args").split()[0] for _, kind, text in commands
               if kind == "bench" and not re.fullmatch(r"bench/[\w-]+\.py", text)}
    checker = bench_checker()
    with ThreadPoolExecutor(4) as pool:           # each script's --help is a process: start them together
        list(pool.map(lambda s: checker.usage_of(s) if (ROOT / s).is_file() else None, sorted(scripts)))
    problems = []
    for where, kind, text in commands:
        args = dict(KINDS)[kind].match(text).group("args")
        try:
            problem = {"vmgrid": check_vmgrid, "run.sh": check_run_sh, "python -m": check_python_m,
                       "bench": lambda _: check_bench(where, text)}[kind](args)
        except ValueError as exc:                   # shlex: quotes that do not close
            problem = f"not a shell command: {exc}"
        if problem:
            problems.append(f"{where}: `{text}`: {problem}")
    return problems


# -- the tests ---------------------------------------------------------------------------------------------------

def test_the_docs_have_inline_commands_of_every_kind():
    commands = all_inline_commands()
    kinds = {kind for _, kind, _ in commands}
    assert len(commands) >= 150 and kinds == {k for k, _ in KINDS}, (len(commands), kinds)


def test_every_inline_command_names_what_vmgrid_ships():
    problems = problems_of(all_inline_commands())
    assert not problems, "\n".join(problems)


def test_the_checker_reports_a_renamed_option_a_missing_subcommand_and_a_wrong_path(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("\n".join([
        "Run `vmgrid repo import DIR` and `vmgrid vm deploy --lifetme 60 IMAGE NAME`, then `vmgrid vm",
        "launch x`. Also `./run.sh tests`, `run.sh test tests/nowhere -q`, `vmgrid ca user|hots NAME`,",
        "`vmgrid: a message`, `VMGRID_NODE=URL vmgrid vm lst`, `vmgrid transfer ... --paralel 4 ...`,",
        "`vmgrid repo vos | head -3`, `vmgrid vm list --json ; vmgrid vm lst`,",
        "`vmgrid vm status \"x`,",
        "`.venv/bin/python -m guestd.nope`, `python3 -m guestd.image.build --forse` and `vmgrid serve nope`.",
        "",
        "```sh", "vmgrid nothing here", "```",
        "",
        "    vmgrid nor here",
        "",
        "<!-- `vmgrid nor in a comment` -->",
        "| `vmgrid ca user\\|host NAME` | `bench/bench_nothing.py --n 3` | `python -c pass` | `bench/gone.py` |", ""]))
    commands = inline_commands(doc)
    assert [(w, k) for w, k, _ in commands] == [
        ("x.md:1", "vmgrid"), ("x.md:1", "vmgrid"), ("x.md:1", "vmgrid"), ("x.md:2", "run.sh"), ("x.md:2", "run.sh"),
        ("x.md:2", "vmgrid"), ("x.md:3", "vmgrid"), ("x.md:3", "vmgrid"), ("x.md:4", "vmgrid"), ("x.md:4", "vmgrid"),
        ("x.md:5", "vmgrid"), ("x.md:6", "python -m"), ("x.md:6", "python -m"), ("x.md:6", "vmgrid"),
        ("x.md:15", "vmgrid"), ("x.md:15", "bench"), ("x.md:15", "bench")]
    problems = problems_of(commands)           # returns: argparse's exits are caught
    expected = ["x.md:1: `vmgrid vm deploy --lifetme 60 IMAGE NAME`: vmgrid vm deploy: no option --lifetme",
                "x.md:1: `vmgrid vm launch x`: vmgrid vm: no subcommand 'launch'",
                "x.md:2: `./run.sh tests`: run.sh has no subcommand 'tests'",
                "x.md:2: `run.sh test tests/nowhere -q`: no such test path: tests/nowhere",
                "x.md:2: `vmgrid ca user|hots NAME`: vmgrid ca: no subcommand 'hots'",
                "x.md:3: `VMGRID_NODE=URL vmgrid vm lst`: vmgrid vm: no subcommand 'lst'",
                "x.md:3: `vmgrid transfer ... --paralel 4 ...`: vmgrid transfer: no option --paralel",
                "x.md:4: `vmgrid vm list --json ; vmgrid vm lst`: vmgrid vm: no subcommand 'lst'",
                "x.md:5: `vmgrid vm status \"x`: not a shell command: No closing quotation",
                "x.md:6: `.venv/bin/python -m guestd.nope`: no module guestd.nope",
                "x.md:6: `python3 -m guestd.image.build --forse`: python -m guestd.image.build --help: no option --forse",
                "x.md:6: `vmgrid serve nope`: vmgrid serve: no 'nope' (one of: repository, authz, vmmanager, jobs)",
                "x.md:15: `bench/bench_nothing.py --n 3`: x.md:15: bench/bench_nothing.py does not exist",
                "x.md:15: `bench/gone.py`: bench/gone.py does not exist"]
    assert len(problems) == len(expected), "\n".join(problems)
    for line, want in zip(problems, expected):
        assert line.startswith(want), (want, line)
