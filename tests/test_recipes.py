"""recipes.py: the recipes by name, what an explicit flag and an implicit default each beat."""
import pytest

from checks import UserError
from recipes import RECIPES, parse_args


def test_recipes_by_name_and_implicit_defaults(tmp_path):
    assert (parse_args([]).lr, parse_args([]).dim, parse_args([]).builtin) == (2e-3, 256, "tasks")
    paper = parse_args(["--init", str(tmp_path)])
    assert (paper.lr, paper.batch_size, paper.epochs) == (5e-5, 128, 3)
    assert vars(parse_args(["--recipe", "demo"])) == vars(parse_args([]))
    fig4 = parse_args(["--recipe", "fig4"])
    for k, v in RECIPES["fig4"].items():
        assert getattr(fig4, k) == v, k
    # an explicit flag beats the recipe, and the recipe beats the implicit one
    mine = parse_args(["--recipe", "fig4", "--dim", "64", "--epochs", "2", "--builtin", "tasks", "--init",
                       str(tmp_path)])
    assert (mine.dim, mine.epochs, mine.builtin, mine.n_layers) == (64, 2, "tasks", RECIPES["fig4"]["n_layers"])
    with pytest.raises(UserError, match="--builtin-size"):
        parse_args(["--builtin-size", "1"])
