"""The architecture, as rules a change cannot break silently: no module imports another's private names, every module
says what it is for, and the layout of docs/architecture.md names every module. (ruff and the import-linter contracts of
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
    """The layout of docs/architecture.md draws the package: every module and subpackage of hf_collapse appears."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    layout = page[page.index("## Layout") :]
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
    assert absent == [], f"the layout of docs/architecture.md does not show {absent}"
    assert hf_collapse.__version__


def test_every_job_and_tlc_take_their_budget_from_one_dataclass_checked_by_budget_alone():
    """The budget flags are declared once (BudgetArguments), by every job and TLCConfig alike, and one checker words
    every refusal (the command names the flag)."""
    import dataclasses

    import pytest

    from hf_collapse.budget import BUDGET_FIELDS, BudgetArguments
    from hf_collapse.commands.lacoot import LaCoOTJobArguments
    from hf_collapse.commands.prune import PruneJobArguments
    from hf_collapse.commands.tlc import TLCJobArguments
    from hf_collapse.tlc import TLCConfig

    for owner in (LaCoOTJobArguments, PruneJobArguments, TLCJobArguments, TLCConfig):
        assert issubclass(owner, BudgetArguments), owner
        assert {f.name for f in dataclasses.fields(owner)} >= set(BUDGET_FIELDS), owner
    for owner in (LaCoOTJobArguments, TLCConfig):
        with pytest.raises(ValueError, match=r"^max_metric_ratio must be >= 1 \(the metric may get this many times"):
            owner(max_metric_ratio=0.5)
    assert TLCConfig(num_units=2, flops_fraction=0.8).budget().to_dict() == {"num_units": 2, "flops_fraction": 0.8}
