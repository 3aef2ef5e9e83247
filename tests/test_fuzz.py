"""prepare under random input, bounded and seeded (`make fuzz` runs the same for minutes)."""

import random

from fuzz_prepare import INPUT_KINDS, OUTPUT_KINDS, PATH_CASES, fuzz, path_case


def test_prepare_never_fails_on_random_rows_and_accounts_for_every_one():
    totals = fuzz(seed=0, cases=40)
    assert totals["cases"] == 40
    assert totals["rows"] == totals["kept"] + sum(n for k, n in totals.items()
                                                  if k not in ("cases", "rows", "kept") and not k.startswith(PATH_CASES))
    assert totals[PATH_CASES + "written"] + totals[PATH_CASES + "refused"] == 10
    # The generator reaches the interesting reasons, not only unparseable lines.
    assert {"non-string content", "text is not valid Unicode (a lone surrogate)", "missing or unknown role",
            "non-UTF-8 text", "unparseable line", "no known chat shape"} <= set(totals)


def test_odd_paths_never_hang_nor_lose_a_byte(tmp_path):
    """Inputs that are devices, FIFOs or links to them (which hung), outputs that are the input,
    a device, a FIFO or a folder (which lost data): each pairing, seeded, is written safely or
    refused in one line with nothing changed."""
    r = random.Random(0)
    cases = [path_case(r, tmp_path / "case") for _ in range(80)]
    assert {outcome for outcome, _, _ in cases} == {"written", "refused"}
    assert {kind for _, kind, _ in cases} == set(INPUT_KINDS)  # every kind was tried
    assert {kind for _, _, kind in cases} == set(OUTPUT_KINDS)
