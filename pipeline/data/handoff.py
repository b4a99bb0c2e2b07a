"""How batches get from DataLoader workers to the training process.

By default torch sends every batch as its own message through a fresh shared-memory segment:
the worker creates it, and the training process receives its file descriptor over a new
socket connection and maps it. With the DataLoader's own per-message work that is ~0.5 ms of
CPU per batch (``benchmarks/loader.py``): for a batch of 256 28x28 images, ~2 us per image,
a seventh of decoding one, and 8x that per image at batch 32.

Here each worker owns a few slots in one shared segment, which it sends once. It writes
consecutive batches into a slot until about ``MESSAGE_BYTES`` are there, then sends one
message that names the slot and describes the batches. The training process copies each batch
out (so the caller owns it; a copy costs ~0.3 ms per MB, into memory the allocator reuses)
and counts the slot as free in a counter both sides share. A batch over ``SLOT_MAX_BYTES``
travels the default way: its own message and segment, as the fixed cost is small next to such
a batch and this saves a copy.

Torch has no hook on the training side, so the reading half runs in ``EpochIterator``; other
users of the DataLoader get the default path.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

# A message costs the training process ~0.5 ms of CPU (the DataLoader's queues and threads,
# unpickling), which at 1 MB per message was a quarter of its share of the loader's work at
# 64x64: 4 MB per message took the loader from 0.79-0.82x to 0.85-0.88x of the decode limit
# (benchmarks/loader.py, 2026-12-03). A worker's slots then hold 4 x (4 MB + a batch).
MESSAGE_BYTES = 4 << 20
# Above this, a batch travels in its own segment, so that the slots never hold more than
# about 4 x 2 x this per worker (the shared memory, /dev/shm, is small in containers). Below
# it, the slot's copy costs less than the new segment, its file descriptor passed over a new
# connection (a thread woken in the worker for each) and unmapped: at 128x128 (4 MB batches)
# the loader went from 0.86x to 0.92-0.95x of the decode limit when they came through slots.
SLOT_MAX_BYTES = 16 << 20
# Slots per worker. The DataLoader delivers messages in the order it asked for them, and the
# one it waits for next was asked of a worker with nothing older undelivered: that worker
# always has a free slot, so waiting for one never deadlocks.
SLOTS = 4
_FREE_ALL = 1 << 62  # a released count that frees every slot: the reader has gone


def shared_uint8(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor in shared memory (as torch's default_collate makes in a
    worker), so that sending it copies nothing more."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class SlotWriter:
    """One worker's side: where to write each batch's pixels, and the messages to send."""

    def __init__(self, released: torch.Tensor, worker: int) -> None:
        self.released, self.worker = released.numpy(), worker
        self.ring: torch.Tensor | None = None  # (SLOTS, capacity) bytes
        self.ring_sent = False
        self.sent = 0  # messages sent; the next one uses slot sent % SLOTS
        self.used: int | None = None  # bytes written into the current slot (None: no slot taken)
        self.parent = os.getppid()

    def batch(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, Any]]:
        """A tensor of ``shape`` to fill, and the batch fields that stand for it once filled."""
        size = math.prod(shape)
        if size <= SLOT_MAX_BYTES:
            if self.ring is None or (self.used is None and self.ring.shape[1] < MESSAGE_BYTES + size):
                self.ring, self.ring_sent = shared_uint8((SLOTS, MESSAGE_BYTES + size)), False
            if self.used is None:
                self._wait_for_slot()
                self.used = 0
            if self.used + size <= self.ring.shape[1]:
                offset, self.used = self.used, self.used + size
                pixels = self.ring[self.sent % SLOTS, offset : offset + size].view(shape)
                return pixels, {"offset": offset, "shape": shape}
        tensor = shared_uint8(shape)
        return tensor, {"image": tensor}

    def messages(self, batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Group ``batches`` (made with ``batch``) into messages of about MESSAGE_BYTES."""
        pending: list[dict[str, Any]] = []
        for batch in batches:
            pending.append(batch)
            # The first message holds one batch: training starts as soon as that is ready.
            if self.used is None or self.used >= MESSAGE_BYTES or self.sent == 0:
                yield self._message(pending)
                pending = []
        if pending:
            yield self._message(pending)

    def _message(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        message: dict[str, Any] = {"worker": self.worker, "batches": batches}
        if self.used is not None:  # some of the batches are in the current slot
            message["slot"] = self.sent % SLOTS
            if not self.ring_sent:
                message["ring"], self.ring_sent = self.ring, True
            self.sent, self.used = self.sent + 1, None
        return message

    def _wait_for_slot(self) -> None:
        while self.sent - int(self.released[self.worker]) >= SLOTS:
            time.sleep(0.0002)
            if os.getppid() != self.parent:  # the training process died: stop, as torch's workers do
                raise SystemExit(0)


class SlotReader:
    """The training process's side, for one DataLoader iterator: turns messages back into
    batches whose tensors the caller owns (pinned when a GPU will receive them), and frees
    the slots."""

    def __init__(self, num_workers: int) -> None:
        self.released = torch.zeros(max(1, num_workers), dtype=torch.int64).share_memory_()
        self._released = self.released.numpy()
        self.rings: dict[int, torch.Tensor] = {}
        self.pin = torch.cuda.is_available()

    def take(self, message: dict[str, Any]) -> list[dict[str, Any]]:
        """The batches in one item from the DataLoader: a message, or a plain batch."""
        if "batches" not in message:
            return [self._own(message)]
        worker = message["worker"]
        if "ring" in message:
            self.rings[worker] = message["ring"]
        slot = self.rings[worker][message["slot"]] if "slot" in message else None
        batches = []
        for batch in message["batches"]:
            if "offset" in batch:
                offset, shape = batch.pop("offset"), batch.pop("shape")
                source = slot[offset : offset + math.prod(shape)].view(shape)
                batch["image"] = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin).copy_(source)
                batches.append(batch)
            else:
                batches.append(self._own(batch))
        if slot is not None:
            self._released[worker] += 1
        return batches

    def _own(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.pin:
            batch["image"] = batch["image"].pin_memory()
        return batch

    def abandon(self) -> None:
        """The iterator is being dropped: let any waiting worker finish (nothing reads its slots)."""
        self._released[:] = _FREE_ALL
