"""The architecture, as rules a change cannot break silently: no module imports another's private names, every module
says what it is for, and the README's layout names every module. (ruff and the import-linter contracts of
pyproject.toml, run by `make test`, check the style, the layers and the absence of import cycles.)"""

import ast
import re
from pathlib import Path

import hf_collapse

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hf_collapse"


def _modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(ROOT)): ast.parse(path.read_text(), str(path)) for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_no_module_imports_another_modules_private_names():
    crossings = []
    for path, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("hf_collapse")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    crossings.append(f"{path}:{node.lineno} imports {private} from {'.' * node.level}{node.module}")
    assert crossings == []


def test_every_module_says_what_it_is_for():
    missing = [path for path, tree in _modules().items() if not ast.get_docstring(tree)]
    assert missing == []


def test_the_readme_layout_names_every_module():
    """The README's layout section draws the package: every module and subpackage of hf_collapse appears in it."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    end = layout.find("\n## ", 4)
    layout = layout if end < 0 else layout[:end]
    named = set(re.findall(r"[\w/]+\.py|[\w]+/", layout))
    expected = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE)
        if relative.name in ("__init__.py", "__main__.py"):
            if relative.parent != Path("."):
                expected.add(f"{relative.parent.name}/")
            continue
        expected.add(relative.name)
    absent = sorted(name for name in expected if name not in named)
    assert absent == [], f"the README's layout does not show {absent}"
    assert hf_collapse.__version__
