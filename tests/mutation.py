"""`just mutants`' bookkeeping over mutmut's verdicts in mutants/ (docs/TESTING.md).

    python tests/mutation.py pending PREFIX...   the mutants of PREFIX... to test (again): all but the killed
                                                 and those tests/mutants-equivalent.txt lists
    python tests/mutation.py table PREFIX...     per module: mutants, killed, survived, equivalent, score;
                                                 then every survivor not listed as equivalent, with its hash

tests/mutants-equivalent.txt holds one line per equivalent survivor: its name, the first 8 hex digits of the
sha256 of the mutant's source as mutmut generated it, and why it changes nothing observable. A mutant whose
source has changed since (its function was edited, so the number may now name another change) no longer counts
as equivalent and is tested and shown again, marked stale.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
EQUIVALENT = ROOT / "tests" / "mutants-equivalent.txt"


def verdicts(prefixes: tuple[str, ...]) -> dict[str, dict[str, int | None]]:
    """{module: {mutant name: exit code or None}} of the modules under `prefixes` (`sitctl.data.`, `model.`)."""
    found = {}
    for meta in sorted(MUTANTS.rglob("*.py.meta")):
        module = ".".join(meta.relative_to(MUTANTS).with_suffix("").with_suffix("").parts)
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        mine = {name: code for name, code in codes.items() if name.startswith(prefixes)}
        if mine:
            found[module] = mine
    return found


@functools.cache
def mutant_hashes(module: str) -> dict[str, str]:
    """sha256 (8 hex digits) of each mutant function's source in mutants/, by mutant name."""
    path = MUTANTS / (module.replace(".", "/") + ".py")
    source = path.read_text()
    lines = source.splitlines(keepends=True)
    hashes = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name:
            text = "".join(lines[node.lineno - 1 : node.end_lineno]).strip()  # its def line to its last
            hashes[f"{module}.{node.name}"] = hashlib.sha256(text.encode()).hexdigest()[:8]
    return hashes


def equivalents() -> dict[str, tuple[str, str]]:
    """{name: (hash, reason)} from tests/mutants-equivalent.txt (blank lines and # comments skipped)."""
    listed = {}
    for line in EQUIVALENT.read_text().splitlines() if EQUIVALENT.is_file() else []:
        if line.strip() and not line.lstrip().startswith("#"):
            name, digest, reason = line.split(maxsplit=2)
            listed[name] = (digest, reason)
    return listed


def classify(module: str, codes: dict[str, int | None]) -> dict[str, str]:
    """Each mutant's outcome: killed, timeout (or crash), survived, equivalent, stale (listed, source changed), no tests,
    untested."""
    listed, hashes = equivalents(), mutant_hashes(module)
    outcome = {}
    for name, code in codes.items():
        status = status_by_exit_code[code]
        if status in ("killed", "timeout", "no tests"):
            outcome[name] = status
        elif status == "segfault":  # the tests' process crashed (or was killed): the mutant did not go unseen
            outcome[name] = "timeout"
        elif status == "not checked":
            outcome[name] = "untested"
        elif name in listed:
            outcome[name] = "equivalent" if listed[name][0] == hashes.get(name) else "stale"
        else:
            outcome[name] = "survived" if status == "survived" else status
    return outcome


def pending(prefixes: tuple[str, ...]) -> list[str]:
    names = []
    for module, codes in verdicts(prefixes).items():
        names += [name for name, status in classify(module, codes).items() if status not in ("killed", "timeout", "equivalent")]
    return names


def table(prefixes: tuple[str, ...]) -> str:
    rows = ["| Module | Mutants | Killed (timeouts, crashes) | Survived | Equivalent | Untested | Score |", "|---|---|---|---|---|---|---|"]
    left, untested = [], 0
    for module, codes in verdicts(prefixes).items():
        outcome = classify(module, codes)
        count = Counter(outcome.values())
        killed, equivalent = count["killed"] + count["timeout"], count["equivalent"]
        others = len(outcome) - killed - equivalent - count["untested"]
        score = killed / max(len(outcome) - equivalent, 1)
        rows.append(f"| `{module.replace('.', '/')}.py` | {len(outcome)} | {killed} ({count['timeout']}) | {others} | "
                    f"{equivalent} | {count['untested']} | {100 * score:.1f}% |")
        untested += count["untested"]
        hashes = mutant_hashes(module)
        left += [f"{status:9} {name} {hashes.get(name, '-')}" for name, status in outcome.items()
                 if status not in ("killed", "timeout", "equivalent", "untested")]
    note = ["untested mutants left: functions edited since mutmut last generated them get new mutants when it starts,",
            "after the list to test was made; run the recipe again to test them", ""] if untested else []
    return "\n".join(rows + [""] + note + (left or ["no surviving mutants"]))


if __name__ == "__main__":
    command, prefixes = sys.argv[1], tuple(sys.argv[2:])
    print("\n".join(pending(prefixes)) if command == "pending" else table(prefixes))
