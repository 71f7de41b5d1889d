"""The progress reporter: the time-left estimate on simulated pipelines (warm-up, start offsets, noise), and
the renderings (a bar on a terminal, log lines otherwise, a caller's function)."""

import io
import logging
import random
import sys

import pytest

from wq_ops.report.progress import (
    BarReporter,
    BlockProgress,
    CallbackReporter,
    LogReporter,
    TimeLeft,
    reporter_for,
)


def simulate(rng: random.Random, *, actors: int, blocks_per_actor: int, mode: str) -> list[tuple[float, int]]:
    """(staged_at, rank) of every block of a simulated job. Each block takes ~1 s (+-15%); an actor's first
    block also carries a warm-up of 3 s (the first ETA's trap: 4x a block); `chained` actors run one after
    another; `pipelined` ones start 0.2 s apart; `streamed` ones first spend 5 s on the calibration forward."""
    events, clock = [], 0.0
    for rank in range(actors):
        t = clock if mode == "chained" else 0.2 * rank if mode == "pipelined" else 5.0
        t += 3.0                                                  # warm-up, first load
        for _ in range(blocks_per_actor):
            t += rng.uniform(0.85, 1.15)
            events.append((t, rank))
        clock = t
    return sorted(events)


@pytest.mark.parametrize("mode,actors,per_actor", [("chained", 2, 16), ("chained", 4, 8), ("pipelined", 4, 8),
                                                   ("pipelined", 2, 20), ("streamed", 4, 10), ("chained", 1, 30)])
def test_eta_after_a_quarter_of_the_blocks_is_within_25_percent(mode, actors, per_actor):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    events = simulate(rng, actors=actors, blocks_per_actor=per_actor, mode=mode)
    end = events[-1][0]
    estimate = TimeLeft([per_actor] * actors, sequential=mode == "chained", started_at=0.0)
    quarter = -(-len(events) // 4)
    for k, (at, rank) in enumerate(events, 1):
        estimate.add(rank, at=at, resumed=False)
        if k >= quarter:
            true_left = end - at
            eta = estimate.eta(at)
            assert eta is not None
            # Within 25% of the time truly left (and within a block's time near the end, where 25% is nothing).
            assert abs(eta - true_left) <= max(0.25 * true_left, 1.2), \
                f"seed={seed}: after {k}/{len(events)} blocks ETA {eta:.1f} s, truly {true_left:.1f} s"
    assert estimate.eta(end) == 0.0


def test_the_naive_rate_misses_by_far_more_which_is_why_the_estimate_exists():
    """Blocks done / elapsed, the first ETA wq printed, on the chained case: off by more than 25% at the
    quarter (this makes the test above meaningful: its bound is not loose enough to pass anything)."""
    rng = random.Random(0)
    events = simulate(rng, actors=2, blocks_per_actor=4, mode="chained")
    at, _ = events[1]
    naive = (len(events) - 2) * at / 2
    assert abs(naive - (events[-1][0] - at)) > 0.25 * (events[-1][0] - at)


def test_resumed_blocks_count_as_done_but_do_not_set_the_pace():
    estimate = TimeLeft([4], sequential=True, started_at=0.0)
    estimate.add(0, at=0.1, resumed=True)
    estimate.add(0, at=0.2, resumed=True)
    assert estimate.eta(0.2) is None                      # nothing computed yet: no pace
    estimate.add(0, at=10.2, resumed=False)
    estimate.add(0, at=12.2, resumed=False)
    assert estimate.eta(12.2) == 0.0


def test_a_later_actor_of_a_chained_job_counts_from_when_the_previous_one_finished():
    estimate = TimeLeft([2, 2], sequential=True, started_at=0.0)
    for at in (4.0, 5.0):
        estimate.add(0, at=at, resumed=False)
    # Actor 0's first block took 3 s beyond its pace of 1 s (warm-up, first load), so actor 1's will too. It
    # began at 5.0; at 5.5: 3 + 2 x 1 - 0.5 s left.
    assert estimate.overhead() == pytest.approx(3.0)
    assert estimate.eta(5.5) == pytest.approx(4.5)


def progress(**changes) -> BlockProgress:
    fields = dict(block=3, rank=1, done=4, total=10, actor_done=2, actor_total=5, resumed=False, block_seconds=1.5,
                  mean_error=1e-3, elapsed_s=12.0, tokens_per_s=4096.0, eta_s=75.0, device_peak_bytes=3 << 30)
    fields.update(changes)
    return BlockProgress(**fields)


def test_the_log_line_carries_every_field_as_key_value():
    line = progress().log_line()
    assert line == ("block=3 done=4/10 actor=1 actor_done=2/5 seconds=1.50 mean_error=1.000e-03 elapsed_s=12.0 "
                    "tokens_per_s=4096 eta_s=75.0 gpu_peak_gib=3.00")
    assert progress(eta_s=None, device_peak_bytes=None).log_line().endswith("eta_s=?")
    assert progress(resumed=True).log_line().endswith("resumed (staged by an earlier run of this job)")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_bar_and_anything_else_log_lines():
    assert isinstance(reporter_for(Terminal()), BarReporter)
    assert isinstance(reporter_for(io.StringIO()), LogReporter)


def test_the_bar_shows_blocks_eta_tokens_and_gpu_memory_and_logs_go_above_it(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    console = logging.StreamHandler(sys.stderr)           # what logging.basicConfig sets up in jobs.quantize
    logging.getLogger().addHandler(console)
    try:
        bar = BarReporter(screen)
        bar.start(10)
        bar.update(progress())
        logging.getLogger("wq_ops.cluster.driver").warning("an actor was lost")
        bar.close()
    finally:
        logging.getLogger().removeHandler(console)
    text = screen.getvalue()
    assert "1/10 blocks" in text and "ETA 01:15" in text and "4.1k tok/s" in text and "GPU 3.0 GiB" in text
    assert "an actor was lost" in text                     # the redirect wrote it through tqdm, above the bar


def test_the_callback_gets_every_block(caplog):
    seen = []
    reporter = CallbackReporter(seen.append)
    reporter.start(10)
    with caplog.at_level(logging.INFO):
        reporter.update(progress())
    reporter.close()
    assert seen == [progress()]
    assert "block=3 done=4/10" in caplog.text
