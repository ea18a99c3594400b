"""Every sweep recipe in pipelines/ parses, has points, places each of the paper's numbers on a
point, and opens with a comment block. Nothing on disk is read but the recipes: `load_recipe`
only substitutes and checks, so the dataset variables can point at paths that do not exist."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from vermouth_cache.sweep.recipe import load_recipe
from vermouth_cache.sweep.run import paper_for

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
RECIPES = sorted(PIPELINES.glob("*.yaml"))
PREDEFINED = {"BUNDLED", "RECIPE_DIR"}  # load_recipe sets these itself
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _variables(path: Path, root: Path) -> dict[str, str]:
    names = set(_VAR.findall(path.read_text())) - PREDEFINED
    return {name: str(root / name.lower()) for name in sorted(names)}


def test_there_are_recipes():
    assert len(RECIPES) >= 7, [p.name for p in RECIPES]


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_parses_and_places_every_paper_number(path, tmp_path):
    recipe = load_recipe(path, variables=_variables(path, tmp_path / "data"))
    assert recipe.points, f"{path.name}: no points"
    # paper_for returns values, not entries, and two entries may share a value (Table 5: IN-1K
    # 42.08 twice): tag each entry with its index so that the union names entries exactly.
    tagged = dataclasses.replace(recipe, paper=[{**item, "value": i} for i, item in enumerate(recipe.paper)])
    placed = {hit["value"] for point in tagged.points for hit in paper_for(tagged, point)}
    missing = [item for i, item in enumerate(recipe.paper) if i not in placed]
    assert not missing, f"{path.name}: paper entries no point reproduces: {missing}"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_paper_numbers_name_a_scored_set(path, tmp_path):
    """A run scores a fewshot or sbir dataset under its own label, a segmentation run only its
    eval sets: a paper entry on a segmentation TRAINING label would never reach the report."""
    recipe = load_recipe(path, variables=_variables(path, tmp_path / "data"))
    scored = set()
    for d in recipe.datasets.values():
        scored |= {label for label, _ in d.evals()} if d.task == "seg" else {d.label}
    for item in recipe.paper:
        assert item["dataset"] in scored, f"{path.name}: paper entry on {item['dataset']!r}, which no run scores"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_opens_with_a_comment_block(path):
    lines = path.read_text().splitlines()
    head = []
    for line in lines:
        if not line.startswith("#"):
            break
        head.append(line)
    assert len(head) >= 5, f"{path.name}: expected a leading comment block, got {len(head)} comment lines"
    text = "\n".join(head)
    assert "vermouth-cache sweep pipelines/" in text, f"{path.name}: the comment block gives no command line"


def test_the_command_line_sets_every_variable_the_recipe_uses():
    """Each ${VAR} of a recipe's body appears as --set VAR=... in its comment block."""
    for path in RECIPES:
        text = path.read_text()
        body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        used = set(_VAR.findall(body)) - PREDEFINED
        documented = set(re.findall(r"--set ([A-Z_][A-Z0-9_]*)=", text))
        assert used <= documented, f"{path.name}: {sorted(used - documented)} used but no --set in the comment"

