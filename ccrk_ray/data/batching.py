"""Cut one worker's row stream, which runs over several epochs, back into per-epoch batches.

The training data of a worker is one Ray dataset for many epochs (the data actors stay alive);
its blocks arrive in plan order, each row tagged with its epoch (``_epoch``). ``EpochBatcher``
hands out full batches of one epoch at a time: the short tail of an epoch is never mixed with the
next epoch's rows, and rows of an epoch that the caller has left (all ranks stop an epoch together,
so a rank may leave rows behind) are passed over. Pure torch, no Ray.
"""

from __future__ import annotations

import threading
from typing import Any, Iterable, Iterator, Mapping

import torch

from ccrk_ray.data.plan import EPOCH_COLUMN

Batch = dict[str, torch.Tensor]


class EpochBatcher:
    """Full ``batch_size``-row batches of the epoch asked for, from blocks of rows in stream order."""

    def __init__(self, blocks: Iterable[Mapping[str, torch.Tensor]], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._blocks: Iterator[Mapping[str, torch.Tensor]] = iter(blocks)
        self._parts: list[Batch] = []       # rows of the current epoch not yet handed out
        self._rows = 0                      # rows in _parts
        self._epoch: int | None = None      # epoch of the rows in _parts
        self._ahead: list[Batch] = []       # runs of a later epoch, already split off a block
        self.dropped = 0                    # rows passed over (short epoch tails, rows left by the caller)

    def next(self, epoch: int) -> Batch | None:
        """The next full batch of ``epoch``, or None when the stream has no full batch of it left."""
        if self._epoch is not None and self._epoch != epoch:
            self._drop_parts()
        while self._rows < self.batch_size:
            run = self._next_run()
            if run is None:
                self._drop_parts()
                return None
            run_epoch = int(run[EPOCH_COLUMN][0])
            if run_epoch < epoch:           # left behind by the caller: skip
                self.dropped += len(run[EPOCH_COLUMN])
                continue
            if run_epoch > epoch:           # the epoch is over; keep the run for later
                self._ahead.insert(0, run)
                self._drop_parts()
                return None
            self._parts.append(run)
            self._rows += len(run[EPOCH_COLUMN])
            self._epoch = epoch
        return self._take(self.batch_size)

    def _next_run(self) -> Batch | None:
        """The next rows of one epoch (a block is split where its epoch changes)."""
        if self._ahead:
            return self._ahead.pop(0)
        for block in self._blocks:
            epochs = block[EPOCH_COLUMN]
            if len(epochs) == 0:
                continue
            cuts = (torch.nonzero(epochs[1:] != epochs[:-1]).flatten() + 1).tolist()
            if not cuts:
                return dict(block)
            bounds = [0, *cuts, len(epochs)]
            runs = [{k: v[a:b] for k, v in block.items()} for a, b in zip(bounds[:-1], bounds[1:])]
            self._ahead.extend(runs[1:])
            return runs[0]
        return None

    def _take(self, n: int) -> Batch:
        """The first n buffered rows: a view when they lie in one block, else only they are copied."""
        pieces, need = [], n
        while need:
            part = self._parts[0]
            rows = len(part[EPOCH_COLUMN])
            if rows <= need:
                pieces.append(self._parts.pop(0))
                need -= rows
            else:
                pieces.append({k: v[:need] for k, v in part.items()})
                self._parts[0] = {k: v[need:] for k, v in part.items()}
                need = 0
        self._rows -= n
        return pieces[0] if len(pieces) == 1 else {k: torch.cat([p[k] for p in pieces]) for k in pieces[0]}

    def _drop_parts(self) -> None:
        self.dropped += self._rows
        self._parts, self._rows, self._epoch = [], 0, None


class Started(Iterator):
    """``items`` with its first item requested now, in a background thread, so that whatever the
    caller does next (building the model, loading a checkpoint) overlaps the stream's start-up (a
    Ray Data stream starts its data actors, seconds of imports, on the first request).

    The first ``next`` waits for that item (or re-raises what fetching it raised); later ones read
    ``items`` directly, in the caller's thread."""

    def __init__(self, items: Iterable[Any]):
        self._items = iter(items)
        self._first: tuple = ()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = threading.Thread(target=self._fetch, name="data-start",
                                                                 daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = (next(self._items),)
        except StopIteration:
            pass
        except BaseException as exc:  # re-raised in the caller's thread
            self._error = exc

    def __next__(self) -> Any:
        if self._thread is None:
            return next(self._items)
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise self._error
        if not self._first:
            raise StopIteration
        first, self._first = self._first[0], ()
        return first
