"""Start-up progress (loading weights, compiling buckets) shown as tqdm bars, one per phase."""

from tqdm.auto import tqdm


class TqdmProgress:
    """A `progress(phase, done, total)` callback drawing one bar per phase; bars close when a phase completes."""

    def __init__(self, disable: bool = False):
        self.disable = disable
        self._bars: dict[str, tqdm] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        bar = self._bars.get(phase)
        if bar is None:
            bar = self._bars[phase] = tqdm(total=total, desc=phase, disable=self.disable or total <= 1, leave=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
