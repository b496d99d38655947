"""``memtrain bench whitening`` (memtrain/bench/whitening.py): the parts of SWAN's direction are timed and each
root's distance from the exact polar factor is right: more Newton–Schulz steps come closer, the eigh root is the
k → ∞ limit, and the default k=10 row is what ``swan`` computes."""
import torch

from memtrain.bench import whitening
from memtrain.optim.swan import standardize, unit_rms, whiten


def test_whitening_bench_on_llama_tiny(tmp_path):
    out = tmp_path / "w.md"
    result = whitening.main(["--model", "llama-tiny", "--out", str(out)])
    rows, distances = result["rows"], result["distances"]
    assert {tuple(r["shape"]) for r in rows} == {(128, 128), (352, 128), (128, 352)}
    assert all(len(d) == 4 * 7 for d in distances.values())  # every hidden matrix of llama-tiny's 4 layers
    for r in rows:
        roots = r["roots"]
        assert all(v["ms"] > 0 for v in roots.values()) and r["gram_ms"] > 0
        assert roots["newton-schulz k=20"]["distance"] < roots["newton-schulz k=5"]["distance"]
        # the exact root: close (the damping's own effect, ~1e-3 here), far closer than 5 steps
        assert roots["eigh (exact root)"]["distance"] < min(1e-2, roots["newton-schulz k=5"]["distance"] / 10)
    # each row's distance is its matrix's entry in the all-matrix list
    first = next(i for i, (name, _) in enumerate(whitening._gradients("llama-tiny", 0)) if name == rows[0]["matrix"])
    quintic = "quintic 3 + newton-schulz 3"
    assert rows[0]["roots"][quintic]["distance"] == distances[quintic][first]
    assert out.read_text().splitlines()[1] == f"`memtrain bench whitening --model llama-tiny --out {out}`"


def test_distance_is_that_of_swans_own_direction():
    torch.manual_seed(0)
    g = torch.randn(48, 24)
    x = standardize(g)
    polar = whitening.polar_factor(x)  # x·1 = 0: rank 23, its null direction left out
    assert torch.linalg.matrix_rank(polar) == 23
    z = whitening.whitening_root(x.mT @ x, steps=10, damping=1e-6, deflate=True)
    torch.testing.assert_close(x @ z, whiten(x), rtol=0, atol=0)
    exact = whitening._eigh_root(x.mT @ x, 1e-6, True)
    assert ((unit_rms((x @ exact).double()) - polar).norm() / polar.norm()) < 1e-5


def test_a_diverged_root_is_counted_not_averaged():
    result = {"rows": [{"matrix": "w", "shape": [4, 2], "side": "right", "gradnorm_ms": 1.0, "gram_ms": 1.0,
                        "apply_ms": 1.0, "rescale_ms": 1.0,
                        "roots": {whitening.DEFAULT: {"ms": 2.0, "distance": 0.1}, "b": {"ms": 1.0, "distance": 0.3}}}],
              "distances": {whitening.DEFAULT: [0.1, 0.3, 0.2], "b": [float("nan"), 0.3, float("inf")]}}
    page = whitening.markdown(result, {"model": "m", "command": "c", "torch": "t", "threads": 1})
    assert f"| {whitening.DEFAULT} | 2.00 | 2.00e-01 | 3.00e-01 | 0 of 3 |" in page
    assert "| b | 1.00 | 3.00e-01 | 3.00e-01 | 2 of 3 |" in page
