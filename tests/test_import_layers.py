"""The layers of the package (README, "The repository"): the three stages import only the contracts below them
(store/, sae/, images/ and the small shared modules), never each other; the contracts import no stage."""

import ast
from pathlib import Path

import visionsae

PACKAGE = Path(visionsae.__file__).parent
SHARED = {"errors", "faults", "locks", "runs", "atomic", "device", "cli_options"}  # single modules every layer may use
ALLOWED = {
    "extract": {"store", "images"},
    "train": {"store", "sae"},
    "evaluate": {"store", "sae", "images"},
    "store": set(), "sae": set(), "images": set(),
}


def _imported(path: Path) -> set[str]:
    """First-level visionsae subpackages or modules that a file imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        out |= {n.split(".")[1] for n in names if n.startswith("visionsae.")}
    return out


def test_no_layer_imports_above_itself():
    wrong = []
    for part, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / part).rglob("*.py")):
            for name in _imported(path) - allowed - SHARED - {part}:
                wrong.append(f"{path.relative_to(PACKAGE)} imports visionsae.{name}")
    assert not wrong, wrong
