"""Statistic sets per period: what CloudWatch gets (SampleCount, Sum, Minimum, Maximum), built in O(1).

The request path adds values; a period that has ended is moved to ``closed`` the next time a value
arrives or the publisher asks, so no timer runs on the request path.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class StatisticSet:
    """SampleCount, Sum, Minimum and Maximum of the values seen in one period."""

    count: int = 0
    total: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        if value < self.minimum:
            self.minimum = value
        if value > self.maximum:
            self.maximum = value


@dataclass
class Period:
    """The statistic sets of one period; ``start`` is the period's start in Unix seconds."""

    start: int
    sets: dict[str, StatisticSet]


class PeriodStatistics:
    """Statistic sets keyed by CloudWatch metric name, one ``Period`` per ``period_s`` of wall-clock time."""

    def __init__(self, period_s: int, wallclock: Callable[[], float] = time.time) -> None:
        self.period_s = period_s
        self._wallclock = wallclock
        self.closed: deque[Period] = deque()
        self._current = self._new_period(wallclock())

    def _new_period(self, now: float) -> Period:
        start = int(now // self.period_s) * self.period_s
        self._end = start + self.period_s
        return Period(start, {})

    def _roll(self, now: float) -> None:
        if self._current.sets:
            self.closed.append(self._current)
        self._current = self._new_period(now)

    def current(self) -> dict[str, StatisticSet]:
        """The sets of the period now running, rolling over first if it has ended."""
        now = self._wallclock()
        if now >= self._end:
            self._roll(now)
        return self._current.sets

    def add(self, sets: dict[str, StatisticSet], name: str, value: float) -> None:
        statistic = sets.get(name)
        if statistic is None:
            statistic = sets[name] = StatisticSet()
        statistic.add(value)

    def take_closed(self) -> list[Period]:
        """Ended periods, oldest first, handed over to the publisher."""
        self.current()
        taken = list(self.closed)
        self.closed.clear()
        return taken

    def take_all(self) -> list[Period]:
        """Every period including the partial one now running: for the flush at shutdown."""
        taken = self.take_closed()
        if self._current.sets:
            taken.append(self._current)
            self._current = Period(self._current.start, {})
        return taken
