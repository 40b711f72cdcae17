"""The results report: pytest-benchmark JSON -> results file -> Markdown table and PNG (no timing here)."""

import json

import report


def _bench(name, group, impl, median, **extra):
    return {"name": name, "group": group, "stats": {"median": median, "mean": median, "min": median,
                                                    "stddev": 0.0, "rounds": 3},
            "extra_info": {"impl": impl, "op": "x", **extra}}


def test_collect_and_render(tmp_path):
    raw = {"benchmarks": [
        _bench("a", "attention fwd", "torch", 0.02, peak_bytes=2**21),
        _bench("b", "attention fwd", "cpu", 0.01),
        _bench("c", "attention fwd", "sdpa", 0.016),
        _bench("d", "train", "all", 3.0, per_impl_median_s={"reference": 2.0, "gptfast-dropin": 1.0},
               per_impl_tokens_per_s={"reference": 256.0, "gptfast-dropin": 512.0},
               speedup_per_round={"reference": [1.0, 1.0, 1.0], "gptfast-dropin": [1.9, 2.2, 2.05]},
               speedup_median_of_rounds={"reference": 1.0, "gptfast-dropin": 2.05}),
    ]}
    (tmp_path / "raw.json").write_text(json.dumps(raw))
    out = tmp_path / "results" / "r.json"
    assert report.main(["collect", str(tmp_path / "raw.json"), str(tmp_path / "missing.json"), "--out", str(out),
                        "--command", "pytest x", "--note", "shared"]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"] == "pytest x" and "torch" in doc["environment"]
    assert len(doc["results"]) == 6 and doc["unreadable_inputs"]  # 4 benchmarks + 2 expanded variants
    rows = {(r["group"], r["impl"]): r for r in report.speedups(doc["results"])}
    assert rows[("attention fwd", "cpu")]["vs_torch"] == 2.0
    assert rows[("attention fwd", "cpu")]["vs_best_plain"] == 1.6
    assert rows[("train per variant", "gptfast-dropin")]["vs_torch"] == 2.0
    assert report.main([str(out)]) == 0
    md = out.with_suffix(".md").read_text()
    assert "| attention fwd | cpu | 10.000 | 2.00x | 1.60x |" in md and "512 tok/s" in md and "2.0 |" in md
    assert "per round vs reference 1.90x, 2.20x, 2.05x (median 2.05x)" in md
    assert out.with_suffix(".png").stat().st_size > 1000


def test_render_without_results(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err
    try:
        report.latest_results(tmp_path)
    except FileNotFoundError as exc:
        assert "no results JSON" in str(exc)
    else:
        raise AssertionError("an empty results folder must raise FileNotFoundError")


def test_per_implementation_values_of_interleaved_benchmarks_are_rendered():
    # run_interleaved records e.g. peak_bytes as {impl: value}: each value gets the column's format
    assert report._fmt({"reference": 2 * 2**20, "gptfast": 2**19}, ".1f", 1 / 2**20) == "reference 2.0, gptfast 0.5"
    assert report._fmt(None, ".1f") == "" and report._fmt(1.5, ".2f") == "1.50"


def test_rows_with_per_implementation_rates_render():
    doc = {"results": [{"group": "qwen3-b1-fp32", "impl": "reference and gptfast, interleaved", "median_s": 30.0,
                        "tokens_per_s": {"reference": 3.6, "gptfast": 5.6},
                        "gb_per_s": {"reference": 8.59, "gptfast": 13.35}}]}
    md = report.markdown(doc)
    assert "reference 3.6, gptfast 5.6 tok/s" in md and "reference 8.6, gptfast 13.3 GB/s" in md
