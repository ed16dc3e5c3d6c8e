"""docs/results.md: every figure says where it comes from (its command, machine and commit)."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURE = re.compile(r"\d+\.\d+|\d+ ?%|\d+ (?:s|ms|min|GiB|img/s)\b")      # a measured number, not a count
COMMIT = re.compile(r"\b[0-9a-f]{7,40}\b")
COMMAND = re.compile(r"`[^`]*(?:python|bash|torchrun|pytest|\.py)[^`]*`")


def blocks(text):
    """[(context, [(line number, line)])] of results.md. The headline table's rows stand alone. After
    the first '## ', a block starts at a heading or at a paragraph that opens in bold, and its
    context is itself plus its section's heading and first paragraph, where a section names what
    all of its blocks share."""
    out, intro, intro_open = [], None, False
    for i, ln in enumerate(text.splitlines(), 1):
        if ln.startswith("## "):
            intro, intro_open = [ln], True
            out.append((intro, []))
        elif intro is None:
            if ln.startswith("|") and not ln.startswith("| **"):      # the headline table; not the machines'
                out.append(([ln], [(i, ln)]))
        elif ln.startswith("**"):
            intro_open = False
            out.append((intro, [(i, ln)]))
        else:
            out[-1][1].append((i, ln))
            if intro_open and ln.strip():
                intro.append(ln)
            elif intro_open and len(intro) > 1:
                intro_open = False
    return [(" ".join(ctx) + " " + " ".join(l for _, l in lines), lines) for ctx, lines in out]


def test_every_figure_in_the_results_names_its_command_machine_and_commit():
    text = open(os.path.join(ROOT, "docs", "results.md")).read()
    machines = re.findall(r"^\| \*\*([^*]+)\*\* \|", text, re.M)
    assert {"EPYC-2c", "EPYC512-2c", "H100"} <= set(machines)
    missing = []
    for ctx, lines in blocks(text):
        for i, ln in lines:
            if not FIGURE.search(re.sub(r"`[^`]*`", "", ln)) or set(ln) <= set("|-: "):
                continue
            lacks = [what for what, ok in (("machine", any(m in ctx for m in machines)),
                                           ("commit", COMMIT.search(ctx)), ("command", COMMAND.search(ctx))) if not ok]
            if lacks:
                missing.append(f"docs/results.md:{i} names no {' or '.join(lacks)}: {ln[:80]}")
    assert not missing, "\n".join(missing)


def test_the_check_catches_a_figure_without_its_origin():
    text = ("| **M1** | a machine | native |\n\n## A section\n\nMeasured on M1 at abc1234 (`python toy.py`).\n\n"
            "| a | 0.75 |\n\n**An aside**: it ran in 4.2 min.\n")
    flagged = [ln for ctx, lines in blocks(text) for _, ln in lines
               if FIGURE.search(ln) and not (COMMIT.search(ctx) and COMMAND.search(ctx))]
    assert flagged == []                                   # both inherit the section's first paragraph
    text = text.replace("Measured on M1 at abc1234 (`python toy.py`).", "Measured once.")
    flagged = [ln for ctx, lines in blocks(text) for _, ln in lines
               if FIGURE.search(ln) and not (COMMIT.search(ctx) and COMMAND.search(ctx))]
    assert flagged == ["| a | 0.75 |", "**An aside**: it ran in 4.2 min."]
