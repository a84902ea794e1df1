"""The progress line of `ner-stream tag`, step by step on a made-up clock."""

from ner_stream.progress import TagProgress, format_duration


def test_a_line_is_shown_at_most_once_per_interval():
    p = TagProgress(total_bytes=1000, started=100.0, interval_s=0.5)
    assert p.advance(10, 200, 100, now=101.0) == "10 documents  200 tokens/s  10%  ETA 9s"
    assert p.advance(10, 200, 200, now=101.2) is None  # too soon: counted, not shown
    assert p.advance(20, 600, 500, now=102.0) == "40 documents  500 tokens/s  50%  ETA 2s"


def test_the_eta_assumes_the_rest_goes_at_the_average_rate_so_far():
    p = TagProgress(total_bytes=4_000_000, started=0.0)
    assert p.advance(1000, 50_000, 1_000_000, now=600.0).endswith("25%  ETA 30m00s")


def test_without_a_known_size_there_is_no_percentage_or_eta():
    p = TagProgress(total_bytes=None, started=0.0)
    assert p.advance(5, 100, 0, now=2.0) == "5 documents  50 tokens/s"


def test_at_the_end_the_line_shows_all_and_no_eta():
    p = TagProgress(total_bytes=10, started=0.0)
    p.advance(3, 30, 10, now=1.0)
    assert p.line(now=3.0) == "3 documents  10 tokens/s  100%"


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.9, 60, 185, 3599, 3600, 7620)] == [
        "0s", "59s", "1m00s", "3m05s", "59m59s", "1h00m", "2h07m",
    ]  # fmt: skip
