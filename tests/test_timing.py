"""The phase stopwatch of a run (alignment.timing), on a scripted clock so that every figure is known."""
import pytest

from alignment.timing import PhaseTimes


def scripted_clock(*readings):
    readings = iter(readings)
    return lambda: next(readings)


def test_laps_are_net_of_validation_and_curve_booked_inside_them():
    # Clock readings in call order: start 0; data ends at 10; fit runs 10..100 with a validation 20..26 and a
    # curve 40..52 inside it; saving ends at 103.
    phases = PhaseTimes(clock=scripted_clock(0.0, 10.0, 20.0, 26.0, 40.0, 52.0, 100.0, 103.0))
    phases.lap("data")
    phases.on_validation_start(None, None)
    phases.on_validation_end(None, None)
    with phases.phase("curve"):
        pass
    phases.lap("training")
    phases.lap("saving")
    assert phases.seconds == {"data": 10.0, "validation": 6.0, "curve": 12.0, "training": 72.0, "saving": 3.0}
    assert phases.metrics() == {"time/data": 10.0, "time/training": 72.0, "time/validation": 6.0,
                                "time/curve": 12.0, "time/saving": 3.0, "time/total": 103.0}
    assert phases.summary() == ("Time per phase: data 10 s (10%), training 72 s (70%), validation 6 s (6%), "
                                "curve 12 s (12%), saving 3 s (3%); total 103 s")


def test_a_lap_after_the_hooks_only_subtracts_what_was_booked_since_the_previous_lap():
    phases = PhaseTimes(clock=scripted_clock(0.0, 1.0, 3.0, 5.0, 9.0))
    phases.on_validation_start(None, None)  # 1..3 inside the first lap
    phases.on_validation_end(None, None)
    phases.lap("training")  # 0..5 minus 2
    phases.lap("evaluation")  # 5..9, nothing booked meanwhile
    assert phases.seconds == pytest.approx({"validation": 2.0, "training": 3.0, "evaluation": 4.0})
