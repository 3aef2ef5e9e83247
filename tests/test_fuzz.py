"""prepare under random input, bounded and seeded (`make fuzz` runs the same for minutes)."""

from fuzz_prepare import fuzz


def test_prepare_never_fails_on_random_rows_and_accounts_for_every_one():
    totals = fuzz(seed=0, cases=40)
    assert totals["cases"] == 40
    assert totals["rows"] == totals["kept"] + sum(n for k, n in totals.items() if k not in ("cases", "rows", "kept"))
    # The generator reaches the interesting reasons, not only unparseable lines.
    assert {"non-string content", "text is not valid Unicode (a lone surrogate)", "missing or unknown role",
            "non-UTF-8 text", "unparseable line", "no known chat shape"} <= set(totals)
